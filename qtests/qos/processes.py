"""Stopping a child process for sure: SIGTERM, a bounded wait, then SIGKILL."""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import Any

_log = logging.getLogger(__name__)

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
) -> int:
    """Stop ``proc`` and return its exit status (negative: killed by that signal).

    SIGTERM, wait ``grace`` s, then SIGKILL. With ``asked=True`` the caller already asked the
    process to exit (QMP ``quit``): wait ``grace`` s for that first, then SIGTERM
    (`TERM_GRACE` s), then SIGKILL. Raises RuntimeError only if it survives SIGKILL.
    """
    log = log or _log
    if asked and proc.poll() is None and not _wait(proc, grace):
        log.warning(
            "%s (pid %d) still running %.1fs after being asked: SIGTERM", name, proc.pid, grace
        )
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        if not _wait(proc, TERM_GRACE if asked else grace):
            log.warning("%s (pid %d) ignored SIGTERM: SIGKILL", name, proc.pid)
            proc.kill()
            if not _wait(proc, KILL_WAIT):
                raise RuntimeError(f"{name} (pid {proc.pid}) survived SIGKILL")
    rc = proc.poll()
    assert rc is not None
    return rc
