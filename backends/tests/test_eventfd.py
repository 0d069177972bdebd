"""backends/vhost_user/eventfd.py: never wait on an eventfd, whatever flags the peer set."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from backends.vhost_user import eventfd

FULL = (1 << 64) - 2


@pytest.fixture
def blocking_fd() -> Iterator[int]:
    fd = os.eventfd(0)  # no EFD_NONBLOCK: what a hostile peer leaves us
    yield fd
    os.close(fd)


def test_drain_of_an_empty_blocking_eventfd_returns_at_once(blocking_fd: int) -> None:
    assert eventfd.drain(blocking_fd) is None
    os.eventfd_write(blocking_fd, 3)
    assert eventfd.drain(blocking_fd) == 3
    assert eventfd.drain(blocking_fd) is None
    assert os.get_blocking(blocking_fd)  # drained without touching the shared flags


def test_signal_of_a_full_blocking_eventfd_reports_failure(blocking_fd: int) -> None:
    os.eventfd_write(blocking_fd, FULL)
    assert not eventfd.writable(blocking_fd)
    assert eventfd.signal(blocking_fd) is False
    assert os.eventfd_read(blocking_fd) == FULL  # nothing was added
    assert eventfd.signal(blocking_fd) is True
    assert os.eventfd_read(blocking_fd) == 1


def test_watchdog_bounds_a_write_that_blocks_after_the_poll(
    blocking_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the poll cannot close: the counter fills (and O_NONBLOCK is cleared) between
    our poll and our write. The main thread's watchdog interrupts the write."""
    os.eventfd_write(blocking_fd, FULL)
    monkeypatch.setattr(eventfd, "writable", lambda fd: True)  # the poll saw room, then...
    monkeypatch.setattr(os, "set_blocking", lambda fd, flag: None)  # ...the peer won the race
    started = time.monotonic()
    assert eventfd.signal(blocking_fd) is False
    assert time.monotonic() - started < 5.0  # bounded by the 50 ms watchdog (+ a loaded box)
    assert os.eventfd_read(blocking_fd) == FULL


def test_a_watchdog_that_fires_while_the_counter_has_room_writes_again(
    blocking_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded machine the watchdog can fire before a write that would not block (this
    process was not scheduled): that is no full counter, the interrupt is written."""
    real_write = os.write
    calls: list[int] = []

    def write_late(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 1:
            raise eventfd._WriteTimedOut()  # the alarm, before anything was written
        return real_write(fd, data)

    monkeypatch.setattr(eventfd.os, "write", write_late)
    assert eventfd.signal(blocking_fd)
    assert len(calls) == 2
    monkeypatch.setattr(eventfd.os, "write", real_write)
    assert eventfd.drain(blocking_fd) == 1
