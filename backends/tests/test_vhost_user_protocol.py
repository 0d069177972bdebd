"""The vhost-user protocol, end to end over a real unix socket.

The backend runs in-process (its event loop in a thread, inspected only through
``BackendThread.call``); the front-end in :mod:`qtests.qos.vhost_user_frontend` speaks to it the way
QEMU 10 does, with real memfds for guest RAM and real eventfds.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.vhost_user import messages as m
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.vhost_user.messages import Request as R
from backends.vhost_user.rarp import ETH_P_RARP
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED
from qtests.qos.backend_thread import BackendThread
from qtests.qos.guest_memory import PAGE, UADDR_BASE, SharedGuestMemory
from qtests.qos.processes import open_fd_count
from qtests.qos.vhost_user_frontend import (
    Frontend,
    FrontendError,
    IommuEntry,
    VhostUserRing,
    eventfd,
)
from qtests.qos.waiting import poll_until

HDR = bytes(12)  # virtio_net_hdr_v1, no offloads
MAC = bytes.fromhex("525400123456")
IOVA_OFFSET = 0x10_0000_0000
NO_LOG = ~(1 << m.VHOST_F_LOG_ALL)
NO_IOMMU = ~(1 << VIRTIO_F_ACCESS_PLATFORM)
NO_PACKED = ~(1 << VIRTIO_F_RING_PACKED)  # these rings are split


def frame(payload: bytes = b"ping" * 16, dst: bytes = b"\xff" * 6) -> bytes:
    return dst + MAC + b"\x08\x00" + payload


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def backend(tmp_path: Path) -> Iterator[BackendThread]:
    b = BackendThread(str(tmp_path / "vu.sock"), wire="loopback")
    b.call(b.backend.start)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def mem() -> Iterator[SharedGuestMemory]:
    g = SharedGuestMemory(4 << 20)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def fe(backend: BackendThread) -> Iterator[Frontend]:
    f = backend.frontend()
    try:
        yield f
    finally:
        f.close_init_fds()
        f.close()


class Rings:
    """rx + tx rings of queue pair 0, closed by the fixture."""

    def __init__(self, mem: SharedGuestMemory, iova_offset: int | None = None) -> None:
        self.rx = VhostUserRing(mem, 0, 64, iova_offset)
        self.tx = VhostUserRing(mem, 1, 64, iova_offset)

    def all(self) -> list[VhostUserRing]:
        return [self.rx, self.tx]

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture
def rings(mem: SharedGuestMemory) -> Iterator[Rings]:
    r = Rings(mem)
    try:
        yield r
    finally:
        r.close()


def start(
    fe: Frontend,
    mem: SharedGuestMemory,
    rings: Rings,
    *,
    features_mask: int = NO_LOG & NO_IOMMU,
    want_protocol: int | None = None,
) -> int:
    fe.init_like_qemu(2, want_protocol)
    features = fe.device_features & features_mask
    fe.start_like_qemu(mem, rings.all(), features)
    return features


def send_tx(mem: SharedGuestMemory, tx: VhostUserRing, data: bytes) -> int:
    buf = mem.alloc(len(HDR) + len(data))
    mem.write(buf, HDR + data)
    head = tx.add(out=[(buf, len(HDR) + len(data))])
    tx.kick()
    return head


def post_rx(mem: SharedGuestMemory, rx: VhostUserRing, size: int = 2048, kick: bool = True) -> int:
    buf = mem.alloc(size, PAGE)
    rx.add(inp=[(buf, size)])
    if kick:
        rx.kick()
    return buf


# -- negotiation --------------------------------------------------------------------------------
def test_init_sequence_is_qemus(fe: Frontend) -> None:
    sent = fe.init_like_qemu(2)
    assert sent == [
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.SET_BACKEND_REQ_FD,
        R.SET_OWNER,
        R.GET_FEATURES,
        R.SET_VRING_CALL,
        R.SET_VRING_ERR,
        R.SET_VRING_CALL,
        R.SET_VRING_ERR,
    ]
    f = fe.device_features
    for bit in (m.VHOST_USER_F_PROTOCOL_FEATURES, m.VHOST_F_LOG_ALL, VIRTIO_F_ACCESS_PLATFORM, 32):
        assert f >> bit & 1, f"feature bit {bit} not offered"
    offered = fe.get_protocol_features()
    for pf in (
        PF.MQ,
        PF.LOG_SHMFD,
        PF.RARP,
        PF.REPLY_ACK,
        PF.MTU,
        PF.BACKEND_REQ,
        PF.CONFIGURE_MEM_SLOTS,
        PF.STATUS,
        PF.RESET_DEVICE,
        PF.CONFIG,
    ):
        assert offered >> pf & 1, pf.name
    assert fe.max_queues == 1
    assert fe.max_mem_slots == m.MAX_MEM_SLOTS


def test_withheld_features(tmp_path: Path) -> None:
    b = BackendThread(
        str(tmp_path / "vu.sock"), offer_mem_slots=False, offer_iommu=False, offer_log=False
    )
    try:
        b.call(b.backend.start)
        with b.frontend() as fe:
            f = fe.get_features()
            p = fe.get_protocol_features()
        assert not f >> VIRTIO_F_ACCESS_PLATFORM & 1
        assert not f >> m.VHOST_F_LOG_ALL & 1
        assert not p >> PF.LOG_SHMFD & 1
        assert not p >> PF.CONFIGURE_MEM_SLOTS & 1
        assert p >> PF.REPLY_ACK & 1 and p >> PF.BACKEND_REQ & 1
    finally:
        b.close()


def test_replies_have_flags_exactly_0x5(fe: Frontend) -> None:
    for request in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_STATUS):
        fe.send(request, need_reply=True)  # NEED_REPLY on a data request changes nothing
        msg = fe.recv()
        assert msg.header.flags == 0x5
        assert msg.header.request == request
        assert len(msg.payload) == 8


def test_reply_ack_success_failure_and_silence(fe: Frontend, backend: BackendThread) -> None:
    fe.init_like_qemu(2)
    assert fe.has(PF.REPLY_ACK)
    assert fe.set_vring_num(0, 256, ack=True) == 0
    mark = backend.mark()
    assert fe.set_vring_num(0, 3, ack=True, check=False) != 0
    assert backend.query(["error.protocol"], mark)[0]["request"] == "SET_VRING_NUM"
    # without NEED_REPLY nothing comes back: the next reply is GET_FEATURES'
    fe.set_vring_num(0, 128, ack=False)
    fe.set_vring_num(0, 5, ack=False)
    assert fe.get_features() & ~(1 << VIRTIO_F_RING_PACKED) == fe.device_features


def test_status_and_features_ok(fe: Frontend, backend: BackendThread) -> None:
    fe.init_like_qemu(2)
    assert fe.get_status() == 0
    fe.set_features(fe.device_features & NO_LOG & NO_IOMMU)  # + GET/SET_STATUS FEATURES_OK
    assert fe.get_status() == 8
    fe.set_status(8 | 1 | 2)
    assert fe.get_status() == 11
    assert backend.call(lambda: backend.backend.device.get_status()) == 11
    fe.set_status(0)
    assert fe.get_status() == 0


def test_config_space(fe: Frontend, backend: BackendThread) -> None:
    fe.init_like_qemu(2)
    cfg = fe.get_config(0, 12)
    assert cfg[:6] == MAC
    mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg)
    assert (status, pairs, mtu) == (1, 1, 1500)
    assert fe.get_config(6, 2) == struct.pack("<H", 1)
    # NEED_REPLY'd SET_CONFIG (a legacy MAC write)
    assert fe.set_config(0, bytes.fromhex("020000000001")) == 0
    assert fe.get_config(0, 6) == bytes.fromhex("020000000001")


def test_net_set_mtu_and_rarp(tmp_path: Path, mem: SharedGuestMemory) -> None:
    peer_path = str(tmp_path / "peer")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    b = BackendThread(str(tmp_path / "vu.sock"), wire=f"unix:{tmp_path / 'wire'}:{peer_path}")
    try:
        b.call(b.backend.start)
        with b.frontend() as fe:
            fe.init_like_qemu(2)
            assert fe.net_set_mtu(9000) == 0
            assert b.call(lambda: b.backend.net.config.mtu) == 9000
            assert fe.net_set_mtu(10, check=False) != 0
            mark = b.mark()
            fe.send_rarp(MAC)
            peer.settimeout(5)
            rarp = peer.recv(2048)
            fe.close_init_fds()
        assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == MAC
        assert struct.unpack("!H", rarp[12:14])[0] == ETH_P_RARP
        assert len(rarp) == 60
        assert b.query(["net.rarp"], mark)[0]["mac"] == "52:54:00:12:34:56"
    finally:
        b.close()
        peer.close()


# -- data path ----------------------------------------------------------------------------------
def test_start_sequence_and_loopback(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    fe.init_like_qemu(2)
    sent = fe.start_like_qemu(mem, rings.all(), fe.device_features & NO_LOG & NO_IOMMU)
    assert sent[:3] == [R.SET_VRING_ENABLE, R.SET_VRING_ENABLE, R.SET_FEATURES]
    assert sent[3:6] == [R.GET_STATUS, R.SET_STATUS, R.ADD_MEM_REG]  # CONFIGURE_MEM_SLOTS
    assert R.SET_MEM_TABLE not in sent and sent[-1] == R.SET_STATUS
    rxbuf = post_rx(mem, rings.rx)
    data = frame()
    send_tx(mem, rings.tx, data)
    assert rings.tx.wait_used(1) == [(0, 0)]
    ((head, written),) = rings.rx.wait_used(1)
    assert written == len(HDR) + len(data)
    assert mem.read(rxbuf + len(HDR), len(data)) == data
    # ring addresses arrived as QEMU user addresses and were turned into GPAs
    vq = backend.backend.device.vqs[1]
    addrs = backend.call(lambda: (vq.desc, vq.avail, vq.used))
    assert addrs == (rings.tx.desc, rings.tx.avail, rings.tx.used)


def test_get_vring_base_after_tx_packets(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    start(fe, mem, rings)
    n = 7
    for k in range(n):
        send_tx(mem, rings.tx, frame(bytes([k]) * 60))
    rings.tx.wait_used(n)
    mark = backend.mark()
    assert fe.get_vring_base(1) == n
    assert fe.get_vring_base(0) == 0
    assert backend.query(["vq.stop"], mark)
    # the ring is stopped: a kick is not served until it is restarted
    assert not backend.call(lambda: backend.backend.device.vqs[1].started)
    # restart from the saved base, as QEMU does after a stop
    fe.set_vring_base(1, n)
    fe.set_vring_kick(1, rings.tx.kick_fd)
    send_tx(mem, rings.tx, frame())
    rings.tx.wait_used(1)
    assert fe.get_vring_base(1) == n + 1


def test_vring_enable_gates_the_ring(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    start(fe, mem, rings)
    fe.set_vring_enable(1, False)
    send_tx(mem, rings.tx, frame())
    with pytest.raises(TimeoutError):
        rings.tx.wait_used(1, timeout=0.3)
    fe.set_vring_enable(1, True)
    assert rings.tx.wait_used(1)


def test_without_protocol_features_rings_start_enabled(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings
) -> None:
    # a front-end that never negotiates bit 30 (no SET_VRING_ENABLE, no STATUS)
    f = fe.get_features()
    fe.set_owner()
    features = f & ~(1 << m.VHOST_USER_F_PROTOCOL_FEATURES) & NO_LOG & NO_IOMMU & NO_PACKED
    fe.start_like_qemu(mem, rings.all(), features)
    send_tx(mem, rings.tx, frame())
    assert rings.tx.wait_used(1)


def test_kick_without_fd_polls(fe: Frontend, mem: SharedGuestMemory, rings: Rings) -> None:
    start(fe, mem, rings)
    fe.set_vring_kick(1, None)  # the no-fd bit: the backend polls
    buf = mem.alloc(len(HDR) + 60)
    mem.write(buf, HDR + frame(b"x" * 46))
    rings.tx.add(out=[(buf, len(HDR) + 60)])  # no kick
    assert rings.tx.wait_used(1)


def test_replaced_fds_are_closed(fe: Frontend, mem: SharedGuestMemory, rings: Rings) -> None:
    start(fe, mem, rings)
    before = open_fd_count()
    for _ in range(5):
        fds = [eventfd(), eventfd(), eventfd()]
        try:
            fe.set_vring_call(1, fds[0])
            fe.set_vring_err(1, fds[1])
            fe.set_vring_kick(1, fds[2])
        finally:
            for fd in fds:
                os.close(fd)
    fe.set_vring_call(1, rings.tx.call_fd)
    fe.set_vring_kick(1, rings.tx.kick_fd)
    fe.get_features()  # everything before it has been handled
    assert open_fd_count() <= before
    send_tx(mem, rings.tx, frame())
    assert rings.tx.wait_used(1)


# -- memory table -------------------------------------------------------------------------------
def _regions(backend: BackendThread) -> list[tuple[int, int]]:
    return backend.call(lambda: [(r.id, r.gpa) for r in backend.backend.device.host.regions()])


def _mappings(backend: BackendThread) -> list[tuple[int, int, int]]:
    return backend.call(
        lambda: [(x.id, x.iova, x.size) for x in backend.backend.device.iotlb.entries()]
    )


def test_mem_table_resend_keeps_region_ids(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    start(fe, mem, rings)
    regions, maps = _regions(backend), _mappings(backend)
    assert [gpa for _, gpa in regions] == [0]
    assert maps[0][1:] == (0, mem.slots[0].size)
    before = open_fd_count()
    mark = backend.mark()
    fe.set_mem_table(mem)  # the same table again
    assert _regions(backend) == regions
    assert _mappings(backend) == maps  # same mapping objects: nothing remapped
    assert not backend.query(["mem.add", "mem.remove", "dma.map", "dma.unmap"], mark)
    table = backend.query(["mem.table"], mark)[-1]
    assert table["kept"] == [regions[0][0]] and not table["added"] and not table["removed"]
    assert open_fd_count() <= before  # the duplicate fd was closed
    # one more slot: only it is added; the first keeps its id and mapping
    slot = mem.add_slot(0x1000_0000, 1 << 20, name="dimm")
    mark = backend.mark()
    fe.set_mem_table(mem)
    now = _regions(backend)
    assert now[0] == regions[0] and now[1][1] == 0x1000_0000
    assert _mappings(backend)[0] == maps[0]
    assert [e["gpa"] for e in backend.query(["mem.add"], mark)] == [slot.gpa]
    assert not backend.query(["mem.remove"], mark)
    send_tx(mem, rings.tx, frame())
    assert rings.tx.wait_used(1)


def test_add_rem_mem_reg_touch_exactly_one_mapping(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    start(fe, mem, rings)
    assert fe.has(PF.CONFIGURE_MEM_SLOTS)
    ((rid0, _),) = _regions(backend)
    map0 = _mappings(backend)[0]
    slot = mem.add_slot(0x2000_0000, 2 << 20, name="dimm")
    mark = backend.mark()
    assert fe.add_mem_reg(slot) == 0
    added = backend.query(["mem.add"], mark)
    assert len(added) == 1
    assert added[0]["gpa"] == slot.gpa and added[0]["size"] == slot.size
    assert added[0]["uaddr"] == slot.uaddr and added[0]["request"] == "ADD_MEM_REG"
    assert [e["iova"] for e in backend.query(["dma.map"], mark)] == [slot.gpa]
    assert not backend.query(["dma.unmap", "mem.remove"], mark)
    assert _mappings(backend)[0] == map0
    # the new memory is usable: a TX buffer in it
    buf = slot.gpa + 0x100
    data = frame(b"dimm" * 20)
    mem.write(buf, HDR + data)
    rings.tx.add(out=[(buf, len(HDR) + len(data))])
    rings.tx.kick()
    assert rings.tx.wait_used(1)
    # REM_MEM_REG (with a stray fd, which must be closed unused)
    mark = backend.mark()
    before = open_fd_count()
    stray = eventfd()
    try:
        assert fe.rem_mem_reg(slot.region(), fds=[stray]) == 0
    finally:
        os.close(stray)
    removed = backend.query(["mem.remove"], mark)
    assert len(removed) == 1 and removed[0]["gpa"] == slot.gpa
    assert removed[0]["request"] == "REM_MEM_REG"
    assert [e["iova"] for e in backend.query(["dma.unmap"], mark)] == [slot.gpa]
    assert [rid for rid, _ in _regions(backend)] == [rid0]
    assert _mappings(backend) == [map0]
    assert open_fd_count() <= before
    mem.remove_slot(slot)


# -- vIOMMU: IOTLB messages and MISS --------------------------------------------------------------
def pump_misses(fe: Frontend, done, timeout: float = 5.0) -> list[m.IotlbMsg]:
    """Serve MISS requests like QEMU until ``done()``; returns the misses served."""
    misses: list[m.IotlbMsg] = []
    channel = fe.backend_sock
    assert channel is not None

    def step() -> bool:
        if done():
            return True
        r, _, _ = select.select([channel], [], [], 0.02)
        if r:
            misses.append(fe.serve_miss())
        return False

    poll_until(step, timeout, "the queue to make progress through IOTLB misses", max_interval=0)
    return misses


def start_iommu(fe: Frontend, mem: SharedGuestMemory, backend: BackendThread) -> Rings:
    r = Rings(mem, IOVA_OFFSET)
    fe.init_like_qemu(2)
    features = fe.device_features & NO_LOG
    assert features >> VIRTIO_F_ACCESS_PLATFORM & 1
    fe.iommu = [IommuEntry(IOVA_OFFSET, mem.slots[0].size, 0, 3)]
    fe.start_like_qemu(mem, r.all(), features)
    assert backend.call(lambda: backend.backend.device.dma.iommu)
    return r


def test_iommu_miss_round_trip(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    r = start_iommu(fe, mem, backend)
    try:
        assert _mappings(backend) == []  # the mem table gave host memory only
        mark = backend.mark()
        rxbuf = post_rx(mem, r.rx)
        data = frame(b"iommu" * 12)
        send_tx(mem, r.tx, data)
        got: list[tuple[int, int]] = []

        def received() -> bool:
            got.extend(r.rx.pop_used())
            return bool(got)

        misses = pump_misses(fe, received)
        assert misses and all(x.type == m.IotlbType.MISS for x in misses)
        assert all(x.iova >= IOVA_OFFSET for x in misses)
        assert got[0][1] == len(HDR) + len(data)
        assert mem.read(rxbuf + len(HDR), len(data)) == data
        acks = backend.query(["iotlb.miss_ack"], mark)
        assert acks and all(a["status"] == 0 for a in acks)
        assert backend.query(["iotlb.update"], mark)
        assert not backend.query(["error.protocol"], mark)
    finally:
        r.close()


def test_iotlb_invalidate_then_miss_again(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    r = start_iommu(fe, mem, backend)
    try:
        size = mem.slots[0].size
        assert fe.iotlb_update(IOVA_OFFSET, size, UADDR_BASE, 3) == 0  # map it all up front
        send_tx(mem, r.tx, frame())
        assert r.tx.wait_used(1)
        assert fe.iotlb_invalidate(IOVA_OFFSET, size) == 0
        assert _mappings(backend) == []
        mark = backend.mark()
        send_tx(mem, r.tx, frame())
        pump_misses(fe, lambda: bool(r.tx.pop_used()))
        assert backend.query(["iotlb.miss"], mark)
    finally:
        r.close()


def test_refused_miss_is_tolerated(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    r = start_iommu(fe, mem, backend)
    try:
        mark = backend.mark()
        send_tx(mem, r.tx, frame())
        msg = fe.recv_backend()
        assert m.IotlbMsg.unpack(msg.payload).type == m.IotlbType.MISS
        assert msg.header.need_reply
        fe.reply_backend(msg, 1)  # QEMU refuses a MISS while the device is stopped
        backend.wait_journal("iotlb.miss_ack", mark)
        assert backend.query(["iotlb.miss_ack"], mark)[0]["status"] == 1
        assert not backend.query(["error.protocol"], mark)
        assert fe.get_features()  # still serving
    finally:
        r.close()


def test_refused_miss_is_asked_again_on_the_next_kick(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    """A MISS acked with failure brings no UPDATE: the queue stays parked, and the next kick
    must send the MISS again (the guest may have mapped the IOVA meanwhile)."""
    r = start_iommu(fe, mem, backend)
    try:
        mark = backend.mark()
        send_tx(mem, r.tx, frame())
        first = fe.recv_backend()
        refused = m.IotlbMsg.unpack(first.payload)
        after = backend.mark()
        fe.reply_backend(first, 1)  # e.g. the vIOMMU has no mapping yet
        backend.wait_journal("iotlb.miss_ack", mark)
        assert backend.call(lambda: backend.backend.device.parked)  # parked, alive
        # (a kick that came while the MISS was outstanding asks again at the refusal already)
        r.tx.kick()  # the guest mapped it and kicks again: a second MISS, then progress
        pump_misses(fe, lambda: bool(r.tx.pop_used()))
        again = [e["iova"] for e in backend.query(["iotlb.miss_sent"], after)]
        assert refused.iova in again
        assert not backend.query(["error.protocol"], mark)
    finally:
        r.close()


def test_access_fail_request_and_its_refusal(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    r = start_iommu(fe, mem, backend)
    try:
        send_tx(mem, r.tx, frame())  # serve the start-up misses first
        pump_misses(fe, lambda: bool(r.tx.pop_used()))
        mark = backend.mark()

        def channel():
            conn = backend.backend.server.connection
            assert conn is not None and conn.backend is not None
            return conn.backend

        assert backend.call(lambda: channel().send_access_fail(IOVA_OFFSET + PAGE, 2))
        msg = fe.recv_backend()
        got = m.IotlbMsg.unpack(msg.payload)
        assert (got.type, got.iova, got.perm) == (m.IotlbType.ACCESS_FAIL, IOVA_OFFSET + PAGE, 2)
        assert msg.header.need_reply
        fe.reply_backend(msg, 1)  # QEMU 10: "Access failure IOTLB message type not supported"
        (ack,) = backend.wait_journal("iotlb.access_fail_ack", mark)
        assert (ack["iova"], ack["perm"], ack["status"]) == (IOVA_OFFSET + PAGE, 2, 1)
        assert backend.query(["iotlb.access_fail_sent"], mark)
        # MISS acks still pair with their MISS afterwards
        assert fe.iotlb_invalidate(IOVA_OFFSET, mem.slots[0].size) == 0
        send_tx(mem, r.tx, frame())
        pump_misses(fe, lambda: bool(r.tx.pop_used()))
        acks = backend.query(["iotlb.miss_ack"], mark)
        assert acks and all(a["status"] == 0 for a in acks)
        assert backend.call(lambda: channel().outstanding()) == []
        assert not backend.query(["error.protocol"], mark)
    finally:
        r.close()


def test_set_features_starts_an_empty_iotlb(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    """QEMU sends SET_FEATURES on every vhost start but no INVALIDATE for what the guest
    unmapped while vhost was stopped: each start must begin with an empty IOTLB."""
    r = start_iommu(fe, mem, backend)
    try:
        send_tx(mem, r.tx, frame())
        pump_misses(fe, lambda: bool(r.tx.pop_used()))
        assert _mappings(backend)
        mark = backend.mark()
        fe.set_features(fe.features)  # what a vhost restart sends
        assert _mappings(backend) == []
        assert backend.query(["dma.set_map"], mark)[0]["removed"] > 0
        send_tx(mem, r.tx, frame())  # translated afresh through MISS
        assert pump_misses(fe, lambda: bool(r.tx.pop_used()))
    finally:
        r.close()


def test_update_ack_and_bad_updates(
    fe: Frontend, mem: SharedGuestMemory, backend: BackendThread
) -> None:
    r = start_iommu(fe, mem, backend)
    try:
        assert fe.iotlb_update(IOVA_OFFSET, PAGE, UADDR_BASE, 1) == 0
        assert _mappings(backend)[0][1:] == (IOVA_OFFSET, PAGE)
        # outside host memory, perm 0, size 0: refused with a non-zero status
        assert fe.iotlb(m.IotlbMsg(0, PAGE, 0x1234_0000, 3, m.IotlbType.UPDATE), check=False)
        assert fe.iotlb(m.IotlbMsg(0, PAGE, UADDR_BASE, 0, m.IotlbType.UPDATE), check=False)
        assert fe.iotlb(m.IotlbMsg(0, 0, UADDR_BASE, 3, m.IotlbType.UPDATE), check=False)
        assert len(_mappings(backend)) == 1
    finally:
        r.close()


# -- dirty log ------------------------------------------------------------------------------------
def test_dirty_log_marks_rx_pages_and_used_ring(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    fe.init_like_qemu(2)
    log_size = mem.slots[0].size // PAGE // 8
    log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(log_fd, log_size)
        features = fe.device_features & NO_IOMMU  # LOG_ALL on
        fe.start_like_qemu(mem, rings.all(), features, log=(log_fd, log_size))
        assert backend.call(lambda: backend.backend.device.dma.dirty_log is not None)
        rxbuf = post_rx(mem, rings.rx, 3 * PAGE)
        data = frame(b"L" * (PAGE + 100))  # header + data span two pages
        backend.call(lambda: backend.backend.net.inject(data))
        rings.rx.wait_used(1)
        log = os.pread(log_fd, log_size, 0)

        def dirty(gpa: int) -> bool:
            page = gpa // PAGE
            return bool(log[page >> 3] >> (page & 7) & 1)

        assert dirty(rxbuf) and dirty(rxbuf + PAGE)  # packet data and header
        assert not dirty(rxbuf + 2 * PAGE)  # not written
        assert dirty(rings.rx.used)  # the used ring
        assert not dirty(rings.tx.desc) and not dirty(rings.rx.desc)  # only read
        # SET_FEATURES without LOG_ALL stops logging
        fe.set_features(features & NO_LOG)
        assert backend.call(lambda: backend.backend.device.dma.dirty_log is None)
    finally:
        os.close(log_fd)


def test_set_log_base_replies_without_need_reply(fe: Frontend, backend: BackendThread) -> None:
    fe.init_like_qemu(2)
    log_fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(log_fd, PAGE)
        assert fe.set_log_base(log_fd, PAGE) == 0
        assert backend.query(["log.base"])[-1]["size"] == PAGE
        # beyond the fd: refused, still a reply; and the connection is dropped, because QEMU
        # frees its old log whatever the answer (logging into it would lose dirty pages)
        assert fe.set_log_base(log_fd, 2 * PAGE) != 0
        entries = backend.query(["vhost.disconnect", "error.protocol"])
        assert entries[-2]["kind"] == "error.protocol" and entries[-2]["error"] == "log-base"
        assert entries[-1]["kind"] == "vhost.disconnect"
    finally:
        os.close(log_fd)


# -- resets and reconnects ----------------------------------------------------------------------
def test_reset_device_keeps_memory(
    fe: Frontend, mem: SharedGuestMemory, rings: Rings, backend: BackendThread
) -> None:
    start(fe, mem, rings)
    regions, maps = _regions(backend), _mappings(backend)
    fe.call(R.RESET_DEVICE)
    assert fe.get_status() == 0
    assert _regions(backend) == regions and _mappings(backend) == maps
    fe.start_like_qemu(mem, rings.all(), fe.device_features & NO_LOG & NO_IOMMU)
    send_tx(mem, rings.tx, frame())
    assert rings.tx.wait_used(1)


def test_reconnect(backend: BackendThread, mem: SharedGuestMemory) -> None:
    for round_ in range(3):
        r = Rings(mem)
        fe = backend.frontend()
        try:
            mark = backend.mark()
            start(fe, mem, r)
            send_tx(mem, r.tx, frame(bytes([round_]) * 50))
            assert r.tx.wait_used(1)
            assert fe.get_vring_base(1) == 1
        finally:
            fe.close_init_fds()
            fe.close()
            r.close()
        backend.wait_journal("vhost.disconnect", mark)
        assert _regions(backend) == [] and _mappings(backend) == []
        assert backend.call(lambda: backend.backend.device.get_status()) == 0


def test_second_front_end_waits_for_the_first(backend: BackendThread) -> None:
    with backend.frontend() as first:
        assert first.get_features()
        second = backend.frontend()
        try:
            second.send(R.GET_FEATURES)
            with pytest.raises(TimeoutError):
                second.recv(timeout=0.2)
            first.close()
            assert len(second.recv_reply(R.GET_FEATURES)) == 8
        finally:
            second.close()


def test_set_vring_endian_is_refused_politely(fe: Frontend, backend: BackendThread) -> None:
    fe.init_like_qemu(2)
    mark = backend.mark()
    assert fe.call(R.SET_VRING_ENDIAN, m.VringState(0, 1).pack(), ack=True, check=False) == 1
    assert backend.query(["error.protocol"], mark)[0]["error"] == "unsupported"
    with pytest.raises(FrontendError):
        fe.call(R.SET_VRING_ENDIAN, m.VringState(0, 1).pack(), ack=True)
