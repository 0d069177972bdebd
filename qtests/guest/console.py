"""The guest's serial console (a unix-socket chardev) driven with pexpect.

Commands are framed by markers the shell prints but the echoed input cannot contain
(``echo __B""EGIN_7__`` prints ``__BEGIN_7__``), so output is exact whatever the echo, the
prompt or line editing do. Everything read is logged to the console log file.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pexpect
from pexpect import fdpexpect

import guest_images

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PANIC = r"Kernel panic - not syncing[^\r\n]*"


class ConsoleError(AssertionError):
    """The console did not show what was awaited (timeout, EOF, kernel panic)."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    output: str

    def check(self) -> str:
        if self.rc != 0:
            raise ConsoleError(f"guest command {self.command!r} exited {self.rc}:\n{self.output}")
        return self.output


@dataclass
class PendingCommand:
    command: str
    token: int
    consumed: list[str] = field(default_factory=list)  # output already read by read_until


@dataclass(frozen=True)
class BootInfo:
    seconds: float  # host wall clock from QEMU start to the ready marker
    guest_uptime: float | None
    interfaces: dict[str, dict[str, str]]  # from the VDPA-GUEST-IF lines
    errors: list[str]  # VDPA-GUEST-ERROR lines
    transcript: str


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


class GuestConsole:
    def __init__(self, sock: socket.socket, logfile: Path, timeout: float = 30.0) -> None:
        self._sock = sock
        self._logf: TextIO = logfile.open("w", encoding="utf-8", errors="replace")
        self._child = fdpexpect.fdspawn(
            sock.fileno(), timeout=timeout, encoding="utf-8", codec_errors="replace"
        )
        self._child.logfile_read = self._logf
        self._token = 0
        self.pending: PendingCommand | None = None

    def _tail(self) -> str:
        before = self._child.before if isinstance(self._child.before, str) else ""
        return clean(before)[-1500:]

    def expect(self, patterns: list[str], timeout: float, what: str) -> int:
        """Index of the first pattern seen; ConsoleError names ``what`` on timeout/EOF/panic."""
        try:
            idx = self._child.expect([*patterns, PANIC], timeout=timeout)
        except pexpect.TIMEOUT:
            raise ConsoleError(
                f"console: timed out after {timeout:g}s waiting for {what}; last output:\n"
                f"{self._tail()}"
            ) from None
        except pexpect.EOF:
            raise ConsoleError(
                f"console: closed (QEMU gone?) while waiting for {what}; last output:\n"
                f"{self._tail()}"
            ) from None
        if idx == len(patterns):
            raise ConsoleError(f"guest kernel panic while waiting for {what}: {self.match_text}")
        return idx

    @property
    def match_text(self) -> str:
        m = self._child.match
        return m.group(0) if m is not None and not isinstance(m, type) else ""

    @property
    def before(self) -> str:
        return clean(self._child.before) if isinstance(self._child.before, str) else ""

    # -- boot -----------------------------------------------------------------------------
    def wait_ready(self, timeout: float, started: float) -> BootInfo:
        self.expect([re.escape(guest_images.READY_MARKER)], timeout, "the guest ready marker")
        seconds = time.monotonic() - started
        transcript = self.before
        ifaces: dict[str, dict[str, str]] = {}
        uptime = None
        errors = []
        for line in transcript.splitlines():
            if line.startswith(guest_images.ERROR_MARKER):
                errors.append(line)
            elif line.startswith("VDPA-GUEST-IF "):
                name, *fields = line.split()[1:]
                ifaces[name] = dict(f.split("=", 1) for f in fields if "=" in f)
            elif line.startswith("VDPA-GUEST-CPUS ") and "uptime=" in line:
                uptime = float(line.split("uptime=")[1].split()[0])
        self.expect([re.escape(guest_images.PROMPT)], timeout, "the first shell prompt")
        return BootInfo(seconds, uptime, ifaces, errors, transcript)

    # -- commands -------------------------------------------------------------------------
    def start(self, command: str) -> PendingCommand:
        """Type ``command``; finish it with :meth:`finish` (one command at a time)."""
        if self.pending is not None:
            raise ConsoleError(f"console busy with {self.pending.command!r}")
        self._token += 1
        n = self._token
        self._child.send(f'echo __B""EGIN_{n}__; {{ {command}\n}}; echo __E""ND_{n}_$?__\n')
        self.expect([rf"__BEGIN_{n}__\r?\n"], 30, f"start of guest command {command!r}")
        self.pending = PendingCommand(command, n)
        return self.pending

    def read_until(self, pattern: str, timeout: float, what: str) -> str:
        """While a command runs: wait for ``pattern`` in its output; returns the match."""
        if self.pending is None:
            raise ConsoleError(f"no guest command running while waiting for {what}")
        self.expect([pattern], timeout, what)
        self.pending.consumed.append(self.before + clean(self.match_text))
        return self.match_text

    def finish(self, pending: PendingCommand, timeout: float = 30.0) -> CommandResult:
        if self.pending is not pending:
            raise ConsoleError(f"{pending.command!r} is not the running command")
        self.expect(
            [rf"__END_{pending.token}_(\d+)__"], timeout, f"guest command {pending.command!r}"
        )
        rc = int(self._child.match.group(1))
        output = "".join(pending.consumed) + self.before
        self.pending = None
        self.expect([re.escape(guest_images.PROMPT)], 30, "the shell prompt")
        return CommandResult(pending.command, rc, output.strip("\n"))

    def run(self, command: str, timeout: float = 30.0) -> CommandResult:
        return self.finish(self.start(command), timeout)

    def interrupt(self) -> None:
        """Ctrl-C the running command (the shell has the console as controlling tty)."""
        self._child.send("\x03")

    def close(self) -> None:
        try:
            self._child.close()
        except OSError:
            pass
        try:
            self._sock.close()
        finally:
            self._logf.close()
