"""A broken or malicious driver: malformed rings must not take the backend down.

Each case writes bad ring content through the raw virtqueue API (descriptor loops, indexes out
of range, an avail index that jumps by more than the queue size, bad or nested indirect tables,
a device-readable descriptor after a device-writable one, buffers at guest-physical addresses
outside guest RAM) and kicks. The backend must journal the error (``error.vq`` with the kind of
malformation), set NEEDS_RESET and stop processing, keep running (monitor answers), and work
again after the driver resets the device (status 0) and initialises it anew.

What the guest sees of NEEDS_RESET with QEMU 10: nothing. The device status register the driver
reads is QEMU's own ``vdev->status``; QEMU sends GET_STATUS only to read-modify-write the status
it sets itself, never to refresh what the guest reads; the backend's CONFIG_CHANGE message would
need the CONFIG protocol feature, which QEMU's virtio-net does not accept ("vhost-user backend
supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"); and the vring err eventfd is only
traced by QEMU. So NEEDS_RESET is asserted through the backend monitor (``query-status``), and
the guest-visible status is asserted to be unchanged (if QEMU ever propagates it, that assertion
tells). The driver only notices that its chains are never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from backends.virtio.features import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from qtests.qos.frames import make_frame, parse_frame
from qtests.qos.testbed import Testbed
from qtests.qos.virtio_net import NET_HDR_SIZE
from qtests.qos.virtqueue import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitVirtqueue,
)
from qtests.qos.waiting import WaitTimeout, poll_until

pytestmark = pytest.mark.qemu

RX_Q, TX_Q = 0, 1
GUEST_READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
#: A guest-physical address far outside guest RAM (and outside every memory region).
UNMAPPED_GPA = 0x7000_0000_0000
INIT = {"indirect": True}


@dataclass
class Bad:
    """What the backend must report: the ring, and the ``error`` field of ``error.vq``."""

    vq: int
    error: str


class Scratch:
    """Guest memory for the valid parts of bad chains (a header-sized readable buffer)."""

    def __init__(self, tb: Testbed) -> None:
        assert tb.alloc is not None
        self.tb = tb
        self.buf = tb.alloc.alloc(4096, tag="bad-guest scratch")
        self.tables: list[int] = []

    def table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """An indirect table in guest memory holding ``entries`` (addr, len, flags, next)."""
        assert self.tb.alloc is not None and self.tb.machine is not None
        raw = b"".join(DESC.pack(*e) for e in entries)
        addr = self.tb.alloc.alloc(len(raw), 16, tag="bad-guest indirect table")
        self.tables.append(addr)
        self.tb.machine.qtest.write(addr, raw)
        return addr

    def free(self) -> None:
        assert self.tb.alloc is not None
        for addr in [self.buf, *self.tables]:
            self.tb.alloc.free(addr)
        self.tables = []


def _tx(tb: Testbed) -> SplitVirtqueue:
    return tb.net.txq[0]


# -- the malformations ----------------------------------------------------------------------
def descriptor_loop(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.write_desc_raw(0, s.buf, NET_HDR_SIZE, VRING_DESC_F_NEXT, 1)
    vq.write_desc_raw(1, s.buf, 64, VRING_DESC_F_NEXT, 0)
    vq.publish_raw([0])
    return Bad(TX_Q, "loop")


def head_out_of_range(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.publish_raw([vq.size])
    return Bad(TX_Q, "head-range")


def next_out_of_range(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.write_desc_raw(0, s.buf, NET_HDR_SIZE, VRING_DESC_F_NEXT, vq.size)
    vq.publish_raw([0])
    return Bad(TX_Q, "next-range")


def avail_index_jump(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.publish_raw(avail_idx=vq.avail_idx + vq.size + 1)
    return Bad(TX_Q, "avail-jump")


def indirect_bad_length(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    table = s.table([(s.buf, 64, 0, 0), (s.buf, 64, 0, 0)])
    vq.write_desc_raw(0, table, 24, VRING_DESC_F_INDIRECT)  # not a multiple of 16
    vq.publish_raw([0])
    return Bad(TX_Q, "indirect-len")


def indirect_nested(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    inner = s.table([(s.buf, 64, 0, 0)])
    outer = s.table(
        [(s.buf, NET_HDR_SIZE, VRING_DESC_F_NEXT, 1), (inner, 16, VRING_DESC_F_INDIRECT, 0)]
    )
    vq.write_desc_raw(0, outer, 32, VRING_DESC_F_INDIRECT)
    vq.publish_raw([0])
    return Bad(TX_Q, "indirect-nested")


def readable_after_writable(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.write_desc_raw(0, s.buf, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    vq.write_desc_raw(1, s.buf + 64, 64, 0)
    vq.publish_raw([0])
    return Bad(TX_Q, "order")


def unmapped_tx_buffer(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.write_desc_raw(0, s.buf, NET_HDR_SIZE, VRING_DESC_F_NEXT, 1)
    vq.write_desc_raw(1, UNMAPPED_GPA, 64, 0)
    vq.publish_raw([0])
    return Bad(TX_Q, "translate")


def unmapped_indirect_table(tb: Testbed, s: Scratch) -> Bad:
    vq = _tx(tb)
    vq.write_desc_raw(0, UNMAPPED_GPA, 32, VRING_DESC_F_INDIRECT)
    vq.publish_raw([0])
    return Bad(TX_Q, "translate")


def unmapped_rx_buffer(tb: Testbed, s: Scratch) -> Bad:
    """A device-writable RX buffer outside guest RAM, used when a frame arrives."""
    vq = tb.net.rxq[0]
    vq.write_desc_raw(0, UNMAPPED_GPA, 2048, VRING_DESC_F_WRITE)
    vq.publish_raw([0])
    vq.kick(force=True)
    tb.peer.send(make_frame(999, 100))
    return Bad(RX_Q, "translate")


CASES: dict[str, Callable[[Testbed, Scratch], Bad]] = {
    "descriptor-loop": descriptor_loop,
    "head-out-of-range": head_out_of_range,
    "next-out-of-range": next_out_of_range,
    "avail-index-jump": avail_index_jump,
    "indirect-bad-length": indirect_bad_length,
    "indirect-nested": indirect_nested,
    "readable-after-writable": readable_after_writable,
    "unmapped-tx-buffer": unmapped_tx_buffer,
    "unmapped-indirect-table": unmapped_indirect_table,
    "unmapped-rx-buffer": unmapped_rx_buffer,
}


# -- the scenario -------------------------------------------------------------------------------
def _traffic_works(tb: Testbed, seq: int) -> None:
    tb.net.send(make_frame(seq, 120, stream=1))
    assert parse_frame(tb.peer.recv()) == (1, seq)
    tb.peer.send(make_frame(seq, 120, stream=2))
    assert parse_frame(tb.net.recv().data) == (2, seq)


def bad_guest_scenario(
    tb: Testbed, case: Callable[[Testbed, Scratch], Bad], timeout: float = 5.0
) -> None:
    """Good traffic; bad ring content; error + NEEDS_RESET, backend alive, guest status as
    QEMU keeps it; the bad chain never used; driver reset + re-init; good traffic again."""
    backend = tb.backend
    assert backend is not None
    _traffic_works(tb, 1)
    rx_post = case is unmapped_rx_buffer
    if rx_post:  # the RX ring must hold only the bad buffer: start over without posting
        tb.net.close()
        tb.init_net(post_rx=False, **INIT)
    scratch = Scratch(tb)
    cfg_irq = tb.net.dev.config_interrupt
    cfg_irq.clear()
    mark = backend.mark()
    rings = {RX_Q: tb.net.rxq[0], TX_Q: _tx(tb)}
    used_before = {i: vq.device_used_idx() for i, vq in rings.items()}
    bad = case(tb, scratch)
    if not rx_post:
        _tx(tb).kick(force=True)
    try:
        errors = poll_until(
            lambda: backend.journal(kinds=["error."], since=mark),
            timeout,
            f"the backend to journal an error for the bad {bad.error} content on vq {bad.vq}",
        )
    except WaitTimeout as e:
        names = backend.cmd("query-status")["status_names"]
        raise AssertionError(f"{e}; backend status {names}") from e
    first = errors[0]
    assert (first["kind"], first["vq"], first["error"]) == ("error.vq", bad.vq, bad.error), errors
    status = backend.cmd("query-status")
    assert backend.running, f"{backend.name} died on bad ring content"
    assert "NEEDS_RESET" in status["status_names"] and not status["running"], status
    assert status["connection"]["connected"], "the backend dropped QEMU's connection"
    used_after = {i: vq.device_used_idx() for i, vq in rings.items()}
    assert used_after[bad.vq] == used_before[bad.vq], f"a malformed chain on vq {bad.vq} was used"
    assert used_after == used_before, f"used idx moved: {used_before} -> {used_after}"
    # QEMU 10 keeps the guest-visible status to itself (see the module docstring)
    assert tb.net.dev.status == GUEST_READY, (
        f"guest-visible status {tb.net.dev.status:#x}: QEMU now propagates NEEDS_RESET?"
    )
    assert not cfg_irq.fired(), "a config interrupt reached the guest"
    assert "CONFIG" not in status["connection"]["protocol_features"]["names"]
    # the driver resets the device and starts over
    tb.net.close()
    scratch.free()
    mark = backend.mark()
    tb.init_net(**INIT)
    status = backend.cmd("query-status")
    assert status["running"] and "NEEDS_RESET" not in status["status_names"], status
    _traffic_works(tb, 2)
    assert backend.journal(kinds=["error."], since=mark) == []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_ring_content_needs_reset_and_recovers(
    make_testbed: Callable[..., Testbed], name: str
) -> None:
    bad_guest_scenario(make_testbed().start(**INIT), CASES[name])


#: Representative malformations for the meta-test (loop, index range, order, indirect).
META_CASES = ["descriptor-loop", "head-out-of-range", "readable-after-writable", "indirect-nested"]


@pytest.mark.parametrize("name", META_CASES)
def test_meta_no_chain_validation_is_caught(
    make_testbed: Callable[..., Testbed], name: str
) -> None:
    """A device that skips bad chains silently leaves no error and no NEEDS_RESET."""
    tb = make_testbed(faults=["no-chain-validation"]).start(**INIT)
    with pytest.raises(
        AssertionError,
        match=r"waiting for the backend to journal an error for the bad [a-z-]+ content .*"
        r"backend status \[(?!.*NEEDS_RESET)",
    ):
        bad_guest_scenario(tb, CASES[name], timeout=1.0)
