"""Timing helpers: repeat a callable and summarise, without sleeping anywhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    """Seconds per call over ``rounds`` rounds (each the mean of ``number`` calls)."""

    median: float
    best: float
    rounds: int
    number: int

    @property
    def median_us(self) -> float:
        return self.median * 1e6

    @property
    def per_second(self) -> float:
        return 1.0 / self.median if self.median > 0 else float("inf")


def repeat(
    fn: Callable[[], Any],
    *,
    number: int = 1,
    rounds: int = 7,
    setup: Callable[[], Any] | None = None,
    budget_s: float = 5.0,
) -> Sample:
    """Run ``setup()`` (untimed) then ``number`` timed calls of ``fn``, ``rounds`` times, but
    stop early once ``budget_s`` seconds have been spent (at least one round always runs)."""
    per_call: list[float] = []
    deadline = time.monotonic() + budget_s
    for _ in range(rounds):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        per_call.append((time.perf_counter() - t0) / number)
        if time.monotonic() > deadline:
            break
    return Sample(statistics.median(per_call), min(per_call), len(per_call), number)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
