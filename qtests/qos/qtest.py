"""Client for QEMU's qtest protocol (system/qtest.c) over a unix stream socket.

With ``-qtest unix:PATH`` QEMU is the *client*: it connects to a socket we listen on (exactly
like libqtest).  `QTest.accept` waits for that connection; `QemuMachine` does this for you.

The protocol is line based: one request, one ``OK [VALUE]`` / ``FAIL ...`` / ``ERR ...``
response.  Between them QEMU may send asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines
(after ``irq_intercept_in/out``); they are recorded in `irq_levels` / `irq_events` and skipped.

Several requests may be written before their responses are read (`write_many`); QEMU answers
them in order, which is the fast path for bulk ring updates.
"""

from __future__ import annotations

import base64
import collections
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0
#: Largest chunk moved by one b64read/b64write command.
MAX_CHUNK = 1 << 20
_RECV_SIZE = 1 << 16
_IRQ_HISTORY = 4096


class QTestError(Exception):
    """A qtest command failed (``FAIL``/``ERR`` reply, bad reply, lost connection)."""

    def __init__(self, command: str, message: str, reply: str | None = None) -> None:
        self.command = command
        self.reply = reply
        super().__init__(f"qtest command {_short(command)!r}: {message}")


class QTestTimeout(QTestError):
    """No complete response arrived within the timeout."""


class QTestClosed(QTestError):
    """QEMU closed the qtest socket (usually: QEMU exited or crashed)."""


@dataclass(frozen=True, slots=True)
class IrqEvent:
    """One asynchronous ``IRQ raise|lower N`` line, with its arrival time (monotonic)."""

    num: int
    level: bool
    when: float


def _short(command: str, limit: int = 96) -> str:
    return command if len(command) <= limit else command[:limit] + "..."


class QTest:
    """A connected qtest session.  Not thread-safe by design, but calls are serialised."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._rx = bytearray()
        self._scan = 0  # bytes of _rx already known to hold no newline
        self._lock = threading.Lock()
        #: Default timeout (seconds) of every command.
        self.timeout = timeout
        #: Current level of every IRQ line QEMU reported (irq number -> raised).
        self.irq_levels: dict[int, bool] = {}
        #: Recent IRQ line changes, oldest first (bounded).
        self.irq_events: collections.deque[IrqEvent] = collections.deque(maxlen=_IRQ_HISTORY)
        self.commands_sent = 0
        self._closed = False

    # ------------------------------------------------------------------ set-up / tear-down
    @classmethod
    def accept(
        cls,
        listener: socket.socket,
        timeout: float,
        *,
        alive: Callable[[], bool] | None = None,
        qtest_timeout: float = DEFAULT_TIMEOUT,
    ) -> QTest:
        """Accept QEMU's connection on ``listener``; give up early if ``alive()`` turns false."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QTestTimeout("<connect>", f"QEMU did not connect within {timeout:.3g}s")
            ready, _, _ = select.select([listener], [], [], min(remaining, 0.05))
            if ready:
                conn, _ = listener.accept()
                return cls(conn, timeout=qtest_timeout)
            if alive is not None and not alive():
                raise QTestClosed("<connect>", "QEMU exited before connecting to the qtest socket")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def __enter__(self) -> QTest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _send(self, data: bytes, command: str) -> None:
        if self._closed:
            raise QTestClosed(command, "qtest session is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise QTestClosed(command, f"send failed: {e}") from e
        self.commands_sent += 1

    def _read_line(self, deadline: float, command: str) -> str:
        while True:
            nl = self._rx.find(b"\n", self._scan)
            if nl >= 0:
                line = bytes(self._rx[:nl])
                del self._rx[: nl + 1]
                self._scan = 0
                return line.decode("ascii", "replace").rstrip("\r")
            self._scan = len(self._rx)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QTestTimeout(command, "timed out waiting for the reply")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except TimeoutError as e:
                raise QTestTimeout(command, "timed out waiting for the reply") from e
            except OSError as e:
                raise QTestClosed(command, f"receive failed: {e}") from e
            finally:
                if not self._closed:
                    self._sock.settimeout(None)
            if not chunk:
                self.close()
                raise QTestClosed(command, "QEMU closed the qtest socket")
            self._rx += chunk

    def _note_irq(self, line: str, command: str) -> None:
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("raise", "lower"):
            raise QTestError(command, f"malformed asynchronous line {line!r}", line)
        try:
            num = int(parts[2], 0)
        except ValueError as e:
            raise QTestError(command, f"malformed IRQ number in {line!r}", line) from e
        level = parts[1] == "raise"
        self.irq_levels[num] = level
        self.irq_events.append(IrqEvent(num, level, time.monotonic()))

    def _response(self, command: str, deadline: float) -> list[str]:
        while True:
            line = self._read_line(deadline, command)
            if line.startswith("IRQ "):
                self._note_irq(line, command)
                continue
            words = line.split(" ")
            if words[0] == "OK":
                return words
            if words[0] in ("FAIL", "ERR"):
                raise QTestError(command, f"QEMU replied {line!r}", line)
            raise QTestError(command, f"unexpected reply {_short(line)!r}", line)

    def command(self, command: str, *, timeout: float | None = None) -> list[str]:
        """Send one raw command line (without newline); return the words of the OK reply."""
        with self._lock:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            self._send(command.encode("ascii") + b"\n", command)
            return self._response(command, deadline)

    def pipeline(self, commands: list[str], *, timeout: float | None = None) -> list[list[str]]:
        """Send all ``commands`` at once, then read their replies in order.

        Every reply is read even when one fails, so the stream stays in step; the first
        failure is raised afterwards.
        """
        if not commands:
            return []
        with self._lock:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            self._send("".join(c + "\n" for c in commands).encode("ascii"), commands[0])
            self.commands_sent += len(commands) - 1
            replies: list[list[str]] = []
            first_error: QTestError | None = None
            for cmd in commands:
                try:
                    replies.append(self._response(cmd, deadline))
                except (QTestTimeout, QTestClosed):
                    raise
                except QTestError as e:
                    first_error = first_error or e
                    replies.append([])
            if first_error is not None:
                raise first_error
            return replies

    @staticmethod
    def _value(words: list[str], command: str) -> int:
        if len(words) < 2:
            raise QTestError(command, f"reply {' '.join(words)!r} carries no value")
        try:
            return int(words[1], 0)
        except ValueError as e:
            raise QTestError(command, f"reply value {words[1]!r} is not a number") from e

    # ------------------------------------------------------------------ port I/O
    def _in(self, op: str, port: int) -> int:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"I/O port 0x{port:x} out of range")
        cmd = f"{op} 0x{port:x}"
        return self._value(self.command(cmd), cmd)

    def _out(self, op: str, port: int, value: int, bits: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"I/O port 0x{port:x} out of range")
        self.command(f"{op} 0x{port:x} 0x{value & ((1 << bits) - 1):x}")

    def inb(self, port: int) -> int:
        return self._in("inb", port) & 0xFF

    def inw(self, port: int) -> int:
        return self._in("inw", port) & 0xFFFF

    def inl(self, port: int) -> int:
        return self._in("inl", port) & 0xFFFFFFFF

    def outb(self, port: int, value: int) -> None:
        self._out("outb", port, value, 8)

    def outw(self, port: int, value: int) -> None:
        self._out("outw", port, value, 16)

    def outl(self, port: int, value: int) -> None:
        self._out("outl", port, value, 32)

    # ------------------------------------------------------------------ sized memory access
    def _read(self, op: str, addr: int, bits: int) -> int:
        cmd = f"{op} 0x{addr:x}"
        return self._value(self.command(cmd), cmd) & ((1 << bits) - 1)

    def _write(self, op: str, addr: int, value: int, bits: int) -> None:
        self.command(f"{op} 0x{addr:x} 0x{value & ((1 << bits) - 1):x}")

    def readb(self, addr: int) -> int:
        return self._read("readb", addr, 8)

    def readw(self, addr: int) -> int:
        return self._read("readw", addr, 16)

    def readl(self, addr: int) -> int:
        return self._read("readl", addr, 32)

    def readq(self, addr: int) -> int:
        return self._read("readq", addr, 64)

    def writeb(self, addr: int, value: int) -> None:
        self._write("writeb", addr, value, 8)

    def writew(self, addr: int, value: int) -> None:
        self._write("writew", addr, value, 16)

    def writel(self, addr: int, value: int) -> None:
        self._write("writel", addr, value, 32)

    def writeq(self, addr: int, value: int) -> None:
        self._write("writeq", addr, value, 64)

    # ------------------------------------------------------------------ bulk memory access
    def memread(self, addr: int, size: int) -> bytes:
        """``read ADDR SIZE`` (hex encoded).  Size 0 returns b'' without asking QEMU."""
        if size <= 0:
            return b""
        cmd = f"read 0x{addr:x} 0x{size:x}"
        words = self.command(cmd)
        if len(words) < 2 or not words[1].startswith("0x"):
            raise QTestError(cmd, f"reply {_short(' '.join(words))!r} carries no data")
        data = bytes.fromhex(words[1][2:])
        if len(data) != size:
            raise QTestError(cmd, f"asked for {size} bytes, got {len(data)}")
        return data

    def memwrite(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """``write ADDR SIZE 0xHEX``.  Empty data is a no-op."""
        if len(data) == 0:
            return
        self.command(f"write 0x{addr:x} 0x{len(data):x} 0x{bytes(data).hex()}")

    def memset(self, addr: int, size: int, value: int = 0) -> None:
        self.command(f"memset 0x{addr:x} 0x{size:x} 0x{value & 0xFF:02x}")

    def b64read(self, addr: int, size: int) -> bytes:
        """``b64read ADDR SIZE``, in chunks of at most `MAX_CHUNK` bytes."""
        if size <= 0:
            return b""
        return self.read_many([(addr, size)])[0]

    def read_many(self, items: Iterable[tuple[int, int]]) -> list[bytes]:
        """Read several (address, size) pieces with one pipelined round trip."""
        spans = list(items)
        cmds: list[str] = []
        counts: list[int] = []
        for addr, size in spans:
            pieces = [
                f"b64read 0x{addr + off:x} 0x{min(MAX_CHUNK, size - off):x}"
                for off in range(0, max(size, 0), MAX_CHUNK)
            ]
            cmds += pieces
            counts.append(len(pieces))
        replies = iter(zip(cmds, self.pipeline(cmds), strict=True))
        out: list[bytes] = []
        for (_, size), count in zip(spans, counts, strict=True):
            data = bytearray()
            for _ in range(count):
                cmd, words = next(replies)
                if len(words) < 2:
                    raise QTestError(cmd, "reply carries no data")
                data += base64.b64decode(words[1])
            if len(data) != max(size, 0):
                raise QTestError(cmds[0], f"asked for {size} bytes, got {len(data)}")
            out.append(bytes(data))
        return out

    def b64write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """``b64write ADDR SIZE B64``, in chunks of at most `MAX_CHUNK` bytes."""
        self.write_many([(addr, data)])

    def write_many(self, items: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write several (address, data) pieces with one pipelined round trip."""
        cmds = []
        for addr, data in items:
            view = memoryview(data)
            for off in range(0, len(view), MAX_CHUNK):
                piece = view[off : off + MAX_CHUNK]
                enc = base64.b64encode(piece).decode("ascii")
                cmds.append(f"b64write 0x{addr + off:x} 0x{len(piece):x} {enc}")
        self.pipeline(cmds)

    #: Convenience names used by the rest of the library (bulk, base64 encoded).
    read = b64read
    write = b64write

    # ------------------------------------------------------------------ IRQs and misc
    def irq_intercept_in(self, qom_path: str) -> None:
        """Intercept the gpio-in lines of ``qom_path`` (e.g. ``ioapic``).  One device only."""
        self.command(f"irq_intercept_in {qom_path}")

    def irq_intercept_out(self, qom_path: str, name: str | None = None) -> None:
        self.command(f"irq_intercept_out {qom_path}" + (f" {name}" if name else ""))

    def set_irq_in(self, qom_path: str, num: int, level: int, name: str | None = None) -> None:
        self.command(f"set_irq_in {qom_path} {name or 'unnamed-gpio-in'} {num} {level}")

    def endianness(self) -> str:
        words = self.command("endianness")
        return words[1] if len(words) > 1 else ""

    def sync(self) -> None:
        """Round trip with no side effect: collects any IRQ lines QEMU has already sent."""
        self.command("endianness")

    def get_irq(self, num: int) -> bool:
        """Current level of intercepted IRQ ``num`` (after a sync round trip)."""
        self.sync()
        return self.irq_levels.get(num, False)

    def wait_irq(self, num: int, level: bool = True, timeout: float | None = None) -> None:
        """Block on the socket until IRQ ``num`` reaches ``level``."""
        what = f"IRQ {num} {'raise' if level else 'lower'}"
        with self._lock:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while self.irq_levels.get(num, False) != level:
                try:
                    line = self._read_line(deadline, what)
                except QTestTimeout as e:
                    raise QTestTimeout(what, "timed out waiting for the IRQ line") from e
                if not line.startswith("IRQ "):
                    raise QTestError(what, f"unexpected line {_short(line)!r} while idle", line)
                self._note_irq(line, what)
