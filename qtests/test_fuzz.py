"""The bounded slice of ``make fuzz`` that runs in ``make check`` (issue #12).

Deterministic under ``CI=true`` (hypothesis derandomized, one chunk of cases); otherwise each
run explores new cases for a bounded time. Either way the corpus is replayed first, and the
first crash, hang, fd leak or silent refusal fails the test with the case that caused it.
The full run (>= 1,000,000 messages, >= 100,000 tables) is ``make fuzz``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qtests.fuzz import descriptors, vhost_user

CI = bool(os.environ.get("CI"))


def test_vhost_user_fuzz_slice() -> None:
    stats = vhost_user.run(max_messages=10_000, max_seconds=20.0, ci=CI, strict=True, chunk=50)
    assert stats.cases >= 50 and stats.messages > 1000, stats.report()
    assert (stats.crashes, stats.hangs, stats.fd_leaks) == (0, 0, 0), stats.failures
    assert stats.fd_min == stats.fd_max, stats.report()


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
