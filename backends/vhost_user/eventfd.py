"""Reading and writing eventfds a peer controls, without ever blocking.

A front-end hands us its kick, call and err eventfds. We hold our own descriptor, but the open
file description (and its ``O_NONBLOCK`` flag) is shared: the peer can clear the flag on its
copy at any time, so setting it ourselves proves nothing. Every access therefore decides per
call that it will not wait:

* :func:`drain` reads with ``preadv2(RWF_NOWAIT)``: the kernel's eventfd read honours
  ``IOCB_NOWAIT`` whatever the file flags say, so an empty counter is ``EAGAIN``, never a wait
  (kernels without it: a zero-timeout ``poll`` first, then the read under ``O_NONBLOCK``).
* :func:`signal` writes only when a zero-timeout ``poll`` says the counter has room
  (``POLLOUT``: counter < 2^64-2). eventfd writes have no per-call no-wait flag, so one window
  remains: the peer fills the counter to 2^64-2 with ``O_NONBLOCK`` cleared between our poll
  and our write. In the main thread (the backend process) a one-shot interval timer
  (``ITIMER_REAL``, :data:`WRITE_WATCHDOG_S`, borrowed and given back; our SIGALRM handler is
  installed on first use, re-installed if replaced, and chains to the earlier one) interrupts even that write, reported as not delivered.
  Other threads (in-process test backends) set ``O_NONBLOCK`` just before and keep the window. A write that cannot be made returns False; the
  caller reports it (journal + log) and coalesces it with the next interrupt.
"""

from __future__ import annotations

import os
import select
import signal as _signal
import threading

__all__ = ["WRITE_WATCHDOG_S", "drain", "signal", "writable"]

WRITE_WATCHDOG_S = 0.05
#: Writes interrupted by the watchdog while the counter still had room are tried this often.
WATCHDOG_ATTEMPTS = 3
_ONE = (1).to_bytes(8, "little")
_nowait_read = hasattr(os, "RWF_NOWAIT")


_previous: object = None  # the SIGALRM handler ours chains to
_armed = False  # a write is in progress under the watchdog


class _WriteTimedOut(Exception):
    pass


def _ready(fd: int, events: int) -> bool:
    p = select.poll()
    p.register(fd, events)
    for _, revents in p.poll(0):
        if revents & (select.POLLERR | select.POLLNVAL):
            raise OSError(f"eventfd {fd}: poll reports error ({revents:#x})")
        return bool(revents & events)
    return False


def writable(fd: int) -> bool:
    """The counter has room for a write of 1 (zero-timeout poll)."""
    return _ready(fd, select.POLLOUT)


def drain(fd: int) -> int | None:
    """Read and reset the counter; ``None`` if it was zero. Never waits. OSError if ``fd`` is
    broken."""
    global _nowait_read
    if _nowait_read:
        buf = bytearray(8)
        try:
            os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: kernel without it
                raise
            _nowait_read = False
        else:
            return int.from_bytes(buf, "little")
    if not _ready(fd, select.POLLIN):
        return None
    os.set_blocking(fd, False)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return None


def _on_alarm(signum: int, frame: object) -> None:
    if _armed:
        raise _WriteTimedOut()
    if callable(_previous):
        _previous(signum, frame)


def _install_watchdog() -> bool:
    """Make sure our SIGALRM handler is in place (main thread only; re-installed if someone
    replaced it, chaining to theirs); False where it cannot be."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    current = _signal.getsignal(_signal.SIGALRM)
    if current is not _on_alarm:
        _previous = current
        _signal.signal(_signal.SIGALRM, _on_alarm)
    return True


def signal(fd: int, value: int = 1) -> bool:
    """Add ``value`` to the counter; False (nothing written, or not known to be) if it has no
    room or the write could not be made at once. Never waits longer than
    :data:`WRITE_WATCHDOG_S`."""
    global _armed
    if not writable(fd):
        return False
    data = _ONE if value == 1 else value.to_bytes(8, "little")
    if threading.current_thread() is not threading.main_thread() or not _install_watchdog():
        os.set_blocking(fd, False)  # the best a thread can do: see the module docstring
        try:
            return os.write(fd, data) == 8
        except BlockingIOError:
            return False
    for _ in range(WATCHDOG_ATTEMPTS):
        previous: tuple[float, float] = (0.0, 0.0)
        try:
            try:
                _armed = True
                # the process has one ITIMER_REAL: borrow it, give back what was left of it
                previous = _signal.setitimer(_signal.ITIMER_REAL, WRITE_WATCHDOG_S)
                ok = os.write(fd, data) == 8
            finally:
                _armed = False
                _signal.setitimer(_signal.ITIMER_REAL, *previous)
        except BlockingIOError:
            return False
        except _WriteTimedOut:
            # the watchdog also fires when this process was merely not scheduled for
            # WRITE_WATCHDOG_S (a loaded machine): while the counter still has room, that was
            # no full counter, try again (a timer after a good write: one interrupt too many)
            if writable(fd):
                continue
            return False
        return ok
    return False
