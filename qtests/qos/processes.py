"""Child processes of the suite: they die with it (PR_SET_PDEATHSIG), and stopping one is
sure: SIGTERM, a bounded wait, then SIGKILL."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
from typing import Any

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


#: The runner's main thread, as the parent saw it (a forked child inherits this object).
_MAIN_THREAD = threading.main_thread()


def die_with_parent() -> None:
    """``preexec_fn`` for QEMU and backend children: SIGKILL when the runner dies, even if it
    is itself SIGKILLed (only calls prctl, which is safe between fork and exec).

    Only for children forked by the runner's main thread: the kernel sends the signal when the
    *thread* that forked exits, and avocado runs setUp / the test / tearDown each in a worker
    thread that ends with it, which would kill QEMU and the backend between test and tearDown.
    (In the child, ``current_thread()`` is the parent's forking thread object.) Children of
    other threads rely on their process group instead.
    """
    if _prctl is not None and threading.current_thread() is _MAIN_THREAD:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


#: How long a process gets after SIGTERM when it was already asked to exit another way.
TERM_GRACE = 5.0
#: How long the kernel gets to reap a SIGKILLed process.
KILL_WAIT = 10.0


def _wait(proc: subprocess.Popen[Any], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def stop_process(
    proc: subprocess.Popen[Any],
    name: str,
    grace: float = 10.0,
    *,
    asked: bool = False,
    log: logging.Logger | None = None,
    sig: int = signal.SIGTERM,
) -> int:
    """Stop ``proc`` and return its exit status (negative: killed by that signal).

    SIGTERM (or ``sig``), wait ``grace`` s, then SIGKILL. With ``asked=True`` the caller already asked the
    process to exit (QMP ``quit``): wait ``grace`` s for that first, then SIGTERM
    (`TERM_GRACE` s), then SIGKILL. Raises RuntimeError only if it survives SIGKILL.
    """
    log = log or _log
    if asked and proc.poll() is None and not _wait(proc, grace):
        log.warning(
            "%s (pid %d) still running %.1fs after being asked: SIGTERM", name, proc.pid, grace
        )
    if proc.poll() is None:
        proc.send_signal(sig)
        if not _wait(proc, TERM_GRACE if asked else grace):
            log.warning("%s (pid %d) ignored SIGTERM: SIGKILL", name, proc.pid)
            proc.kill()
            if not _wait(proc, KILL_WAIT):
                raise RuntimeError(f"{name} (pid {proc.pid}) survived SIGKILL")
    rc = proc.poll()
    assert rc is not None
    return rc


def open_fd_count(pid: int | None = None) -> int:
    """How many fds process ``pid`` (default: this one) has open."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
