"""Wall time of the test suites: ``make check``'s vhost-user tests (``pytest -n auto
--dist loadgroup backends/tests qtests -m "not vdpa_lane and not lab"``, as ``make check`` runs
them but without the vhost-vdpa lane, which runs in its lab VM beside them, and the lab runner's
own tests, which boot that VM; target <= 60 s; with the CPU time of the run and all its
children, which a loaded machine inflates far less), ``pytest qtests`` alone and
``python -m avocado_tests.run --ci``.

Each runs once, as ``make`` would run it, in a child process with a time limit; the figure is
the wall time whatever the outcome, and a non-zero exit status is written in ``notes`` (a
failing or time-limited suite is still a measurement of how long it took to say so).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Report

REPO = Path(__file__).resolve().parents[1]
SUITES = {
    "check_vhost_user_s": [
        *(sys.executable, "-m", "pytest", "-n", "auto", "--dist", "loadgroup"),
        # the vhost-vdpa lane and the lab runner's own L1 boots are not vhost-user tests
        *("backends/tests", "qtests", "-m", "not vdpa_lane and not lab"),
        *("-q", "-p", "no:cacheprovider"),
    ],
    "qtest_suite_s": [sys.executable, "-m", "pytest", "qtests", "-q", "-p", "no:cacheprovider"],
    "avocado_ci_s": [sys.executable, "-m", "avocado_tests.run", "--ci"],
}
LIMIT_S = 3600.0


def run(
    report: Report,
    logs: Path,
    log: Callable[[str], None],
    limit_s: float = LIMIT_S,
    only: list[str] | None = None,
) -> None:
    for key, argv in SUITES.items():
        if only and key not in only:
            continue
        log_path = logs / f"{key}.log"
        log(f"  {' '.join(argv[1:])} (log: {log_path})")
        t0 = time.monotonic()
        cpu0 = _children_cpu_s()
        with log_path.open("w") as out:
            try:
                rc = subprocess.run(
                    argv,
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=limit_s,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        took = time.monotonic() - t0
        report.put(key, round(took, 1))
        if key == "check_vhost_user_s":
            report.put("check_vhost_user_cpu_s", round(_children_cpu_s() - cpu0, 1))
        tail = _summary_line(log_path)
        if rc is None:
            report.note(key, f"stopped at the {limit_s:.0f} s limit")
        elif rc != 0:
            report.note(key, f"exit status {rc}: {tail}")
        else:
            report.note(key, tail)
        log(f"  {key} = {took:.1f} s (exit {rc}) {tail}")


def _children_cpu_s() -> float:
    """User + system CPU seconds of every waited-for descendant so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _summary_line(path: Path) -> str:
    """pytest's / avocado's last summary line ("12 passed in 3.4s", "RESULTS : PASS 3 ...")."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip().strip("=").strip()
        if " passed" in text or " failed" in text or text.startswith("RESULTS"):
            return text[:200]
    return ""
