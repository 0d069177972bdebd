"""The backend's QMP monitor, driven by the same clients that drive QEMU.

The monitor runs on a real EventLoop in a background thread (test-only: the backend itself is
single-threaded) with a real VdpaDevice + NetDevice over bytearray guest memory. Clients:
qemu.qmp's QMPClient (asyncio), raw sockets (framing and malformed input), and qmp-shell
run as a subprocess with commands on stdin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from backends.loop import EventLoop
from backends.monitor import EVENTS, JsonParseError, JsonStreamSplitter, Monitor, journal_event
from backends.monitor import json_stream as monitor_mod
from backends.net.datapath import NetDevice
from backends.net.wire import LoopbackWire
from backends.vdpa.device import VdpaDevice
from backends.vdpa.faults import FAULTS, Faults
from backends.vdpa.iotlb import Perm
from backends.vdpa.journal import Journal
from backends.vdpa.memory import HostRegion
from backends.vhost_user import messages as vu
from backends.vhost_user.server import VhostUserServer
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, Status, bit
from qtests.qos.vhost_user_frontend import Frontend
from qtests.qos.waiting import poll_until

from .conftest import DriverRing

T = TypeVar("T")
TIMEOUT = 5.0
VENV_BIN = os.path.dirname(sys.executable)

EXPECTED_COMMANDS = {
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-features",
    "query-mem-table",
    "query-iotlb",
    "query-vrings",
    "query-journal",
    "journal-mark",
    "query-faults",
    "set-fault",
    "clear-fault",
    "inject-packet",
    "query-wire",
    "hold-tx",
    "hold-rx",
    "iotlb-request",
    "suspend",
    "resume",
    "quit",
}

# guest memory of the in-process driver: one bytearray region, identity IOTLB by GPA
RAM_GPA = 0x0
RAM_SIZE = 0x100000
RAM_UADDR = 0x7F0000000000
QSIZE = 8
RING_BASE = 0x1000
RING_STRIDE = 0x1000
BUF_SIZE = 2048
NET_HDR = 12


# -- the loop thread -----------------------------------------------------------------------------
class LoopThread:
    """Runs an EventLoop in a thread and runs callables on it (woken through a pipe)."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        loop.add_reader(self._rfd, self._run_jobs)
        self.thread = threading.Thread(target=loop.run_forever, name="backend-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run_jobs(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._rfd, 4096)
        while True:
            try:
                fn, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T], what: str = "a call on the loop thread") -> T:
        if not self.thread.is_alive():
            raise RuntimeError(f"backend loop thread is not running ({what})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        os.write(self._wfd, b"x")
        try:
            return fut.result(TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"timed out after {TIMEOUT}s waiting for {what}") from None

    def wait_stopped(self, what: str) -> None:
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise TimeoutError(f"timed out after {TIMEOUT}s waiting for {what}")

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.call(self.loop.stop, "the loop to stop")
            self.thread.join(TIMEOUT)
        self.loop.remove_reader(self._rfd)
        os.close(self._rfd)
        os.close(self._wfd)


# -- the backend under test -----------------------------------------------------------------
@dataclass
class Backend:
    lt: LoopThread
    device: VdpaDevice
    net: NetDevice
    wire: LoopbackWire
    monitor: Monitor
    path: str
    region: HostRegion
    rings: list[DriverRing]
    quits: list[str] = field(default_factory=list)

    @property
    def journal(self) -> Journal:
        return self.device.journal

    def on_loop(self, fn: Callable[[], T], what: str = "a device operation") -> T:
        return self.lt.call(fn, what)

    def add_memory(self) -> None:
        def go() -> None:
            self.device.add_host_region(self.region)
            self.device.dma_map(RAM_GPA, RAM_SIZE, RAM_UADDR, Perm.RW)

        self.on_loop(go, "adding guest memory")

    def driver_ok(self, features: int = bit(VIRTIO_F_VERSION_1)) -> None:
        """Negotiate ``features``, lay out RX 0 / TX 1, DRIVER_OK (the vDPA bus-op order)."""
        dev = self.device
        s = Status

        def go() -> None:
            dev.set_status(s.ACKNOWLEDGE | s.DRIVER)
            dev.set_driver_features(features & dev.get_device_features())
            dev.set_status(s.ACKNOWLEDGE | s.DRIVER | s.FEATURES_OK)
            for i, r in enumerate(self.rings):
                dev.set_vq_num(i, r.num)
                dev.set_vq_address(i, r.desc_iova, r.avail_iova, r.used_iova)
                dev.set_vq_ready(i, True)
            dev.set_status(s.ACKNOWLEDGE | s.DRIVER | s.FEATURES_OK | s.DRIVER_OK)

        self.on_loop(go, "driver bring-up")

    def post_rx_buffers(self, n: int) -> list[int]:
        """Post ``n`` device-writable buffers on RX queue 0 and kick it; their GPAs."""
        rx = self.rings[0]

        def go() -> list[int]:
            gpas = [rx.add_chain(inp=[BUF_SIZE])[1][0] for _ in range(n)]
            self.device.kick_vq(0)
            return gpas

        return self.on_loop(go, "posting RX buffers")

    def rx_used(self) -> list[tuple[int, int]]:
        return self.on_loop(self.rings[0].reclaim, "reading the RX used ring")

    def peek(self, gpa: int, n: int) -> bytes:
        return self.on_loop(lambda: self.region.read_gpa(gpa, n), "reading guest memory")


@pytest.fixture
def backend() -> Iterator[Backend]:
    tmp = tempfile.mkdtemp(prefix="qmpmon-", dir="/tmp")  # short: unix socket path limit
    path = os.path.join(tmp, "qmp.sock")
    loop = EventLoop()
    journal = Journal()
    faults = Faults(journal=journal)
    wire = LoopbackWire()
    net = NetDevice(wire, queue_pairs=2, faults=faults)
    device = VdpaDevice(net, journal=journal, faults=faults)
    net.set_loop(loop)  # as the backend wires it: RX batches run from loop callbacks
    region = HostRegion.anonymous(RAM_GPA, RAM_SIZE, RAM_UADDR)
    rings = [DriverRing(region, QSIZE, RING_BASE + i * RING_STRIDE) for i in range(2)]
    quits: list[str] = []
    mon = Monitor(path, loop, device, net, on_quit=lambda: quits.append("quit"))
    mon.start()
    lt = LoopThread(loop)
    lt.start()
    be = Backend(lt, device, net, wire, mon, path, region, rings, quits)
    try:
        yield be
    finally:
        if lt.thread.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError):
                lt.call(mon.close, "monitor close")
        else:
            mon.close()
        lt.stop()
        wire.close()
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- clients ------------------------------------------------------------------------------------
class RawClient:
    """A blocking unix-socket client reading CRLF-terminated JSON replies."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_raw_line(self, what: str) -> bytes:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"timed out after {TIMEOUT}s waiting for {what}") from None
            if not chunk:
                raise EOFError(f"monitor closed the connection while waiting for {what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def read(self, what: str = "a message") -> dict[str, Any]:
        line = self.read_raw_line(what)
        assert line.endswith(b"\r\n"), line
        line.decode("ascii")  # the server's output is ASCII
        return json.loads(line)

    def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Send a command; its reply (events arriving meanwhile go to ``self.events``)."""
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(json.dumps(msg).encode())
        while "event" in (reply := self.read(f"the reply to {name}")):
            self.events.append(reply)
        return reply

    def negotiate(self) -> dict[str, Any]:
        greeting = self.read("the greeting")
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return greeting


@contextlib.contextmanager
def raw_client(path: str, negotiate: bool = True) -> Iterator[RawClient]:
    c = RawClient(path)
    try:
        if negotiate:
            c.negotiate()
        yield c
    finally:
        c.close()


def run(coro_fn: Callable[[], Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), 3 * TIMEOUT)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def qmp_client(path: str, name: str = "test"):
    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)
    try:
        yield qmp
    finally:
        await qmp.disconnect()


async def next_event(qmp: QMPClient, name: str) -> dict[str, Any]:
    """The next event called ``name`` (others are skipped)."""

    async def wait() -> dict[str, Any]:
        while True:
            ev = await qmp.events.get()
            if ev["event"] == name:
                return dict(ev)

    try:
        return await asyncio.wait_for(wait(), TIMEOUT)
    except TimeoutError:
        raise TimeoutError(f"timed out after {TIMEOUT}s waiting for event {name}") from None


def wait_for(pred: Callable[[], bool], what: str) -> None:
    poll_until(pred, TIMEOUT, what)


# -- JSON stream splitting (no sockets) -----------------------------------------------------
def split_all(chunks: list[bytes]) -> list[object]:
    sp = JsonStreamSplitter()
    out: list[object] = []
    for c in chunks:
        out += sp.feed(c)
    return out


def test_splitter_needs_no_delimiter_and_survives_any_chunking() -> None:
    stream = (
        b'{"execute":"a","id":1}{"execute": "b", "arguments": {"s": "}{[\\"]\'"}}\n'
        b' [1, {"x": []}] "top" 42\n'
        b'{\n  "execute": "pretty",\n  "id": "multi\\nline"\n}\r\n'
    )
    expected = [
        {"execute": "a", "id": 1},
        {"execute": "b", "arguments": {"s": "}{[\"]'"}},
        [1, {"x": []}],
        "top",
        42,
        {"execute": "pretty", "id": "multi\nline"},
    ]
    assert split_all([stream]) == expected
    assert split_all([stream[i : i + 1] for i in range(len(stream))]) == expected
    for cut in range(1, len(stream)):
        assert split_all([stream[:cut], stream[cut:]]) == expected


def test_splitter_accepts_qemu_single_quotes() -> None:
    out = split_all([b"{'execute': 'x', 'id': 'it\\'s \"q\"', \"k\": \"a\\'b\"}"])
    assert out == [{"execute": "x", "id": 'it\'s "q"', "k": "a'b"}]


def test_splitter_errors_and_recovery() -> None:
    out = split_all([b'{"execute": }', b"\xff", b'{"a": 1}', b'\x01garbage{"b": 2}'])
    assert isinstance(out[0], JsonParseError)
    assert str(out[0]) == "JSON parse error, expecting value"
    assert isinstance(out[1], JsonParseError) and "stray" in str(out[1])
    assert out[2] == {"a": 1}
    assert isinstance(out[3], JsonParseError)
    assert out[4] == {"b": 2}  # recovery skipped "garbage" up to the structural character
    # a control character inside a string resets the parser; the next line parses
    out = split_all([b'{"execute": "a\x02b"}\n{"c": 3}'])
    assert isinstance(out[0], JsonParseError)
    assert out[-1] == {"c": 3}
    # stray closers, bad keywords, NaN, bad UTF-8
    for bad in (b"}", b"nope\n", b'{"x": NaN}', b'{"x": "\xc3\x28"}'):
        (res,) = split_all([bad])
        assert isinstance(res, JsonParseError), bad


def test_splitter_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    out = split_all([b"[" * (monitor_mod.MAX_NESTING + 1) + b'\n{"ok": 1}'])
    assert isinstance(out[0], JsonParseError) and "nesting" in str(out[0])
    assert out[-1] == {"ok": 1}
    monkeypatch.setattr(monitor_mod, "MAX_MESSAGE_BYTES", 64)
    out = split_all([b'{"x": "' + b"a" * 100 + b'"}\n{"ok": 2}'])
    assert isinstance(out[0], JsonParseError) and "exceeds" in str(out[0])
    assert out[-1] == {"ok": 2}


def test_journal_event_mapping_is_json_safe() -> None:
    j = Journal()
    got: list[tuple[str, dict[str, Any]] | None] = []
    j.subscribe(lambda e: got.append(journal_event(e)))
    j.record("mem.add", id=1, raw=b"\x00\xff")
    j.record("dma.map", iova=0)
    j.record("error.vq", vq=0, detail="bad")
    j.record("status.set", old=0, new=0xF)
    names = [g[0] if g else None for g in got]
    assert names == ["MEM_TABLE_CHANGED", None, "DEVICE_ERROR", "STATUS_CHANGED"]
    assert got[0] and got[0][1]["raw"] == "00ff"
    assert got[3] and got[3][1]["status_names"] == [
        "ACKNOWLEDGE",
        "DRIVER",
        "DRIVER_OK",
        "FEATURES_OK",
    ]
    for g in got:
        if g:
            json.dumps(g[1], allow_nan=False)
            assert g[0] in EVENTS


# -- protocol ---------------------------------------------------------------------------------
def test_greeting_negotiation_and_ids_over_a_raw_socket(backend: Backend) -> None:
    with raw_client(backend.path, negotiate=False) as c:
        greeting = c.read("the greeting")
        assert greeting == {
            "QMP": {
                "version": {
                    "qemu": {"micro": 0, "minor": 0, "major": 10},
                    "package": "vdpa-backend",
                },
                "capabilities": [],
            }
        }
        before = c.cmd("query-status", id="pre")
        assert before == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": "pre",
        }
        # events are not delivered before negotiation: the next line is the reply, not an event
        backend.on_loop(lambda: backend.journal.record("vq.start", index=0))
        assert c.cmd("nonsense", id=1)["error"]["class"] == "CommandNotFound"
        bad = c.cmd("qmp_capabilities", {"enable": ["oob"]}, id=2)
        assert bad == {
            "error": {"class": "GenericError", "desc": "Capability oob not available"},
            "id": 2,
        }
        assert c.cmd("qmp_capabilities", {}, id={"any": ["json", 1]}) == {
            "return": {},
            "id": {"any": ["json", 1]},
        }
        again = c.cmd("qmp_capabilities", id=3)
        assert again["error"] == {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
        assert c.cmd("journal-mark", id=4)["id"] == 4
        assert "id" not in c.cmd("journal-mark")
        assert c.events == []  # nothing arrived between the commands and their replies


def test_malformed_input_gets_errors_and_the_server_keeps_going(backend: Backend) -> None:
    with raw_client(backend.path) as c:

        def err(data: bytes, what: str) -> dict[str, Any]:
            c.send(data)
            reply = c.read(what)
            assert set(reply) <= {"error", "id"}, reply
            assert reply["error"]["class"] == "GenericError", reply
            return reply

        assert err(b'{"execute": }\n', "parse error")["error"]["desc"] == (
            "JSON parse error, expecting value"
        )
        # garbage: one error per bad token (as QEMU's parser does), then resync on a command
        assert err(b"this is not json\n", "garbage")["error"]["desc"] == (
            "JSON parse error, invalid keyword 'this'"
        )
        c.send(b'{"execute": "journal-mark", "id": "sync"}')
        while c.read("resync reply").get("id") != "sync":
            pass
        # a lexical error (0xFF, the spec's way to reset the parser) drops a half-sent command;
        # input up to the next structural character or line end is skipped, then all is well
        c.send(b'{"execute": "journal-mark", "id": "lost"')
        assert "stray" in err(b"\xff", "lexical error")["error"]["desc"]
        c.send(b'skipped\n{"execute": "journal-mark", "id": "after-reset"}')
        assert c.read("reply after the reset")["id"] == "after-reset"
        cases = {
            b"[1, 2]": "QMP input must be a JSON object",
            b'"str"': "QMP input must be a JSON object",
            b'{"arguments": {}}': "QMP input lacks member 'execute'",
            b'{"execute": 1}': "QMP input member 'execute' must be a string",
            b'{"execute": "journal-mark", "arguments": []}': (
                "QMP input member 'arguments' must be an object"
            ),
            b'{"execute": "journal-mark", "bogus": 1, "id": 7}': (
                "QMP input member 'bogus' is unexpected"
            ),
            b'{"exec-oob": "journal-mark", "id": 8}': "QMP input member 'exec-oob' is unexpected",
        }
        for data, desc in cases.items():
            assert err(data, desc)["error"]["desc"] == desc
        assert err(b'{"execute": "journal-mark", "bogus": 1, "id": 7}', "id")["id"] == 7
        # bad arguments: QAPI wording
        arg_cases: list[tuple[str, dict[str, Any], str | None]] = [
            ("set-fault", {}, "Parameter 'name' is missing"),
            ("set-fault", {"name": 1}, "Invalid parameter type for 'name', expected: string"),
            ("set-fault", {"name": "drop-tx", "x": 1}, "Parameter 'x' is unexpected"),
            ("query-iotlb", {"iova": -1}, "Parameter 'iova' expects uint64"),
            ("query-iotlb", {"iova": True}, "Invalid parameter type for 'iova', expected: integer"),
            ("query-iotlb", {"iova": 1.5}, "Invalid parameter type for 'iova', expected: integer"),
            (
                "query-journal",
                {"kinds": ["a", 2]},
                "Invalid parameter type for 'kinds[1]', expected: string",
            ),
            (
                "query-journal",
                {"kinds": "a"},
                "Invalid parameter type for 'kinds', expected: array",
            ),
            ("inject-packet", {"data": "zz"}, None),
            ("inject-packet", {"data": ""}, None),
            ("inject-packet", {"data": "00", "queue": 2}, None),
        ]
        for name, args, want in arg_cases:
            reply = c.cmd(name, args, id=name)
            assert reply["id"] == name
            assert reply["error"]["class"] == "GenericError", reply
            if want is not None:
                assert reply["error"]["desc"] == want
        unknown = c.cmd("no-such-command", id=9)
        assert unknown == {
            "error": {
                "class": "CommandNotFound",
                "desc": "The command no-such-command has not been found",
            },
            "id": 9,
        }
        # framing: a command split into single bytes, two in one send, a pretty-printed one,
        # QEMU's single-quoted strings
        for b in b'{"execute": "journal-mark", "id": "split"}':
            c.send(bytes([b]))
        assert c.read("split reply")["id"] == "split"
        c.send(b'{"execute":"journal-mark","id":1}{"execute":"journal-mark","id":2}')
        assert [c.read("first")["id"], c.read("second")["id"]] == [1, 2]
        c.send(b'{\n  "execute": "journal-mark",\n  "id": "pretty"\n}\n')
        assert c.read("pretty reply")["id"] == "pretty"
        c.send(b"{'execute': 'journal-mark', 'id': 'single\\'quoted'}")
        assert c.read("single-quoted reply")["id"] == "single'quoted"
        assert "return" in c.cmd("query-status")


def test_client_disconnecting_mid_command_is_dropped(backend: Backend) -> None:
    with raw_client(backend.path) as other:
        count = lambda: backend.on_loop(lambda: backend.monitor.client_count)  # noqa: E731
        assert count() == 1
        for partial in (b'{"execute": "query-st', b"", b"\xff{"):
            c = RawClient(backend.path)
            c.read("greeting")
            if partial:
                c.send(partial)
            wait_for(lambda: count() == 2, "the second client to be counted")
            c.close()
            wait_for(lambda: count() == 1, "the disconnected client to be dropped")
        # a client that closes right after sending a full command (reply cannot be sent)
        c = RawClient(backend.path)
        c.send(b'{"execute": "qmp_capabilities"}{"execute": "query-journal"}')
        c.close()
        wait_for(lambda: count() == 1, "the vanished client to be dropped")
        assert "return" in other.cmd("query-status")


def test_a_slow_reader_gets_a_large_reply_intact(backend: Backend) -> None:
    def fill() -> None:
        for i in range(20000):
            backend.journal.record("test.bulk", i=i, blob=b"\xab" * 32)

    backend.on_loop(fill, "filling the journal")
    with raw_client(backend.path) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(b'{"execute": "query-journal", "arguments": {"kinds": ["test."]}, "id": "big"}')
        c.send(b'{"execute": "journal-mark", "id": "after"}')
        reply = c.read("the large query-journal reply")
        assert reply["id"] == "big"
        entries = reply["return"]["entries"]
        assert [e["i"] for e in entries] == list(range(20000))
        assert entries[0]["blob"] == "ab" * 32
        assert c.read("the reply queued behind it")["id"] == "after"


def test_socket_path_handling_and_close(backend: Backend) -> None:
    stale = os.path.join(os.path.dirname(backend.path), "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(stale)  # a socket file nobody listens on any more
    loop = EventLoop()
    try:
        # a live monitor's path is not stolen
        with pytest.raises(FileExistsError, match="listening"):
            Monitor(backend.path, loop, backend.device).start()
        # a stale socket file is replaced; close() removes it
        mon = Monitor(stale, loop, backend.device)
        mon.start()
        mon.close()
        assert not os.path.exists(stale)
    finally:
        loop.close()
    # close(): clients see EOF, the socket file is gone
    with raw_client(backend.path) as c:
        backend.on_loop(backend.monitor.close, "monitor close")
        with pytest.raises(EOFError):
            c.read("EOF after close")
    assert not os.path.exists(backend.path)


# -- commands through qemu.qmp -----------------------------------------------------------------
def test_query_commands_and_state_queries(backend: Backend) -> None:
    backend.add_memory()
    backend.driver_ok()

    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            cmds = await qmp.execute("query-commands")
            assert {c["name"] for c in cmds} == EXPECTED_COMMANDS

            status = await qmp.execute("query-status")
            assert status["status"] == 0xF
            assert status["status_names"] == ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]
            assert status["running"] is True and status["suspended"] is False
            assert "VERSION_1" in status["features"]["names"]
            assert status["connection"] is None  # no vhost-user server given

            feats = await qmp.execute("query-features")
            assert feats["negotiated"]["bits"] == bit(VIRTIO_F_VERSION_1)
            assert feats["device"]["bits"] & bit(VIRTIO_F_VERSION_1)
            assert "MAC" in feats["device"]["names"]
            assert feats["driver"]["names"] == ["VERSION_1"]

            mem = await qmp.execute("query-mem-table")
            assert mem == {
                "regions": [
                    {
                        "id": backend.region.id,
                        "gpa": RAM_GPA,
                        "size": RAM_SIZE,
                        "uaddr": RAM_UADDR,
                        "mmap_offset": 0,
                        "written": mem["regions"][0]["written"],
                    }
                ]
            }
            assert mem["regions"][0]["written"] >= 0

            tlb = await qmp.execute("query-iotlb")
            (m,) = tlb["mappings"]
            assert (m["iova"], m["size"], m["uaddr"], m["perm"]) == (
                RAM_GPA,
                RAM_SIZE,
                RAM_UADDR,
                "RW",
            )
            hit = await qmp.execute("query-iotlb", {"iova": RAM_SIZE - 1, "size": 1})
            miss = await qmp.execute("query-iotlb", {"iova": RAM_SIZE, "size": 0x1000})
            assert hit["mappings"] == [m] and miss["mappings"] == []
            with pytest.raises(ExecuteError, match="'size' needs parameter 'iova'"):
                await qmp.execute("query-iotlb", {"size": 1})

            vrings = (await qmp.execute("query-vrings"))["vrings"]
            assert [v["index"] for v in vrings] == list(range(len(backend.device.vqs)))
            rx = vrings[0]
            r0 = backend.rings[0]
            assert (rx["desc"], rx["avail"], rx["used"], rx["num"]) == (
                r0.desc,
                r0.avail,
                r0.used,
                QSIZE,
            )
            assert rx["ready"] is True and rx["enabled"] is True and rx["started"] is True
            assert (rx["last_avail_idx"], rx["used_idx"], rx["inflight"]) == (0, 0, 0)
            assert (rx["packets"], rx["bytes"]) == (0, 0)
            # kick/call eventfds belong to the vhost-user transport: none here
            assert rx["kicks"] is None and rx["calls"] is None
            assert vrings[2]["ready"] is False and vrings[2]["started"] is False

    run(go)


def test_journal_queries(backend: Backend) -> None:
    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            mark = (await qmp.execute("journal-mark"))["seq"]
            await qmp.execute("set-fault", {"name": "drop-tx"})
            await qmp.execute("clear-fault", {"name": "drop-tx"})
            backend.on_loop(lambda: backend.journal.record("test.bytes", raw=b"\x01\x02"))
            j = await qmp.execute("query-journal", {"since": mark})
            kinds = [e["kind"] for e in j["entries"]]
            assert kinds == ["fault.set", "fault.clear", "test.bytes"]
            assert j["last"] == j["entries"][-1]["seq"] == mark + 3
            assert j["entries"][-1]["raw"] == "0102"
            only = await qmp.execute("query-journal", {"kinds": ["fault."], "since": mark})
            assert [e["kind"] for e in only["entries"]] == ["fault.set", "fault.clear"]
            exact = await qmp.execute("query-journal", {"kinds": ["fault.clear"], "since": mark})
            assert [e["name"] for e in exact["entries"]] == ["drop-tx"]
            limited = await qmp.execute("query-journal", {"since": mark, "limit": 2})
            assert [e["kind"] for e in limited["entries"]] == ["fault.set", "fault.clear"]
            assert (await qmp.execute("journal-mark"))["seq"] == mark + 3
            none = await qmp.execute("query-journal", {"since": mark + 3})
            assert none == {"entries": [], "last": mark + 3}

    run(go)


def test_faults(backend: Backend) -> None:
    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            faults = await qmp.execute("query-faults")
            assert faults["active"] == []
            assert {f["name"] for f in faults["known"]} == set(FAULTS)
            assert all(f["description"] for f in faults["known"])
            await qmp.execute("set-fault", {"name": "stale-iotlb"})
            assert backend.on_loop(lambda: backend.device.faults.active("stale-iotlb"))
            faults = await qmp.execute("query-faults")
            assert faults["active"] == ["stale-iotlb"]
            assert [f["name"] for f in faults["known"] if f["active"]] == ["stale-iotlb"]
            with pytest.raises(ExecuteError, match="unknown fault 'bogus'") as exc:
                await qmp.execute("set-fault", {"name": "bogus"})
            assert exc.value.error_class == "GenericError"
            await qmp.execute("clear-fault", {"name": "stale-iotlb"})
            assert (await qmp.execute("query-faults"))["active"] == []

    run(go)


def test_inject_packet_reaches_the_guest_and_query_wire_counts(backend: Backend) -> None:
    backend.add_memory()
    backend.driver_ok()
    gpas = backend.post_rx_buffers(4)
    frame = bytes.fromhex("ffffffffffff5254001234560800") + bytes(range(50))

    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            reply = await qmp.execute("inject-packet", {"data": frame.hex()})
            assert reply == {"length": len(frame), "queue": 0, "queued": True}
            used: list[tuple[int, int]] = []

            def collect(got: list[tuple[int, int]], n: int) -> bool:
                got.extend(backend.rx_used())
                return len(got) == n if n > 1 else bool(got)

            wait_for(lambda: collect(used, 1), "the RX used ring")
            assert used == [(0, NET_HDR + len(frame))]
            assert backend.peek(gpas[0] + NET_HDR, len(frame)) == frame
            # separators are accepted in the hex string; an explicit queue pair
            await qmp.execute("inject-packet", {"data": frame[:20].hex(":"), "queue": 0})
            wait_for(lambda: collect(used, 2), "frame 2")
            assert used[1][1] == NET_HDR + 20
            assert backend.peek(gpas[1] + NET_HDR, 20) == frame[:20]
            wire = await qmp.execute("query-wire")
            assert wire["wire"]["kind"] == "loopback"
            for key in ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drops"):
                assert isinstance(wire["wire"][key], int)
            rxq = {q["vq"]: q for q in wire["queues"]}[0]
            assert (rxq["packets"], rxq["bytes"], rxq["drops"]) == (2, len(frame) + 20, 0)
            assert wire["backlog"] == [0, 0]
            vrings = (await qmp.execute("query-vrings"))["vrings"]
            assert (vrings[0]["packets"], vrings[0]["used_idx"]) == (2, 2)
            # pair 1 is not enabled: NetDevice routes its frames to pair 0 (buffer 3)
            await qmp.execute("inject-packet", {"data": "11" * 60, "queue": 1})
            wait_for(lambda: collect(used, 3), "frame 3")
            # buffer 4 takes the next frame; with none left the last one waits in the backlog
            for _ in range(2):
                await qmp.execute("inject-packet", {"data": "22" * 60})
            wire = await qmp.execute("query-wire")
            assert wire["backlog"] == [1, 0]
            assert {q["vq"]: q for q in wire["queues"]}[0]["packets"] == 4

    run(go)


def test_suspend_resume_quit(backend: Backend) -> None:
    backend.add_memory()
    backend.driver_ok()

    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            assert await qmp.execute("suspend") == {}
            st = await qmp.execute("query-status")
            assert st["suspended"] is True and st["running"] is False
            assert await qmp.execute("resume") == {}
            assert (await qmp.execute("query-status"))["suspended"] is False
            assert await qmp.execute("quit") == {}
            ev = await next_event(qmp, "SHUTDOWN")
            assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}

    run(go)
    wait_for(lambda: backend.quits == ["quit"], "on_quit to be called")


def test_hold_tx_command(backend: Backend) -> None:
    backend.add_memory()
    backend.driver_ok()

    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            assert await qmp.execute("hold-tx", {"enable": True}) == {"held": 0, "enabled": True}
            assert (await qmp.execute("query-wire"))["tx_held"] == 0
            assert await qmp.execute("hold-tx", {"enable": False}) == {"held": 0, "enabled": False}
            with pytest.raises(ExecuteError, match="expected: boolean"):
                await qmp.execute("hold-tx", {"enable": 1})

    run(go)


def test_iotlb_request_checks_arguments_and_needs_a_backend_channel(backend: Backend) -> None:
    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            with pytest.raises(ExecuteError, match="'type' expects"):
                await qmp.execute("iotlb-request", {"iova": 0x1000, "type": "bogus"})
            with pytest.raises(ExecuteError, match="'perm' expects"):
                await qmp.execute("iotlb-request", {"iova": 0x1000, "perm": 0})
            with pytest.raises(ExecuteError, match="no backend channel"):
                await qmp.execute("iotlb-request", {"iova": 0x1000, "type": "access-fail"})
            with pytest.raises(ExecuteError, match="'iova' is missing"):
                await qmp.execute("iotlb-request", {})

    run(go)


def test_quit_without_on_quit_stops_the_loop(backend: Backend) -> None:
    backend.on_loop(lambda: setattr(backend.monitor, "on_quit", None))
    with raw_client(backend.path) as c:
        assert c.cmd("quit", id="q") == {"return": {}, "id": "q"}
        assert c.read("SHUTDOWN")["event"] == "SHUTDOWN"
    backend.lt.wait_stopped("the backend loop to stop after quit")


# -- events -------------------------------------------------------------------------------------
def test_events_reach_every_negotiated_client(backend: Backend) -> None:
    dev = backend.device

    async def go() -> None:
        with raw_client(backend.path, negotiate=False) as lurker:
            lurker.read("greeting")
            async with qmp_client(backend.path, "a") as a, qmp_client(backend.path, "b") as b:
                backend.add_memory()
                for q in (a, b):
                    ev = await next_event(q, "MEM_TABLE_CHANGED")
                    assert ev["data"]["kind"] == "mem.add"
                    assert ev["data"]["id"] == backend.region.id
                    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
                    assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
                backend.driver_ok()  # DRIVER_OK starts the configured rings
                for q in (a, b):
                    ev = await next_event(q, "STATUS_CHANGED")
                    assert ev["data"]["status_names"] == ["ACKNOWLEDGE", "DRIVER"]
                    ev = await next_event(q, "VRING_STARTED")
                    assert ev["data"]["vq"] == 0
                backend.on_loop(lambda: dev.stop_vq(0), "stop_vq")
                for q in (a, b):
                    ev = await next_event(q, "VRING_STOPPED")
                    assert ev["data"]["vq"] == 0
                with pytest.raises(ValueError):
                    backend.on_loop(lambda: dev.set_vq_num(99, 8), "a bad bus op")
                for q in (a, b):
                    ev = await next_event(q, "DEVICE_ERROR")
                    assert ev["data"]["kind"] == "error.protocol"
                entries = [(RAM_GPA, RAM_SIZE // 2, RAM_UADDR, int(Perm.RW))]
                backend.on_loop(lambda: dev.set_map(entries), "set_map")
                for q in (a, b):
                    ev = await next_event(q, "MEM_TABLE_CHANGED")
                    assert ev["data"]["kind"] == "dma.set_map"
                backend.on_loop(lambda: dev.remove_host_region(backend.region), "remove region")
                for q in (a, b):
                    ev = await next_event(q, "MEM_TABLE_CHANGED")
                    assert ev["data"]["kind"] == "mem.remove"
            # the client that never negotiated got no event: its next line is a reply
            assert lurker.cmd("journal-mark", id="l")["error"]["class"] == "CommandNotFound"
            assert lurker.events == []

    run(go)


def test_iotlb_miss_event_from_the_device(backend: Backend) -> None:
    # vIOMMU mode (ACCESS_PLATFORM) with nothing in the IOTLB: starting TX misses on its ring
    backend.on_loop(lambda: backend.device.add_host_region(backend.region), "adding memory")

    async def go() -> None:
        async with qmp_client(backend.path) as qmp:
            backend.driver_ok(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM))
            ev = await next_event(qmp, "IOTLB_MISS")
            assert ev["data"]["vq"] == 1
            tx = backend.rings[1]
            assert tx.desc <= ev["data"]["iova"] < tx.end
            miss = await qmp.execute("query-iotlb", {"iova": ev["data"]["iova"], "size": 1})
            assert miss["mappings"] == []

    run(go)


def test_query_status_reports_the_vhost_user_connection(backend: Backend) -> None:
    vu_path = os.path.join(os.path.dirname(backend.path), "vhost.sock")
    server = VhostUserServer(vu_path, backend.device, backend.lt.loop)
    backend.on_loop(server.start, "vhost-user server start")
    mon = Monitor(
        os.path.join(os.path.dirname(backend.path), "qmp2.sock"),
        backend.lt.loop,
        backend.device,
        backend.net,
        server,
    )
    backend.on_loop(mon.start, "second monitor start")
    try:
        with raw_client(mon.path) as c:
            conn = c.cmd("query-status")["return"]["connection"]
            assert conn["connected"] is False and conn["protocol_features"] is None
            with Frontend(vu_path) as fe:
                assert fe.get_features() >> vu.VHOST_USER_F_PROTOCOL_FEATURES & 1
                want = fe.get_protocol_features() & vu.protocol_mask(
                    vu.ProtocolFeature.MQ, vu.ProtocolFeature.REPLY_ACK
                )
                fe.set_protocol_features(want)
                fe.get_features()  # a round trip: SET_PROTOCOL_FEATURES has been handled
                conn = c.cmd("query-status")["return"]["connection"]
                assert conn["connected"] is True
                assert conn["protocol_features"] == {"bits": want, "names": ["MQ", "REPLY_ACK"]}
                feats = c.cmd("query-features")["return"]
                assert "PROTOCOL_FEATURES" in feats["offered"]["names"]
            wait_for(
                lambda: not c.cmd("query-status")["return"]["connection"]["connected"],
                "the front-end's disconnect to show in query-status",
            )
    finally:
        backend.on_loop(mon.close, "second monitor close")
        backend.on_loop(server.close, "vhost-user server close")


# -- qmp-shell ----------------------------------------------------------------------------------
def test_qmp_shell_connects_and_runs_commands(backend: Backend, tmp_path: Any) -> None:
    shell = os.path.join(VENV_BIN, "qmp-shell")
    argv = [shell] if os.path.exists(shell) else [sys.executable, "-m", "qemu.qmp.qmp_shell"]
    commands = "query-status\nset-fault name=drop-tx\nquery-faults\nno-such-command\nquit\n"
    env = {**os.environ, "HOME": str(tmp_path)}  # qmp-shell writes its history file there
    proc = subprocess.run(
        [*argv, backend.path],
        input=commands,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Connected to QEMU 10.0.0" in out
    replies = [json.loads(line[line.index("{") :]) for line in out.splitlines() if "{" in line]
    assert "status_names" in replies[0]["return"]
    assert replies[1] == {"return": {}}
    assert replies[2]["return"]["active"] == ["drop-tx"]
    assert replies[3]["error"]["class"] == "CommandNotFound"
    assert replies[4] == {"return": {}}
    wait_for(lambda: backend.quits == ["quit"], "quit from qmp-shell")
