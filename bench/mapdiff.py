"""Memory-table updates: one region added / removed as a diff, against re-applying the table.

Two layers, N = 1, 8, 64, 256 regions already present (2 MiB each):

* the device model, in-process (``*_model`` keys and the set_map / set_mem_table figures):
  ``memreg_add_us_N_model`` = what ADD_MEM_REG does to the device (``batch_begin``,
  ``add_host_region``, identity ``dma_map``, ``batch_commit``); ``memreg_rem_us_N_model`` =
  REM_MEM_REG (``dma_unmap`` + ``remove_host_region``, N+1 -> N); ``set_map_one_change_us_N``
  = the full identity list of N+1 entries through ``set_map`` (applied as a diff) + the one new
  host region, i.e. what our SET_MEM_TABLE does; ``set_mem_table_full_us_N`` = rebuilding
  from scratch (unmap all, drop all regions, add N+1, map N+1), what a backend that does not
  diff does with every SET_MEM_TABLE.
* the transport, over a real socket to a backend process (the un-suffixed
  ``memreg_add_us_N`` / ``memreg_rem_us_N``): the front-end of ``qtests/qos/vhost_user_frontend.py``
  sends ADD_MEM_REG / REM_MEM_REG with REPLY_ACK (as QEMU does) and times request -> ack.
  SET_MEM_TABLE carries at most 8 regions, so the transport comparison is
  ``set_mem_table_us_8_transport`` (a table of 8 with one region new) against
  ``memreg_add_us_7`` (the same change as a diff).
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from backends.net.datapath import NetDevice
from backends.net.wire import NullWire
from backends.vdpa.device import VdpaDevice
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import HostRegion
from backends.vhost_user import messages as m
from bench.report import Report
from bench.timing import repeat
from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend

COUNTS = (1, 8, 64, 256)
REGION = 2 << 20
GPA_BASE = 1 << 32  # region k at GPA_BASE + k * REGION
UADDR = 0x7F00_0000_0000


def _region(k: int) -> HostRegion:
    """Region k: anonymous shared memory, never touched (no pages are allocated)."""
    gpa = GPA_BASE + k * REGION
    return HostRegion(gpa, REGION, UADDR + gpa, 0, mmap.mmap(-1, REGION))


def _device() -> VdpaDevice:
    return VdpaDevice(NetDevice(NullWire()))


def _identity(regions: list[HostRegion]) -> list[tuple[int, int, int, Perm]]:
    return [(r.gpa, r.size, r.uaddr, Perm.RW) for r in regions]


def _populated(n: int) -> tuple[VdpaDevice, list[HostRegion]]:
    dev = _device()
    regions = [_region(k) for k in range(n)]
    for r in regions:
        dev.add_host_region(r)
    dev.set_map(_identity(regions))
    return dev, regions


def model(report: Report, counts: tuple[int, ...], log: Callable[[str], None]) -> None:
    for n in counts:
        _model_one(report, n)
        log(
            f"  model N={n}: add {report.get(f'memreg_add_us_{n}_model')} us, "
            f"rem {report.get(f'memreg_rem_us_{n}_model')} us, set_map(+1) "
            f"{report.get(f'set_map_one_change_us_{n}')} us, rebuild "
            f"{report.get(f'set_mem_table_full_us_{n}')} us"
        )


def _model_one(report: Report, n: int) -> None:
    dev, regions = _populated(n)
    extra = _region(n)
    everything = [*regions, extra]
    full = _identity(everything)
    base = _identity(regions)

    def add() -> None:
        dev.batch_begin()
        dev.add_host_region(extra)
        dev.dma_map(extra.gpa, extra.size, extra.uaddr, Perm.RW)
        dev.batch_commit()

    def remove() -> None:
        dev.dma_unmap(extra.gpa, extra.size)
        dev.remove_host_region(extra)

    adds, rems = [], []
    for _ in range(50):  # add timed, remove timed, alternately
        t0 = time.perf_counter()
        add()
        adds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        remove()
        rems.append(time.perf_counter() - t0)
    report.put(f"memreg_add_us_{n}_model", round(statistics.median(adds) * 1e6, 2))
    report.put(f"memreg_rem_us_{n}_model", round(statistics.median(rems) * 1e6, 2))

    times = []
    for _ in range(30):  # the full list with one change, then undone (untimed)
        t0 = time.perf_counter()
        dev.set_map(full)
        dev.add_host_region(extra)
        times.append(time.perf_counter() - t0)
        dev.remove_host_region(extra)
        dev.set_map(base)
    report.put(f"set_map_one_change_us_{n}", round(statistics.median(times) * 1e6, 2))

    def rebuild() -> None:
        dev.set_map([])
        for r in dev.host.regions():
            dev.remove_host_region(r)
        for r in everything:
            dev.add_host_region(r)
        dev.set_map(full)

    s = repeat(rebuild, rounds=15, budget_s=3.0)
    report.put(f"set_mem_table_full_us_{n}", round(s.median_us, 2))
    for r in everything:
        r.close()


def _timed_call(fe: Frontend, request: m.Request, payload: bytes, fds: list[int]) -> float:
    t0 = time.perf_counter()
    fe.call(request, payload, fds)
    return time.perf_counter() - t0


def transport(
    report: Report,
    counts: tuple[int, ...],
    workdir: Path,
    log: Callable[[str], None],
    backend_cpu: int | None,
) -> None:
    """ADD/REM_MEM_REG round trips against a ``python -m backends`` process."""
    for n in counts:
        proc = BackendProcess.launch(workdir, "--wire", "null", monitor=False)
        mem = SharedGuestMemory(2 << 20, gpa=0)
        fe: Frontend | None = None
        try:
            if backend_cpu is not None:
                os.sched_setaffinity(proc.pid, {backend_cpu})
            fe = Frontend(proc.socket, timeout=30)
            fe.init_like_qemu(2)
            if not fe.has(m.ProtocolFeature.CONFIGURE_MEM_SLOTS):
                report.fail(f"memreg_add_us_{n}", "backend did not offer CONFIGURE_MEM_SLOTS")
                continue
            # region 0 is the first RAM slot; N-1 more, then the one that comes and goes
            fe.add_mem_reg(mem.slots[0])
            for k in range(1, n):
                fe.add_mem_reg(mem.add_slot(GPA_BASE + k * REGION, REGION, name=f"r{k}"))
            extra = mem.add_slot(GPA_BASE + n * REGION, REGION, name="extra")
            add_payload = m.pack_mem_reg(extra.region())
            adds, rems = [], []
            for _ in range(30):
                adds.append(_timed_call(fe, m.Request.ADD_MEM_REG, add_payload, [extra.fd]))
                rems.append(_timed_call(fe, m.Request.REM_MEM_REG, add_payload, []))
            report.put(f"memreg_add_us_{n}", round(statistics.median(adds) * 1e6, 1))
            report.put(f"memreg_rem_us_{n}", round(statistics.median(rems) * 1e6, 1))
            log(
                f"  transport N={n}: ADD_MEM_REG {report.get(f'memreg_add_us_{n}')} us, "
                f"REM_MEM_REG {report.get(f'memreg_rem_us_{n}')} us"
            )
        finally:
            if fe is not None:
                fe.close_init_fds()
                fe.close()
            proc.stop()
            mem.close()
    _set_mem_table_transport(report, workdir, log, backend_cpu)


def _set_mem_table_transport(
    report: Report, workdir: Path, log: Callable[[str], None], backend_cpu: int | None
) -> None:
    """A table of 8 (the protocol's maximum) with one region new, vs ADD_MEM_REG at N=7."""
    proc = BackendProcess.launch(workdir, "--wire", "null", "--no-mem-slots", monitor=False)
    mem = SharedGuestMemory(2 << 20, gpa=0)
    fe: Frontend | None = None
    try:
        if backend_cpu is not None:
            os.sched_setaffinity(proc.pid, {backend_cpu})
        fe = Frontend(proc.socket, timeout=30)
        fe.init_like_qemu(2)
        for k in range(1, 7):
            mem.add_slot(GPA_BASE + k * REGION, REGION, name=f"r{k}")
        seven = mem.regions()
        seven_fds = mem.fds()
        extra = mem.add_slot(GPA_BASE + 7 * REGION, REGION, name="extra")
        eight = [*seven, extra.region()]
        eight_fds = [*seven_fds, extra.fd]
        fe.call(m.Request.SET_MEM_TABLE, m.pack_mem_table(seven), seven_fds)
        times = []
        for _ in range(30):
            times.append(
                _timed_call(fe, m.Request.SET_MEM_TABLE, m.pack_mem_table(eight), eight_fds)
            )
            fe.call(m.Request.SET_MEM_TABLE, m.pack_mem_table(seven), seven_fds)
        report.put("set_mem_table_us_8_transport", round(statistics.median(times) * 1e6, 1))
        log(
            f"  transport SET_MEM_TABLE (8, one new): {report.get('set_mem_table_us_8_transport')} us"
        )
    finally:
        if fe is not None:
            fe.close_init_fds()
            fe.close()
        proc.stop()
        mem.close()
