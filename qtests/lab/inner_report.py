"""pytest plugin for the lane's inner run in L1: one JSON line per test phase and per failed
collection, in ``$VDPA_LAB_RESULTS``, keyed by node id (unambiguous, unlike junit's names).

Loaded with ``-p qtests.lab.inner_report``; the host reads the file with :mod:`qtests.lab.lane`.
"""

from __future__ import annotations

import json
import os
from typing import IO

import pytest

from qtests.lab.lane import RESULTS_ENV

_out: IO[str] | None = None


def _write(record: dict[str, object]) -> None:
    global _out
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    if _out is None:
        _out = open(path, "a", encoding="utf-8")  # kept open for the session
    _out.write(json.dumps(record) + "\n")
    _out.flush()


def _text(report: pytest.TestReport) -> str:
    """The failure text, or for a skip just its reason (pytest keeps (path, line, reason))."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return report.longreprtext


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _write(
        {
            "kind": "test",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": _text(report),
            "duration": round(report.duration, 3),
            "sections": [[name, text] for name, text in report.sections],
            "wasxfail": getattr(report, "wasxfail", None),
        }
    )


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """The test's log directory (the qtests' ``log_dir`` fixture), so the host can name it."""
    log_dir = (getattr(item, "funcargs", None) or {}).get("log_dir")
    if log_dir is not None:
        _write({"kind": "log_dir", "nodeid": item.nodeid, "path": str(log_dir)})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write({"kind": "collect", "nodeid": report.nodeid, "longrepr": report.longreprtext})
