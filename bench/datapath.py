"""Datapath throughput: our backend vs DPDK's vhost PMD, both driven by the same
``dpdk-testpmd`` virtio-user frontend.

Directions (named from the guest's side, like the frontend's counters):

* ``tx`` - frontend ``--forward-mode=txonly --txpkts=SIZE``; our backend sends every frame to
  a null wire, DPDK's backend runs ``rxonly``. Figure: the frontend's Tx-pps.
* ``rx`` - frontend ``rxonly``; our backend's RX is fed by a :class:`GeneratorWire` of
  SIZE-byte frames, DPDK's backend runs ``txonly --txpkts=SIZE``. Figure: the frontend's
  Rx-pps.

Placement on a 2-CPU machine: the frontend's forwarding lcore on CPU B, the backend (our
Python process, or the reference testpmd's forwarding lcore) on CPU A, both main lcores on the
other CPU (they sleep). Keeping the Python process off the frontend's forwarding CPU matters:
unpinned, it preempts the PMD's polling thread and DPDK 22.11's split-ring TX path was seen to
corrupt its free list (a segfault in ``virtqueue_enqueue_xmit``), which DPDK-vs-DPDK runs on a
shared CPU never showed; pinned, it never happened.

Gbit/s counts Ethernet frame bytes (SIZE, no FCS / preamble / gap).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.dpdk import TestPmd
from bench.procs import Proc
from bench.report import Report

REPO = Path(__file__).resolve().parents[1]
SIZES = (64, 512, 1500)
DIRECTIONS = ("tx", "rx")


@dataclass
class Placement:
    backend_cpu: int
    frontend_fwd_cpu: int
    main_cpu: int


def placement() -> Placement | None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    # frontend forwarding on the last CPU, backend on the first, main lcores share the first
    return Placement(backend_cpu=cpus[0], frontend_fwd_cpu=cpus[-1], main_cpu=cpus[0])


def gbps(pps: float | None, size: int) -> float | None:
    return None if pps is None else pps * size * 8 / 1e9


class DatapathBench:
    def __init__(
        self,
        testpmd: str,
        workdir: Path,
        logs: Path,
        *,
        warmup_s: float,
        window_s: float,
        log: Callable[[str], None],
    ) -> None:
        self.testpmd = testpmd
        self.workdir = workdir
        self.logs = logs
        self.warmup_s = warmup_s
        self.window_s = window_s
        self.log = log
        self.sock = str(workdir / "vhost.sock")
        p = placement()
        if p is None:
            raise RuntimeError("needs at least 2 CPUs (testpmd forwarding lcore + a backend)")
        self.place = p

    # -- processes ----------------------------------------------------------------------------
    def _clean_socket(self) -> None:
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass

    def _frontend(self, tag: str, direction: str, size: int) -> TestPmd:
        mode = "txonly" if direction == "tx" else "rxonly"
        return TestPmd(
            self.testpmd,
            f"bench-fe-{os.getpid()}",
            f"net_virtio_user0,path={self.sock},queues=1",
            mode,
            self.logs / f"testpmd-frontend-{tag}.log",
            fwd_cpu=self.place.frontend_fwd_cpu,
            main_cpu=self.place.main_cpu,
            txpkts=size if direction == "tx" else None,
        )

    def _ours(self, tag: str, direction: str, size: int) -> Proc:
        wire = "null" if direction == "tx" else f"gen:{size}"
        argv = [sys.executable, "-m", "bench.backend", "--socket", self.sock, "--wire", wire]
        argv += ["--cpu", str(self.place.backend_cpu)]
        proc = Proc(
            "our backend",
            argv,
            self.logs / f"ours-backend-{tag}.log",
            cpus=[self.place.backend_cpu],
            cwd=REPO,
        )
        return proc.wait_ready(30)

    def _dpdk(self, tag: str, direction: str, size: int) -> TestPmd:
        mode = "rxonly" if direction == "tx" else "txonly"
        pmd = TestPmd(
            self.testpmd,
            f"bench-be-{os.getpid()}",
            f"net_vhost0,iface={self.sock},queues=1",
            mode,
            self.logs / f"testpmd-backend-{tag}.log",
            fwd_cpu=self.place.backend_cpu,
            main_cpu=self.place.frontend_fwd_cpu,
            txpkts=size if direction == "rx" else None,
        )
        try:
            pmd.wait_listening()
        except BaseException:
            pmd.stop()
            raise
        return pmd

    # -- one measurement ----------------------------------------------------------------------
    def run(self, backend: str, direction: str, size: int) -> float:
        """Packets/s seen by the frontend (median of its per-second samples)."""
        tag = f"{backend}-{direction}-{size}"
        self._clean_socket()
        be: Proc | TestPmd = (
            self._ours(tag, direction, size)
            if backend == "ours"
            else self._dpdk(tag, direction, size)
        )
        fe: TestPmd | None = None
        try:
            fe = self._frontend(tag, direction, size)
            fe.wait_forwarding()
            t = fe.measure(self.warmup_s, self.window_s)
            value = t.tx if direction == "tx" else t.rx
            if value is None:
                raise RuntimeError(f"no throughput samples from the frontend ({tag})")
            return value
        finally:
            if fe is not None:
                fe.stop()
            be.stop()
            self._clean_socket()

    def run_all(
        self, report: Report, sizes: tuple[int, ...] = SIZES, dpdk_reference: bool = True
    ) -> None:
        for direction in DIRECTIONS:
            for size in sizes:
                for backend in ("ours", "dpdk") if dpdk_reference else ("ours",):
                    suffix = "" if backend == "ours" else "_dpdk"
                    pkey = f"pps_{size}_{direction}{suffix}"
                    gkey = f"gbps_{size}_{direction}{suffix}"
                    try:
                        pps = self.run(backend, direction, size)
                    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
                        report.fail(pkey, str(e))
                        report.fail(gkey, str(e))
                        self.log(f"  {pkey}: FAILED {e}")
                        continue
                    report.put(pkey, round(pps))
                    report.put(gkey, round(gbps(pps, size) or 0.0, 4))
                    self.log(f"  {pkey} = {pps:,.0f} pps ({gbps(pps, size):.3f} Gbit/s)")
                ours = report.get(f"pps_{size}_{direction}")
                ref = report.get(f"pps_{size}_{direction}_dpdk")
                rkey = f"ratio_{size}_{direction}"
                if isinstance(ours, int | float) and isinstance(ref, int | float) and ref > 0:
                    report.put(rkey, round(ours / ref, 5))
                else:
                    report.fail(rkey, "needs both our figure and the DPDK reference")
