"""The VDUSE fuzzer: what a misbehaving kernel could send, in-process, with hypothesis.

The real transport (:class:`backends.vduse.transport.VduseTransport`, device model, virtio-net,
event loop) runs over the fake kernel (:class:`backends.vduse.fake_kernel.FakeVduse`), which
plays the kernel's side and is made to misbehave by :class:`VduseMachine` (hypothesis stateful
testing): raw messages of any length, unknown request types, GET_VQ_STATE for queues that do
not exist or are not ready, SET_STATUS values in any order, UPDATE_IOTLB ranges that are empty,
inverted, overflow or overlap, IOTLB_GET_FD answers with fds of the wrong kind (pipe, eventfd,
socket, /dev/null) or the wrong size (a memfd shorter than the range, an offset past its end),
ioctl errors, driver features never offered (or the packed layout), VQ_GET_INFO answers with addresses outside the IOTLB, sizes 0 / not a power of
two / above the maximum, an avail index far ahead, ready toggled, kicks for queues never set up.
Messages are encoded with the one codec (:mod:`backends.vduse.uapi`).

After every case the transport must answer a fresh valid sequence (reset, bring-up, one TX
frame on the wire), the process's open fds (``/proc/self/fd``) must be back at the baseline,
and no exception may have escaped into the event loop or a request handler (a handler's
journalled ``error.vduse`` is fine; a traceback in the log is not).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from backends.tests.vduse_rig import (
    DRIVER_FEATURES,
    MEM_SIZE,
    RING_SPACING,
    Rig,
    make_rig,
    tx_chain,
)
from backends.vduse import uapi
from backends.vduse.fake_kernel import ADDR_MAX
from backends.vduse.uapi import IotlbEntry, Request
from backends.virtio.features import VIRTIO_F_RING_PACKED
from qtests.fuzz.target import FuzzStats, fuzz_settings, rss_kib

PUMP_TIMEOUT_S = 10.0

_u64 = st.one_of(
    st.sampled_from([0, 1, 0xFFF, 0x1000, MEM_SIZE - 1, MEM_SIZE, 1 << 32, 1 << 63, ADDR_MAX]),
    st.integers(0, ADDR_MAX),
)
_addr = st.one_of(
    st.integers(0, MEM_SIZE + 0x1000),  # in (or just past) the mapped guest memory
    st.sampled_from([RING_SPACING, MEM_SIZE - 2, ADDR_MAX - 1, 1 << 48]),
    st.integers(0, ADDR_MAX),
)
_ERRNOS = [errno.EINVAL, errno.ENOMEM, errno.EFAULT, errno.EPERM, errno.ENODEV, errno.EIO]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Tracebacks(logging.Handler):
    """Counts log records that carry an exception (``log.exception``): an exception escaped
    into the event loop or a request handler's catch-all."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(f"{record.name}: {record.getMessage()}: {record.exc_info[1]!r}")


class KernelSide:
    """One fake kernel + transport rig, kept across cases (like one backend process), and the
    fds a case made (closed when the case ends)."""

    def __init__(self, stats: FuzzStats) -> None:
        self.stats = stats
        self.rig = make_rig()
        self.fds: list[int] = []
        self.ops: list[str] = []
        self.frames = 0
        self._rid = 1 << 20

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def send(self, data: bytes) -> None:
        self.rig.kernel.queue(data)
        self.stats.messages += 1
        self.pump()

    def pump(self) -> None:
        """Run the loop until every queued message was read, then the due callbacks."""
        k = self.rig.kernel
        self.rig.loop.run_until(lambda: not k.requests, PUMP_TIMEOUT_S, "the transport to read")
        self.rig.loop.run_once(0)

    def fd_of(self, kind: str, size: int) -> int:
        if kind == "memfd":
            fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            self.fds.append(w)
            fd = r
        elif kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        elif kind == "socket":
            a, b = socket.socketpair()
            self.fds.append(b.detach())
            fd = a.detach()
        else:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def end_case(self) -> None:
        self.rig.kernel.responses.clear()  # the fake keeps every reply; lookups scan them
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.ops = []

    def fresh_sequence(self) -> None:
        """Reset + a valid bring-up + one TX frame on the wire (AssertionError / TimeoutError
        when the transport cannot do it any more)."""
        k = self.rig.kernel
        k.get_fd_errno = k.map_errno = k.irq_errno = None
        if self.rig.mem is not None:  # a driver that starts over initialises its rings
            self.rig.mem.buf[:] = bytes(MEM_SIZE)
        self.rig.bring_up()
        self.rig.wait(lambda: self.rig.device.vqs[1].ready, "TX ready after the fresh bring-up")
        sent = len(self.rig.wire.sent)
        tx_chain(self.rig.rings[1], b"\x5a" * 60)
        k.kick(1)
        self.rig.wait(lambda: len(self.rig.wire.sent) > sent, "a TX frame after the case")
        self.stats.messages += 6

    def rebuild(self) -> None:
        try:
            self.rig.close()
        except Exception:
            pass
        self.end_case()
        self.rig = make_rig()

    def close(self) -> None:
        self.end_case()
        self.rig.close()


class VduseMachine(RuleBasedStateMachine):
    """One case: the fake kernel sends and answers whatever the rules draw."""

    side: KernelSide
    on_case: Callable[[list[str]], None]

    def __init__(self) -> None:
        super().__init__()
        self.s = type(self).side

    @property
    def rig(self) -> Rig:
        return self.s.rig

    def _op(self, text: str) -> None:
        self.s.ops.append(text)

    @rule(data=st.binary(max_size=2 * uapi.MESSAGE_SIZE))
    def raw(self, data: bytes) -> None:
        """A message of any length and content."""
        self._op(f"raw {data.hex()}")
        self.s.send(data)

    @rule(typ=st.integers(0, 0xFFFFFFFF), payload=st.binary(max_size=uapi.UNION_SIZE))
    def any_type(self, typ: int, payload: bytes) -> None:
        """A request of any type (unknown ones included) with any union."""
        self._op(f"request type={typ} payload={payload.hex()}")
        self.s.send(Request(typ, self.s.rid(), payload).pack())

    @rule(index=st.one_of(st.integers(0, 3), st.integers(0, 0xFFFFFFFF)))
    def get_vq_state(self, index: int) -> None:
        self._op(f"GET_VQ_STATE {index}")
        self.s.send(uapi.get_vq_state_request(self.s.rid(), index).pack())

    @rule(
        status=st.one_of(st.sampled_from([0, 1, 3, 11, 15, 4, 8, 0x40, 0x80]), st.integers(0, 255))
    )
    def set_status(self, status: int) -> None:
        """SET_STATUS in any order (DRIVER_OK before FEATURES_OK, bits dropped, FAILED...)."""
        self._op(f"SET_STATUS {status:#x}")
        self.s.send(uapi.set_status_request(self.s.rid(), status).pack())
        if status == 0:
            self.rig.kernel.reset()  # vduse_dev_reset after the reply

    @rule(start=_u64, last=_u64)
    def update_iotlb(self, start: int, last: int) -> None:
        """UPDATE_IOTLB for any range: empty, inverted, the whole space."""
        self._op(f"UPDATE_IOTLB [{start:#x}, {last:#x}]")
        self.s.send(uapi.update_iotlb_request(self.s.rid(), start, last).pack())

    @rule(
        entries=st.lists(
            st.tuples(
                _u64,  # iova start
                st.sampled_from([0, 1, 0x1000, MEM_SIZE, ADDR_MAX]),  # size
                st.sampled_from(["memfd", "memfd", "memfd", "pipe", "eventfd", "socket", "null"]),
                st.sampled_from([0, 0x1000, MEM_SIZE // 2, MEM_SIZE]),  # the file's size
                st.sampled_from([0, 0x800, 0x1000, MEM_SIZE, 1 << 62]),  # offset in the file
                st.integers(0, 7),  # perm (3: RW; others wrong)
            ),
            max_size=4,
        ),
        start=_u64,
        last=_u64,
    )
    def iotlb_table(
        self, entries: list[tuple[int, int, str, int, int, int]], start: int, last: int
    ) -> None:
        """The kernel's IOTLB (what IOTLB_GET_FD answers) replaced by entries that may overlap,
        overflow, be empty, point past the end of their file or at an fd of the wrong kind,
        then UPDATE_IOTLB for a range."""
        table = []
        for iova, size, kind, fsize, offset, perm in entries:
            fd = self.s.fd_of(kind, fsize)
            table.append((IotlbEntry(offset, iova, min(iova + size - 1, ADDR_MAX), perm), fd))
        self._op(f"IOTLB {[(e.start, e.last, e.offset, e.perm, k[2], k[3]) for (e, _), k in zip(table, entries, strict=True)]}")  # fmt: skip
        self.rig.kernel.iotlb = table
        self.s.send(uapi.update_iotlb_request(self.s.rid(), start, last).pack())

    @rule(get_fd=st.sampled_from([None, *_ERRNOS]), map_=st.sampled_from([None, *_ERRNOS]))
    def ioctl_errors(self, get_fd: int | None, map_: int | None) -> None:
        """VDUSE_IOTLB_GET_FD / mmap failing."""
        self._op(f"errors get_fd={get_fd} map={map_}")
        self.rig.kernel.get_fd_errno = get_fd
        self.rig.kernel.map_errno = map_

    @rule(
        index=st.integers(0, 1),
        num=st.sampled_from([0, 1, 2, 3, 64, 100, 256, 257, 1 << 15, 0xFFFF, 1 << 16]),
        desc=_addr,
        driver=_addr,
        device=_addr,
        avail=st.integers(0, 0xFFFF),
        ready=st.booleans(),
    )
    def vq_info(
        self, index: int, num: int, desc: int, driver: int, device: int, avail: int, ready: bool
    ) -> None:
        """What VQ_GET_INFO will answer: any size, addresses in or out of the IOTLB, any avail
        index, ready or not."""
        self._op(f"VQ_INFO {index} num={num} {desc:#x} {driver:#x} {device:#x} {avail} {ready}")
        k = self.rig.kernel
        k.setup_vq(index, num, desc, driver, device, avail)
        k.set_ready(index, ready)

    @rule(
        features=st.one_of(
            st.sampled_from(
                [0, DRIVER_FEATURES, DRIVER_FEATURES | 1 << VIRTIO_F_RING_PACKED, 1 << 32]
            ),
            st.integers(0, (1 << 64) - 1),
        )
    )
    def driver_features(self, features: int) -> None:
        """What VDUSE_DEV_GET_FEATURES answers at the next FEATURES_OK: bits never offered,
        VERSION_1 missing, the packed layout."""
        self._op(f"driver features {features:#x}")
        self.rig.kernel.driver_features = features

    @rule(index=st.integers(0, 1), ready=st.booleans())
    def toggle_ready(self, index: int, ready: bool) -> None:
        self._op(f"ready {index} {ready}")
        self.rig.kernel.set_ready(index, ready)

    @rule(index=st.integers(0, 1), force=st.booleans())
    def kick(self, index: int, force: bool) -> None:
        """A kick, also for a queue that is not ready or was never set up."""
        self._op(f"kick {index} force={force}")
        self.rig.kernel.kick(index, force=force)
        self.s.pump()

    @rule(offset=st.integers(0, MEM_SIZE - 1), data=st.binary(min_size=1, max_size=64))
    def scribble(self, offset: int, data: bytes) -> None:
        """The driver side writes anything into guest memory (rings included: avail index far
        ahead, descriptors out of range)."""
        mem = self.rig.mem
        if mem is not None:
            self._op(f"scribble {offset:#x} {data.hex()}")
            data = data[: MEM_SIZE - offset]
            mem.buf[offset : offset + len(data)] = data

    def teardown(self) -> None:
        type(self).on_case(list(self.s.ops))


def run(
    max_cases: int,
    max_seconds: float,
    *,
    ci: bool = False,
    strict: bool = False,
    chunk: int = 100,
    progress: Callable[[str], None] | None = None,
) -> FuzzStats:
    """Fuzz until ``max_cases`` cases ran or ``max_seconds`` passed (checked between chunks).
    ``strict``: the first broken transport, fd leak or escaped exception fails (hypothesis
    then shrinks the case); otherwise it is counted and the rig rebuilt."""
    # RSS counts from here: the device's bounded journal (100,000 entries) is full by then
    stats = FuzzStats("vduse", warmup_messages=50_000)
    tracebacks = _Tracebacks()
    backends_log = logging.getLogger("backends")
    backends_log.addHandler(tracebacks)
    quiet = backends_log.level
    backends_log.setLevel(logging.ERROR)  # the journal has the warnings; keep the output short
    side = KernelSide(stats)
    try:
        side.fresh_sequence()
        stats.fd_baseline = open_fds()

        def on_case(ops: list[str]) -> None:
            stats.cases += 1
            case = f"case {stats.cases}: " + "; ".join(ops)[:2000]
            verdict = None
            try:
                side.fresh_sequence()
            except TimeoutError as e:
                stats.hangs += 1
                verdict = f"hang ({e})"
            except Exception as e:
                stats.crashes += 1
                verdict = f"broken ({type(e).__name__}: {e})"
            side.end_case()
            if tracebacks.seen:
                if verdict is None:
                    stats.crashes += 1
                verdict = f"{verdict or 'exception'}: {tracebacks.seen[0]}"
                tracebacks.seen.clear()
            if verdict is not None:
                side.rebuild()
                side.fresh_sequence()
                stats.fd_baseline = open_fds()
            fds = open_fds()
            stats.sample(fds, rss_kib(os.getpid()))
            if stats.fd_baseline is not None and fds > stats.fd_baseline:
                stats.fd_leaks += 1
                verdict = f"fd leak ({fds} open, baseline {stats.fd_baseline})"
                stats.fd_baseline = fds
            if stats.rss_first_kib is None:
                stats.rss_first_kib = stats.rss_end_kib
            if stats.rss_start_kib is None and stats.messages >= stats.warmup_messages:
                stats.rss_start_kib = stats.rss_end_kib
            if verdict is not None:
                stats.failures.append(f"{verdict} after {case}")
                if strict:
                    raise AssertionError(f"transport {verdict} after {case}")

        VduseMachine.side = side
        VduseMachine.on_case = staticmethod(on_case)
        while stats.cases < max_cases and stats.wall_s < max_seconds:
            before = stats.cases
            run_state_machine_as_test(
                VduseMachine, settings=fuzz_settings(min(chunk, max_cases - before), ci=ci)
            )
            if progress is not None:
                progress(stats.report())
            if ci or stats.cases == before:
                break  # a derandomized run repeats itself: one chunk is the slice
        return stats
    finally:
        side.close()
        backends_log.removeHandler(tracebacks)
        backends_log.setLevel(quiet)
