"""``python -m qtests.soak`` (``make soak``): the scenario suites, N runs in a row.

A flaky scenario is a broken scenario: this runs one pytest selection (by default every
scenario suite of the three mission scenarios and of the changes that meet work in flight, on
both transports; the vhost-vdpa cases in the lab L1 as ``make check`` runs them) ``--runs``
times in a row, each run a fresh pytest session with its own logs and junit report under
``<log-dir>/run-K/``, and stops at the first run that fails (``--keep-going`` runs them all).
It prints one line per run (passed / failed / skipped, wall time) and a summary, and writes
them to ``<log-dir>/soak.json``. A run that collected no test, or in which a test was skipped
that the first run did not skip, counts as failed: a soak proves nothing about tests that did
not run.

    make soak                                   # 10 runs of the scenario suites
    make soak SOAK_RUNS=3 SOAK_ARGS="qtests/test_viommu_inflight.py -k packed"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The scenario suites (globs under the checkout): memory hotplug, vIOMMU, migration and
#: reconnect, the in-flight variants of each, and the vhost-vdpa lane's scenario modules.
SCENARIO_SUITES = (
    "qtests/test_memory_hotplug.py",
    "qtests/test_viommu.py",
    "qtests/test_migration.py",
    "qtests/test_reconnect.py",
    "qtests/test_vring_state.py",
    "qtests/test_*inflight*.py",
    "qtests/test_vdpa_migration.py",
    "qtests/test_vdpa_*inflight*.py",
    "qtests/test_vdpa_reconnect*.py",
)


@dataclass
class Run:
    run: int
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    exit_code: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    why: str = ""

    @property
    def ok(self) -> bool:
        return not self.why and self.exit_code == 0 and not self.failed and not self.errors


def suites() -> list[str]:
    """The default selection: every existing file matched by :data:`SCENARIO_SUITES`."""
    found: list[str] = []
    for pattern in SCENARIO_SUITES:
        for p in sorted(REPO.glob(pattern)):
            rel = str(p.relative_to(REPO))
            if rel not in found:
                found.append(rel)
    return found


def read_junit(path: Path, run: Run) -> None:
    """Fill ``run``'s counts from a pytest junit report."""
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            run.failed += 1
            run.failed_ids.append(nodeid)
        elif case.find("error") is not None:
            run.errors += 1
            run.failed_ids.append(nodeid)
        elif case.find("skipped") is not None:
            run.skipped += 1
            run.skipped_ids.append(nodeid)
        else:
            run.passed += 1


def one_run(k: int, selection: Sequence[str], jobs: str, log_root: Path, timeout: float) -> Run:
    run = Run(k)
    out = log_root / f"run-{k}"
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    if jobs != "1":
        cmd += ["-n", jobs, "--dist", "loadgroup"]
    cmd += [f"--junitxml={junit}", *selection]
    env = dict(os.environ, QOS_LOG_DIR=str(out))
    started = time.monotonic()
    with open(out / "pytest.out", "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            run.exit_code = proc.returncode
        except subprocess.TimeoutExpired:
            run.exit_code = -1
            run.why = f"pytest did not finish within {timeout:.0f} s"
    run.wall_s = round(time.monotonic() - started, 1)
    if junit.exists():
        read_junit(junit, run)
    elif not run.why:
        run.why = f"no junit report (pytest exit {run.exit_code})"
    if not run.why and run.passed + run.failed + run.errors == 0:
        run.why = "no test ran"
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qtests.soak", description=__doc__.split("\n")[0])
    p.add_argument("selection", nargs="*", help="pytest arguments (default: the scenario suites)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--jobs", default="2", help="pytest-xdist workers per run (1: no xdist)")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    p.add_argument("--log-dir", default=str(REPO / "test-logs" / "soak"))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run at most")
    args = p.parse_args(argv)
    selection = args.selection or suites()
    log_root = Path(args.log_dir)
    log_root.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.runs} runs of: {' '.join(selection)}", flush=True)
    runs: list[Run] = []
    baseline_skips: set[str] | None = None
    for k in range(1, args.runs + 1):
        run = one_run(k, selection, args.jobs, log_root, args.timeout)
        if baseline_skips is None:
            baseline_skips = set(run.skipped_ids)
        elif not run.why and set(run.skipped_ids) - baseline_skips:
            extra = sorted(set(run.skipped_ids) - baseline_skips)
            run.why = f"skipped what run 1 ran: {', '.join(extra)}"
        runs.append(run)
        verdict = "ok" if run.ok else "FAILED"
        print(
            f"soak run {k}/{args.runs}: {verdict}: {run.passed} passed, "
            f"{run.failed + run.errors} failed, {run.skipped} skipped in {run.wall_s} s"
            + (f" ({run.why})" if run.why else "")
            + "".join(f"\n    {i}" for i in run.failed_ids),
            flush=True,
        )
        if not run.ok and not args.keep_going:
            break
    walls = [r.wall_s for r in runs]
    good = sum(r.ok for r in runs)
    summary = {
        "runs_asked": args.runs,
        "runs": len(runs),
        "runs_passed": good,
        "in_a_row": good == args.runs == len(runs),
        "tests_per_run": runs[0].passed + runs[0].failed + runs[0].errors if runs else 0,
        "wall_s_min": min(walls) if walls else None,
        "wall_s_median": statistics.median(walls) if walls else None,
        "wall_s_max": max(walls) if walls else None,
        "load_average_end": os.getloadavg()[0],
        "selection": list(selection),
        "per_run": [asdict(r) for r in runs],
    }
    (log_root / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"soak: {good}/{args.runs} runs passed"
        + (" in a row" if summary["in_a_row"] else "")
        + f"; {summary['tests_per_run']} tests a run; wall min/median/max "
        f"{summary['wall_s_min']}/{summary['wall_s_median']}/{summary['wall_s_max']} s; "
        f"details in {log_root / 'soak.json'}",
        flush=True,
    )
    return 0 if summary["in_a_row"] else 1


if __name__ == "__main__":
    sys.exit(main())
