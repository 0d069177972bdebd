"""The guest's serial console, shared: one thread relays it to every party that wants it.

QEMU's serial chardev connects to one socket. The relay owns that connection and always reads
it (a guest never stalls on a full console), logs everything to the console log, and passes it
on to:

* users who connect to the relay's own unix socket (``socat -,raw,echo=0,escape=0x1d
  UNIX-CONNECT:PATH`` in another terminal) and to the shell's ``console`` command;
* the command end, a socketpair whose other end is a pexpect `GuestConsole` (marker-framed
  guest commands): fed only while a command runs (:meth:`feeding`), so idle output does not pile
  up there.

Input from any party goes to the guest. After a migration :meth:`replace_guest` swaps the QEMU
connection for the destination's; users stay connected.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_log = logging.getLogger(__name__)

#: How much recent console output is kept for someone who attaches later.
HISTORY_BYTES = 8192
#: Socket buffers of the command end (a command's whole output must fit while it runs).
COMMAND_BUFFER = 4 << 20
GUEST_SEND_TIMEOUT = 5.0


class ConsoleRelay:
    def __init__(self, user_path: Path, log_path: Path) -> None:
        self.user_path = Path(user_path)
        self._log = log_path.open("ab")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.user_path))
        self._listener.listen(4)
        self._listener.setblocking(False)
        self.command_end, self._cmd = socket.socketpair()
        for s in (self.command_end, self._cmd):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, COMMAND_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, COMMAND_BUFFER)
        self._cmd.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self._requests: queue.Queue[Callable[[], None]] = queue.Queue()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept_user)
        self._sel.register(self._cmd, selectors.EVENT_READ, self._from_command_end)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._run_requests)
        self._guest: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._feeding = threading.Event()
        self._history: collections.deque[bytes] = collections.deque()
        self._history_len = 0
        self._lock = threading.Lock()  # history
        self._stop = False
        #: Bytes a slow user did not take (their terminal lags behind, the guest does not wait).
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="console-relay", daemon=True)
        self._thread.start()

    # -- control (any thread) --------------------------------------------------------------
    def _request(self, fn: Callable[[], None]) -> None:
        self._requests.put(fn)
        os.write(self._wake_w, b"x")

    def replace_guest(self, sock: socket.socket) -> None:
        """Relay ``sock`` (QEMU's console connection) from now on; closes the previous one."""

        def swap() -> None:
            if self._guest is not None:
                self._sel.unregister(self._guest)
                self._guest.close()
            sock.settimeout(GUEST_SEND_TIMEOUT)
            self._guest = sock
            self._sel.register(sock, selectors.EVENT_READ, self._from_guest)

        self._request(swap)

    def connect_local(self) -> socket.socket:
        """A new party (the shell's ``console`` command): a socket that sees the guest's output
        from now on and whose input goes to the guest. Close it to leave."""
        mine, theirs = socket.socketpair()
        theirs.setblocking(False)
        self._request(lambda: self._add_client(theirs))
        return mine

    @contextlib.contextmanager
    def feeding(self) -> Iterator[None]:
        """Pass guest output to the command end while the block runs (a guest command)."""
        self._feeding.set()
        try:
            yield
        finally:
            self._feeding.clear()

    def history(self) -> bytes:
        with self._lock:
            return b"".join(self._history)

    def close(self) -> None:
        """Stop the thread, close every socket (the guest's too) and the log. Idempotent."""
        if self._stop:
            return

        def stop() -> None:
            self._stop = True

        self._request(stop)
        self._thread.join(timeout=5)
        for s in [*self._clients, self._guest, self._listener, self._cmd, self.command_end]:
            if s is not None:
                s.close()
        self._clients.clear()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            self.user_path.unlink()

    # -- the relay thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                for key, _ in self._sel.select():
                    key.data(key.fileobj)
                    if self._stop:
                        break
        except Exception:  # a relay bug must be visible, not a silently dead console
            _log.exception("console relay stopped")

    def _run_requests(self, _fd: object) -> None:
        os.read(self._wake_r, 4096)
        while True:
            try:
                fn = self._requests.get_nowait()
            except queue.Empty:
                return
            fn()

    def _add_client(self, sock: socket.socket) -> None:
        self._clients.add(sock)
        self._sel.register(sock, selectors.EVENT_READ, self._from_user)

    def _drop_client(self, sock: socket.socket) -> None:
        self._clients.discard(sock)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()

    def _accept_user(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._add_client(conn)

    def _from_guest(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            _log.info("guest console: %s", exc)
            data = b""
        if not data:  # QEMU went away (quit, or migrated and stopped)
            self._sel.unregister(sock)
            sock.close()
            if self._guest is sock:
                self._guest = None
            return
        self._log.write(data)
        self._log.flush()
        with self._lock:
            self._history.append(data)
            self._history_len += len(data)
            while self._history_len > HISTORY_BYTES and len(self._history) > 1:
                self._history_len -= len(self._history.popleft())
        for client in list(self._clients):
            try:
                client.send(data)
            except BlockingIOError:
                self.dropped += len(data)
            except OSError:
                self._drop_client(client)
        if self._feeding.is_set():
            try:
                self._cmd.send(data)
            except BlockingIOError:
                self.dropped += len(data)

    def _to_guest(self, data: bytes) -> None:
        if self._guest is None:
            return
        try:
            self._guest.sendall(data)
        except OSError as exc:
            _log.info("guest console input lost: %s", exc)

    def _from_user(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop_client(sock)
            return
        self._to_guest(data)

    def _from_command_end(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        if not data:  # the GuestConsole closed its end
            self._sel.unregister(sock)
            return
        self._to_guest(data)
