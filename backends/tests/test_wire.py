"""Wires: spec parsing, loopback ordering, UDP and unix datagram sockets (real, local)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator

import pytest

from backends.loop import EventLoop
from backends.net.wire import (
    LoopbackWire,
    NullWire,
    UdpWire,
    UnixWire,
    make_wire,
)

SIZES = [14, 60, 1514, 9014, 65507]


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def closers() -> Iterator[list[Callable[[], object]]]:
    todo: list[Callable[[], object]] = []
    try:
        yield todo
    finally:
        for fn in reversed(todo):
            fn()


def recv_exact(sock: socket.socket, what: str) -> bytes:
    sock.settimeout(5.0)
    try:
        return sock.recv(1 << 20)
    except TimeoutError:
        raise TimeoutError(f"timed out after 5.0s waiting for {what}") from None


class Capture:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, int]] = []

    def __call__(self, data: bytes, qp: int) -> None:
        self.frames.append((data, qp))


# -- make_wire --------------------------------------------------------------------------------


def test_make_wire_simple_kinds() -> None:
    w = make_wire("loopback")
    assert isinstance(w, LoopbackWire)
    w.close()
    w = make_wire(" null ")
    assert isinstance(w, NullWire)
    w.close()


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "unknown wire spec"),
        ("tap:foo", "unknown wire spec"),
        ("udp", "unknown wire spec"),
        ("udp:127.0.0.1:1", "udp:HOST:PORT:PEERPORT"),
        ("udp:127.0.0.1:a:2", "not a number"),
        ("udp:127.0.0.1:1:70000", "out of range"),
        ("udp::1:2", "udp:HOST:PORT:PEERPORT"),
        ("udp:[::1:1:2", "unterminated"),
        ("unix:", "unix:PATH"),
        ("unix:/a:b:c", "unix:PATH"),
        ("unix:/a:", "unix:PATH"),
    ],
)
def test_make_wire_rejects_bad_specs(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make_wire(spec)


def test_make_wire_udp_and_unix(tmp_path: os.PathLike[str], closers: list) -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closers.append(peer.close)
    peer.bind(("127.0.0.1", 0))
    w = make_wire(f"udp:127.0.0.1:0:{peer.getsockname()[1]}")
    closers.append(w.close)
    assert isinstance(w, UdpWire)
    assert w.peer == ("127.0.0.1", peer.getsockname()[1])
    u = make_wire(f"unix:{tmp_path}/w")
    closers.append(u.close)
    assert isinstance(u, UnixWire)
    assert u.peer_path == f"{tmp_path}/w.peer"
    v = make_wire(f"unix:{tmp_path}/v:{tmp_path}/other")
    closers.append(v.close)
    assert isinstance(v, UnixWire) and v.peer_path == f"{tmp_path}/other"


# -- null / loopback --------------------------------------------------------------------------


def test_null_wire_counts_and_discards() -> None:
    w = NullWire()
    cap = Capture()
    w.set_receiver(cap)
    w.send(b"x" * 100, 0)
    w.send(b"y" * 50, 3)
    assert w.counters() == {
        "tx_frames": 2,
        "tx_bytes": 150,
        "rx_frames": 0,
        "rx_bytes": 0,
        "drops": 0,
    }
    assert cap.frames == []
    w.close()


def test_loopback_delivers_from_loop_not_recursively(loop: EventLoop) -> None:
    w = LoopbackWire()
    w.attach(loop)
    seen: list[tuple[bytes, int]] = []

    def receiver(data: bytes, qp: int) -> None:
        seen.append((data, qp))
        if len(seen) == 1:
            w.send(b"echo" + data, qp)  # must not be delivered inside this call
            assert len(seen) == 1

    w.set_receiver(receiver)
    w.send(frame(9014), 2)
    assert seen == []  # nothing synchronous
    loop.run_once(0)
    assert seen == [(frame(9014), 2)]
    loop.run_until(lambda: len(seen) == 2, 2.0, "second loopback frame")
    assert seen[1] == (b"echo" + frame(9014), 2)
    assert w.counters()["tx_frames"] == 2 and w.counters()["rx_frames"] == 2
    w.close()


def test_loopback_queue_bound_and_no_receiver(loop: EventLoop) -> None:
    w = LoopbackWire(limit=3)
    for i in range(5):
        w.send(bytes([i]) * 20, 0)
    assert w.pending() == 3 and w.drops == 2
    w.attach(loop)  # frames queued before attach are delivered once attached
    loop.run_once(0)
    assert w.pending() == 0
    assert w.drops == 5  # three more: no receiver set
    w.close()


# -- UDP ----------------------------------------------------------------------------------------


def test_udp_wire_both_directions_byte_exact(loop: EventLoop, closers: list) -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closers.append(peer.close)
    peer.bind(("127.0.0.1", 0))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    w = UdpWire("127.0.0.1", 0, peer.getsockname()[1])
    closers.append(w.close)
    w.attach(loop)
    cap = Capture()
    w.set_receiver(cap)

    for i, n in enumerate(SIZES):
        f = frame(n, i)
        w.send(f, qp=i % 2)
        assert recv_exact(peer, f"{n}-byte frame on the UDP peer") == f
    assert w.tx_frames == len(SIZES) and w.tx_bytes == sum(SIZES)

    for i, n in enumerate(SIZES):
        peer.sendto(frame(n, 100 + i), w.local_address)
    loop.run_until(lambda: len(cap.frames) == len(SIZES), 5.0, "UDP frames on the wire")
    assert cap.frames == [(frame(n, 100 + i), 0) for i, n in enumerate(SIZES)]
    assert w.rx_frames == len(SIZES) and w.rx_bytes == sum(SIZES)

    # bigger than an IPv4 UDP datagram: counted, not raised
    w.send(frame(65508), 0)
    assert w.drops == 1 and w.tx_frames == len(SIZES)


def test_udp_wire_send_after_close_is_a_drop(closers: list) -> None:
    w = UdpWire("127.0.0.1", 0, 9)
    w.close()
    w.close()  # idempotent
    w.send(b"z" * 64, 0)
    assert w.drops == 1


def test_udp_wire_bad_host() -> None:
    with pytest.raises(ValueError, match="cannot resolve"):
        UdpWire("no-such-host.invalid", 0, 1)


# -- unix ---------------------------------------------------------------------------------------


def test_unix_wires_back_to_back(
    tmp_path: os.PathLike[str], loop: EventLoop, closers: list
) -> None:
    a_path = f"{tmp_path}/a"
    a = UnixWire(a_path)
    closers.append(a.close)
    b = make_wire(f"unix:{a_path}.peer:{a_path}")
    closers.append(b.close)
    a.attach(loop)
    b.attach(loop)
    got_a, got_b = Capture(), Capture()
    a.set_receiver(got_a)
    b.set_receiver(got_b)

    sizes = [14, 1514, 9014, 65535, 70000]
    for i, n in enumerate(sizes):
        a.send(frame(n, i), qp=1)
        loop.run_until(functools.partial(_has, got_b.frames, i + 1), 5.0, f"frame {i} at b")
        b.send(frame(n, 50 + i), qp=0)
        loop.run_until(functools.partial(_has, got_a.frames, i + 1), 5.0, f"frame {i} at a")
    assert got_b.frames == [(frame(n, i), 0) for i, n in enumerate(sizes)]
    assert got_a.frames == [(frame(n, 50 + i), 0) for i, n in enumerate(sizes)]
    assert a.counters() == {
        "tx_frames": len(sizes),
        "tx_bytes": sum(sizes),
        "rx_frames": len(sizes),
        "rx_bytes": sum(sizes),
        "drops": 0,
    }

    a.close()
    assert not os.path.exists(a_path)  # unlinked on close
    b.send(b"q" * 60, 0)  # peer gone: a drop, not an exception
    assert b.drops == 1


def test_unix_wire_peer_missing_or_slow(tmp_path: os.PathLike[str], closers: list) -> None:
    w = UnixWire(f"{tmp_path}/w")
    closers.append(w.close)
    w.send(b"a" * 60, 0)  # nobody at w.peer
    assert w.drops == 1 and w.tx_frames == 0

    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    closers.append(slow.close)
    slow.bind(w.peer_path)
    for _ in range(200):  # the peer never reads: its queue fills, sends become drops
        w.send(b"b" * 1000, 0)
    assert w.tx_frames > 0 and w.drops > 1
    assert w.tx_frames + w.drops == 201


def test_unix_wire_stale_live_and_foreign_paths(tmp_path: os.PathLike[str], closers: list) -> None:
    stale_path = f"{tmp_path}/stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(stale_path)
    s.close()  # the file remains, nobody bound: stale
    w = UnixWire(stale_path)
    closers.append(w.close)

    with pytest.raises(FileExistsError, match="in use"):
        UnixWire(stale_path)  # w is alive there

    regular = f"{tmp_path}/regular"
    with open(regular, "w") as fh:
        fh.write("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        UnixWire(regular)
    with open(regular) as fh:
        assert fh.read() == "keep me"


def _has(frames: list[tuple[bytes, int]], n: int) -> bool:
    return len(frames) == n
