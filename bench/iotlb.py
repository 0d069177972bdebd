"""IOTLB: lookups per second, and the MISS round trip.

* ``iotlb_lookups_per_s_1k`` / ``_100k``: ``IOTLB.translate(iova, 64, READ)`` over random
  entries of a table of 1 000 / 100 000 4 KiB mappings (with gaps, so nothing merges), no
  journal, per second of this thread's CPU time (other processes on the machine then change
  the figure little); the module as imported (mypyc-compiled when ``make compiled`` built it,
  ``backends/compiled.py``), and ``_100k_interpreted`` from the source in a child process; ``dma_translate_per_s_100k`` the same through ``DmaSpace.translate`` (IOTLB +
  host memory + the remembered window) with every lookup in a different mapping, its worst
  case.
* ``iotlb_miss_rtt_us``: with QEMU - a virtio-iommu in front of the device (qtest driver
  ``qtests/qos/virtio_iommu.py``), the guest maps a fresh page per packet, so every packet
  makes the backend send an IOTLB MISS; the figure is the backend's ``iotlb.miss_sent`` ->
  ``iotlb.miss_ack`` (QEMU has sent the UPDATE before it acks), from its journal timestamps
  (CLOCK_MONOTONIC). ``iotlb_miss_rtt_us_frontend``: the same against the Python front-end of
  ``qtests/qos/vhost_user_frontend.py`` over a real socket (kick -> MISS read -> UPDATE + ack ->
  used), ``iotlb_miss_notify_us_frontend`` its kick -> MISS part.
"""

from __future__ import annotations

import os
import random
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.vdpa.access import Access
from backends.vdpa.dma import DmaSpace
from backends.vdpa.iotlb import IOTLB, Perm
from backends.vdpa.memory import HostMemory, HostRegion
from backends.vhost_user import messages as m
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM
from bench.report import Report
from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import UADDR_BASE, SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend, IommuEntry, VhostUserRing

PAGE = 0x1000
IOVA_OFFSET = 0x10_0000_0000
HDR = bytes(12)


def _table(n: int) -> IOTLB:
    t = IOTLB()  # no journal: the figure is the lookup
    t.set_map((k * 2 * PAGE, PAGE, UADDR_BASE + k * PAGE, Perm.RW) for k in range(n))
    return t


def lookups_per_s(n: int, budget_s: float = 1.0) -> float:
    t = _table(n)
    rng = random.Random(n)
    iovas = [rng.randrange(n) * 2 * PAGE + rng.randrange(PAGE - 64) for _ in range(20000)]
    translate = t.translate
    read = Access.READ
    done = 0
    t0 = time.thread_time()
    deadline = t0 + budget_s
    while True:
        for iova in iovas:
            translate(iova, 64, read)
        done += len(iovas)
        now = time.thread_time()
        if now >= deadline:
            return done / (now - t0)


def dma_translate_per_s(n: int, budget_s: float = 1.0) -> float:
    t = _table(n)
    host = HostMemory()
    host.add(HostRegion(0, n * PAGE, UADDR_BASE, 0, bytearray(n * PAGE)))
    dma = DmaSpace(t, host)
    iovas = [k * 2 * PAGE for k in range(n)]
    random.Random(1).shuffle(iovas)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    while True:
        for iova in iovas[:20000]:
            dma.translate(iova, 64, Access.READ)
        done += min(n, 20000)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - t0)


def in_process(
    report: Report, log: Callable[[str], None], budget_s: float = 1.0, quick: bool = False
) -> None:
    """Lookups/s, each figure from ``budget_s`` CPU seconds of lookups; ``quick`` (``--quick``)
    measures only the lookups of the code as it runs (not the interpreted fall-back nor
    DmaSpace), each table of 100,000 entries taking a good part of a second to build."""
    import backends.vdpa.iotlb as iotlb_module
    from backends.compiled import is_compiled

    how = "mypyc-compiled" if is_compiled(iotlb_module) else "interpreted"
    for n, key in ((1000, "1k"), (100_000, "100k")):
        rate = lookups_per_s(n, budget_s)
        report.put(f"iotlb_lookups_per_s_{key}", round(rate), f"{how} backends/vdpa/iotlb.py")
        log(f"  IOTLB.translate ({how}), {n} entries: {rate:,.0f} lookups/s")
    if quick:
        return
    code = f"from bench.iotlb import lookups_per_s; print(lookups_per_s(100_000, {budget_s}))"
    env = dict(os.environ, VDPA_INTERPRETED="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode == 0:
        rate = float(r.stdout.split()[-1])
        report.put("iotlb_lookups_per_s_100k_interpreted", round(rate))
        log(f"  IOTLB.translate (interpreted), 100000 entries: {rate:,.0f} lookups/s")
    else:
        report.fail("iotlb_lookups_per_s_100k_interpreted", r.stderr.strip()[-300:])
    rate = dma_translate_per_s(100_000, budget_s)
    report.put("dma_translate_per_s_100k", round(rate))
    log(f"  DmaSpace.translate, 100k entries, every lookup a new mapping: {rate:,.0f}/s")


# -- MISS round trip against the Python front-end ------------------------------------------------
def miss_rtt_frontend(
    report: Report, workdir: Path, log: Callable[[str], None], backend_cpu: int | None
) -> None:
    proc = BackendProcess.launch(workdir, "--wire", "null", monitor=False)
    mem = SharedGuestMemory(4 << 20)
    tx = VhostUserRing(mem, 1, 64, IOVA_OFFSET)
    rx = VhostUserRing(mem, 0, 64, IOVA_OFFSET)
    fe = None
    try:
        if backend_cpu is not None:
            os.sched_setaffinity(proc.pid, {backend_cpu})
        fe = Frontend(proc.socket, timeout=10)
        fe.init_like_qemu(2)
        features = fe.device_features & ~(1 << m.VHOST_F_LOG_ALL)
        if not features >> VIRTIO_F_ACCESS_PLATFORM & 1:
            report.fail("iotlb_miss_rtt_us_frontend", "backend did not offer ACCESS_PLATFORM")
            return
        rings_end = max(tx.used, rx.used) + PAGE
        buffers = 1 << 20  # GPA of the buffer area: its IOTLB entry comes and goes
        fe.iommu = [
            IommuEntry(IOVA_OFFSET, rings_end, 0, 3),
            IommuEntry(IOVA_OFFSET + buffers, 1 << 20, buffers, 3),
        ]
        fe.start_like_qemu(mem, [rx, tx], features)
        fe.iotlb_update(IOVA_OFFSET, rings_end, UADDR_BASE, 3)  # rings stay mapped
        assert fe.backend_sock is not None
        frame = HDR + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56\x08\x00" + bytes(50)
        buf = buffers + 0x100
        mem.write(buf, frame)
        _warm_up(fe, tx, buf, len(frame))  # serves the misses left from the start-up
        notify, rtt = [], []
        for _ in range(40):
            fe.iotlb_invalidate(IOVA_OFFSET + buffers, 1 << 20)
            tx.add(out=[(buf, len(frame))])
            t0 = time.perf_counter()
            tx.kick()
            miss = fe.recv_backend()
            t1 = time.perf_counter()
            _serve(fe, miss)
            _wait_used(tx, 1)
            t2 = time.perf_counter()
            notify.append(t1 - t0)
            rtt.append(t2 - t0)
        report.put("iotlb_miss_notify_us_frontend", round(statistics.median(notify) * 1e6, 1))
        report.put("iotlb_miss_rtt_us_frontend", round(statistics.median(rtt) * 1e6, 1))
        log(
            f"  MISS via the Python front-end: kick->MISS "
            f"{report.get('iotlb_miss_notify_us_frontend')} us, kick->used "
            f"{report.get('iotlb_miss_rtt_us_frontend')} us"
        )
    finally:
        if fe is not None:
            fe.close_init_fds()
            fe.close()
        tx.close()
        rx.close()
        proc.stop()
        mem.close()


def _warm_up(fe: Any, tx: VhostUserRing, buf: int, length: int, timeout: float = 30.0) -> None:
    """One packet through, serving every MISS (start-up ones included) until it is used."""
    tx.add(out=[(buf, length)])
    tx.kick()
    deadline = time.monotonic() + timeout
    while not tx.pop_used():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for the warm-up packet")
        msg = fe.poll_backend(0.01)
        if msg is not None:
            _serve(fe, msg)
    while (msg := fe.poll_backend(0)) is not None:  # anything else queued
        _serve(fe, msg)


def _serve(fe: Any, msg: Any) -> None:
    """Answer one MISS like QEMU: UPDATE (acked) on the main socket, then the MISS's ack."""
    miss = m.IotlbMsg.unpack(msg.payload)
    for e in fe.iommu:
        if e.iova <= miss.iova < e.iova + e.size:
            fe.iotlb_update(e.iova, e.size, UADDR_BASE + e.gpa, e.perm)
            break
    if msg.header.need_reply:
        fe.reply_backend(msg, 0)


def _wait_used(ring: VhostUserRing, count: int, timeout: float = 5.0) -> None:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        got += ring.pop_used()
        if len(got) >= count:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout}s waiting for {count} used buffers")
        select.select([ring.call_fd], [], [], min(left, 0.001))
        try:
            os.eventfd_read(ring.call_fd)
        except BlockingIOError:
            pass


# -- MISS round trip with QEMU --------------------------------------------------------------------
def miss_rtt_qemu(report: Report, log_dir: Path, log: Callable[[str], None]) -> None:
    try:
        from qtests.qos.viommu_scenarios import scenario_dynamic  # the suite's traffic
        from qtests.qos.viommu_testbed import ViommuTestbed
    except ImportError as e:
        report.fail("iotlb_miss_rtt_us", f"the vIOMMU qtest driver is not available: {e}")
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    tb = ViommuTestbed(log_dir)
    try:
        tb.start()
        assert tb.backend is not None
        mark = tb.backend.mark()
        scenario_dynamic(tb, 60)
        entries = tb.backend.journal(["iotlb.miss_sent", "iotlb.miss_ack"], mark)
        rtts = _pair_rtts(entries)
        if not rtts:
            report.fail("iotlb_miss_rtt_us", "no MISS was sent during the scenario")
            return
        report.put("iotlb_miss_rtt_us", round(statistics.median(rtts), 1))
        report.note(
            "iotlb_miss_rtt_us",
            f"QEMU 10 + virtio-iommu (TCG, qtest driver): median of {len(rtts)} MISS -> ack, "
            f"p90 {sorted(rtts)[int(0.9 * (len(rtts) - 1))]:.0f} us",
        )
        log(f"  MISS with QEMU + virtio-iommu: {statistics.median(rtts):.0f} us ({len(rtts)})")
    finally:
        tb.close()


def _pair_rtts(entries: list[dict[str, Any]]) -> list[float]:
    """Microseconds from each ``iotlb.miss_sent`` to the next ``iotlb.miss_ack`` of its IOVA."""
    sent: dict[int, int] = {}
    out: list[float] = []
    for e in entries:
        ts = e.get("mono_ns")
        if ts is None:
            continue
        if e["kind"] == "iotlb.miss_sent":
            sent[int(e["iova"])] = int(ts)
        elif e["kind"] == "iotlb.miss_ack" and int(e["iova"]) in sent:
            out.append((int(ts) - sent.pop(int(e["iova"]))) / 1000)
    return out
