"""The bounded slice of ``make fuzz`` that runs in ``make check`` (issue #12).

Deterministic under ``CI=true`` (hypothesis derandomized, one chunk of cases); otherwise each
run explores new cases for a bounded time. Either way the corpus is replayed first, and the
first crash, hang, fd leak or silent refusal fails the test with the case that caused it.
The full run (>= 1,000,000 messages, >= 100,000 tables, 100,000 VDUSE cases) is ``make fuzz``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from backends.vduse.transport import VduseTransport
from backends.vduse.uapi import Request
from qtests.fuzz import descriptors, vduse, vhost_user

CI = bool(os.environ.get("CI"))


def test_vhost_user_fuzz_slice() -> None:
    stats = vhost_user.run(max_messages=10_000, max_seconds=20.0, ci=CI, strict=True, chunk=50)
    assert stats.cases >= 50 and stats.messages > 1000, stats.report()
    assert (stats.crashes, stats.hangs, stats.fd_leaks) == (0, 0, 0), stats.failures
    assert stats.fd_min == stats.fd_max, stats.report()


def test_vduse_fuzz_slice() -> None:
    """A misbehaving VDUSE kernel, in-process: a few seconds of cases."""
    stats = vduse.run(max_cases=200, max_seconds=8.0, ci=CI, strict=True, chunk=100)
    assert stats.cases >= 100, stats.report()
    assert (stats.crashes, stats.hangs, stats.fd_leaks) == (0, 0, 0), stats.failures
    assert stats.fd_min == stats.fd_max, stats.report()


def test_vduse_fuzz_catches_an_exception_and_a_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VDUSE fuzzer can fail: a handler that raises, and one that leaks an fd."""
    real = VduseTransport._get_vq_state

    def raising(self: VduseTransport, req: Request) -> tuple[bytes, dict[str, Any]]:
        raise RuntimeError("planted")

    monkeypatch.setattr(VduseTransport, "_get_vq_state", raising)
    with pytest.raises(AssertionError, match="planted"):
        vduse.run(max_cases=100, max_seconds=30.0, ci=True, strict=True, chunk=100)

    def leaking(self: VduseTransport, req: Request) -> tuple[bytes, dict[str, Any]]:
        os.dup(0)
        return real(self, req)

    monkeypatch.setattr(VduseTransport, "_get_vq_state", leaking)
    with pytest.raises(AssertionError, match="fd leak"):
        vduse.run(max_cases=100, max_seconds=30.0, ci=True, strict=True, chunk=100)


@pytest.mark.qemu
def test_descriptor_fuzz_slice(log_dir: Path) -> None:
    stats = descriptors.run(
        max_tables=100,
        max_seconds=40.0,
        log_dir=log_dir,
        ci=CI,
        strict=True,
        chunk=50,
        verify_every=50,
    )
    assert stats.cases >= 100, stats.report()
    assert (stats.crashes, stats.hangs, stats.fd_leaks) == (0, 0, 0), stats.failures
    assert not stats.failures, stats.failures


def test_make_fuzz_command_line_parses() -> None:
    """``make fuzz`` names no fuzzer (all of them); Python 3.11's argparse once refused that."""
    from qtests.fuzz.__main__ import FUZZERS, main, parser

    assert parser().parse_args(["--messages", "1"]).which == []
    assert parser().parse_args(list(FUZZERS)).which == list(FUZZERS)
    with pytest.raises(SystemExit) as e:
        main(["no-such-fuzzer"])
    assert e.value.code == 2
