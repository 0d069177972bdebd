"""Waiting on polled conditions with a deadline whose error names what was awaited."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true in time (an AssertionError so avocado reports FAIL)."""


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value, which is returned.

    Raises WaitTimeout("timed out after Ns waiting for <what>[: <detail()>]").
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is the pause, not a synchronisation
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            extra = f": {detail()}" if detail else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{extra}")
        pause.wait(min(interval, remaining))
