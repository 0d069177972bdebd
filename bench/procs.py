"""Benchmark child processes: pinned to CPUs, output captured through a pipe (and teed to a
log file), waited on by reading that pipe with a deadline, always stopped."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from qtests.qos.processes import stop_process


class Proc:
    """A child whose stdout+stderr go through a pipe we drain ourselves."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cpus: Sequence[int] | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.output = ""
        allowed = set(os.sched_getaffinity(0))
        want = {c for c in (cpus or ()) if c in allowed}

        def pin() -> None:
            if want:
                os.sched_setaffinity(0, want)

        self._log: IO[str] = log_path.open("w")
        self._log.write("$ " + " ".join(self.argv) + "\n")
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                preexec_fn=pin,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_once(self, timeout: float) -> int:
        """Bytes read within ``timeout`` s (0: nothing came, -1: EOF)."""
        if self._eof:
            return -1
        r, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not r:
            return 0
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return 0
        if not chunk:
            self._eof = True
            return -1
        text = chunk.decode(errors="replace")
        self.output += text
        self._log.write(text)
        return len(chunk)

    def pump(self, timeout: float) -> bool:
        """Read what the child printed within ``timeout`` s; False at EOF."""
        return self._read_once(timeout) >= 0

    def pump_until(self, deadline: float) -> None:
        """Keep draining the output until the monotonic ``deadline`` (or EOF)."""
        while (left := deadline - time.monotonic()) > 0:
            if not self.pump(left):
                return

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        """Drain output until ``pattern`` matches it; TimeoutError / RuntimeError naming
        ``what`` otherwise (the child's last output is in the message)."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {what} from {self.name}; "
                    f"last output: {self.tail()!r}"
                )
            if not self.pump(min(left, 0.5)) and not self.alive():
                m = rx.search(self.output)
                if m:
                    return m
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}; "
                    f"last output: {self.tail()!r}"
                )

    def wait_ready(self, timeout: float = 30.0) -> Proc:
        """Wait for a backend's ``READY`` line; the child is stopped if it never comes."""
        try:
            self.wait_for(r"^READY", timeout, "the READY line")
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self, n: int = 600) -> str:
        return self.output[-n:]

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, bounded wait, SIGKILL; drains and closes the pipe and the log."""
        try:
            rc = stop_process(self.proc, self.name, grace)
        finally:
            while self._read_once(0.0) > 0:  # what is already buffered, nothing more
                pass
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()
        return rc

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._log.closed:
            self.stop()
