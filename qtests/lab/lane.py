"""Run the vhost-vdpa lane's tests inside L1 with ONE inner pytest and read back each result.

The host collects the lane tests (they are ordinary Python), boots L1 once, and runs
``python -m pytest <node ids>`` there in the same checkout with the same venv. The inner run
writes, on the lab's writable share: ``results.jsonl`` (:mod:`qtests.lab.inner_report`: every
phase of every test, by node id), ``junit.xml``, and per-test logs under ``test-logs/``
(``QOS_LOG_DIR``). Afterwards the per-test log directories are copied to the host's
``test-logs/<test id>/`` and L1's console log stays in ``test-logs/vdpa-lab/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtests.lab.vm import LabError, LabResult, run_in_lab
from qtests.qos.machine import QemuError, find_qemu

#: Wall seconds the inner pytest may take in L1 (all lane tests, TCG, a loaded machine).
INNER_TIMEOUT = 900.0
RESULTS_FILE = "results.jsonl"
#: Where the inner run's :mod:`qtests.lab.inner_report` writes (set by :func:`inner_command`).
RESULTS_ENV = "VDPA_LAB_RESULTS"
JUNIT_FILE = "junit.xml"
INNER_LOGS = "test-logs"


@dataclass
class InnerResult:
    """One lane test as the inner pytest saw it (its setup, call and teardown phases)."""

    nodeid: str
    outcome: str = "missing"  # passed | failed | skipped | missing
    text: str = ""  # failure / skip text of the phase that decided the outcome
    sections: list[tuple[str, str]] = field(default_factory=list)
    duration: float = 0.0
    log_dir_name: str = ""  # its log directory's name under test-logs/ (copied to the host)

    def add(self, rec: dict[str, Any]) -> None:
        when, outcome = str(rec["when"]), str(rec["outcome"])
        self.duration += float(rec.get("duration") or 0.0)
        self.sections = [(str(n), str(t)) for n, t in rec.get("sections") or []]
        text = str(rec.get("longrepr") or "")
        if outcome == "failed":
            if self.outcome != "failed":
                label = "" if when == "call" else f"error in {when}: "
                self.outcome, self.text = "failed", label + text
        elif outcome == "skipped" and self.outcome in ("missing", "passed"):
            self.outcome, self.text = "skipped", text
            if rec.get("wasxfail") is not None:
                self.text = f"xfail in L1: {rec['wasxfail']}"
        elif outcome == "passed" and when == "call" and self.outcome == "missing":
            self.outcome = "passed"


@dataclass
class LaneRun:
    """The inner run's outcome: per-test results, or the reason there are none."""

    results: dict[str, InnerResult]
    lab: LabResult | None
    error: str  # why some or all tests have no result ('' if none is missing)
    workdir: Path
    seconds: float

    def result(self, nodeid: str) -> InnerResult:
        return self.results.get(nodeid) or InnerResult(nodeid)


def inner_command(nodeids: list[str], rootdir: Path, python: str, qemu: str | None = None) -> str:
    """The /bin/sh script L1 runs: the inner pytest over exactly ``nodeids``, with
    ``QTEST_QEMU_BINARY=qemu`` (the host session's QEMU, same path through the shared root)."""
    args = [
        # no hypothesis plugin: it costs ~2.5 s of start-up natively, tens of seconds under
        # TCG, and @given works without it (no lane test uses hypothesis today)
        python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
        "-p", "qtests.lab.inner_report",
        "-o", "console_output_style=classic", "-rA", "-v",
        '--junitxml="$VDPA_LAB_SHARE/' + JUNIT_FILE + '"',
        "--", *nodeids,
    ]  # fmt: skip
    quoted = " ".join(a if a.startswith("--junitxml=") else shlex.quote(a) for a in args)
    return (
        "set -u\n"
        f"cd {shlex.quote(str(rootdir))}\n"
        "export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1\n"
        "export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis\n"  # the checkout is read-only
        f'export QOS_LOG_DIR="$VDPA_LAB_SHARE/{INNER_LOGS}"\n'
        f'export {RESULTS_ENV}="$VDPA_LAB_SHARE/{RESULTS_FILE}"\n'
        + (f"export QTEST_QEMU_BINARY={shlex.quote(qemu)}\n" if qemu else "")
        + f"exec {quoted}\n"
    )


def read_results(path: Path, nodeids: list[str]) -> tuple[dict[str, InnerResult], list[str]]:
    """Per-test results and the inner collection errors from ``results.jsonl``."""
    results = {n: InnerResult(n) for n in nodeids}
    collect_errors: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return results, collect_errors
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed L1
        if rec.get("kind") == "collect":
            collect_errors.append(f"{rec.get('nodeid')}: {rec.get('longrepr')}")
        elif rec.get("kind") == "test":
            results.setdefault(str(rec["nodeid"]), InnerResult(str(rec["nodeid"]))).add(rec)
        elif rec.get("kind") == "log_dir":
            inner = results.setdefault(str(rec["nodeid"]), InnerResult(str(rec["nodeid"])))
            inner.log_dir_name = Path(str(rec["path"])).name
    return results, collect_errors


def copy_logs(share: Path, log_root: Path) -> None:
    """The inner per-test log directories, to ``log_root/<test id>/`` on the host."""
    inner = share / INNER_LOGS
    if not inner.is_dir():
        return
    for src in inner.iterdir():
        if src.is_dir():
            dest = log_root / src.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src, dest, symlinks=True)


def run_lane(nodeids: list[str], rootdir: Path, log_root: Path, timeout: float) -> LaneRun:
    """Boot L1 once and run the lane tests ``nodeids`` in it; never raises for a lab failure
    (every test then carries the reason)."""
    with _claim_workdir(log_root) as workdir:
        return _run_lane(nodeids, rootdir, log_root, timeout, workdir)


@contextlib.contextmanager
def _claim_workdir(log_root: Path) -> Iterator[Path]:
    """``log_root/vdpa-lab``, emptied, held with a lock for this session; if another session
    (sharing the checkout) holds it, ``log_root/vdpa-lab-<pid>`` instead."""
    log_root.mkdir(parents=True, exist_ok=True)
    with (log_root / "vdpa-lab.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            workdir = log_root / "vdpa-lab"
        except BlockingIOError:
            workdir = log_root / f"vdpa-lab-{os.getpid()}"
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        yield workdir


def _run_lane(
    nodeids: list[str], rootdir: Path, log_root: Path, timeout: float, workdir: Path
) -> LaneRun:
    t0 = time.monotonic()
    try:
        qemu: str | None = find_qemu()
    except QemuError:
        qemu = None  # the lab cannot boot either: run_in_lab says so
    command = inner_command(nodeids, rootdir, sys.executable, qemu)
    lab: LabResult | None = None
    error = ""
    try:
        lab = run_in_lab(command, workdir, timeout=timeout)
    except LabError as exc:
        error = str(exc)
    share = workdir / "share"
    results, collect_errors = read_results(share / RESULTS_FILE, nodeids)
    copy_logs(share, log_root)
    missing = [n for n in nodeids if results[n].outcome == "missing"]
    if missing and not error:
        assert lab is not None
        error = f"the inner pytest in L1 exited {lab.rc} without running this test"
        if collect_errors:
            error += "; collection errors in L1:\n" + "\n".join(collect_errors)
        tail = (lab.stdout[-3000:] + "\n" + lab.stderr[-2000:]).strip()
        error += f"\ninner pytest output (tail):\n{tail}"
    run = LaneRun(results, lab, error, workdir, round(time.monotonic() - t0, 2))
    _write_timings(run, workdir / "timings.json")
    return run


def _write_timings(run: LaneRun, path: Path) -> None:
    lab = run.lab
    data = {
        "lane_seconds": run.seconds,
        "l1_boot_seconds": lab.boot_seconds if lab else None,
        "inner_run_seconds": lab.run_seconds if lab else None,
        "l1_total_seconds": lab.total_seconds if lab else None,
        "l1_guest_uptime": lab.guest_uptime if lab else None,
        "tests": len(run.results),
        "outcomes": {n: r.outcome for n, r in run.results.items()},
        "error": run.error,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
