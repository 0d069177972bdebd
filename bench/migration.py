"""Migration: downtime and total time of a qtest live migration, and GET_VRING_BASE latency.

* ``migration_downtime_ms`` / ``migration_total_ms``: two testbeds of ``qtests/qos`` (backend +
  QEMU 10 + the qtest virtio-net driver each), the source at DRIVER_OK with RX buffers posted,
  migrated with ``qtests.qos.migration.MigrationPair`` over a unix socket; QEMU's own
  ``query-migrate`` figures (median over the runs). ``migration_ring_gap_ms``: from the
  source backend's last ``vq.stop`` to the destination backend's first ``vq.start``
  (both journals, CLOCK_MONOTONIC): how long no backend ran the rings.
* ``get_vring_base_us_256_inflight``: a backend process holding 256 popped TX chains (monitor
  ``hold-tx``: completions held, like a datapath with transmissions pending) answers
  GET_VRING_BASE, i.e. drops what it holds, rewinds 256 and replies; request -> reply over the
  real socket, the front-end of ``qtests/qos/vhost_user_frontend.py`` (as QEMU at the switchover).
  ``get_vring_base_us_0_inflight``: the same ring with nothing in flight.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.vhost_user import messages as m
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM
from bench.report import Report
from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend, VhostUserRing
from qtests.qos.waiting import poll_until

RING = 256
HDR = bytes(12)


# -- live migration ---------------------------------------------------------------------------
def live_migration(report: Report, log_dir: Path, runs: int, log: Callable[[str], None]) -> None:
    try:
        from qtests.qos.migration import MigrationPair
        from qtests.qos.testbed import Testbed
    except ImportError as e:
        for key in ("migration_downtime_ms", "migration_total_ms"):
            report.fail(key, f"qtests/qos/migration.py is not available: {e}")
        return
    downtimes: list[float] = []
    totals: list[float] = []
    gaps: list[float] = []
    for run in range(runs):
        run_dir = log_dir / f"run{run}"
        run_dir.mkdir(parents=True, exist_ok=True)
        beds: list[Any] = []
        make = _factory(Testbed, run_dir, beds)
        try:
            pair = MigrationPair(make, memory="256M")
            pair.start_source()
            pair.start_destination()
            src_mark = pair.src.backend.mark()
            dst_mark = pair.dst.backend.mark()
            stats = pair.migrate(timeout=120)
            if stats.downtime_ms is not None:
                downtimes.append(float(stats.downtime_ms))
            if stats.total_time_ms is not None:
                totals.append(float(stats.total_time_ms))
            gap = _ring_gap(pair.src.backend, src_mark, pair.dst.backend, dst_mark)
            if gap is not None:
                gaps.append(gap)
            log(
                f"  migration run {run + 1}: downtime {stats.downtime_ms} ms, total "
                f"{stats.total_time_ms} ms, ring gap {gap if gap is None else round(gap, 1)} ms"
            )
        finally:
            for tb in reversed(beds):
                tb.close()
    _put_median(report, "migration_downtime_ms", downtimes, "QEMU query-migrate 'downtime'")
    _put_median(report, "migration_total_ms", totals, "QEMU query-migrate 'total-time'")
    _put_median(report, "migration_ring_gap_ms", gaps, "last vq.stop (src) -> first vq.start")


def _factory(testbed_cls: Any, log_dir: Path, beds: list[Any]) -> Callable[..., Any]:
    """A ``make_testbed`` like the qtests fixture: every testbed it makes is in ``beds``."""

    def make(**kw: Any) -> Any:
        tb = testbed_cls(log_dir, **kw)
        beds.append(tb)
        return tb

    return make


def _put_median(report: Report, key: str, values: list[float], what: str) -> None:
    if values:
        report.put(key, round(statistics.median(values), 2))
        report.note(key, f"{what}, median of {len(values)} run(s), idle qtest guest, 256 MiB")
    else:
        report.fail(key, f"no value: {what} was not reported")


def _ring_gap(src: Any, src_mark: int, dst: Any, dst_mark: int) -> float | None:
    stops = [e for e in src.journal(["vq.stop"], src_mark) if "mono_ns" in e]
    starts = [e for e in dst.journal(["vq.start"], dst_mark) if "mono_ns" in e]
    if not stops or not starts:
        return None
    return (min(e["mono_ns"] for e in starts) - max(e["mono_ns"] for e in stops)) / 1e6


# -- GET_VRING_BASE ---------------------------------------------------------------------------
def vring_base(
    report: Report, workdir: Path, log: Callable[[str], None], backend_cpu: int | None
) -> None:
    proc = BackendProcess.launch(workdir, "--wire", "null")
    mem = SharedGuestMemory(4 << 20)
    rx = VhostUserRing(mem, 0, RING)
    tx = VhostUserRing(mem, 1, RING)
    fe = None
    try:
        if backend_cpu is not None:
            os.sched_setaffinity(proc.pid, {backend_cpu})
        fe = Frontend(proc.socket, timeout=10)
        fe.init_like_qemu(2)
        features = fe.device_features & ~(1 << m.VHOST_F_LOG_ALL)
        features &= ~(1 << VIRTIO_F_ACCESS_PLATFORM)
        fe.start_like_qemu(mem, [rx, tx], features)
        frame = HDR + bytes(60)
        buf = mem.alloc(len(frame))
        mem.write(buf, frame)
        proc.cmd("hold-tx", enable=True)
        for _ in range(RING):
            tx.add(out=[(buf, len(frame))])
        base = 0
        held, idle = [], []
        for _ in range(20):
            tx.kick()
            poll_until(lambda: _inflight(proc, 1) == RING, 10, f"{RING} TX chains held in flight")
            t0 = time.perf_counter()
            base = fe.get_vring_base(1)
            held.append(time.perf_counter() - t0)
            if base != tx.avail_idx - RING & 0xFFFF:
                raise RuntimeError(f"GET_VRING_BASE {base}: the {RING} held chains not rewound")
            # nothing in flight now (the ring is stopped): the same request again
            _restart(fe, tx, base)
            proc.cmd("hold-tx", enable=False)
            t0 = time.perf_counter()
            fe.get_vring_base(1)
            idle.append(time.perf_counter() - t0)
            proc.cmd("hold-tx", enable=True)
            _restart(fe, tx, base)
        report.put("get_vring_base_us_256_inflight", round(statistics.median(held) * 1e6, 1))
        report.put("get_vring_base_us_0_inflight", round(statistics.median(idle) * 1e6, 1))
        log(
            f"  GET_VRING_BASE: {report.get('get_vring_base_us_256_inflight')} us with {RING} "
            f"in flight, {report.get('get_vring_base_us_0_inflight')} us with none"
        )
    finally:
        if fe is not None:
            fe.close_init_fds()
            fe.close()
        rx.close()
        tx.close()
        proc.stop()
        mem.close()


def vring_base_model(report: Report, log: Callable[[str], None]) -> None:
    """``VdpaDevice.stop_vq`` in-process with 256 TX chains held (what GET_VRING_BASE runs)."""
    from bench.inproc import InprocDatapath

    b = InprocDatapath(64)
    try:
        b.net.hold_tx(True)
        vq = b.dev.vqs[1]
        times = []
        for _ in range(30):
            b.publish_all(1)
            b.dev.kick_vq(1)
            if vq.inflight != RING:
                raise RuntimeError(f"{vq.inflight} chains in flight, wanted {RING}")
            t0 = time.perf_counter()
            state = b.dev.stop_vq(1)
            times.append(time.perf_counter() - t0)
            b.dev.set_vq_state(1, state)
            b.dev.start_vq(1)
            b.unpublish(1, RING)
    finally:
        b.close()
    report.put("get_vring_base_us_256_inflight_model", round(statistics.median(times) * 1e6, 1))
    log(f"  stop_vq with {RING} held, in-process: {statistics.median(times) * 1e6:.1f} us")


def _inflight(proc: BackendProcess, vq: int) -> int:
    return int(proc.vring(vq)["inflight"])


def _restart(fe: Any, ring: VhostUserRing, base: int) -> None:
    """QEMU's ring start after a stop: NUM, BASE, ADDR, KICK (the same eventfd again)."""
    fe.set_vring_num(ring.index, ring.num)
    fe.set_vring_base(ring.index, base)
    fe.set_vring_addr(ring.vring_addr())
    fe.set_vring_kick(ring.index, ring.kick_fd)
