"""The vhost-vdpa lane's figures: L1 boot time and the lane's run time.

* ``lab_l1_boot_s``: wall time from starting the lab's QEMU (TCG) to /init's READY marker, the
  median of ``boots`` boots that run ``true`` (``lab_l1_cycle_s``: the whole boot-run-power-off
  cycle). On a host that cannot run the lab the figures are null with the reason.
* ``lab_lane_s``: wall time of ``pytest -m vdpa_lane`` (make check-vdpa without make) in a child
  process; ``lab_lane_inner_s`` the inner pytest's share of it in L1 and ``lab_lane_boot_s`` the
  boot in that run, from the lane's summary line. A failing lane is still
  a measurement of how long it took to say so (its exit status goes in ``notes``).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Report

REPO = Path(__file__).resolve().parents[1]
LANE_LIMIT_S = 1800.0
_SUMMARY = re.compile(r"vdpa lane in the lab: .*L1 boot ([\d.]+) s, inner pytest ([\d.]+) s")


def boot(report: Report, work: Path, log: Callable[[str], None], boots: int = 3) -> None:
    from qtests.lab import host
    from qtests.lab.vm import LabError, run_in_lab

    why = host.lab_problem()
    if why is not None:
        for key in ("lab_l1_boot_s", "lab_l1_cycle_s"):
            report.fail(key, f"the lab cannot run here: {why}")
        return
    ready, cycle = [], []
    for i in range(boots):
        try:
            result = run_in_lab("true", work / f"boot{i}", timeout=120)
        except LabError as exc:
            for key in ("lab_l1_boot_s", "lab_l1_cycle_s"):
                report.fail(key, str(exc))
            return
        ready.append(result.boot_seconds)
        cycle.append(result.total_seconds)
        log(f"  L1 boot {i + 1}/{boots}: READY after {result.boot_seconds:.2f} s, "
            f"cycle {result.total_seconds:.2f} s (guest uptime {result.guest_uptime})")  # fmt: skip
    report.put("lab_l1_boot_s", round(statistics.median(ready), 2), f"{boots} boots: {ready}")
    report.put("lab_l1_cycle_s", round(statistics.median(cycle), 2), f"{boots} boots: {cycle}")


def lane(report: Report, logs: Path, log: Callable[[str], None]) -> None:
    log_path = logs / "lab_lane.log"
    argv = [sys.executable, "-m", "pytest", "-m", "vdpa_lane", "-q", "-p", "no:cacheprovider"]
    log(f"  {' '.join(argv[1:])} (log: {log_path})")
    t0 = time.monotonic()
    with log_path.open("w") as out:
        try:
            rc: int | None = subprocess.run(
                argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, timeout=LANE_LIMIT_S,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = None
    took = round(time.monotonic() - t0, 1)
    tail = next(
        (ln for ln in reversed(log_path.read_text(errors="replace").splitlines()) if ln.strip()),
        "",
    )
    report.put("lab_lane_s", took, f"exit {rc}: {tail}")
    # the plugin's summary: "vdpa lane in the lab: N test(s), L1 boot B s, inner pytest I s, ..."
    found = _SUMMARY.search(log_path.read_text(errors="replace"))
    if found is None:
        for key in ("lab_lane_boot_s", "lab_lane_inner_s"):
            report.fail(key, "no 'vdpa lane in the lab' summary (lane ran directly, or L1 failed)")
    else:
        report.put("lab_lane_boot_s", float(found.group(1)))
        report.put("lab_lane_inner_s", float(found.group(2)))
    log(f"  lab_lane_s = {took} s (exit {rc}) {tail}")
