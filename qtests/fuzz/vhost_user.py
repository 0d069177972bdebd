"""The vhost-user fuzzer: hypothesis stateful testing against the real ``python -m backends``.

A case is one connection driven by :class:`VhostUserMachine`: valid QEMU-like handshake steps
interleaved with mutations (sizes that lie, descriptors of the wrong kind or too many, regions
that overlap or overflow, indices out of range, unknown requests, NEED_REPLY on everything,
malformed IOTLB messages) and with a front-end that changes what it handed over after handing
it over (ftruncate a memfd, also right behind a queue of ring-touching messages so the shrink
lands inside a callback; fill / block / close an eventfd, scribble on the rings). After each
case :class:`~qtests.fuzz.target.BackendTarget` checks that the process is alive, answers a
fresh connection within a bound, and samples its fd count and RSS.

Every step is an *op*, a small JSON-able dict executed by :meth:`Session.apply`; a case is the
list of its ops. The corpus (``qtests/fuzz/corpus/vhost_user/*.json``) is replayed first on
every run, and a case that crashes or hangs the backend is written there (commit it: it is a
regression test from then on). Messages are encoded by the project's codec
(:mod:`backends.vhost_user.messages`) and sent by the test front-end
(:mod:`qtests.qos.vhost_user_frontend`).
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from backends.vhost_user import messages as m
from backends.vhost_user.framing import close_fds
from backends.vhost_user.messages import Request as R
from backends.vhost_user.offer import Offer
from qtests.fuzz.target import BackendTarget, FuzzStats, fuzz_settings
from qtests.qos.guest_memory import UADDR_BASE, SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend

CORPUS = Path(__file__).parent / "corpus" / "vhost_user"
MEM_SIZE = 1 << 20
RING = 0x10000  # rings of the valid prefix live here (gpa); 256 entries each, 0x4000 apart
U64 = (1 << 64) - 1
Op = dict[str, Any]

# -- the valid prefix: what QEMU 10 sends (vhost_dev_init + vhost_net_start), concretely --------
_NR = m.VERSION | m.FLAG_NEED_REPLY


def _msg(req: int, payload: bytes = b"", fds: list[str] | None = None, flags: int = _NR) -> Op:
    return {
        "op": "msg",
        "req": int(req),
        "flags": flags,
        "payload": payload.hex(),
        "fds": fds or [],
    }


# what QEMU's virtio-net keeps of what the backend offers (it strips CONFIG)
_PROTOCOL = Offer().protocol_features() & ~(1 << m.ProtocolFeature.CONFIG)


def prefix_ops() -> list[Op]:
    ops = [
        _msg(R.GET_FEATURES),
        _msg(R.GET_PROTOCOL_FEATURES),
        _msg(R.SET_PROTOCOL_FEATURES, m.pack_u64(_PROTOCOL)),
        _msg(R.GET_QUEUE_NUM),
        _msg(R.SET_BACKEND_REQ_FD, fds=["socket"]),
        _msg(R.SET_OWNER),
        _msg(R.GET_FEATURES),
    ]
    for i in range(2):
        ops.append(_msg(R.SET_VRING_CALL, m.VringFile(i, False).pack(), ["eventfd"]))
        ops.append(_msg(R.SET_VRING_ERR, m.VringFile(i, False).pack(), ["eventfd"]))
    ops.append(_msg(R.SET_FEATURES, m.pack_u64(1 << 32 | 1 << 30 | 1 << 29)))
    ops.append(
        _msg(R.SET_MEM_TABLE, m.pack_mem_table([m.MemRegion(0, MEM_SIZE, UADDR_BASE, 0)]), ["mem"])
    )
    for i in range(2):
        base = RING + 0x4000 * i
        addr = m.VringAddr(
            i, 0, UADDR_BASE + base, UADDR_BASE + base + 0x2000, UADDR_BASE + base + 0x1000, 0
        )
        ops += [
            _msg(R.SET_VRING_NUM, m.VringState(i, 256).pack()),
            _msg(R.SET_VRING_BASE, m.VringState(i, 0).pack()),
            _msg(R.SET_VRING_ADDR, addr.pack()),
            _msg(R.SET_VRING_KICK, m.VringFile(i, False).pack(), ["eventfd"]),
            _msg(R.SET_VRING_CALL, m.VringFile(i, False).pack(), ["eventfd"]),
            _msg(R.SET_VRING_ENABLE, m.VringState(i, 1).pack()),
        ]
    ops.append(_msg(R.SET_STATUS, m.pack_u64(0xF)))
    return ops


PREFIX = prefix_ops()


def issue_sequences() -> dict[str, list[Op]]:
    """The three sequences of issue #12 as ops (the seed of the corpus)."""
    head = [
        _msg(R.SET_OWNER, flags=m.VERSION),
        _msg(R.SET_FEATURES, m.pack_u64(1 << 32), flags=m.VERSION),
        _msg(
            R.SET_MEM_TABLE,
            m.pack_mem_table([m.MemRegion(0, MEM_SIZE, UADDR_BASE, 0)]),
            ["mem"],
            flags=m.VERSION,
        ),
    ]
    for i in range(2):
        base = RING + 0x4000 * i
        head += [
            _msg(R.SET_VRING_NUM, m.VringState(i, 256).pack(), flags=m.VERSION),
            _msg(
                R.SET_VRING_ADDR,
                m.VringAddr(
                    i,
                    0,
                    UADDR_BASE + base,
                    UADDR_BASE + base + 0x2000,
                    UADDR_BASE + base + 0x1000,
                    0,
                ).pack(),
                flags=m.VERSION,
            ),
        ]
    head.append({"op": "sync"})
    nofd_kick = _msg(R.SET_VRING_KICK, m.VringFile(1, True).pack(), flags=m.VERSION)
    # one valid TX chain on ring 1: a 12-byte header + 60-byte frame at 0x8000, avail idx 1
    desc = RING + 0x4000
    chain = [
        {
            "op": "tamper",
            "what": "scribble",
            "off": 0x8000,
            "data": (bytes(12) + b"\xff" * 60).hex(),
        },
        {
            "op": "tamper",
            "what": "scribble",
            "off": desc,
            "data": struct.pack("<QIHH", 0x8000, 72, 0, 0).hex(),
        },
        {"op": "tamper", "what": "scribble", "off": desc + 0x1000, "data": "000001000000"},
    ]
    return {
        "issue12-1-shrunk-memfd-polling-kick": [
            *head,
            {"op": "tamper", "what": "truncate", "i": 0, "size": 0},
            nofd_kick,
            {"op": "sync"},
        ],
        "issue12-2-full-blocking-call-eventfd": [
            *head,
            _msg(
                R.SET_VRING_CALL,
                m.VringFile(1, False).pack(),
                ["eventfd-blocking"],
                flags=m.VERSION,
            ),
            {"op": "tamper", "what": "block", "i": 0},
            {"op": "tamper", "what": "fill", "i": 0},
            {"op": "tamper", "what": "block", "i": 0},
            *chain,
            nofd_kick,
            {"op": "sync"},
            {"op": "sync"},
        ],
        "issue12-3-shared-kick-made-blocking": [
            *head,
            _msg(R.SET_VRING_KICK, m.VringFile(0, False).pack(), ["eventfd"], flags=m.VERSION),
            {"op": "dup-kick", "index": 1},
            {"op": "sync"},
            {"op": "tamper", "what": "block", "i": 0},
            {"op": "tamper", "what": "kick", "i": 0},
            {"op": "sync"},
        ],
        "qemu-prefix-then-need-reply-flood": [
            *PREFIX,
            *[_msg(R.GET_FEATURES) for _ in range(64)],
            {"op": "sync"},
        ],
    }


# -- a session: one connection, the memory and eventfds it handed over ------------------------
class Session:
    """Executes ops on one connection to the backend. Keeps every fd it handed over (so it
    can tamper with them later) and closes them all in :meth:`close`."""

    def __init__(self, path: str, stats: FuzzStats, timeout: float = 10.0) -> None:
        self.stats = stats
        self.fe = Frontend(path, timeout=timeout)
        self.mem = SharedGuestMemory(MEM_SIZE)
        self.memfds: list[int] = [self.mem.slots[0].fd]  # extra memfds it made
        self.efds: list[int] = []
        self.others: list[int] = []  # sockets, pipes, files
        self.ops: list[Op] = []
        self.dead = False  # the backend closed this connection (fine: it may)
        #: a header lied about its size (or its version): message boundaries are lost, so
        #: a sync's GET_FEATURES may be swallowed as payload; syncs are skipped from then on
        self.desynced = False

    # fds by kind ----------------------------------------------------------------------------
    def _fd(self, spec: str) -> int:
        kind, _, arg = spec.partition(":")
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.efds.append(fd)
        elif kind == "eventfd-blocking":
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            self.efds.append(fd)
        elif kind == "mem":
            fd = self.mem.slots[0].fd
        elif kind == "memfd":
            flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if "sealed" in arg else 0)
            fd = os.memfd_create("fuzz", flags)
            os.ftruncate(fd, int(arg.split(",")[0] or "0", 0))
            self.memfds.append(fd)
        elif kind == "socket":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fd = a.detach()
            self.others += [fd, b.detach()]
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self.others += [r, w]
            fd = r
        else:  # "devnull" and anything unknown: a file of the wrong kind
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            self.others.append(fd)
        return fd

    def _efd(self, i: int) -> int | None:
        return self.efds[i % len(self.efds)] if self.efds else None

    # ops ------------------------------------------------------------------------------------
    def apply(self, op: Op) -> None:
        self.ops.append(op)
        if self.dead:
            return
        kind = op["op"]
        if kind == "msg":
            self._send(op)
        elif kind == "tamper":
            self._tamper(op)
        elif kind == "sync":
            self._sync()
        elif kind == "burst":
            self._burst(op)
        elif kind == "dup-kick" and self.efds:
            self.fe.send(R.SET_VRING_KICK, m.VringFile(op["index"], False).pack(), [self.efds[-1]])
            self.stats.messages += 1
        self._drain()

    def _send(self, op: Op) -> None:
        payload = bytes.fromhex(op["payload"])
        fds = [self._fd(s) for s in op.get("fds", [])]
        size = op.get("size")
        if size is not None or op["flags"] & m.VERSION_MASK != m.VERSION:
            self.desynced = True
        hdr = m.HEADER.pack(
            op["req"] & 0xFFFFFFFF,
            op["flags"] & 0xFFFFFFFF,
            len(payload) if size is None else size & 0xFFFFFFFF,
        )
        try:
            self.fe.send_raw(hdr + payload, fds)
        except OSError:
            self.dead = True
            return
        self.stats.messages += 1

    def _tamper(self, op: Op) -> None:
        what = op["what"]
        i = op.get("i", 0)
        try:
            if what == "truncate":
                fd = self.memfds[i % len(self.memfds)]
                os.ftruncate(fd, op["size"])
            elif what == "shrink-busy":
                # polling kicks queued for both rings, then the shrink at once, unsynchronised:
                # it lands while the backend works through them, often inside one callback
                # (after the loop's size check, before a ring access: the SIGBUS guard's case)
                for k in range(16):
                    payload = m.VringFile(k % 2, True).pack().hex()
                    self._send({"op": "msg", "req": int(R.SET_VRING_KICK), "flags": _NR,
                                "payload": payload})  # fmt: skip
                    if self.dead:
                        return
                fd = self.memfds[i % len(self.memfds)]
                os.ftruncate(fd, op["size"])
            elif what == "scribble":
                off = op["off"] % MEM_SIZE
                data = bytes.fromhex(op["data"])[: MEM_SIZE - off]
                slot = self.mem.slots[0]
                if os.fstat(slot.fd).st_size >= MEM_SIZE:
                    slot.mm[off : off + len(data)] = data
            elif what in ("fill", "block", "kick", "close", "drain"):
                fd = self._efd(i)
                if fd is None:
                    return
                if what == "fill":
                    os.set_blocking(fd, False)
                    try:
                        os.eventfd_write(fd, U64 - 1)
                    except BlockingIOError:
                        pass
                elif what == "block":
                    os.set_blocking(fd, True)
                elif what == "kick":
                    os.set_blocking(fd, False)
                    try:
                        os.eventfd_write(fd, 1)
                    except BlockingIOError:
                        pass
                elif what == "drain":
                    os.set_blocking(fd, False)
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                else:  # close our copy: the backend's stays valid
                    self.efds.remove(fd)
                    os.close(fd)
        except OSError:
            pass

    def _burst(self, op: Op) -> None:
        rng = random.Random(op["seed"])
        base = bytes.fromhex(op["payload"])
        for _ in range(op["count"]):
            p = bytearray(base)
            for _ in range(rng.randint(0, 3) if p else 0):
                p[rng.randrange(len(p))] ^= rng.randint(1, 255)
            self._send({"op": "msg", "req": op["req"], "flags": _NR, "payload": p.hex()})
            if self.dead:
                return
            if rng.random() < 0.25:
                self._drain()

    def _sync(self) -> None:
        """GET_FEATURES and wait for its answer: everything sent before has been handled.
        No answer within the timeout leaves the verdict to the probe (a hang)."""
        self._drain()
        if self.desynced:
            return
        try:
            self.fe.send(R.GET_FEATURES)
            self.stats.messages += 1
            self.fe.recv(what="the GET_FEATURES answer of a sync").close_fds()
        except (OSError, ConnectionError, TimeoutError):
            self.dead = True

    def _drain(self) -> None:
        """Read whatever the backend sent (replies), never waiting."""
        while True:
            r, _, _ = select.select([self.fe.sock], [], [], 0)
            if not r:
                return
            msgs, stop = self.fe._reader.read()
            for msg in msgs:
                msg.close_fds()
            if stop is not None:
                self.dead = True
                return
            if not msgs:
                return

    def close(self) -> None:
        self.fe.close()
        self.mem.close()
        close_fds([fd for fd in self.memfds[1:]] + self.efds + self.others)
        self.memfds, self.efds, self.others = [], [], []


def run_ops(target: BackendTarget, ops: list[Op], name: str) -> str | None:
    """Replay one recorded case; the target's verdict."""
    s = Session(target.socket_path, target.stats)
    try:
        for op in ops:
            s.apply(op)
    finally:
        s.close()
    target.stats.cases += 1
    return target.check(name)


def replay_corpus(target: BackendTarget, corpus: Path = CORPUS) -> int:
    n = 0
    for path in sorted(corpus.glob("*.json")):
        verdict = run_ops(target, json.loads(path.read_text()), f"corpus {path.name}")
        if verdict is not None:
            target.stats.failures.append(f"corpus case {path.name}: {verdict}")
        n += 1
    return n


def write_seed_corpus(corpus: Path = CORPUS) -> list[Path]:
    """(Re)write the hand-made seed cases (:func:`issue_sequences`) into the corpus."""
    corpus.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ops in issue_sequences().items():
        path = corpus / f"{name}.json"
        path.write_text(json.dumps(ops, indent=1) + "\n")
        paths.append(path)
    return paths


def save_case(ops: list[Op], verdict: str, corpus: Path = CORPUS) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    path = corpus / f"{verdict}-{abs(hash(json.dumps(ops))) & 0xFFFFFFFF:08x}.json"
    path.write_text(json.dumps(ops, indent=0) + "\n")
    return path


# -- strategies -------------------------------------------------------------------------------
_requests = st.one_of(
    st.sampled_from([int(r) for r in R]),
    st.integers(0, 80),
    st.integers(0, 0xFFFFFFFF),
)
_flags = st.one_of(
    st.just(_NR),
    st.just(m.VERSION),
    st.sampled_from([m.VERSION | m.FLAG_REPLY, _NR | m.FLAG_REPLY, 0x1 | 0x10]),
    st.integers(0, 0xFFFFFFFF),
)
_u64 = st.one_of(
    st.integers(0, 0x10000),
    st.sampled_from([0, 1, 0xFFF, 0x1000, MEM_SIZE, MEM_SIZE - 1, U64, U64 - 0xFFF, 1 << 63]),
    st.integers(0, U64),
    st.integers(UADDR_BASE - 0x1000, UADDR_BASE + 2 * MEM_SIZE),
)
_fdspec = st.sampled_from(
    [
        "eventfd",
        "eventfd",
        "eventfd-blocking",
        "mem",
        "memfd:0x100000",
        "memfd:0",
        "memfd:0x1000,sealed",
        "socket",
        "pipe",
        "devnull",
    ]
)
_fds: st.SearchStrategy[list[str]] = st.one_of(
    st.just([]),
    st.lists(_fdspec, min_size=1, max_size=2),
    st.lists(_fdspec, min_size=9, max_size=12),
)


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    """A payload of a valid shape for some request, then mutated."""
    shape = draw(
        st.sampled_from(
            ["u64", "state", "addr", "memreg", "table", "iotlb", "config", "log", "random", "empty"]
        )
    )
    if shape == "u64":
        p = m.pack_u64(draw(_u64))
    elif shape == "state":
        p = m.VringState(draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFFFFFF))).pack()
    elif shape == "addr":
        p = m.VringAddr(
            draw(st.integers(0, 300)),
            draw(st.integers(0, 3)),
            draw(_u64),
            draw(_u64),
            draw(_u64),
            draw(_u64),
        ).pack()
    elif shape == "memreg":
        p = m.pack_mem_reg(m.MemRegion(draw(_u64), draw(_u64), draw(_u64), draw(_u64)))
    elif shape == "table":
        regions = draw(st.lists(st.builds(m.MemRegion, _u64, _u64, _u64, _u64), max_size=9))
        p = m.MEMORY_HEADER.pack(
            len(regions) if draw(st.booleans()) else draw(st.integers(0, 0xFFFFFFFF)), 0
        )
        p += b"".join(
            m.MEM_REGION.pack(r.gpa & U64, r.size & U64, r.uaddr & U64, r.mmap_offset & U64)
            for r in regions
        )
    elif shape == "iotlb":
        p = m.IOTLB.pack(
            draw(_u64), draw(_u64), draw(_u64), draw(st.integers(0, 255)), draw(st.integers(0, 255))
        )
    elif shape == "config":
        size = draw(st.integers(0, 300))
        p = m.CONFIG_HEADER.pack(draw(st.integers(0, 0xFFFFFFFF)), size, draw(st.integers(0, 3)))
        p += bytes(min(size, 300))
    elif shape == "log":
        p = m.LOG.pack(draw(_u64), draw(_u64))
    elif shape == "random":
        p = draw(st.binary(max_size=300))
    else:
        p = b""
    mutation = draw(st.sampled_from(["keep", "keep", "truncate", "extend", "flip"]))
    if mutation == "truncate" and p:
        p = p[: draw(st.integers(0, len(p) - 1))]
    elif mutation == "extend":
        p += draw(st.binary(min_size=1, max_size=64))
    elif mutation == "flip" and p:
        k = draw(st.integers(0, len(p) - 1))
        p = p[:k] + bytes([p[k] ^ draw(st.integers(1, 255))]) + p[k + 1 :]
    return p


# -- the state machine ------------------------------------------------------------------------
class VhostUserMachine(RuleBasedStateMachine):
    """One case = one run of this machine = one connection. ``target`` is set by the runner."""

    target: BackendTarget
    on_case: Callable[[list[Op], str | None], None] = staticmethod(lambda ops, verdict: None)

    def __init__(self) -> None:
        super().__init__()
        self.s = Session(self.target.socket_path, self.target.stats)
        self.pos = 0

    @initialize(n=st.integers(0, len(PREFIX)))
    def handshake(self, n: int) -> None:
        """A valid prefix of QEMU's sequence, of random length."""
        for op in PREFIX[:n]:
            self.s.apply(op)
        self.pos = n

    @precondition(lambda self: self.pos < len(PREFIX))
    @rule()
    def next_valid_step(self) -> None:
        self.s.apply(PREFIX[self.pos])
        self.pos += 1

    @rule(req=_requests, flags=_flags, payload=_payload(), fds=_fds)
    def mutated(self, req: int, flags: int, payload: bytes, fds: list[str]) -> None:
        self.s.apply(
            {"op": "msg", "req": req, "flags": flags, "payload": payload.hex(), "fds": fds}
        )

    @rule(req=st.sampled_from([int(r) for r in R]), payload=_payload(), fds=_fds)
    def need_reply(self, req: int, payload: bytes, fds: list[str]) -> None:
        self.s.apply({"op": "msg", "req": req, "flags": _NR, "payload": payload.hex(), "fds": fds})

    @rule(
        req=st.sampled_from([int(r) for r in R]),
        payload=_payload(),
        count=st.integers(2, 256),
        seed=st.integers(0, 2**32 - 1),
    )
    def burst(self, req: int, payload: bytes, count: int, seed: int) -> None:
        """A flood of one request, NEED_REPLY on each: hypothesis picks the request, the base
        payload and a seed; each copy gets a few bytes flipped by a PRNG on that seed (cheap
        variety: drawing every message through hypothesis costs ~100x more than sending it)."""
        self.s.apply(
            {"op": "burst", "req": req, "payload": payload.hex(), "count": count, "seed": seed}
        )

    @rule(
        regions=st.lists(st.tuples(_u64, _u64, _u64, _u64), min_size=1, max_size=9),
        fds=st.lists(
            st.sampled_from(
                [
                    "mem",
                    "memfd:0x100000",
                    "memfd:0x1000",
                    "memfd:0",
                    "memfd:0x100000,sealed",
                    "eventfd",
                ]
            ),
            max_size=9,
        ),
        add=st.booleans(),
    )
    def memory(self, regions: list[tuple[int, int, int, int]], fds: list[str], add: bool) -> None:
        """Regions that overlap, overflow, lie about offsets; fds too few, too many, wrong."""
        if add:
            g, s, u, o = regions[0]
            payload = m.pack_mem_reg(m.MemRegion(g, s, u, o))
            self.s.apply(
                _msg(R.ADD_MEM_REG if len(regions) % 3 else R.REM_MEM_REG, payload, fds[:1])
            )
        else:
            table = [m.MemRegion(g, s, u, o) for g, s, u, o in regions]
            self.s.apply(_msg(R.SET_MEM_TABLE, m.pack_mem_table(table), fds))

    @rule(
        req=st.sampled_from(
            [
                R.SET_VRING_NUM,
                R.SET_VRING_BASE,
                R.GET_VRING_BASE,
                R.SET_VRING_ENABLE,
                R.SET_VRING_ADDR,
            ]
        ),
        index=st.one_of(st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
        num=st.one_of(
            st.sampled_from([0, 1, 2, 3, 256, 257, 1024, 32768, 0xFFFF, 0x10000]),
            st.integers(0, 0xFFFFFFFF),
        ),
        addr=st.tuples(_u64, _u64, _u64),
    )
    def vring(self, req: R, index: int, num: int, addr: tuple[int, int, int]) -> None:
        if req is R.SET_VRING_ADDR:
            payload = m.VringAddr(index, num & 1, addr[0], addr[1], addr[2], 0).pack()
        else:
            payload = m.VringState(index, num).pack()
        self.s.apply(_msg(req, payload))

    @rule(
        req=st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
        value=st.one_of(st.integers(0, 3), st.integers(0x100, 0x103), _u64),
        fds=st.one_of(st.just(["eventfd"]), st.just(["eventfd-blocking"]), _fds),
    )
    def vring_file(self, req: R, value: int, fds: list[str]) -> None:
        self.s.apply(_msg(req, m.pack_u64(value), fds))

    @rule(
        iova=_u64,
        size=_u64,
        uaddr=_u64,
        perm=st.integers(0, 255),
        typ=st.integers(0, 255),
        cut=st.integers(0, 40),
    )
    def iotlb(self, iova: int, size: int, uaddr: int, perm: int, typ: int, cut: int) -> None:
        payload = m.IOTLB.pack(iova, size, uaddr, perm, typ)
        if cut:
            payload = payload[:cut]
        self.s.apply(_msg(R.IOTLB_MSG, payload))

    @rule(size=st.integers(1, 4096), lie=st.integers(0, 5000))
    def size_lies(self, size: int, lie: int) -> None:
        """A header whose size is not what follows (the stream then desynchronises)."""
        self.s.apply(
            {
                "op": "msg",
                "req": int(R.GET_FEATURES),
                "flags": _NR,
                "payload": bytes(size % 64).hex(),
                "fds": [],
                "size": lie,
            }
        )

    @rule(
        what=st.sampled_from(
            [
                "truncate",
                "shrink-busy",
                "fill",
                "block",
                "kick",
                "close",
                "drain",
                "scribble",
                "kick",
                "scribble",
            ]
        ),
        i=st.integers(0, 20),
        size=st.sampled_from([0, 0x1000, RING, MEM_SIZE // 2, 2 * MEM_SIZE]),
        off=st.one_of(st.integers(RING, RING + 0x8000), st.integers(0, MEM_SIZE)),
        data=st.binary(min_size=1, max_size=64),
    )
    def tamper(self, what: str, i: int, size: int, off: int, data: bytes) -> None:
        """The front-end changes what it handed over after handing it over."""
        self.s.apply(
            {"op": "tamper", "what": what, "i": i, "size": size, "off": off, "data": data.hex()}
        )

    @rule()
    def sync(self) -> None:
        """A round trip: what was sent so far has been handled (so tampering comes after)."""
        self.s.apply({"op": "sync"})

    def teardown(self) -> None:
        self.s.close()
        stats = self.target.stats
        stats.cases += 1
        verdict = self.target.check(f"case {stats.cases}")
        type(self).on_case(self.s.ops, verdict)


def run(
    max_messages: int,
    max_seconds: float,
    *,
    ci: bool = False,
    strict: bool = False,
    chunk: int = 100,
    corpus: Path = CORPUS,
    progress: Callable[[str], None] | None = None,
) -> FuzzStats:
    """Replay the corpus, then fuzz until ``max_messages`` were sent or ``max_seconds`` passed
    (checked between chunks of ``chunk`` cases). ``strict``: the first crash / hang / fd leak
    fails (hypothesis then shrinks it); otherwise it is saved to the corpus and counted."""
    stats = FuzzStats("vhost-user")
    target = BackendTarget(stats)
    try:
        replay_corpus(target, corpus)

        def on_case(ops: list[Op], verdict: str | None) -> None:
            if verdict is None:
                return
            path = save_case(ops, verdict, corpus)
            stats.failures.append(f"{verdict}: saved {path}")
            if strict:
                raise AssertionError(f"backend {verdict} (case saved to {path})")

        VhostUserMachine.target = target
        VhostUserMachine.on_case = staticmethod(on_case)
        while stats.messages < max_messages and stats.wall_s < max_seconds:
            run_state_machine_as_test(VhostUserMachine, settings=fuzz_settings(chunk, ci=ci))
            if progress is not None:
                progress(stats.report())
            if ci:
                break  # a derandomized run repeats itself: one chunk is the slice
        return stats
    finally:
        target.close(keep=bool(stats.crashes or stats.hangs))
