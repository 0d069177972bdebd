"""Bounded waiting on polled conditions.

Everything the driver waits for (a used index, an MSI-X word, a status bit) lives in guest
memory or device registers that can only be observed by asking QEMU over qtest.  `poll_until`
re-evaluates such a condition with a short, growing pause between attempts (pacing, so the
poller does not starve QEMU of CPU) and raises `WaitTimeout` naming what was awaited.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")

#: Longest pause between two evaluations of a polled condition.
MAX_POLL_INTERVAL = 0.002
#: Evaluations done back to back before pausing at all (fast devices answer within these).
EAGER_POLLS = 8


class WaitTimeout(TimeoutError):
    """A polled condition did not become true in time."""

    def __init__(self, what: str, timeout: float, detail: str = "") -> None:
        self.what = what
        self.timeout = timeout
        msg = f"timed out after {timeout:.3g}s waiting for {what}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def poll_until(
    condition: Callable[[], T | None | Literal[False]],
    timeout: float,
    what: str,
    *,
    detail: Callable[[], str] | None = None,
    max_interval: float = MAX_POLL_INTERVAL,
) -> T:
    """Evaluate ``condition`` until it returns a truthy value and return that value.

    ``detail`` (optional) is called on timeout to add state to the error message.
    """
    deadline = time.monotonic() + timeout
    attempts = 0
    interval = 0.00005
    while True:
        value = condition()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise WaitTimeout(what, timeout, detail() if detail else "")
        attempts += 1
        if attempts > EAGER_POLLS:
            # Pacing between polls of a condition only QEMU can change; not synchronisation.
            time.sleep(min(interval, max_interval, deadline - now))
            interval *= 2


def wait_readable(fd: int | socket.socket, timeout: float, what: str) -> None:
    """Block until ``fd`` is readable (an event, not a poll); WaitTimeout naming ``what``."""
    r, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not r:
        raise WaitTimeout(what, timeout)
