"""Issue #12: the three sequences that froze or killed ``python -m backends``, replayed against
the real backend process. After each one the process must be alive, its monitor must answer,
the same connection must answer a request and a fresh connection must be served."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.vdpa import sigbus_guard
from backends.vhost_user import messages as m
from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.hostile_memory import shrink_then_poll
from qtests.qos.vhost_user_frontend import Frontend, VhostUserRing
from qtests.qos.waiting import poll_until

VERSION_1 = 1 << 32
HDR = bytes(12)
NEEDS_RESET = 0x40
TIMEOUT = 15.0


@pytest.fixture
def bp(tmp_path: Path) -> Iterator[BackendProcess]:
    proc = BackendProcess.launch(tmp_path, "--wire", "null")
    try:
        yield proc
    finally:
        rc = proc.stop(sig=signal.SIGTERM)
        assert rc == 0, f"backend exited {rc}: {proc.tails()}"


@pytest.fixture
def mem() -> Iterator[SharedGuestMemory]:
    g = SharedGuestMemory(1 << 20)
    try:
        yield g
    finally:
        g.close()


def setup_rings(fe: Frontend, mem: SharedGuestMemory, rings: list[VhostUserRing]) -> None:
    """SET_OWNER, SET_FEATURES(VERSION_1), SET_MEM_TABLE, SET_VRING_NUM/ADDR per ring."""
    fe.set_owner()
    fe.set_features(VERSION_1)
    fe.set_mem_table(mem)
    for r in rings:
        fe.set_vring_num(r.index, r.num)
        fe.set_vring_addr(r.vring_addr())
    fe.get_features()  # a round trip: everything above has been handled


def assert_still_serving(bp: BackendProcess, fe: Frontend | None) -> None:
    assert bp.running, f"backend died: {bp.tails()}"
    with contextlib.nullcontext(bp) as mon:
        assert mon.cmd("query-status") is not None
    if fe is not None:
        assert fe.get_features() & VERSION_1  # the same connection still answers
        fe.close()
    with Frontend(bp.socket, timeout=TIMEOUT) as fresh:  # and a new one is served
        assert fresh.get_features() & VERSION_1


def test_shrunk_memfd_then_polling_kick_is_refused_not_sigbus(
    bp: BackendProcess, mem: SharedGuestMemory
) -> None:
    """Sequence 1: the memfd shrinks to 0 bytes after SET_MEM_TABLE, then a no-fd kick."""
    tx = VhostUserRing(mem, 1, 16)
    fe = Frontend(bp.socket, timeout=TIMEOUT)
    try:
        setup_rings(fe, mem, [tx])
        os.ftruncate(mem.slots[0].fd, 0)
        fe.set_vring_kick(1, None)
        with contextlib.nullcontext(bp) as mon:
            errors = poll_until(
                lambda: mon.journal(["error.mem"]),
                TIMEOUT,
                "an error.mem entry for the shrunk region",
            )
            assert errors[0]["error"] == "region-shrunk"
            assert "gpa=0x0" in errors[0]["detail"] and "region" in errors[0]["detail"]
            status = mon.cmd("query-status")
            assert mon.cmd("query-mem-table")["regions"] == []
        assert fe.get_status() & NEEDS_RESET, status
        assert_still_serving(bp, fe)
    finally:
        fe.close()
        tx.close()


def test_memfd_shrinking_while_the_ring_polls(bp: BackendProcess, mem: SharedGuestMemory) -> None:
    """The shrink comes while the ring is already being polled (every 5 ms)."""
    tx = VhostUserRing(mem, 1, 16)
    fe = Frontend(bp.socket, timeout=TIMEOUT)
    try:
        setup_rings(fe, mem, [tx])
        fe.set_vring_kick(1, None)
        with contextlib.nullcontext(bp) as mon:
            poll_until(lambda: mon.journal(["vq.start"]), TIMEOUT, "ring 1 to start polling")
            os.ftruncate(mem.slots[0].fd, 4096)
            poll_until(lambda: mon.journal(["error.mem"]), TIMEOUT, "error.mem after the shrink")
        assert_still_serving(bp, fe)
    finally:
        fe.close()
        tx.close()


def test_full_blocking_call_eventfd_does_not_block_the_interrupt(
    bp: BackendProcess, mem: SharedGuestMemory
) -> None:
    """Sequence 2: a blocking call eventfd whose counter is 2^64-2, one TX chain, a polling
    kick: the interrupt cannot be written; it is reported, coalesced, delivered later."""
    tx = VhostUserRing(mem, 1, 16)
    call = os.eventfd(0)  # blocking, as the front-end likes it
    fe = Frontend(bp.socket, timeout=TIMEOUT)
    try:
        setup_rings(fe, mem, [tx])
        os.eventfd_write(call, (1 << 64) - 2)
        fe.set_vring_call(1, call)
        frame = b"\xff" * 60
        buf = mem.alloc(len(HDR) + len(frame))
        mem.write(buf, HDR + frame)
        tx.add(out=[(buf, len(HDR) + len(frame))])
        fe.set_vring_kick(1, None)
        poll_until(lambda: tx.used_idx() == 1, TIMEOUT, "the TX chain to be used")
        with contextlib.nullcontext(bp) as mon:
            errors = poll_until(
                lambda: mon.journal(["error.call"]), TIMEOUT, "error.call for the full counter"
            )
            assert errors[0]["vq"] == 1
            ring = mon.cmd("query-vrings")["vrings"][1]
        assert bp.running
        # the front-end drains its counter: the coalesced interrupt arrives with the next one
        assert os.eventfd_read(call) == (1 << 64) - 2
        buf2 = mem.alloc(len(HDR) + len(frame))
        mem.write(buf2, HDR + frame)
        tx.add(out=[(buf2, len(HDR) + len(frame))])
        poll_until(lambda: tx.used_idx() == 2, TIMEOUT, "the second TX chain to be used")
        os.set_blocking(call, False)
        poll_until(lambda: _drain(call), TIMEOUT, "the coalesced interrupt on the call eventfd")
        assert ring is not None
        assert_still_serving(bp, fe)
    finally:
        fe.close()
        tx.close()
        os.close(call)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_shared_kick_eventfd_made_blocking_does_not_block_the_second_read(
    bp: BackendProcess, mem: SharedGuestMemory
) -> None:
    """Sequence 3: rings 0 and 1 get the same kick eventfd; the front-end clears O_NONBLOCK
    on its copy (shared file description) and signals once."""
    rx, tx = VhostUserRing(mem, 0, 16), VhostUserRing(mem, 1, 16)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    fe = Frontend(bp.socket, timeout=TIMEOUT)
    try:
        setup_rings(fe, mem, [rx, tx])
        fe.set_vring_kick(0, kick)
        fe.set_vring_kick(1, kick)
        fe.get_features()  # both kicks handled (the old backend set O_NONBLOCK here)
        os.set_blocking(kick, True)
        os.eventfd_write(kick, 1)
        with contextlib.nullcontext(bp) as mon:
            poll_until(
                lambda: sum(r["kicks"] or 0 for r in mon.cmd("query-vrings")["vrings"]) >= 1,
                TIMEOUT,
                "the kick to be read by one ring",
            )
        assert_still_serving(bp, fe)
    finally:
        fe.close()
        rx.close()
        tx.close()
        os.close(kick)


def test_replies_a_front_end_never_reads_do_not_freeze_the_backend(
    bp: BackendProcess,
) -> None:
    """NEED_REPLY on everything, replies never read: the backend queues them (bounded) and
    keeps serving the monitor; past the bound it drops that connection, nobody else's."""
    fe = Frontend(bp.socket, timeout=TIMEOUT)
    try:
        msg = m.encode(m.Request.GET_FEATURES, b"", m.VERSION | m.FLAG_NEED_REPLY) * 1000
        fe.sock.setblocking(True)
        fe.sock.settimeout(0.2)
        sent = 0
        with contextlib.nullcontext(bp) as mon:

            def dropped() -> bool:
                return any(
                    "peer does not read" in str(e.get("reason", ""))
                    for e in mon.journal(["vhost.disconnect"])
                )

            deadline = time.monotonic() + 120
            pending = memoryview(msg)
            while not dropped():
                assert time.monotonic() < deadline, f"not dropped after {sent} requests"
                try:
                    pending = pending[fe.sock.send(pending) :]  # never a message cut in two
                    if not pending:
                        pending = memoryview(msg)
                        sent += 1000
                except TimeoutError:
                    assert mon.cmd("query-status") is not None  # serving meanwhile
                except (BrokenPipeError, ConnectionResetError):
                    poll_until(dropped, TIMEOUT, f"the disconnect after {sent} requests")
        assert_still_serving(bp, None)
    finally:
        fe.close()


def test_shrink_inside_one_callback_is_survived(tmp_path: Path) -> None:
    """The remaining window of sequence 1: an unsealable region shrinks after the loop's size
    check ran, before the ring access of the same callback. ``skip-shrink-guard`` turns that
    check off, so the shrink made before the kick is exactly such a shrink, deterministically:
    the ring access faults, the SIGBUS guard maps zero pages and records it, and after the
    callback the region is dropped with ``error.mem`` ``region-shrunk`` + NEEDS_RESET; the
    process and a fresh connection keep working."""
    if not sigbus_guard.available():
        pytest.skip("no C compiler: the SIGBUS guard is not built")
    proc = BackendProcess.launch(tmp_path, "--wire", "null", "--fault", "skip-shrink-guard")
    try:
        entry = shrink_then_poll(proc, TIMEOUT)
        assert "an access faulted" in entry["detail"], entry
        assert_still_serving(proc, None)
    finally:
        rc = proc.stop(sig=signal.SIGTERM)
    assert rc == 0, f"backend exited {rc}: {proc.tails()}"
