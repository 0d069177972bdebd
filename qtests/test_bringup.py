"""Bring-up of virtio-net over vhost-user, seen from all three parties.

The qtest driver (guest side), QEMU (``x-query-virtio-status`` of the virtio-net device) and
the backend process (its monitor and journal) must agree on:

* feature negotiation: what the device offers the driver, what the driver accepts, what QEMU
  forwards to the backend with SET_FEATURES, and which vhost-user protocol features were
  negotiated (also when the backend withholds CONFIGURE_MEM_SLOTS, LOG_SHMFD/LOG_ALL or
  ACCESS_PLATFORM);
* the config space the driver reads (QEMU emulates it for vhost-user-net: the MAC is QEMU's
  ``mac=`` property, the MTU its ``host_mtu=``, which it also sends with NET_SET_MTU);
* ring start: per ring SET_VRING_NUM, BASE, ADDR, KICK, CALL (QEMU 10's order), then
  ``vq.start``, with the ring addresses the driver programmed;
* multiqueue: two pairs, four rings, traffic on both.

QEMU facts these tests pin down (QEMU 10.0):

* ``host-features`` includes bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) but a modern driver never
  sees it: bit 30 is a legacy-only bit (BAD_FEATURE) that virtio-pci masks.
* QEMU forwards only the bits its vhost-user feature list knows: MAC, STATUS and the CTRL_*
  bits are emulated by QEMU and never reach the backend; ring/datapath bits do.
* With MQ every pair's rings are started at DRIVER_OK; pairs beyond the first stay disabled
  (SET_VRING_ENABLE 0) until VQ_PAIRS_SET, and MQ changes reach the backend only as
  SET_VRING_ENABLE.
* The backend's UDP wire has no RSS: every frame from the wire is received on pair 0; the
  monitor's ``inject-packet`` can target pair 1 (it falls back to pair 0 while pair 1 is
  disabled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from backends.virtio.features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_ORDER_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET,
    VIRTIO_F_SR_IOV,
    VIRTIO_F_VERSION_1,
    bit,
)
from backends.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    net_feature_names,
)
from qtests.qos.frames import mac_bytes, make_frame
from qtests.qos.qmp import QmpError
from qtests.qos.testbed import GUEST_MAC, Testbed
from qtests.qos.virtio_net import VirtioNetDriver
from qtests.qos.waiting import poll_until

F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES (legacy BAD_FEATURE for virtio)
F_LOG_ALL = 26  # VHOST_F_LOG_ALL
NET_F_GSO = 6
HOST_MTU = 9000

#: QEMU's names in x-query-virtio-status feature lists -> bit numbers.
QEMU_FEATURE_BITS: dict[str, int] = {
    "VHOST_USER_F_PROTOCOL_FEATURES": F_PROTOCOL_FEATURES,
    "VHOST_F_LOG_ALL": F_LOG_ALL,
    "VIRTIO_F_NOTIFY_ON_EMPTY": VIRTIO_F_NOTIFY_ON_EMPTY,
    "VIRTIO_F_ANY_LAYOUT": VIRTIO_F_ANY_LAYOUT,
    "VIRTIO_RING_F_INDIRECT_DESC": VIRTIO_F_INDIRECT_DESC,
    "VIRTIO_RING_F_EVENT_IDX": VIRTIO_F_EVENT_IDX,
    "VIRTIO_F_VERSION_1": VIRTIO_F_VERSION_1,
    "VIRTIO_F_IOMMU_PLATFORM": VIRTIO_F_ACCESS_PLATFORM,
    "VIRTIO_F_RING_PACKED": VIRTIO_F_RING_PACKED,
    "VIRTIO_F_IN_ORDER": VIRTIO_F_IN_ORDER,
    "VIRTIO_F_ORDER_PLATFORM": VIRTIO_F_ORDER_PLATFORM,
    "VIRTIO_F_SR_IOV": VIRTIO_F_SR_IOV,
    "VIRTIO_F_NOTIFICATION_DATA": VIRTIO_F_NOTIFICATION_DATA,
    "VIRTIO_F_RING_RESET": VIRTIO_F_RING_RESET,
    "VIRTIO_NET_F_CSUM": VIRTIO_NET_F_CSUM,
    "VIRTIO_NET_F_GUEST_CSUM": VIRTIO_NET_F_GUEST_CSUM,
    "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS": VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    "VIRTIO_NET_F_MTU": VIRTIO_NET_F_MTU,
    "VIRTIO_NET_F_MAC": VIRTIO_NET_F_MAC,
    "VIRTIO_NET_F_GSO": NET_F_GSO,
    "VIRTIO_NET_F_GUEST_TSO4": VIRTIO_NET_F_GUEST_TSO4,
    "VIRTIO_NET_F_GUEST_TSO6": VIRTIO_NET_F_GUEST_TSO6,
    "VIRTIO_NET_F_GUEST_ECN": VIRTIO_NET_F_GUEST_ECN,
    "VIRTIO_NET_F_GUEST_UFO": VIRTIO_NET_F_GUEST_UFO,
    "VIRTIO_NET_F_HOST_TSO4": VIRTIO_NET_F_HOST_TSO4,
    "VIRTIO_NET_F_HOST_TSO6": VIRTIO_NET_F_HOST_TSO6,
    "VIRTIO_NET_F_HOST_ECN": VIRTIO_NET_F_HOST_ECN,
    "VIRTIO_NET_F_HOST_UFO": VIRTIO_NET_F_HOST_UFO,
    "VIRTIO_NET_F_MRG_RXBUF": VIRTIO_NET_F_MRG_RXBUF,
    "VIRTIO_NET_F_STATUS": VIRTIO_NET_F_STATUS,
    "VIRTIO_NET_F_CTRL_VQ": VIRTIO_NET_F_CTRL_VQ,
    "VIRTIO_NET_F_CTRL_RX": VIRTIO_NET_F_CTRL_RX,
    "VIRTIO_NET_F_CTRL_VLAN": VIRTIO_NET_F_CTRL_VLAN,
    "VIRTIO_NET_F_CTRL_RX_EXTRA": VIRTIO_NET_F_CTRL_RX_EXTRA,
    "VIRTIO_NET_F_GUEST_ANNOUNCE": VIRTIO_NET_F_GUEST_ANNOUNCE,
    "VIRTIO_NET_F_MQ": VIRTIO_NET_F_MQ,
    "VIRTIO_NET_F_CTRL_MAC_ADDR": VIRTIO_NET_F_CTRL_MAC_ADDR,
}

#: QEMU's vhost-user protocol feature names (include/hw/virtio/vhost-user.h) -> bit numbers.
QEMU_PROTOCOL_BITS: dict[str, int] = {
    f"VHOST_USER_PROTOCOL_F_{name}": n
    for n, name in enumerate(
        "MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ CROSS_ENDIAN CRYPTO_SESSION PAGEFAULT "
        "CONFIG BACKEND_SEND_FD HOST_NOTIFIER INFLIGHT_SHMFD RESET_DEVICE INBAND_NOTIFICATIONS "
        "CONFIGURE_MEM_SLOTS STATUS XEN_MMAP SHARED_OBJECT DEVICE_STATE".split()
    )
}
PF = QEMU_PROTOCOL_BITS

#: What QEMU 10's virtio-net negotiates with a backend offering everything it implements
#: (the backend also offers CONFIG, which QEMU's virtio-net strips).
BASELINE_PROTOCOL = sum(
    bit(PF[f"VHOST_USER_PROTOCOL_F_{n}"])
    for n in (
        "MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ RESET_DEVICE CONFIGURE_MEM_SLOTS STATUS"
    ).split()
)

#: Bits the backend's datapath depends on: negotiated by the driver <=> acked to the backend.
DATAPATH_BITS = (
    VIRTIO_F_VERSION_1,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_MQ,
)
#: Bits QEMU emulates itself for vhost-user-net: never forwarded to the backend.
QEMU_ONLY_BITS = (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ)

RING_SETUP = [
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
]


# ---------------------------------------------------------------------------- helpers
def _decode(names: list[str], table: dict[str, int], what: str) -> int:
    bits = 0
    for entry in names:
        name = entry.split(":", 1)[0].strip()
        if name not in table:
            raise AssertionError(f"QEMU reports {what} {name!r} that this test cannot decode")
        bits |= bit(table[name])
    return bits


def decode_features(info: dict[str, Any]) -> int:
    """A VirtioDeviceFeatures value of x-query-virtio-status as a bit mask."""
    names = list(info.get("transports", [])) + list(info.get("dev-features", []))
    return _decode(names, QEMU_FEATURE_BITS, "feature") | int(info.get("unknown-dev-features", 0))


def decode_protocol(info: dict[str, Any]) -> int:
    bits = _decode(list(info.get("protocols", [])), QEMU_PROTOCOL_BITS, "protocol feature")
    return bits | int(info.get("unknown-protocols", 0))


def virtio_status(tb: Testbed) -> dict[str, Any]:
    return dict(tb.qmp.command("x-query-virtio-status", path=tb.qom_path))


def has(features: int, n: int) -> bool:
    return bool(features >> n & 1)


def describe(features: int) -> str:
    return f"0x{features:x} {net_feature_names(features)}"


@dataclass
class RingSetup:
    """What the backend journal says one ring was told during a start."""

    requests: list[str] = field(default_factory=list)
    fds: dict[str, int] = field(default_factory=dict)
    num: int | None = None
    base: int | None = None
    addr: tuple[int, int, int] | None = None
    started: int = 0  # vq.start entries


def ring_setups(entries: list[dict[str, Any]]) -> dict[int, RingSetup]:
    """Per ring, the SET_VRING_* requests of a journal slice, in order.

    NUM/BASE/ADDR are followed by a ``vq.num``/``vq.set_state``/``vq.address`` entry naming
    the ring; KICK and CALL carry no index in the journal and belong to the ring the
    preceding entries named (any other request ends that run: e.g. the CALL/ERR QEMU sends
    at init are not part of a start).
    """
    rings: dict[int, RingSetup] = {}
    current: int | None = None
    by_entry = {
        "vq.num": "SET_VRING_NUM",
        "vq.set_state": "SET_VRING_BASE",
        "vq.address": "SET_VRING_ADDR",
    }
    for e in entries:
        kind = e["kind"]
        if kind == "vhost.msg":
            req = e["request"]
            if req in ("SET_VRING_KICK", "SET_VRING_CALL"):
                if current is not None:
                    rings[current].requests.append(req)
                    rings[current].fds[req] = e["fds"]
            elif req not in by_entry.values():
                current = None
        elif kind in by_entry:
            current = e["vq"]
            r = rings.setdefault(current, RingSetup())
            r.requests.append(by_entry[kind])
            if kind == "vq.num":
                r.num = e["num"]
            elif kind == "vq.set_state":
                r.base = e["last_avail_idx"]
            else:
                r.addr = (e["desc"], e["avail"], e["used"])
        elif kind == "vq.start":
            rings.setdefault(e["vq"], RingSetup()).started += 1
    return rings


def check_rings_started(tb: Testbed, net: VirtioNetDriver, since: int | None = None) -> None:
    """Every ring of ``net`` was set up NUM, BASE, ADDR, KICK, CALL with the driver's size and
    addresses, started once, and the backend reports those addresses now."""
    setups = ring_setups(tb.backend.journal(since=since))
    queues = [q for pair in zip(net.rxq, net.txq, strict=True) for q in pair]
    assert sorted(setups) == [q.index for q in queues], f"rings set up: {sorted(setups)}"
    vrings = {v["index"]: v for v in tb.backend.vrings()}
    for q in queues:
        s = setups[q.index]
        assert s.requests == RING_SETUP, f"{q.name}: ring set up with {s.requests}"
        assert s.fds == {"SET_VRING_KICK": 1, "SET_VRING_CALL": 1}, f"{q.name}: fds {s.fds}"
        assert s.num == q.size and s.base == 0, f"{q.name}: num {s.num}, base {s.base}"
        assert s.addr == (q.desc, q.avail, q.used), f"{q.name}: SET_VRING_ADDR {s.addr}"
        assert s.started == 1, f"{q.name}: vq.start {s.started} times"
        v = vrings[q.index]
        got = (v["num"], v["desc"], v["avail"], v["used"])
        assert got == (q.size, q.desc, q.avail, q.used), f"{q.name}: backend reports {got}"
        assert v["started"], f"{q.name}: backend ring not started"


def tx_rx_once(tb: Testbed, net: VirtioNetDriver, seq: int, pair: int = 0) -> None:
    """One frame out on ``pair`` and one in from the wire, both byte-exact."""
    out = make_frame(seq, 200)
    net.send(out, pair)
    assert tb.peer.recv(timeout=2) == out, f"TX frame {seq} on pair {pair} changed on the wire"
    inbound = make_frame(seq + 1, 300)
    tb.peer.send(inbound)
    assert net.recv(0).data == inbound, f"RX frame {seq + 1} changed"


# ---------------------------------------------------------------------------- tests
@pytest.mark.qemu
def test_features_agree_across_driver_qemu_and_backend(
    make_testbed: Callable[..., Testbed],
) -> None:
    tb = make_testbed(net_props={"props": {"host_mtu": HOST_MTU}})
    tb.start(event_idx=True, indirect=True)
    net = tb.net
    drv = net.features
    offered_to_driver = net.dev.device_features()
    st = virtio_status(tb)
    host = decode_features(st["host-features"])
    guest = decode_features(st["guest-features"])
    vhost = st["vhost-dev"]
    qemu_got = decode_features(vhost["features"])  # GET_FEATURES as QEMU saw it
    qemu_acked = decode_features(vhost["acked-features"])  # SET_FEATURES as QEMU sent it
    feats = tb.backend.cmd("query-features")
    b_offered = feats["offered"]["bits"]
    b_driver = feats["driver"]["bits"]

    # driver <-> QEMU
    assert net.dev.driver_features() == drv
    assert guest == drv, f"QEMU guest-features {describe(guest)} != driver {describe(drv)}"
    assert offered_to_driver == host & ~bit(F_PROTOCOL_FEATURES), (
        f"driver sees {describe(offered_to_driver)}, QEMU host-features {describe(host)}"
    )
    assert has(host, F_PROTOCOL_FEATURES) and not has(offered_to_driver, F_PROTOCOL_FEATURES)
    assert drv & ~offered_to_driver == 0
    for n in (
        *DATAPATH_BITS[:-1],
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ):  # MQ: not with one queue pair
        assert has(drv, n), f"driver did not negotiate {net_feature_names(bit(n))}"
    assert not has(drv, VIRTIO_NET_F_MQ)
    # QEMU <-> backend
    assert qemu_got == b_offered, (
        f"GET_FEATURES: QEMU saw {describe(qemu_got)}, backend offered {describe(b_offered)}"
    )
    assert qemu_acked == b_driver, (
        f"SET_FEATURES: QEMU sent {describe(qemu_acked)}, backend has {describe(b_driver)}"
    )
    assert feats["negotiated"]["bits"] == b_driver
    assert tb.backend.cmd("query-status")["connection"]["acked_features"]["bits"] == b_driver
    for n in (
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_F_VERSION_1,
    ):
        assert has(host, n) == has(b_offered, n), (
            f"{net_feature_names(bit(n))}: offer not passed on"
        )
    # driver <-> backend
    assert has(b_driver, F_PROTOCOL_FEATURES)
    assert b_driver & ~(drv | bit(F_PROTOCOL_FEATURES)) == 0, (
        f"backend acked {describe(b_driver)} beyond the driver's {describe(drv)}"
    )
    for n in DATAPATH_BITS:
        assert has(b_driver, n) == has(drv, n), (
            f"{net_feature_names(bit(n))} not forwarded as acked"
        )
    for n in QEMU_ONLY_BITS:
        assert not has(b_driver, n), f"QEMU forwarded its own {net_feature_names(bit(n))}"
    # vhost-user protocol features: both ends agree
    b_proto = tb.backend.cmd("query-status")["connection"]["protocol_features"]["bits"]
    assert decode_protocol(vhost["protocol-features"]) == b_proto == BASELINE_PROTOCOL
    tx_rx_once(tb, net, 1)

    # A reset and a new negotiation with fewer features reaches the backend as such.
    mark = tb.backend.mark()
    net.close()
    net2 = VirtioNetDriver.find(tb.bus, tb.alloc)
    drv2 = net2.init(mrg_rxbuf=False)
    b_driver2 = tb.backend.cmd("query-features")["driver"]["bits"]
    assert decode_features(virtio_status(tb)["guest-features"]) == drv2
    assert b_driver2 == bit(F_PROTOCOL_FEATURES) | bit(VIRTIO_F_VERSION_1) | bit(
        VIRTIO_NET_F_MTU
    ), describe(b_driver2)
    stops = tb.backend.journal(kinds=["vq.get_state"], since=mark)
    assert sorted(e["vq"] for e in stops) == [0, 1], "QEMU stopped the rings with GET_VRING_BASE"
    check_rings_started(tb, net2, since=mark)
    tx_rx_once(tb, net2, 3)
    frame = make_frame(5, 100)
    tb.peer.send(frame)
    rx = net2.recv()
    assert rx.data == frame and rx.hdr.num_buffers == 1 and rx.num_buffers == 1


@pytest.mark.qemu
def test_config_space_read_by_the_driver(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(net_props={"props": {"host_mtu": HOST_MTU}}).start()
    cfg = tb.net.config()
    assert cfg.mac == mac_bytes(GUEST_MAC), f"config mac {cfg.mac_str}, passed {GUEST_MAC}"
    assert cfg.link_up and cfg.status == 1  # LINK_UP, no ANNOUNCE pending
    assert cfg.max_virtqueue_pairs == 1
    assert cfg.mtu == HOST_MTU
    assert tb.net.has_feature(VIRTIO_NET_F_MTU)
    # QEMU told the backend the same MTU (NET_SET_MTU, protocol feature NET_MTU)
    mtus = [e["mtu"] for e in tb.backend.journal(kinds=["net.mtu"])]
    assert mtus == [HOST_MTU]
    # every field read at its natural width matches a byte-wise read
    raw = bytes(tb.net.dev.config_read(i, 1) for i in range(12))
    assert raw[:6] == cfg.mac
    assert int.from_bytes(raw[6:8], "little") == cfg.status
    assert int.from_bytes(raw[10:12], "little") == HOST_MTU
    tx_rx_once(tb, tb.net, 1)


@pytest.mark.qemu
def test_rings_start_with_the_addresses_the_driver_programmed(testbed: Testbed) -> None:
    tb = testbed
    check_rings_started(tb, tb.net)
    status = tb.backend.cmd("query-status")
    assert status["running"] and "DRIVER_OK" in status["status_names"]
    assert virtio_status(tb)["vhost-started"] is True
    tx_rx_once(tb, tb.net, 1)
    # The call eventfd reaches QEMU, which turns it into the queue's MSI-X message.
    tx = tb.net.txq[0]
    assert tb.backend.vring(1)["calls"] >= 1
    tx.wait_interrupt(2)


@pytest.mark.qemu
def test_multiqueue_two_pairs(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(queues=2).start()
    net = tb.net
    assert net.has_feature(VIRTIO_NET_F_MQ) and net.has_feature(VIRTIO_NET_F_CTRL_VQ)
    assert net.config().max_virtqueue_pairs == 2 == net.max_queue_pairs == net.active_pairs
    st = virtio_status(tb)
    assert st["vhost-dev"]["max-queues"] == 2
    assert st["num-vqs"] == 5  # 2 pairs + the control queue QEMU emulates
    feats = tb.backend.cmd("query-features")["driver"]["bits"]
    assert has(feats, VIRTIO_NET_F_MQ) and not has(feats, VIRTIO_NET_F_CTRL_VQ)
    check_rings_started(tb, net)
    starts = tb.backend.journal(kinds=["vq.start"])
    assert sorted(e["vq"] for e in starts) == [0, 1, 2, 3]
    assert all(v["enabled"] for v in tb.backend.vrings())

    # TX on both pairs reaches the wire, counted on the right ring.
    for pair in (0, 1):
        frame = make_frame(10 + pair, 150 + pair)
        net.send(frame, pair)
        assert tb.peer.recv(timeout=2) == frame, f"TX on pair {pair}"
    vr = {v["index"]: v for v in tb.backend.vrings()}
    assert (vr[1]["packets"], vr[3]["packets"]) == (1, 1)
    # RX from the wire lands on pair 0 (no RSS on the UDP wire) ...
    inbound = make_frame(20, 300)
    tb.peer.send(inbound)
    assert net.recv(0).data == inbound
    assert net.try_recv(1) is None
    # ... the monitor can deliver on pair 1.
    injected = make_frame(21, 400)
    tb.backend.cmd("inject-packet", data=injected.hex(), queue=1)
    rx = net.recv(1)
    assert rx.data == injected and rx.queue_pair == 1

    # VQ_PAIRS_SET 1: QEMU disables pair 1's rings (SET_VRING_ENABLE 0); injected frames for
    # pair 1 fall back to pair 0. Back to 2: pair 1 works again.
    def enabled() -> list[bool]:
        return [v["enabled"] for v in tb.backend.vrings()]

    net.set_queue_pairs(1)
    poll_until(lambda: enabled() == [True, True, False, False], 5, "pair 1 rings disabled")
    tb.backend.cmd("inject-packet", data=injected.hex(), queue=1)
    assert net.recv(0).data == injected
    net.set_queue_pairs(2)
    poll_until(lambda: all(enabled()), 5, "pair 1 rings enabled again")
    frame = make_frame(30, 500)
    net.send(frame, 1)
    assert tb.peer.recv(timeout=2) == frame
    tb.backend.cmd("inject-packet", data=frame.hex(), queue=1)
    assert net.recv(1).data == frame


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("flag", "protocol_withheld", "feature_withheld"),
    [
        ("--no-mem-slots", "CONFIGURE_MEM_SLOTS", None),
        ("--no-log", "LOG_SHMFD", F_LOG_ALL),
        ("--no-iommu", None, VIRTIO_F_ACCESS_PLATFORM),
    ],
    ids=["no-mem-slots", "no-log", "no-iommu"],
)
def test_withheld_features(
    make_testbed: Callable[..., Testbed],
    flag: str,
    protocol_withheld: str | None,
    feature_withheld: int | None,
) -> None:
    tb = make_testbed(backend_args=[flag]).start()
    vhost = virtio_status(tb)["vhost-dev"]
    conn = tb.backend.cmd("query-status")["connection"]
    b_proto = conn["protocol_features"]["bits"]
    expected = BASELINE_PROTOCOL
    if protocol_withheld is not None:
        expected &= ~bit(PF[f"VHOST_USER_PROTOCOL_F_{protocol_withheld}"])
    assert decode_protocol(vhost["protocol-features"]) == b_proto == expected, (
        f"QEMU {vhost['protocol-features']} backend {conn['protocol_features']['names']}"
    )
    b_offered = tb.backend.cmd("query-features")["offered"]["bits"]
    qemu_got = decode_features(vhost["features"])
    assert qemu_got == b_offered
    if feature_withheld is not None:
        assert not has(b_offered, feature_withheld), describe(b_offered)
    requests = {e["request"] for e in tb.backend.journal(kinds=["vhost.msg"])}
    if flag == "--no-mem-slots":
        # no CONFIGURE_MEM_SLOTS: QEMU sends the whole table instead of ADD_MEM_REG each
        assert "SET_MEM_TABLE" in requests and "ADD_MEM_REG" not in requests
        assert tb.backend.cmd("query-mem-table")["regions"]
    else:
        assert "ADD_MEM_REG" in requests and "SET_MEM_TABLE" not in requests
    if flag == "--no-log":
        # without a dirty log QEMU refuses to migrate (a migration blocker, not a failure)
        with pytest.raises(QmpError, match="LOG_SHMFD"):
            tb.qmp.command("migrate", uri="exec:cat > /dev/null")
    tx_rx_once(tb, tb.net, 1)
