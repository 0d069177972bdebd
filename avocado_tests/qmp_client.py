"""Synchronous QMP over a unix socket, on qemu.qmp's QMPClient: for QEMU and the backend monitor.

Both speak the same protocol (greeting, qmp_capabilities, execute/return/error, events). Each
connection owns a private asyncio loop, so it works from whichever thread avocado runs
setUp / test / tearDown in, and every await is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

_log = logging.getLogger(__name__)
T = TypeVar("T")


class QmpCommandError(AssertionError):
    """A command failed (an error reply, a timeout or a broken connection)."""


class QmpConnection:
    def __init__(self, name: str, timeout: float = 10.0) -> None:
        self.name = name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient(name)
        self.greeting: dict[str, Any] | None = None

    def _run(self, what: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        limit = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(aw, limit))
        except ExecuteError as exc:
            raise QmpCommandError(f"{self.name}: {what} failed: {exc}") from exc
        except TimeoutError as exc:
            raise QmpCommandError(f"{self.name}: timed out after {limit:g}s on {what}") from exc
        except (QMPError, OSError) as exc:
            raise QmpCommandError(f"{self.name}: {what}: {exc!r}") from exc

    def _greeted(self) -> None:
        g = self._qmp.greeting
        self.greeting = dict(g._asdict()) if g is not None else None

    @classmethod
    def connect(cls, path: Path, name: str, timeout: float = 10.0) -> QmpConnection:
        """Connect to a listening monitor (e.g. the backend's) and negotiate capabilities."""
        conn = cls(name, timeout)
        try:
            conn._run(f"connect to {path}", conn._qmp.connect(str(path)))
        except QmpCommandError:
            conn.close()
            raise
        conn._greeted()
        return conn

    @classmethod
    def listen(cls, path: Path, name: str, timeout: float = 10.0) -> QmpConnection:
        """Listen on ``path``; :meth:`accept` after starting the client (QEMU ``-qmp unix:``)."""
        conn = cls(name, timeout)
        conn._run(f"listen on {path}", conn._qmp.start_server(str(path)))
        return conn

    def accept(self, timeout: float) -> None:
        self._run("QMP connection + greeting", self._qmp.accept(), timeout)
        self._greeted()

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Execute ``command``; its 'return' value, or QmpCommandError naming the command."""
        what = f"{command} {args}" if args else command
        return self._run(what, self._qmp.execute(command, args or None), timeout)

    def events(self) -> list[dict[str, Any]]:
        """Events received so far (and forget them)."""
        self._loop.run_until_complete(asyncio.sleep(0))
        return [dict(e) for e in self._qmp.events.clear()]

    def close(self) -> None:
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._qmp.disconnect(), 5))
        except Exception as exc:  # closing a dead connection must not mask the real error
            _log.debug("%s: QMP disconnect: %r", self.name, exc)
        finally:
            self._loop.close()
