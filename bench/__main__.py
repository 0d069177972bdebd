"""``python -m bench`` (``make bench``): measure, write bench/results/report.json + PNG plots.

Groups (all by default, in this order; ``--only`` picks some and merges into the existing
report):

  inproc     CPU us/packet of our TX and RX paths, in-process (stable on a loaded machine)
  datapath   packets/s through our backend vs DPDK's vhost PMD, testpmd virtio-user frontend
  mapdiff    ADD/REM_MEM_REG vs a full table, device model and over the socket
  iotlb      IOTLB lookups/s; MISS round trip with QEMU + virtio-iommu and with a Python peer
  migration  qtest live-migration downtime / total time; GET_VRING_BASE with 256 in flight
  lab        the vhost-vdpa lab: L1 boot time (TCG) and ``pytest -m vdpa_lane`` wall time
  suite      wall time of make check's vhost-user tests (xdist), ``pytest qtests`` and
             ``python -m avocado_tests.run --ci`` (minutes;
             ``--no-suite`` leaves it out, e.g. ``make bench BENCH_ARGS=--no-suite``)

DPDK (``dpdk-testpmd``) is installed with apt-get by this command when missing (root on Debian
only); matplotlib (the ``bench`` extra) with pip. Without them the figures that need them are
null with the reason in ``notes``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import dpdk, plots, readme
from bench.report import Report

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("inproc", "datapath", "mapdiff", "iotlb", "migration", "lab", "suite")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--only", action="append", choices=GROUPS, help="run only these groups")
    p.add_argument(
        "--suite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the full qtest suite and the avocado CI subset (default: yes)",
    )
    p.add_argument(
        "--suites",
        action="append",
        choices=("check_vhost_user_s", "qtest_suite_s", "avocado_ci_s"),
        help="with the suite group: time only these suites",
    )
    p.add_argument("--quick", action="store_true", help="shorter windows, 64-byte frames only")
    p.add_argument("--no-dpdk", action="store_true", help="skip the DPDK reference runs")
    p.add_argument(
        "--no-dpdk-install", action="store_true", help="do not apt-get install DPDK if missing"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy our backend under testpmd TX/RX 64 B (needs py-spy in the venv)",
    )
    p.add_argument(
        "--readme", action="store_true", help="rewrite README.md's benchmark table from the report"
    )
    p.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the PNG plots (installs matplotlib when missing; default: yes)",
    )
    p.add_argument(
        "--qemu",
        metavar="PATH",
        help="QEMU binary for the QEMU figures and the suite timings (default: "
        "$QTEST_QEMU_BINARY, else qemu-system-x86_64 on PATH)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results dir")
    p.add_argument("--migration-runs", type=int, default=3, help="live migrations to time")
    return p.parse_args(argv)


def ensure_matplotlib() -> str:
    """'' when matplotlib imports (installing the ``bench`` extra if needed), else why not."""
    if plots.available():
        return ""
    log("matplotlib missing: pip install -e '.[bench]'")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}[bench]"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "pip install -e '.[bench]' timed out"
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"pip install -e '.[bench]' failed: {last[0]}"
    import importlib

    importlib.invalidate_caches()
    return "" if plots.available() else "matplotlib still not importable after pip install"


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.out / "report.json"
        self.report = Report.load_or_new(path) if args.only else Report(path)
        scratch = REPO / "build" / "bench"
        scratch.mkdir(parents=True, exist_ok=True)
        # sockets live in a private (0700) directory: EAL and vhost refuse world-writable ones
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
        from bench.datapath import placement

        p = placement()
        self.backend_cpu = p.backend_cpu if p else None
        self.testpmd: str | None = None

    def scratch(self, name: str) -> Path:
        d = self.work / name
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def group(self, name: str, fn: Callable[[], None]) -> None:
        log(f"== {name}")
        self.report.sample_load(name)
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # one group failing must not lose the others' figures
            self.report.note(f"group_{name}", f"failed: {type(e).__name__}: {e}")
            log(f"group {name} FAILED: {e}")
            traceback.print_exc()
        self.report.save()
        log(f"== {name} done in {time.monotonic() - t0:.0f} s")

    # -- groups -------------------------------------------------------------------------------
    def inproc(self) -> None:
        from bench.inproc import InprocDatapath

        for d in ("tx", "rx"):
            for size in (64, 1500):
                b = InprocDatapath(size)
                try:
                    us = b.cpu_us_per_packet(d, 0.5 if self.args.quick else 1.5)
                finally:
                    b.close()
                self.report.put(f"cpu_us_per_pkt_{d}_{size}_inproc", round(us, 3))
                log(f"  {d} {size} B: {us:.2f} CPU us/packet ({1e6 / us:,.0f} packets/s/core)")

    def _need_testpmd(self) -> str | None:
        if self.testpmd is None:
            path, why = dpdk.ensure_testpmd(not self.args.no_dpdk_install, log)
            if path is None:
                self.report.note("dpdk", why)
                log(f"  DPDK unavailable: {why}")
                return None
            self.testpmd = path
        return self.testpmd

    def datapath(self) -> None:
        from bench.datapath import SIZES, DatapathBench

        sizes = (64,) if self.args.quick else SIZES
        testpmd = self._need_testpmd()
        if testpmd is None:
            why = self.report.notes.get("dpdk", "dpdk-testpmd unavailable")
            for d in ("tx", "rx"):
                for s in sizes:
                    for k in (f"pps_{s}_{d}", f"pps_{s}_{d}_dpdk", f"ratio_{s}_{d}"):
                        self.report.fail(k, f"needs dpdk-testpmd as the frontend: {why}")
            return
        bench = DatapathBench(
            testpmd,
            self.scratch("datapath"),
            self.logs,
            warmup_s=1.0 if self.args.quick else 2.0,
            window_s=2.0 if self.args.quick else 4.0,
            log=log,
        )
        bench.run_all(self.report, sizes, dpdk_reference=not self.args.no_dpdk)
        if self.args.profile:
            self._profile(testpmd)

    def _profile(self, testpmd: str) -> None:
        from bench.profile import ProfiledBench, py_spy, summarise

        spy = py_spy()
        if spy is None:
            self.report.note("profile", "py-spy not installed: .venv/bin/pip install py-spy")
            return
        for d in ("tx", "rx"):
            raw = self.logs / f"profile_{d}_64.raw"
            b = ProfiledBench(
                testpmd,
                self.scratch("profile"),
                self.logs,
                warmup_s=1.0,
                window_s=4.0,
                log=log,
                spy=spy,
                raw_path=raw,
            )
            pps = b.run("ours", d, 64)
            text, _ = summarise(raw.read_text() if raw.exists() else "")
            (self.out / f"profile_{d}_64.txt").write_text(
                f"our backend under testpmd {d} 64 B, {pps:,.0f} packets/s while sampled\n\n" + text
            )
            log(f"  profile {d}: {self.out / f'profile_{d}_64.txt'}")

    def mapdiff(self) -> None:
        from bench import mapdiff

        mapdiff.model(self.report, mapdiff.COUNTS, log)
        mapdiff.transport(
            self.report, mapdiff.COUNTS, self.scratch("mapdiff"), log, self.backend_cpu
        )

    def iotlb(self) -> None:
        from bench import iotlb

        quick = self.args.quick
        iotlb.in_process(self.report, log, budget_s=0.2 if quick else 1.0, quick=quick)
        iotlb.miss_rtt_frontend(self.report, self.scratch("iotlb"), log, self.backend_cpu)
        iotlb.miss_rtt_qemu(self.report, self.logs / "iotlb-qemu", log)

    def migration(self) -> None:
        from bench import migration

        migration.vring_base(self.report, self.scratch("vring"), log, self.backend_cpu)
        migration.vring_base_model(self.report, log)
        runs = 1 if self.args.quick else max(1, self.args.migration_runs)
        migration.live_migration(self.report, self.logs / "migration", runs, log)

    def lab(self) -> None:
        from bench import lab

        lab.boot(self.report, self.scratch("lab"), log, boots=1 if self.args.quick else 3)
        lab.lane(self.report, self.logs, log)

    def suite(self) -> None:
        from bench import suite

        suite.run(self.report, self.logs, log, only=self.args.suites)

    # -- all ----------------------------------------------------------------------------------
    def run(self, argv: list[str]) -> int:
        self.report.start(argv)
        wanted = self.args.only or [g for g in GROUPS if g != "suite" or self.args.suite]
        if "suite" not in wanted and not self.args.only:
            for key in ("qtest_suite_s", "avocado_ci_s"):
                self.report.fail(key, "not run (--no-suite)")
        for name in GROUPS:
            if name in wanted:
                self.group(name, getattr(self, name))
        self.report.finish()
        if self.report.meta.get("loaded"):
            self.report.note(
                "machine",
                "taken on a loaded machine (other QEMU/test processes were running): "
                "wall-clock rates are pessimistic and noisy; cpu_us_per_pkt_* are CPU time",
            )
        else:
            self.report.notes.pop("machine", None)
        why = "not drawn (--no-plots)" if not self.args.plots else ensure_matplotlib()
        if why:
            self.report.note("plots", why)
            log(f"no plots: {why}")
        else:
            drawn = plots.draw_all(self.report.to_dict(), self.out)
            self.report.meta["plots"] = [
                str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in drawn
            ]
            log("plots: " + ", ".join(str(p) for p in drawn))
        self.report.save()
        table = readme.render(self.report.to_dict())
        (self.out / "table.md").write_text(table)
        if self.args.readme:
            readme.update(REPO / "README.md", table)
            log("README.md: benchmark table regenerated")
        log(f"report: {self.report.path}")
        log("figures against issue #17's targets:")
        for line in self.report.summary():
            log("  " + line)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qtests.qos.machine import QemuError, use_qemu

    try:  # exported as $QTEST_QEMU_BINARY: testbeds and the timed suites all use it
        log(f"QEMU: {use_qemu(args.qemu)}")
    except QemuError as exc:
        log(f"{'error' if args.qemu else 'no QEMU: its figures will be null'}: {exc}")
        if args.qemu:
            return 2
    runner = Runner(args)
    try:
        return runner.run(sys.argv[1:] if argv is None else argv)
    finally:
        _rmtree_quiet(runner.work)


def _rmtree_quiet(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        log(f"could not remove {path}")


if __name__ == "__main__":
    sys.exit(main())
