"""Stopping child processes for sure: a grace period, then SIGTERM, then SIGKILL."""

from __future__ import annotations

import logging
import subprocess


def stop_process(
    proc: subprocess.Popen[bytes], name: str, log: logging.Logger, grace: float = 10.0
) -> int:
    """Wait ``grace`` s for an exit already asked for, then SIGTERM (5 s), then SIGKILL.

    Returns the exit status (negative: killed by that signal).
    """
    steps = (("wait", grace), ("terminate", 5.0), ("kill", 5.0))
    for step, timeout in steps:
        if proc.poll() is not None:
            break
        if step == "terminate":
            log.warning("%s (pid %d) still running after %.0f s: SIGTERM", name, proc.pid, grace)
            proc.terminate()
        elif step == "kill":
            log.warning("%s (pid %d) ignored SIGTERM: SIGKILL", name, proc.pid)
            proc.kill()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    if proc.returncode is None:
        raise AssertionError(f"{name} (pid {proc.pid}) survived SIGKILL")
    return proc.returncode
