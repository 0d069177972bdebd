"""A front-end shrinks guest memory the backend cannot seal (issue #12), against the real
backend process: the shrink is found before any ring access (the pre-callback size check) and
reported as ``error.mem`` ``region-shrunk`` with NEEDS_RESET; the process keeps serving. The
meta-test turns the size check off (``skip-shrink-guard``): the ring access then faults, the
SIGBUS guard survives it and the scenario says so."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qtests.qos.backend_process import BackendProcess
from qtests.qos.hostile_memory import assert_found_before_access, shrink_then_poll


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
    started: list[BackendProcess] = []

    def start(faults: tuple[str, ...] = ()) -> BackendProcess:
        args = [a for f in faults for a in ("--fault", f)]
        where = tmp_path / f"b{len(started)}"
        where.mkdir()
        bp = BackendProcess.launch(where, "--wire", "null", *args)
        started.append(bp)
        return bp

    yield start
    for bp in started:
        rc = bp.stop(sig=signal.SIGTERM)
        assert rc == 0, f"backend exited {rc}: {bp.tails()}"


def test_shrunk_unsealable_region_is_found_before_any_access(
    start_backend: Callable[..., BackendProcess],
) -> None:
    bp = start_backend()
    assert_found_before_access(shrink_then_poll(bp))


def test_meta_skip_shrink_guard_is_caught(
    start_backend: Callable[..., BackendProcess],
) -> None:
    bp = start_backend(faults=("skip-shrink-guard",))
    entry = shrink_then_poll(bp)  # survived: the SIGBUS guard caught the ring access
    with pytest.raises(AssertionError, match="the ring access faulted"):
        assert_found_before_access(entry)
