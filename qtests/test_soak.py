"""``python -m qtests.soak``: runs in a row, stops at the first failure, and a run that skips
what the first one ran (or runs nothing) is not a pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qtests.soak import REPO, suites

FLAKY = """
from pathlib import Path
def test_second_run_fails():
    counter = Path(__file__).with_name("count")
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    assert n != {fail_at}, "run {fail_at} fails"
"""

SKIPS_LATER = """
from pathlib import Path
import pytest
def test_runs_then_skips():
    counter = Path(__file__).with_name("count")
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n > 1:
        pytest.skip("not this time")
def test_always():
    pass
"""


def _soak(tmp_path: Path, body: str, runs: int) -> tuple[int, dict[str, object], str]:
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_it.py").write_text(body)
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "qtests.soak", "--runs", str(runs), "--jobs", "1"]
        + ["--log-dir", str(logs), str(tmp_path / "suite" / "test_it.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, json.loads((logs / "soak.json").read_text()), proc.stdout


def test_all_runs_pass(tmp_path: Path) -> None:
    rc, summary, out = _soak(tmp_path, FLAKY.format(fail_at=99), 3)
    assert rc == 0, out
    assert summary["runs_passed"] == 3 and summary["in_a_row"] is True
    assert "3/3 runs passed in a row" in out


def test_stops_at_the_first_failed_run(tmp_path: Path) -> None:
    rc, summary, out = _soak(tmp_path, FLAKY.format(fail_at=2), 4)
    assert rc == 1, out
    assert summary["runs"] == 2 and summary["runs_passed"] == 1, summary
    assert "soak run 2/4: FAILED" in out and "run 2 fails" not in out
    assert (tmp_path / "logs" / "run-2" / "pytest.out").read_text().count("run 2 fails")


def test_a_run_that_skips_more_is_not_a_pass(tmp_path: Path) -> None:
    rc, summary, out = _soak(tmp_path, SKIPS_LATER, 2)
    assert rc == 1, out
    assert "skipped what run 1 ran" in out


def test_default_selection_names_existing_scenario_suites() -> None:
    found = suites()
    assert "qtests/test_viommu_inflight.py" in found and "qtests/test_vdpa_migration.py" in found
    assert all((REPO / f).is_file() for f in found)
