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
other CPU (they sleep). The backend is pinned so the figures are steady. (The testpmd segfault in
``virtqueue_enqueue_xmit`` once blamed on sharing a CPU was the backend's: a ``pack_into``
store let used->idx read 0 for a moment; see README "The testpmd segfault".)

Gbit/s counts Ethernet frame bytes (SIZE, no FCS / preamble / gap). ``cpu_us_per_pkt_DIR_SIZE``
is our backend process's CPU time (user + system, all threads, from ``/proc/PID/stat``) during
the measuring window divided by the packets the frontend counted in it: unlike packets/s it
hardly moves when other processes share the machine. ``..._2q`` figures: two queue pairs
(``queues=2`` on both sides, testpmd ``--rxq=2 --txq=2`` on its one forwarding lcore; our
backend still one process).
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
#: sizes also measured with two queue pairs
MQ_SIZES = (64,)


@dataclass
class Result:
    pps: float
    cpu_us_per_pkt: float | None


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


def _queue_args(queues: int) -> list[str]:
    return [f"--rxq={queues}", f"--txq={queues}"] if queues > 1 else []


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

    def _frontend(self, tag: str, direction: str, size: int, queues: int = 1) -> TestPmd:
        mode = "txonly" if direction == "tx" else "rxonly"
        return TestPmd(
            self.testpmd,
            f"bench-fe-{os.getpid()}",
            f"net_virtio_user0,path={self.sock},queues={queues}",
            mode,
            self.logs / f"testpmd-frontend-{tag}.log",
            fwd_cpu=self.place.frontend_fwd_cpu,
            main_cpu=self.place.main_cpu,
            txpkts=size if direction == "tx" else None,
            extra=_queue_args(queues),
        )

    def _ours(self, tag: str, direction: str, size: int, queues: int = 1) -> Proc:
        wire = "null" if direction == "tx" else f"gen:{size}"
        argv = [sys.executable, "-m", "bench.backend", "--socket", self.sock, "--wire", wire]
        argv += ["--cpu", str(self.place.backend_cpu), "--queues", str(queues)]
        proc = Proc(
            "our backend",
            argv,
            self.logs / f"ours-backend-{tag}.log",
            cpus=[self.place.backend_cpu],
            cwd=REPO,
        )
        return proc.wait_ready(30)

    def _dpdk(self, tag: str, direction: str, size: int, queues: int = 1) -> TestPmd:
        mode = "rxonly" if direction == "tx" else "txonly"
        pmd = TestPmd(
            self.testpmd,
            f"bench-be-{os.getpid()}",
            f"net_vhost0,iface={self.sock},queues={queues}",
            mode,
            self.logs / f"testpmd-backend-{tag}.log",
            fwd_cpu=self.place.backend_cpu,
            main_cpu=self.place.frontend_fwd_cpu,
            txpkts=size if direction == "rx" else None,
            extra=_queue_args(queues),
        )
        try:
            pmd.wait_listening()
        except BaseException:
            pmd.stop()
            raise
        return pmd

    # -- one measurement ----------------------------------------------------------------------
    def run(self, backend: str, direction: str, size: int, queues: int = 1) -> float:
        """Packets/s seen by the frontend (median of its per-second samples)."""
        return self.measure(backend, direction, size, queues).pps

    def measure(self, backend: str, direction: str, size: int, queues: int = 1) -> Result:
        """Packets/s seen by the frontend (median of its per-second samples) and, for our
        backend, its CPU microseconds per packet over the same window."""
        tag = f"{backend}-{direction}-{size}" + (f"-{queues}q" if queues > 1 else "")
        self._clean_socket()
        be: Proc | TestPmd = (
            self._ours(tag, direction, size, queues)
            if backend == "ours"
            else self._dpdk(tag, direction, size, queues)
        )
        fe: TestPmd | None = None
        try:
            fe = self._frontend(tag, direction, size, queues)
            fe.wait_forwarding()
            pid = be.proc.pid if isinstance(be, Proc) else None
            t = fe.measure(self.warmup_s, self.window_s, cpu_pid=pid)
            value = t.tx if direction == "tx" else t.rx
            if value is None:
                raise RuntimeError(f"no throughput samples from the frontend ({tag})")
            cpu_us = None
            if t.cpu_s is not None and value > 0 and t.window_s > 0:
                cpu_us = t.cpu_s * 1e6 / (value * t.window_s)
            return Result(value, cpu_us)
        finally:
            if fe is not None:
                fe.stop()
            be.stop()
            self._clean_socket()

    def run_all(
        self,
        report: Report,
        sizes: tuple[int, ...] = SIZES,
        dpdk_reference: bool = True,
        mq_sizes: tuple[int, ...] = MQ_SIZES,
    ) -> None:
        cases = [(s, 1) for s in sizes] + [(s, 2) for s in mq_sizes]
        for direction in DIRECTIONS:
            for size, queues in cases:
                q = "_2q" if queues == 2 else ""
                for backend in ("ours", "dpdk") if dpdk_reference else ("ours",):
                    suffix = "" if backend == "ours" else "_dpdk"
                    pkey = f"pps_{size}_{direction}{q}{suffix}"
                    gkey = f"gbps_{size}_{direction}{q}{suffix}"
                    ckey = f"cpu_us_per_pkt_{direction}_{size}{q}"
                    try:
                        r = self.measure(backend, direction, size, queues)
                    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
                        report.fail(pkey, str(e))
                        report.fail(gkey, str(e))
                        if backend == "ours":
                            report.fail(ckey, str(e))
                        self.log(f"  {pkey}: FAILED {e}")
                        continue
                    pps = r.pps
                    report.put(pkey, round(pps))
                    report.put(gkey, round(gbps(pps, size) or 0.0, 4))
                    cpu = ""
                    if backend == "ours":
                        if r.cpu_us_per_pkt is None:
                            report.fail(ckey, "backend CPU time not readable")
                        else:
                            report.put(ckey, round(r.cpu_us_per_pkt, 3))
                            cpu = f", {r.cpu_us_per_pkt:.2f} CPU us/packet"
                    self.log(f"  {pkey} = {pps:,.0f} pps ({gbps(pps, size):.3f} Gbit/s{cpu})")
                ours = report.get(f"pps_{size}_{direction}{q}")
                ref = report.get(f"pps_{size}_{direction}{q}_dpdk")
                rkey = f"ratio_{size}_{direction}{q}"
                if isinstance(ours, int | float) and isinstance(ref, int | float) and ref > 0:
                    report.put(rkey, round(ours / ref, 5))
                else:
                    report.fail(rkey, "needs both our figure and the DPDK reference")
