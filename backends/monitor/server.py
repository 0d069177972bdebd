"""The backend's QMP-compatible monitor: QEMU's QMP wire protocol on a unix stream socket.

Speaks exactly what ``docs/interop/qmp-spec.rst`` specifies and QEMU's monitor does, so that
``qemu.qmp.QMPClient`` and ``qmp-shell`` connect to it as they connect to QEMU:

* on connect the server sends the greeting ``{"QMP": {"version": ..., "capabilities": []}}``;
* until ``qmp_capabilities`` succeeds every other command fails with ``CommandNotFound``
  ("Expecting capabilities negotiation with 'qmp_capabilities'") and no events are sent;
* input is a stream of JSON objects (no delimiter needed, as QEMU's streaming parser: the
  qemu.qmp library sends none); single-quoted strings and the ``\\'`` escape are accepted;
* a reply is ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` with the request's
  ``id`` echoed; output is ASCII JSON terminated by CRLF;
* a lexical error (an ASCII control character other than tab/CR/LF, or a 0xFE/0xFF byte) is
  reported and resets the parser, skipping to the next structural character or line end;
* events ``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` go to every client
  that finished negotiation.

The commands themselves, and the translation of journal entries into events, live in
:mod:`.commands` (arguments in :mod:`.schema`, events in :mod:`.events`); this module is
only the protocol server, its codec is :mod:`.json_stream`. It runs on the
process's :class:`~backends.loop.EventLoop`: non-blocking sockets, any number of clients.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.loop import EventLoop
from backends.unix_socket import UnixListener

from .commands import MonitorCommands
from .events import journal_event
from .json_stream import JsonParseError, JsonStreamSplitter, encode_message
from .schema import CAPABILITIES_COMMAND, CommandError

if TYPE_CHECKING:
    from backends.net.datapath import NetDevice
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

QEMU_VERSION = {"micro": 0, "minor": 0, "major": 10}
PACKAGE = "vdpa-backend"
MAX_PENDING_OUTPUT = 64 << 20  # bytes queued for a client that stopped reading: then dropped
RECV_SIZE = 65536
FLUSH_RETRY_S = (0.001, 0.05)  # back-off range while a client's socket buffer is full


class _Client:
    """One connected QMP client."""

    __slots__ = ("sock", "fd", "name", "splitter", "out", "negotiated", "closed", "retry")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.splitter = JsonStreamSplitter()
        self.out = bytearray()
        self.negotiated = False
        self.closed = False
        self.retry: int | None = None  # timer handle while waiting to flush


class Monitor:
    """QMP-compatible monitor of one backend process, on a unix stream socket at ``path``.

    ``device`` is the :class:`~backends.vdpa.device.VdpaDevice` (its ``journal`` and
    ``faults`` are reached through it), ``net`` the virtio-net personality (for
    ``inject-packet`` / ``query-wire``), ``server`` the vhost-user server (connection state in
    ``query-status``). ``on_quit`` is called by the ``quit`` command after the reply went out;
    without it ``quit`` stops ``loop``.
    """

    def __init__(
        self,
        path: str,
        loop: EventLoop,
        device: VdpaDevice,
        net: NetDevice | None = None,
        server: object | None = None,
        *,
        on_quit: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.loop = loop
        self.device = device
        self.net = net
        self.server = server
        self.on_quit = on_quit
        self.commands = MonitorCommands(device, net, server, request_quit=self._request_quit)
        self._listener: UnixListener | None = None
        self._journal = getattr(device, "journal", None)
        self._clients: dict[int, _Client] = {}
        self._serial = 0
        self._subscribed = False
        self._closed = False
        self._quit_requested = False

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on ``path`` (a stale socket file there is replaced) and serve on the loop."""
        if self._listener is not None:
            raise RuntimeError("monitor already started")
        self._closed = False
        self._listener = UnixListener(self.path, 16, what="monitor")
        self.loop.add_reader(self._listener.fileno(), self._on_accept)
        if self._journal is not None and not self._subscribed:
            self._journal.subscribe(self._on_journal_entry)
            self._subscribed = True
        log.info("QMP monitor listening on %s", self.path)

    def close(self) -> None:
        """Drop every client (pending output is flushed as far as possible), stop listening."""
        self._closed = True
        if self._subscribed and self._journal is not None:
            unsubscribe = getattr(self._journal, "unsubscribe", None)
            if unsubscribe is not None:
                unsubscribe(self._on_journal_entry)
                self._subscribed = False
        for client in list(self._clients.values()):
            self._try_send(client)
            self._drop(client, "monitor closed")
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()  # unlinks the path if it is still ours
            self._listener = None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- connections -------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: report, keep listening
                log.error("QMP monitor accept failed: %s", exc)
                return
            sock.setblocking(False)
            self._serial += 1
            client = _Client(sock, f"qmp#{self._serial}")
            self._clients[client.fd] = client
            self.loop.add_reader(client.fd, functools.partial(self._on_readable, client))
            log.debug("%s connected", client.name)
            self._send(client, self._greeting())

    def _greeting(self) -> dict[str, Any]:
        return {
            "QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE}, "capabilities": []}
        }

    def _on_readable(self, client: _Client) -> None:
        if client.closed:
            return
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"receive failed: {exc}")
            return
        if not data:
            self._drop(client, "disconnected")
            return
        for item in client.splitter.feed(data):
            if client.closed or self._closed:
                return  # a command (quit) may have closed the monitor meanwhile
            self._handle(client, item)

    def _drop(self, client: _Client, why: str) -> None:
        if client.closed:
            return
        client.closed = True
        if client.retry is not None:
            self.loop.cancel(client.retry)
            client.retry = None
        self.loop.remove_reader(client.fd)
        self._clients.pop(client.fd, None)
        try:
            client.sock.close()
        except OSError:
            pass
        log.debug("%s dropped: %s", client.name, why)

    # -- requests ----------------------------------------------------------------------------
    def _handle(self, client: _Client, request: object) -> None:
        reply: dict[str, Any]
        if isinstance(request, JsonParseError):
            self._send(client, _error_reply(CommandError(str(request)), None, False))
            return
        has_id = isinstance(request, dict) and "id" in request
        req_id = request.get("id") if isinstance(request, dict) else None
        try:
            name, arguments = _check_request(request)
            if name == CAPABILITIES_COMMAND:
                reply = {"return": self._qmp_capabilities(client, arguments)}
            elif not client.negotiated:
                raise CommandError(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                    "CommandNotFound",
                )
            else:
                reply = {"return": self.commands.execute(name, arguments)}
        except CommandError as exc:
            reply = _error_reply(exc, req_id, has_id)
        else:
            if has_id:
                reply = {"id": req_id, **reply}
        self._send(client, reply)

    def _qmp_capabilities(self, client: _Client, arguments: dict[str, Any]) -> dict[str, Any]:
        if client.negotiated:
            raise CommandError(
                "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
            )
        self.commands.check_arguments(CAPABILITIES_COMMAND, arguments)
        for i, cap in enumerate(arguments.get("enable", [])):
            if cap == "oob":  # a QMP capability, but not offered in the greeting
                raise CommandError("Capability oob not available")
            raise CommandError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        client.negotiated = True
        return {}

    # -- output ------------------------------------------------------------------------------
    def _send(self, client: _Client, msg: dict[str, Any]) -> None:
        try:
            data = encode_message(msg)
        except (TypeError, ValueError) as exc:  # cannot happen with _json_default; be safe
            log.exception("QMP monitor could not encode a reply")
            data = encode_message(
                {"error": {"class": "GenericError", "desc": f"internal error: {exc}"}}
            )
        if client.closed:
            return
        client.out += data
        if len(client.out) > MAX_PENDING_OUTPUT:
            self._drop(client, f"not reading its output ({len(client.out)} bytes pending)")
            return
        if client.retry is None:
            self._try_send(client)
            if client.out and not client.closed:
                self._schedule_flush(client, FLUSH_RETRY_S[0])

    def _try_send(self, client: _Client) -> None:
        while client.out and not client.closed:
            try:
                sent = client.sock.send(client.out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(client, f"send failed: {exc}")
                return
            del client.out[:sent]

    def _schedule_flush(self, client: _Client, delay: float) -> None:
        # The loop only watches readability, so a full socket buffer is retried on a timer.
        def retry() -> None:
            client.retry = None
            if client.closed:
                return
            self._try_send(client)
            if client.out and not client.closed:
                self._schedule_flush(client, min(delay * 2, FLUSH_RETRY_S[1]))

        client.retry = self.loop.call_later(delay, retry)

    # -- events ------------------------------------------------------------------------------
    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every client that finished capabilities negotiation."""
        if self._closed:
            return
        now = time.time_ns()
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {
            "seconds": now // 1_000_000_000,
            "microseconds": now % 1_000_000_000 // 1000,
        }
        for client in list(self._clients.values()):
            if client.negotiated:
                self._send(client, msg)

    def _on_journal_entry(self, entry: dict[str, Any]) -> None:
        if self._closed or not self._clients:
            return
        try:
            event = journal_event(entry)
        except Exception:  # a journal subscriber must never break the recording code
            log.exception("QMP monitor: cannot turn journal entry %r into an event", entry)
            return
        if event is not None:
            self.emit_event(*event)

    # -- quit --------------------------------------------------------------------------------
    def _request_quit(self) -> None:
        if self._quit_requested:
            return
        self._quit_requested = True
        self.loop.call_soon(self._quit)

    def _quit(self) -> None:
        self.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        for client in list(self._clients.values()):
            self._try_send(client)
        log.info("QMP monitor: quit requested")
        if self.on_quit is not None:
            self.on_quit()
        else:
            self.loop.stop()


def _check_request(request: object) -> tuple[str, dict[str, Any]]:
    """Validate the request envelope as QEMU's qmp_dispatch_check_obj does."""
    if not isinstance(request, dict):
        raise CommandError("QMP input must be a JSON object")
    name: str | None = None
    arguments: dict[str, Any] = {}
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise CommandError("QMP input member 'execute' must be a string")
            name = value
        elif key == "arguments":
            if not isinstance(value, dict):
                raise CommandError("QMP input member 'arguments' must be an object")
            arguments = value
        elif key != "id":
            raise CommandError(f"QMP input member '{key}' is unexpected")
    if name is None:
        raise CommandError("QMP input lacks member 'execute'")
    return name, arguments


def _error_reply(exc: CommandError, req_id: object, has_id: bool) -> dict[str, Any]:
    reply: dict[str, Any] = {"id": req_id} if has_id else {}  # QEMU writes "id" first
    reply["error"] = {"class": exc.error_class, "desc": exc.desc}
    return reply
