"""Shared pytest fixtures for the qtest suites.

``log_dir``: a per-test directory for QEMU stderr, qtest logs, backend logs and journals:
``test-logs/<test id>/`` under pytest's root directory (the checkout; ``QOS_LOG_DIR=/some/dir``
puts them elsewhere). It is emptied when the test starts and kept afterwards, pass or fail;
the junit report names it (the checkout's conftest.py).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtests.qos.testbed import Testbed
from qtests.qos.viommu_testbed import ViommuTestbed


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


@pytest.fixture
def log_dir(request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("QOS_LOG_DIR") or request.config.rootpath / "test-logs")
    path = root / _safe_name(request.node.nodeid)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """How QEMU reaches the backend in this test: "vhost-user" unless the test is
    parametrized over :data:`qtests.qos.transports.BOTH` (indirectly, through this fixture)."""
    return str(getattr(request, "param", "vhost-user"))


@pytest.fixture
def make_testbed(log_dir: Path, transport: str) -> Iterator[Callable[..., Testbed]]:
    """Factory for testbeds (backend process + QEMU + driver); every one is closed at teardown,
    whatever the test did. Testbeds use the test's ``transport`` unless told otherwise."""
    beds: list[Testbed] = []

    def make(**kw: Any) -> Testbed:
        tb = Testbed(log_dir, **{"transport": transport, **kw})
        beds.append(tb)
        return tb

    yield make
    for tb in reversed(beds):
        tb.close()


@pytest.fixture
def make_vbed(log_dir: Path, transport: str) -> Iterator[Callable[..., ViommuTestbed]]:
    """Factory for vIOMMU testbeds on the test's ``transport``, all closed at teardown."""
    beds: list[ViommuTestbed] = []

    def make(**kw: Any) -> ViommuTestbed:
        tb = ViommuTestbed(log_dir, **{"transport": transport, **kw})
        beds.append(tb)
        return tb

    yield make
    for tb in reversed(beds):
        tb.close()


@pytest.fixture
def testbed(make_testbed: Callable[..., Testbed]) -> Testbed:
    """A started single-queue testbed: driver at DRIVER_OK, mergeable RX buffers posted."""
    return make_testbed().start()
