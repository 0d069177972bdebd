"""Hostile descriptor tables from the qtest driver, against real QEMU and the real backend.

One :class:`DescriptorBench` (one backend, one QEMU with the halting BIOS, the qtest virtio-net
driver at DRIVER_OK with indirect descriptors) serves every table: hypothesis draws a table
(:func:`split_tables` / :func:`packed_tables`: loops, chains longer than the ring, heads and
``next`` out of range, avail idx jumps, lengths that overflow, indirect inside indirect,
indirect tables of bad length, descriptors pointing at the rings themselves, unmapped
addresses), the bench writes it into guest memory verbatim through qtest, publishes it and
notifies the TX queue. The verdict is deterministic, no timing involved: the backend's
transport counts every kick it read (``query-vrings`` ``kicks``) and handles a kick in one
event-loop callback, so once the count moved the table has been judged; then the journal says
whether it was refused (``error.vq``/``error.translate`` + NEEDS_RESET, required to come with
the error) or consumed. The bench then resets the device (status 0, the same features, the
same ring addresses zeroed, DRIVER_OK: QEMU stops and restarts vhost on the same connection)
instead of starting anything anew, which is what makes 100,000 tables affordable. Every
``verify_every`` tables, and at the end, a valid frame must still go out on the wire.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import given

from backends.virtio.features import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK
from qtests.fuzz.target import FuzzStats, fuzz_settings, rss_kib
from qtests.qos.frames import make_frame, parse_frame
from qtests.qos.testbed import Testbed
from qtests.qos.virtio_pci import (
    COMMON_QUEUE_DESC,
    COMMON_QUEUE_DEVICE,
    COMMON_QUEUE_DRIVER,
    COMMON_QUEUE_SIZE,
)
from qtests.qos.waiting import poll_until

DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next / packed: addr, len, id, flags
U16 = struct.Struct("<H")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
P_AVAIL, P_USED = 1 << 7, 1 << 15
TX_Q = 1
NET_HDR = 12
UNMAPPED = 0x7000_0000_0000
SCRATCH = 0x10000  # bytes of guest memory for buffers and indirect tables
VERDICT_TIMEOUT_S = 10.0

Table = dict[str, Any]


# -- what a table can hold ----------------------------------------------------------------------
# Addresses are symbolic so one table means the same thing whatever the allocator returned:
# ("buf", off) scratch buffer, ("ind", k) indirect table k, ("desc"|"avail"|"used", off) the ring
# areas themselves, ("raw", value) any u64.
_addr = st.one_of(
    st.tuples(st.just("buf"), st.integers(0, SCRATCH - 1)),
    st.tuples(st.just("buf"), st.just(0)),
    st.tuples(st.just("ind"), st.integers(0, 3)),
    st.tuples(st.sampled_from(["desc", "avail", "used"]), st.integers(0, 64)),
    st.tuples(st.just("raw"), st.sampled_from([0, UNMAPPED, (1 << 64) - 1, (1 << 64) - 0x10])),
    st.tuples(st.just("raw"), st.integers(0, (1 << 64) - 1)),
)
_len = st.one_of(
    st.sampled_from([0, 1, NET_HDR, 16, 24, 32, 64, 1514, 0x10000, 0xFFFFFFFF, 0x80000000]),
    st.integers(0, 0xFFFFFFFF),
)
_split_flags = st.one_of(
    st.sampled_from(
        [
            0,
            F_NEXT,
            F_WRITE,
            F_NEXT | F_WRITE,
            F_INDIRECT,
            F_INDIRECT | F_NEXT,
            F_INDIRECT | F_WRITE,
        ]
    ),
    st.integers(0, 0xFFFF),
)


def _entries(flags: st.SearchStrategy[int], max_size: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(
        st.tuples(_addr, _len, flags, st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF))),
        min_size=1,
        max_size=max_size,
    )


@st.composite
def split_tables(draw: st.DrawFn, size: int) -> Table:
    """A hostile split table for a ring of ``size`` entries."""
    # mostly short tables (cheap to draw); one in four spans the whole ring
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), st.just(size)))
    descs = draw(_entries(_split_flags, n))
    if draw(st.booleans()):  # a chain through every descriptor, longer than the ring or looping
        descs = [
            (a, ln, fl | F_NEXT, (i + 1) % len(descs)) for i, (a, ln, fl, _) in enumerate(descs)
        ]
    return {
        "layout": "split",
        "descs": descs,
        "indirect": draw(st.lists(_entries(_split_flags, 6), max_size=4)),
        "heads": draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)), max_size=4)),
        "avail_idx": draw(
            st.one_of(
                st.none(), st.integers(0, 0xFFFF), st.sampled_from([size, size + 1, 0xFFFF, 0x8000])
            )
        ),
    }


_packed_flags = st.one_of(
    st.sampled_from(
        [
            P_AVAIL,
            P_AVAIL | F_NEXT,
            P_AVAIL | F_WRITE,
            P_AVAIL | F_INDIRECT,
            P_AVAIL | P_USED,
            P_USED,
            0,
            P_AVAIL | F_NEXT | F_INDIRECT,
        ]
    ),
    st.integers(0, 0xFFFF),
)


@st.composite
def packed_tables(draw: st.DrawFn, size: int) -> Table:
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), st.just(size)))
    descs = draw(_entries(_packed_flags, n))
    if draw(st.booleans()):  # one chain over the whole ring (and past its end)
        descs = [(a, ln, fl | P_AVAIL | F_NEXT, i) for i, (a, ln, fl, _) in enumerate(descs)]
    return {
        "layout": "packed",
        "descs": descs,
        "indirect": draw(st.lists(_entries(_split_flags, 6), max_size=4)),
    }


# -- the bench ------------------------------------------------------------------------------------
class DescriptorBench:
    """One testbed reused for every table; reset between tables."""

    def __init__(self, log_dir: Path, stats: FuzzStats, *, packed: bool = False) -> None:
        self.log_dir = log_dir
        self.stats = stats
        self.packed = packed
        self.tb: Testbed | None = None
        self.refused = 0
        self.consumed = 0
        self.resets = 0
        self.seq = 0
        self.mark: int | None = None
        self.start()

    def start(self) -> None:
        props = {"packed": True} if self.packed else {}
        tb = Testbed(
            self.log_dir, name="fuzz-packed" if self.packed else "fuzz-split", net_props=props
        )
        self.tb = tb
        try:
            tb.start(indirect=True, post_rx=False, msix=False, packed=self.packed)
            assert tb.alloc is not None and tb.machine is not None
            net = tb.net
            self.qt = tb.machine.qtest
            self.dev = net.dev
            self.features = net.features
            self.rings = [
                (q.index, q.size, q.desc, q.avail, q.used) for q in (net.rxq[0], net.txq[0])
            ]
            self.notify_addr = self.dev.notify_addr(TX_Q)
            self.scratch = tb.alloc.alloc(SCRATCH, 4096, tag="fuzz scratch")
            self.tables = [tb.alloc.alloc(16 * 8, 16, tag=f"fuzz indirect {k}") for k in range(4)]
            self.size = net.txq[0].size
            self.reset()
            self.verify_traffic()
        except BaseException:
            self.close()
            raise

    # ring programming ---------------------------------------------------------------------
    def _areas(self, index: int) -> tuple[int, int, int]:
        _, size, desc, avail, used = self.rings[index]
        return desc, avail, used

    def reset(self) -> None:
        """Status 0, then the same features and ring addresses (zeroed), DRIVER_OK."""
        d, qt = self.dev, self.qt
        d.set_status(0)
        poll_until(lambda: d.status == 0, VERDICT_TIMEOUT_S, "the device reset to read back 0")
        zero = []
        for _index, size, desc, avail, used in self.rings:
            if self.packed:
                zero += [(desc, bytes(16 * size)), (avail, bytes(4)), (used, bytes(4))]
            else:
                zero += [
                    (desc, bytes(16 * size)),
                    (avail, bytes(6 + 2 * size)),
                    (used, bytes(6 + 8 * size)),
                ]
        qt.write_many(zero)
        d.set_status(STATUS_ACKNOWLEDGE)
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        d.set_driver_features(self.features)
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        for index, size, desc, avail, used in self.rings:
            d.queue_select(index)
            d.common_write(COMMON_QUEUE_SIZE, 2, size)
            d._common_write64(COMMON_QUEUE_DESC, desc)
            d._common_write64(COMMON_QUEUE_DRIVER, avail)
            d._common_write64(COMMON_QUEUE_DEVICE, used)
            d.enable_queue(index)
        d.driver_ok()
        self.avail_idx = 0
        self.resets += 1

    def _resolve(self, a: tuple[str, int]) -> int:
        kind, v = a
        desc, avail, used = self._areas(TX_Q)
        if kind == "buf":
            return self.scratch + v
        if kind == "ind":
            return self.tables[v % 4]
        if kind == "desc":
            return desc + v
        if kind == "avail":
            return avail + v
        if kind == "used":
            return used + v
        return v

    def _writes(self, t: Table) -> list[tuple[int, bytes]]:
        desc, avail, used = self._areas(TX_Q)
        out: list[tuple[int, bytes]] = []
        for k, entries in enumerate(t["indirect"]):
            raw = b"".join(DESC.pack(self._resolve(a), ln, fl, nx) for a, ln, fl, nx in entries)
            out.append((self.tables[k], raw[: 16 * 8]))
        n = min(len(t["descs"]), self.size)
        if t["layout"] == "split":
            raw = b"".join(
                DESC.pack(self._resolve(a), ln, fl, nx) for a, ln, fl, nx in t["descs"][:n]
            )
            out.append((desc, raw))
            heads = t["heads"] or [0]
            out.append((avail + 4, b"".join(U16.pack(h) for h in heads[: self.size])))
            idx = t["avail_idx"]
            out.append((avail + 2, U16.pack(len(heads) if idx is None else idx)))
        else:
            # packed: id in the `next` slot; written last-to-first so the head's AVAIL flag is
            # the final store (one write_many: order within it is what QEMU sees)
            raw = b"".join(
                DESC.pack(self._resolve(a), ln, nx, fl) for a, ln, fl, nx in t["descs"][:n]
            )
            out.append((desc, raw))
        return out

    # one table ----------------------------------------------------------------------------
    def kicks(self) -> int:
        assert self.tb is not None and self.tb.backend is not None
        return int(self.tb.backend.vring(TX_Q).get("kicks") or 0)

    def run_table(self, t: Table) -> str | None:
        """Write, publish, notify; wait for the kick to be judged. None if the backend behaved,
        else 'crash' / 'hang' / 'silent' (refused without NEEDS_RESET)."""
        tb = self.tb
        assert tb is not None and tb.backend is not None
        backend = tb.backend
        st_ = self.stats
        try:
            self.qt.write_many(self._writes(t))
            before = self.kicks()
            # taken after the previous reset: stopping a ring that has NEEDS_RESET walks the
            # hostile table once more (GET_VRING_BASE) and journals its error again
            mark = backend.mark()
            self.qt.writew(self.notify_addr, TX_Q)
            st_.cases += 1
            st_.messages += 1
            poll_until(
                lambda: self.kicks() > before,
                VERDICT_TIMEOUT_S,
                "the backend to read the TX kick",
                max_interval=0.002,
            )
        except Exception as e:  # no answer in time (monitor, qtest): the backend hung or died
            return self._lost(t, e)
        try:
            answer = backend.cmd("query-journal", kinds=["error."], since=mark)
            errors = answer["entries"]
            status = backend.cmd("query-status") if errors else {}
        except Exception as e:
            return self._lost(t, e)
        if errors:
            self.refused += 1
            if "NEEDS_RESET" not in status["status_names"]:
                st_.failures.append(f"refused without NEEDS_RESET: {errors[0]} for {t!r}")
                return "silent"
        else:
            self.consumed += 1
        if st_.cases % 10 == 0 or st_.fd_baseline is None:
            self.sample()
        try:
            self.reset()
        except Exception as e:
            return self._lost(t, e)
        return None

    def _lost(self, t: Table, e: BaseException) -> str:
        """The backend did not answer within the bound (hang) or is gone (crash): count it,
        keep the table in the failures, start a fresh testbed."""
        assert self.tb is not None and self.tb.backend is not None
        st_ = self.stats
        verdict = "hang" if self.tb.backend.running else "crash"
        if verdict == "crash":
            st_.crashes += 1
        else:
            st_.hangs += 1
        st_.failures.append(f"{verdict} on table {t!r}: {type(e).__name__}: {e}")
        self.restart()
        return verdict

    def sample(self) -> None:
        assert self.tb is not None and self.tb.backend is not None
        pid = self.tb.backend.pid
        if pid is None:
            return
        import os

        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = rss_kib(pid)
        st_ = self.stats
        st_.sample(fds, rss)
        if st_.fd_baseline is None:
            st_.fd_baseline = fds
            st_.rss_first_kib = rss
        if st_.rss_start_kib is None and st_.cases >= 20_000:
            st_.rss_start_kib = rss
        if fds > st_.fd_baseline + 2:  # (a reset replaces kick/call fds: +2 in flight at most)
            st_.fd_leaks += 1
            st_.failures.append(f"fd leak: {fds} open, baseline {st_.fd_baseline}")
            st_.fd_baseline = fds

    def verify_traffic(self) -> None:
        """A valid TX frame still reaches the wire (after any number of hostile tables)."""
        assert self.tb is not None
        self.seq += 1
        frame = make_frame(self.seq, 100, stream=7)
        desc, avail, used = self._areas(TX_Q)
        buf = self.scratch
        if self.packed:
            writes = [
                (buf, bytes(NET_HDR) + frame),
                (desc, DESC.pack(buf, NET_HDR + len(frame), 0, P_AVAIL)),
            ]
        else:
            writes = [
                (buf, bytes(NET_HDR) + frame),
                (desc, DESC.pack(buf, NET_HDR + len(frame), 0, 0)),
                (avail + 4, U16.pack(0)),
                (avail + 2, U16.pack(1)),
            ]
        self.qt.write_many(writes)
        self.qt.writew(self.notify_addr, TX_Q)
        # frames of hostile tables the backend accepted (any bytes) may be queued before ours
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"after hostile tables frame {self.seq} never reached the wire"
                )
            if parse_frame(self.tb.peer.recv(left)) == (7, self.seq):
                break
        self.reset()

    def restart(self) -> None:
        self.mark = None
        self.close()
        self.start()

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            tb.close()


def _fuzz_layout(
    bench: DescriptorBench,
    budget: int,
    deadline: float,
    *,
    ci: bool,
    strict: bool,
    chunk: int,
    verify_every: int,
    progress: Callable[[str], None] | None,
) -> None:
    stats = bench.stats
    layout = "packed" if bench.packed else "split"
    strategy = packed_tables(bench.size) if bench.packed else split_tables(bench.size)

    @fuzz_settings(min(chunk, budget), ci=ci)
    @given(table=strategy)
    def one(table: Table) -> None:
        verdict = bench.run_table(table)
        if strict and verdict is not None:
            raise AssertionError(f"{verdict}: {stats.failures[-1]}")

    end = stats.cases + budget
    first = True  # every layout gets at least one chunk, however slow the machine is
    while stats.cases < end and (first or time.monotonic() < deadline):
        first = False
        before = stats.cases
        one()
        if stats.cases // verify_every != before // verify_every:
            bench.verify_traffic()
        if progress is not None:
            progress(
                f"[{layout}] refused={bench.refused} consumed={bench.consumed} "
                f"resets={bench.resets} " + stats.report()
            )
        if ci:
            break  # derandomized: one chunk is the slice
    bench.verify_traffic()


def run(
    max_tables: int,
    max_seconds: float,
    *,
    log_dir: Path,
    ci: bool = False,
    strict: bool = False,
    chunk: int = 500,
    verify_every: int = 500,
    layouts: tuple[str, ...] = ("split", "packed"),
    progress: Callable[[str], None] | None = None,
) -> FuzzStats:
    """Hostile tables split evenly across ``layouts`` until ``max_tables`` or ``max_seconds``.
    ``strict``: the first crash / hang / silent refusal fails (hypothesis reports the table)."""
    stats = FuzzStats("descriptors")
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max_seconds
    per_layout = max(1, max_tables // len(layouts))
    for layout in layouts:
        bench = DescriptorBench(log_dir, stats, packed=layout == "packed")
        try:
            _fuzz_layout(
                bench,
                per_layout,
                deadline,
                ci=ci,
                strict=strict,
                chunk=chunk,
                verify_every=verify_every,
                progress=progress,
            )
        finally:
            bench.close()
    return stats
