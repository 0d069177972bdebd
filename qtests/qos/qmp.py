"""Synchronous facade over qemu.qmp's asyncio `QMPClient`.

The asyncio client runs in a private event-loop thread, so QMP events are collected
continuously (QEMU never blocks on an unread monitor) while tests stay synchronous:
``qmp.command("query-status")``, ``qmp.wait_event("DEVICE_DELETED", timeout=5)``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

DEFAULT_TIMEOUT = 10.0
_HISTORY = 10000

EventMatch = Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None


class QmpError(Exception):
    """A QMP command failed, the connection broke, or something timed out."""

    def __init__(self, command: str, message: str, error_class: str | None = None) -> None:
        self.command = command
        self.error_class = error_class
        super().__init__(f"QMP {command}: {message}")


class QmpTimeout(QmpError):
    pass


def _matches(event: dict[str, Any], name: str | None, match: EventMatch) -> bool:
    if name is not None and event.get("event") != name:
        return False
    if match is None:
        return True
    if callable(match):
        return bool(match(event))
    data = event.get("data", {})
    return all(data.get(k) == v for k, v in match.items())


class QmpClient:
    """One QMP connection with a blocking API.  Events are kept until consumed."""

    def __init__(self, name: str = "qos", *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self._listening: QMPClient | None = None  # listen() until accept()
        self._pump: concurrent.futures.Future[None] | None = None
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        #: Every event received, oldest first (bounded), consumed or not.
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=_HISTORY)
        self._closed = False
        # qemu.qmp logs disconnects of a dying QEMU at ERROR level; they are expected here.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

    # ------------------------------------------------------------------ plumbing
    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float, what: str) -> Any:
        if self._closed:
            coro.close()
            raise QmpError(what, "QMP client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise QmpTimeout(what, f"no answer within {timeout:.3g}s") from e

    async def _connect(self, path: str, deadline: float, alive: Callable[[], bool] | None) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise QmpError("connect", f"the server exited before {path} accepted ({last})")
            client = QMPClient(self.name)
            try:
                await client.connect(path)
            except Exception as e:  # socket not there yet, refused, greeting failed
                last = e
                await asyncio.sleep(0.005)  # QEMU creates its socket within milliseconds
                continue
            self._client = client
            return
        raise QmpError("connect", f"could not connect to {path}: {last}")

    async def _pump_events(self) -> None:
        assert self._client is not None
        listener = self._client.events
        while True:
            event = await listener.get()
            item = dict(event)
            with self._cond:
                self._pending.append(item)
                self.history.append(item)
                self._cond.notify_all()

    # ------------------------------------------------------------------ public API
    def connect(
        self, path: str, timeout: float | None = None, *, alive: Callable[[], bool] | None = None
    ) -> None:
        """Connect to a QMP server socket (QEMU ``server=on``), retrying until ``timeout``.

        ``alive`` (optional) is checked between attempts: give up when it returns False.
        """
        t = self.timeout if timeout is None else timeout
        self._run(self._connect(path, time.monotonic() + t, alive), t + 1.0, "connect")
        self._pump = asyncio.run_coroutine_threadsafe(self._pump_events(), self._loop)

    def listen(self, path: str) -> None:
        """Listen on ``path`` for a QMP server that connects to us (QEMU ``-chardev socket``
        without ``server=on``): nothing polls for a socket, and no early event is lost.
        Finish with :meth:`accept` once the server has been started."""
        client = QMPClient(self.name)
        self._run(client.start_server(path), self.timeout, f"listen on {path}")
        self._listening = client

    def accept(self, timeout: float | None = None) -> None:
        """Wait for the server to connect to the socket of :meth:`listen` (greeting and
        capabilities negotiated)."""
        client = self._listening
        if client is None:
            raise QmpError("accept", "listen() first")
        t = self.timeout if timeout is None else timeout
        try:
            self._run(client.accept(), t, "accept")
        except QmpError:
            raise
        except Exception as e:  # connection or negotiation failed
            raise QmpError("accept", f"{type(e).__name__}: {e}") from e
        self._client, self._listening = client, None
        self._pump = asyncio.run_coroutine_threadsafe(self._pump_events(), self._loop)

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._closed

    def command(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Execute ``name`` with ``args`` (and/or keyword arguments); return its ``return``."""
        if self._client is None:
            raise QmpError(name, "not connected")
        arguments = dict(args or {})
        arguments.update(kwargs)
        client = self._client

        async def go() -> Any:
            return await client.execute(name, arguments or None)

        try:
            return self._run(go(), self.timeout if timeout is None else timeout, name)
        except ExecuteError as e:
            raise QmpError(name, f"{e.error_class}: {e}", e.error_class) from e
        except QmpError:
            raise
        except Exception as e:  # connection lost, protocol errors
            raise QmpError(name, f"{type(e).__name__}: {e}") from e

    cmd = command

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human monitor command and return its text output."""
        out = self.command("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        return str(out)

    def wait_event(
        self, name: str | None, timeout: float | None = None, match: EventMatch = None
    ) -> dict[str, Any]:
        """Return (and consume) the oldest pending event called ``name`` that matches.

        ``match`` is either a dict compared against the event's ``data`` or a predicate.
        Events that arrived before the call count.  Raises `QmpTimeout` naming the event.
        """
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        with self._cond:
            while True:
                for i, ev in enumerate(self._pending):
                    if _matches(ev, name, match):
                        del self._pending[i]
                        return ev
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = sorted({e.get("event", "?") for e in self._pending})
                    raise QmpTimeout(
                        f"event {name or '*'}",
                        f"not received within {t:.3g}s (match={match!r}; pending: {seen})",
                    )
                self._cond.wait(remaining)

    def get_events(self, name: str | None = None, *, clear: bool = True) -> list[dict[str, Any]]:
        """Pending events (optionally only ``name``), removing them unless ``clear=False``."""
        with self._cond:
            found = [e for e in self._pending if _matches(e, name, None)]
            if clear:
                self._pending = [e for e in self._pending if not _matches(e, name, None)]
            return found

    def clear_events(self) -> None:
        with self._cond:
            self._pending.clear()

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect and stop the event-loop thread.  Idempotent, never raises."""
        if self._closed:
            return
        if self._pump is not None:
            self._pump.cancel()
        for client in (self._client, self._listening):
            if client is not None:
                with contextlib.suppress(Exception):
                    self._run(client.disconnect(), timeout, "disconnect")
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
