"""Shared pytest fixtures for the qtest suites.

``log_dir``: a per-test directory for QEMU stderr, qtest logs and backend logs.  By default it
lives under pytest's ``tmp_path``; set ``QOS_LOG_DIR=/some/dir`` to keep logs in one place
(one sub-directory per test node id).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


@pytest.fixture
def log_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    root = os.environ.get("QOS_LOG_DIR")
    path = Path(root) / _safe_name(request.node.nodeid) if root else tmp_path / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
