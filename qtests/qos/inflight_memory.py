"""Memory changes that meet work in progress: the scenarios of issue 15, item 1.

Each scenario is a plain function on a started `Testbed` of either transport (vhost-user, or
vhost-vdpa through VDUSE in the lane) that raises AssertionError naming the first broken
invariant. What differs per transport is only how a memory change reaches the device and how
a ring in removed memory fails; those differences are small functions of their own
(`memory_messages`, `expect_vdpa_diff`, `ring_unreachable`).

"Untouched" is shown from outside the backend's own report: `memfd_mappings` reads
``/proc/PID/maps`` of the backend process, where the mmap of every memory-table region appears
as a ``/memfd:...`` line with its inode and file offset. A region the backend kept must keep its
host address (same inode, same offset, same start); a removed one must be gone; a backend that
unmapped and mapped everything again (faults ``remap-all``, ``mem-table-full-replace``) moves
them, one that ignores REM_MEM_REG (``ignore-rem-mem-reg``) keeps the removed one.

What the device must do when REM_MEM_REG removes memory that chains it holds point into
(`rem_with_held_chains`): the vhost-user spec describes REM_MEM_REG's region as one "which
the back-end device must unmap" (docs/interop/vhost-user.rst), so nothing may reach it after
the reply; the virtio spec gives a buffer to the device from the moment it is made available
until the device marks it used (virtio 1.2, 2.7: the driver does not touch it meanwhile), so
the device owns the chain's completion, not the memory behind it. QEMU does not check either: with CONFIGURE_MEM_SLOTS it
sends REM_MEM_REG as soon as the OSPM ejects the DIMM, without stopping the rings (observed:
no GET_VRING_BASE, no SET_VRING_ADDR). A real guest kernel would not offline pages that are
pinned for DMA, so this is the driver's bug, and the device must survive it: complete the held
chains (their used entries live in the ring, in kept memory) with what it had already read,
never touch the removed pages again (the mmap is gone: /proc/PID/maps), keep every other
mapping where it was, and serve a new DIMM plugged at the same guest-physical address through
a fresh translation.

Over vhost-vdpa the same unplug takes another road, with the same duty for the device. QEMU's
vhost-vdpa memory listener (hw/virtio/vhost-vdpa.c ``vhost_vdpa_listener_region_del``) sends
``VHOST_IOTLB_INVALIDATE`` for the DIMM's range inside an IOTLB batch (``BATCH_BEGIN`` once,
``BATCH_END`` at the listener's commit); nothing stops the rings. The kernel's vhost-vdpa
(drivers/vhost/vdpa.c ``vhost_vdpa_process_iotlb_msg``) drops the range from its IOTLB and, at
``BATCH_END``, calls the bus op ``set_map`` with the whole table; VDUSE
(drivers/vdpa/vdpa_user/vduse_dev.c ``vduse_vdpa_set_map``) installs it in its domain and sends
the device ``VDUSE_UPDATE_IOTLB [0, ULLONG_MAX]``, waiting for the answer (``vduse_dev_msg_sync``,
30 s default timeout, after which the device is marked broken). VDUSE is a VA device
(``use_va``): the kernel pins nothing and revokes nothing -- the fd the device got from
``VDUSE_IOTLB_GET_FD`` and its mmap stay valid after the entry is gone, so "never touch the
removed memory again" is entirely the device's job (its set_map diff unmaps the DIMM's entry;
/proc/PID/maps shows it). The held chains complete into the used ring, which lives in kept
memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .acpi_memhp import AcpiMemoryHotplug
from .alloc import GuestAllocator
from .frames import make_frame
from .memory_devices import DimmHotplug, MemoryDevice, PlacementAllocator
from .testbed import Testbed
from .virtio_net import NET_HDR_SIZE, VirtioNetDriver, VirtioNetHdr
from .waiting import WaitTimeout, poll_until

MiB = 1 << 20
DIMM_SIZE = 64 * MiB
TX_VQ = 1
STREAM = 0x15  # frames of these scenarios carry this stream id
SENTINEL_STREAM = 0x5E
VDPA = "vhost-vdpa"
#: vhost-user requests that carry a memory change, and those that stop or re-program a ring.
MEM_REQUESTS = ("ADD_MEM_REG", "REM_MEM_REG", "SET_MEM_TABLE")
RING_REQUESTS = ("GET_VRING_BASE", "SET_VRING_BASE", "SET_VRING_ADDR")


@dataclass(frozen=True, slots=True)
class Mapping:
    """One memfd mapping line of /proc/PID/maps."""

    start: int
    end: int
    offset: int
    inode: int

    @property
    def size(self) -> int:
        return self.end - self.start


def memfd_mappings(pid: int) -> dict[tuple[int, int], Mapping]:
    """The shared-memory (memfd) mappings of process ``pid``: (inode, file offset) -> mapping."""
    out: dict[tuple[int, int], Mapping] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/memfd:"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        m = Mapping(lo, hi, int(parts[2], 16), int(parts[4]))
        out[(m.inode, m.offset)] = m
    return out


def backend_mappings(tb: Testbed) -> dict[tuple[int, int], Mapping]:
    assert tb.backend is not None and tb.backend.pid is not None
    return memfd_mappings(tb.backend.pid)


def check_kept(
    before: dict[tuple[int, int], Mapping],
    after: dict[tuple[int, int], Mapping],
    what: str,
    *,
    gone: set[int] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Every mapping of ``before`` whose inode is not in ``gone`` is in ``after`` at the same
    host address; no mapping of an inode in ``gone`` is left."""
    moved = [
        f"inode {k[0]} offset {k[1]:#x}: {m.start:#x} -> {after[k].start:#x}"
        if k in after
        else f"inode {k[0]} offset {k[1]:#x}: unmapped"
        for k, m in before.items()
        if k[0] not in gone and (k not in after or after[k] != m)
    ]
    assert not moved, f"{what}: kept memory moved in the backend's address space: {moved}"
    left = [m for k, m in after.items() if k[0] in gone]
    assert not left, f"{what}: the removed region is still mapped in the backend: {left}"


def hotplug_for(tb: Testbed) -> DimmHotplug:
    assert tb.machine is not None
    return DimmHotplug(tb.qmp, AcpiMemoryHotplug(tb.machine.qtest, tb.machine.slots))


# ---------------------------------------------------------------------------- transports
def memory_messages(tb: Testbed, since: int) -> tuple[list[str], list[str]]:
    """What reached the device since journal mark ``since``: (memory-change messages, messages
    that stop, reset or re-program a ring). vhost-user: ADD/REM_MEM_REG or SET_MEM_TABLE, and
    GET/SET_VRING_BASE, SET_VRING_ADDR. vhost-vdpa: VDUSE's UPDATE_IOTLB, and every other
    VDUSE message (SET_STATUS: a reset; GET_VQ_STATE: a ring stop)."""
    assert tb.backend is not None
    b = tb.backend
    if tb.transport == VDPA:
        types = [m["type"] for m in b.journal(["vduse.msg"], since)]
        return [t for t in types if t == "UPDATE_IOTLB"], [t for t in types if t != "UPDATE_IOTLB"]
    requests = [e["request"] for e in b.journal(["vhost.msg"], since)]
    return [r for r in requests if r in MEM_REQUESTS], [r for r in requests if r in RING_REQUESTS]


def expect_vdpa_diff(tb: Testbed, since: int, what: str, *, mapped: list[tuple[int, int]],
                     unmapped: list[tuple[int, int]]) -> None:  # fmt: skip
    """vhost-vdpa only: every UPDATE_IOTLB since ``since`` succeeded and the set_map diffs the
    device applied mapped exactly ``mapped`` and unmapped exactly ``unmapped`` ((iova, size),
    guest-physical here: no vIOMMU). VDUSE announces every change as UPDATE_IOTLB of the whole
    range (``vduse_vdpa_set_map``: ``vduse_dev_update_iotlb(dev, 0ULL, ULLONG_MAX)``), so a
    device that re-maps everything, or fetches nothing, shows here."""
    assert tb.backend is not None
    b = tb.backend
    updates = [m for m in b.journal(["vduse.msg"], since) if m["type"] == "UPDATE_IOTLB"]
    assert updates, f"{what}: no UPDATE_IOTLB reached the device"
    assert all(m["result"] == "ok" for m in updates), f"{what}: UPDATE_IOTLB failed: {updates}"
    maps = [(e["iova"], e["size"]) for e in b.journal(["dma.map"], since)]
    unmaps = [(e["iova"], e["size"]) for e in b.journal(["dma.unmap"], since)]
    assert (maps, unmaps) == (mapped, unmapped), (
        f"{what}: the set_map diffs mapped {_ranges(maps)} and unmapped {_ranges(unmaps)}, "
        f"expected {_ranges(mapped)} / {_ranges(unmapped)} ({len(updates)} UPDATE_IOTLB)"
    )


def _ranges(keys: list[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{a:#x}+{n:#x}" for a, n in keys) + "]"


def expect_memory_change(
    tb: Testbed, since: int, what: str, *, vhost_user: tuple[str, ...], key: tuple[int, int],
    plug: bool,
) -> None:  # fmt: skip
    """The change since ``since`` reached the device as a memory change (vhost-user: one of
    ``vhost_user``; vhost-vdpa: UPDATE_IOTLB whose diff is exactly the DIMM ``key``) and
    nothing stopped, reset or re-programmed a ring."""
    mem, stops = memory_messages(tb, since)
    if tb.transport == VDPA:
        assert mem, f"{what}: no UPDATE_IOTLB reached the device"
        expect_vdpa_diff(
            tb, since, what, mapped=[key] if plug else [], unmapped=[] if plug else [key]
        )
    else:
        assert set(vhost_user) & set(mem), f"{what}: no memory message for the change: {mem}"
    assert not stops, f"{what}: QEMU stopped, reset or re-programmed the rings: {stops}"


def dimm_key(tb: Testbed, dev: MemoryDevice) -> tuple[int, int]:
    """The (IOVA, size) under which the DIMM ``dev`` reaches the device: its guest-physical
    address (vhost-user; vhost-vdpa without a vIOMMU and without shadow virtqueues), or under
    ``x-svq=on`` an IOVA QEMU allocated. With shadow virtqueues QEMU's vhost-vdpa memory
    listener (hw/virtio/vhost-vdpa.c ``vhost_vdpa_listener_region_add``) takes an IOVA for
    the section's host address from its own IOVA tree (``vhost_iova_tree_map_alloc``) and
    ``region_del`` finds it again by host address: the device never sees GPAs. That IOVA is
    read from the device's IOTLB: the one entry of the DIMM's size (no RAM section or shadow
    ring of the test machines has it). Call it while the DIMM is mapped."""
    if tb.transport != VDPA or not tb.netdev_props.get("x-svq"):
        return (dev.addr, dev.size)
    assert tb.backend is not None
    entries = [m for m in tb.backend.cmd("query-iotlb")["mappings"] if m["size"] == dev.size]
    assert len(entries) == 1, (
        f"{dev.id}: expected one IOTLB entry of {dev.size:#x} bytes in the device, found "
        f"{[(hex(m['iova']), hex(m['size'])) for m in entries]}"
    )
    return (int(entries[0]["iova"]), dev.size)


def ring_unreachable(tb: Testbed, since: int, ring: tuple[int, int], what: str) -> None:
    """A kicked queue whose ring lives in [ring[0], ring[0]+ring[1]), memory the device no
    longer maps, fails cleanly and the backend stays alive.

    vhost-user: a translation error naming the ring, NEEDS_RESET in the device status.
    vhost-vdpa: the device finds the ring's address in no IOTLB entry; VDUSE has no message to
    ask the kernel or QEMU for one (no MISS: the only device-side query is
    ``VDUSE_IOTLB_GET_FD``, which answers EINVAL for an address no entry covers), so the error
    says so and the queue waits for the next UPDATE_IOTLB or a reset (the device cannot raise
    NEEDS_RESET either: ``vduse_vdpa_get_status`` returns the kernel's copy of the status,
    which only the driver writes)."""
    assert tb.backend is not None
    b = tb.backend
    lo, size = ring
    if tb.transport == VDPA:

        def naming() -> list[dict[str, Any]]:
            return [
                e for e in b.journal(["error."], since) if lo <= int(e.get("iova", -1)) < lo + size
            ]

        try:
            errors = poll_until(naming, 10.0, f"{what}: an error for an IOVA in the ring memory")
        except WaitTimeout as e:
            raise AssertionError(f"{what}: {e}; errors: {b.journal(['error.'], since)}") from e
        err = errors[0]
        assert (err["kind"], err.get("op")) == ("error.vduse", "iotlb_miss"), f"{what}: {err}"
        assert "not in the VDUSE IOTLB" in str(err["detail"]), f"{what}: {err}"
    else:
        errors = poll_until(
            lambda: b.journal(["error."], since) or [],
            5.0,
            "the backend's error for a ring in removed memory",
        )
        assert any("ring" in str(e.get("error", "")) for e in errors), errors
        status = b.cmd("query-status")
        assert "NEEDS_RESET" in status["status_names"], status
    assert b.running, f"{what}: the backend died"


class Frames:
    """Numbered frames of one stream, and the sentinel that closes a check."""

    def __init__(self, stream: int = STREAM) -> None:
        self.stream = stream
        self.seq = 0
        self.sentinels = 0

    def next(self, size: int = 0) -> bytes:
        self.seq += 1
        return make_frame(self.seq, size or 80 + 53 * (self.seq % 23), stream=self.stream)

    def sentinel(self) -> bytes:
        self.sentinels += 1
        return make_frame(self.sentinels, 64, stream=SENTINEL_STREAM)


def is_rarp(frame: bytes) -> bool:
    """A RARP announce (ethertype 0x8035), as a backend sends after a migration."""
    return frame[12:14] == b"\x80\x35"


def tx_until_sentinel(
    tb: Testbed,
    expected: list[bytes],
    frames: Frames,
    what: str,
    timeout: float = 10.0,
    *,
    rarps: bool = False,
) -> None:
    """Send a sentinel frame after ``expected`` and read the wire up to it: what arrived
    before it must be exactly ``expected`` (no loss, no duplicate, no reordering) - no
    silence window decides it. ``rarps``: RARP announces may come in between."""
    s = frames.sentinel()
    tb.net.send(s)
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        f = tb.peer.recv(max(deadline - time.monotonic(), 0.01))
        if f == s:
            break
        if not (rarps and is_rarp(f)):
            got.append(f)
    assert got == expected, (
        f"{what}: the wire carried {len(got)} frames before the sentinel, expected "
        f"{len(expected)}; first difference at {first_difference(got, expected)}"
    )


def first_difference(got: list[bytes], want: list[bytes]) -> int:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return min(len(got), len(want))


def stage_tx_at(net: VirtioNetDriver, addrs: list[int], frames: list[bytes]) -> None:
    """One TX chain per frame, each frame at the given guest-physical address; kicked."""
    vq = net.txq[0]
    writes = []
    for addr, f in zip(addrs, frames, strict=True):
        data = VirtioNetHdr().pack() + f
        writes.append((addr, data))
        vq.add([(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, len(f))], (), ("staged", addr))
    net.qt.write_many(writes)
    vq.kick()


def wait_tx_used(tb: Testbed, count: int, what: str, since: int, timeout: float = 5.0) -> None:
    """Wait until ``count`` staged TX chains are used (their buffers are the test's); an
    error the backend journalled since journal mark ``since`` fails at once, naming it."""
    assert tb.backend is not None
    b, vq = tb.backend, tb.net.txq[0]
    mark = since

    def done() -> bool:
        errors = b.journal(["error."], mark)
        if errors:
            raise AssertionError(f"{what}: the backend failed: {errors[0]}")
        return vq.pending_used() >= count

    try:
        poll_until(done, timeout, f"{what}: {count} TX chains used")
    except WaitTimeout as e:
        raise AssertionError(f"{what}: {e}") from e
    used = vq.get_used()
    assert len(used) == count, f"{what}: {len(used)} TX chains used, expected {count}"


# ---------------------------------------------------------------------------- scenarios
def rem_with_held_chains(tb: Testbed, held_in_dimm: int = 3, held_in_kept: int = 3) -> None:
    """REM_MEM_REG while the device holds TX chains popped from the removed DIMM (and others
    from kept base RAM); then a new DIMM at the same guest-physical address.

    1. plug a DIMM: one new memfd mapping, every other mapping keeps its host address;
    2. hold TX (monitor ``hold-tx``: chains popped, frames read, not completed); stage chains
       with buffers in the DIMM and in base RAM; the device holds them all;
    3. unplug the DIMM (OSPM eject -> REM_MEM_REG): no ring stop, the DIMM's mapping is gone
       from the backend, every kept mapping is where it was;
    4. release the hold: every held chain completes and its frame reaches the wire byte-exact,
       exactly once, in order (sentinel);
    5. plug a new DIMM (QEMU puts it at the same address): TX from it and RX into it, byte-exact
       (a translation remembered from the first DIMM would reach the closed region).
    """
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    b, net = tb.backend, tb.net
    frames = Frames()
    dimms = hotplug_for(tb)
    m0 = backend_mappings(tb)
    assert m0, "no memfd mapping in the backend's /proc/PID/maps"

    mark = b.mark()
    dev = dimms.plug(DIMM_SIZE)
    m1 = backend_mappings(tb)
    check_kept(m0, m1, "after the plug")
    new = {k[0] for k in m1} - {k[0] for k in m0}
    assert len(new) == 1 and sum(m.size for k, m in m1.items() if k[0] in new) == DIMM_SIZE, (
        f"the plug should add one {DIMM_SIZE:#x}-byte memfd mapping, added "
        f"{[m for k, m in m1.items() if k[0] in new]}"
    )
    if tb.transport == VDPA:
        expect_vdpa_diff(tb, mark, "the plug", mapped=[(dev.addr, dev.size)], unmapped=[])
    dimm_alloc = GuestAllocator()
    dimm_alloc.add_range(dev.addr, dev.size, "dimm")

    # -- chains held by the device: some in the DIMM, some in kept memory
    b.cmd("hold-tx", enable=True)
    held = [frames.next() for _ in range(held_in_dimm + held_in_kept)]
    addrs = [dimm_alloc.alloc(2048, tag="held tx") for _ in range(held_in_dimm)]
    addrs += [tb.alloc.alloc(2048, tag="held tx") for _ in range(held_in_kept)]
    used_before = net.txq[0].device_used_idx()
    stage_tx_at(net, addrs, held)
    poll_until(
        lambda: b.cmd("query-wire")["tx_held"] == len(held),
        5.0,
        f"the device holding {len(held)} popped TX chains",
        detail=lambda: f"held {b.cmd('query-wire')['tx_held']}",
    )

    # -- the DIMM goes while the device holds chains popped from it
    unplug_mark = b.mark()
    dimms.unplug(dev.id)
    assert b.running, "the backend died on REM_MEM_REG with chains held"
    check_kept(m1, backend_mappings(tb), "after REM_MEM_REG with chains held", gone=new)
    # REM_MEM_REG, or (without CONFIGURE_MEM_SLOTS) a whole table the backend diffs; over
    # vhost-vdpa an UPDATE_IOTLB whose diff unmaps exactly the DIMM
    expect_memory_change(
        tb, unplug_mark, "the unplug with chains held",
        vhost_user=("REM_MEM_REG", "SET_MEM_TABLE"), key=(dev.addr, dev.size), plug=False,
    )  # fmt: skip
    assert net.txq[0].device_used_idx() == used_before, (
        "the device completed held chains before the hold was released"
    )

    # -- released: every held chain completes, byte-exact, once
    b.cmd("hold-tx", enable=False)
    wait_tx_used(tb, len(held), "held chains after the REM_MEM_REG", mark)
    tx_until_sentinel(tb, held, frames, "held TX chains across REM_MEM_REG")
    for a in addrs[held_in_dimm:]:
        tb.alloc.free(a)

    # -- a new DIMM at the same address: fresh translations only
    dev2 = dimms.plug(DIMM_SIZE)
    assert dev2.addr == dev.addr, f"QEMU placed the second DIMM at {dev2.addr:#x}"
    m3 = backend_mappings(tb)
    check_kept(m0, m3, "after the second plug")
    again = [frames.next() for _ in range(held_in_dimm)]
    since = b.mark()
    stage_tx_at(net, addrs[:held_in_dimm], again)  # the very addresses of the first DIMM
    wait_tx_used(tb, len(again), "TX from the re-plugged DIMM", since)
    tx_until_sentinel(tb, again, frames, "TX from the re-plugged DIMM")
    rx_in_dimm(tb, addrs[0], frames.next(1000), "RX into the re-plugged DIMM")
    dimms.unplug(dev2.id)
    assert b.running and not b.journal(["error."], mark), b.journal(["error."], mark)


def rx_in_dimm(tb: Testbed, addr: int, frame: bytes, what: str) -> None:
    """Post one RX buffer at ``addr`` (the only one the device may use next) and check the
    frame lands there byte-exact."""
    net = tb.net
    vq = net.rxq[0]
    assert tb.machine is not None
    hdr = NET_HDR_SIZE
    before = vq.pending_used()
    assert before == 0, f"{what}: RX used entries pending before the test: {before}"
    tb.machine.qtest.memset(addr, 2048, 0)
    vq.add((), [(addr, 2048)], ("dimm rx", addr))
    vq.kick()
    tb.peer.send(frame)
    (u,) = vq.wait_used(1, 5.0)
    assert u.token == ("dimm rx", addr), f"{what}: the device used {u}"
    got = tb.machine.qtest.read(addr + hdr, len(frame))
    assert u.length == hdr + len(frame) and got == frame, (
        f"{what}: {u.length} bytes used, frame {'intact' if got == frame else 'differs'}"
    )


def plug_mid_stream(tb: Testbed, rounds: int = 12, burst: int = 4) -> None:
    """A DIMM plugged while a continuous TX and RX stream runs (the backend is never paused):
    QMP object-add + device_add from a second thread while the driver keeps transmitting and
    receiving. ADD_MEM_REG must land between frames of the stream, every frame arrives exactly
    once byte-exact in order both ways, and every mapping the backend had stays at its host
    address. With several queue pairs active, every pair transmits its own stream (checked
    per stream: the order between queues is not defined)."""
    assert tb.backend is not None and tb.machine is not None
    b, net = tb.backend, tb.net
    pairs = range(max(net.active_pairs, 1))
    tx_frames = [Frames(stream=STREAM + 2 + k) for k in pairs]
    frames = Frames()
    rx_frames = Frames(stream=STREAM + 1)
    m0 = backend_mappings(tb)
    mark = b.mark()
    qmp = tb.qmp
    plugged: list[MemoryDevice] = []
    errors: list[BaseException] = []

    def plug() -> None:
        try:
            qmp.command(
                "object-add",
                {"qom-type": "memory-backend-memfd", "id": "mid-mem", "size": DIMM_SIZE,
                 "share": True},
            )  # fmt: skip
            qmp.command("device_add", driver="pc-dimm", id="mid", memdev="mid-mem")
            plugged.append(DimmHotplug(qmp).device("mid"))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    sent_tx: dict[int, list[bytes]] = {k: [] for k in pairs}
    got_tx: list[tuple[int, bytes]] = []  # (monotonic ns on arrival, frame)
    sent_rx: list[bytes] = []
    got_rx: list[bytes] = []
    plugger = threading.Thread(target=plug, name="dimm plug")
    for r in range(rounds):
        if r == rounds // 3:
            plugger.start()
        rx = [rx_frames.next() for _ in range(burst)]
        for k in pairs:
            tx = [tx_frames[k].next() for _ in range(burst)]
            net.send_burst(tx, k, wait=False)
            sent_tx[k] += tx
        for f in rx:
            tb.peer.send(f)
        sent_rx += rx
        for _ in range(burst * len(pairs)):
            got_tx.append((time.monotonic_ns(), tb.peer.recv(5.0)))
        for _ in rx:
            got_rx.append(net.recv_any(5.0).data)
        for k in pairs:
            net.wait_tx(k, 5.0)
        if r == rounds - 3:
            plugger.join(10.0)
            assert not plugger.is_alive(), "the DIMM plug thread hangs"
    assert not errors, f"the plug failed: {errors[0]!r}"
    for k in pairs:
        mine = [f for _, f in got_tx if f in set(sent_tx[k])]
        assert mine == sent_tx[k], f"the TX stream of pair {k} across the plug is not exact"
    assert len(got_tx) == sum(map(len, sent_tx.values())), "TX frames doubled or foreign"
    assert got_rx == sent_rx, "the RX stream across the plug is not exact"
    for k in pairs:
        s = frames.sentinel()
        net.send(s, k)
        late = tb.peer.recv_until(s)
        assert not late, f"pair {k}: {len(late)} frames after the TX stream (doubled?)"
    check_kept(m0, backend_mappings(tb), "after the plug mid-stream")
    adds = b.journal(["mem.add"], mark)
    assert len(adds) == 1, f"expected one mem.add for the plug, got {adds}"
    at = adds[0]["mono_ns"]
    before = sum(1 for t, _ in got_tx if t < at)
    assert 0 < before < len(got_tx), (
        f"the plug did not land inside the stream: {before} of {len(got_tx)} TX frames "
        "arrived before the backend's mem.add"
    )
    assert len(plugged) == 1, plugged
    expect_memory_change(
        tb, mark, "the plug mid-stream", vhost_user=("ADD_MEM_REG", "SET_MEM_TABLE"),
        key=(plugged[0].addr, plugged[0].size), plug=True,
    )  # fmt: skip
    assert not b.journal(["vq.stop", "device.suspend"], mark), "the device was paused"


def unplug_live_rings(tb: Testbed) -> None:
    """The DIMM that holds live rings is ejected: who stops it?

    Observed with QEMU 10 (qtest OSPM ejecting regardless): QEMU does not refuse and does not
    stop the rings - device_del completes and the backend gets REM_MEM_REG while both rings
    live in the DIMM (no GET_VRING_BASE). Over vhost-vdpa the same: the listener's
    region_del unmaps the DIMM (UPDATE_IOTLB whose diff removes it), no SET_STATUS, no
    GET_VQ_STATE; QEMU's vhost_commit ring check (``vhost_verify_ring_mappings``) only
    compares rings with regions that are still there, so a ring in a removed region passes. Protecting the rings is the guest's job: a Linux
    guest cannot offline the pages of a live ring (unmovable kernel memory), so it never
    ejects such a DIMM; a driver that wants the DIMM gone moves its rings first (a reset and
    re-init elsewhere, `plug_unplug_scenario` of test_memory_hotplug). What the backend must
    do when it happens anyway: unmap the region (/proc/PID/maps), never touch it again, fail
    the ring cleanly on its next use (journal error, NEEDS_RESET) and stay alive; a driver
    reset with rings in kept memory brings traffic back.
    """
    assert tb.backend is not None and tb.machine is not None
    b = tb.backend
    dimms = hotplug_for(tb)
    dev = dimms.plug(DIMM_SIZE)
    ranges = tb.machine.make_allocator().ranges()
    alloc = PlacementAllocator(ranges, [(lambda tag: True, "dimm")])
    alloc.add_range(dev.addr, dev.size, "dimm")
    assert tb.bus is not None
    tb.net.close()
    net = VirtioNetDriver.find(tb.bus, alloc)
    net.init()
    # after the driver's reset: vhost-vdpa unmaps everything when the device stops and maps
    # it again at the restart (hw/virtio/vhost-vdpa.c: the listener goes with dev_start)
    m0 = backend_mappings(tb)
    gone = {k[0] for k, m in m0.items() if m.size == DIMM_SIZE}
    for vr in b.vrings()[:2]:
        assert dev.addr <= vr["desc"] < dev.addr + dev.size, f"ring not in the DIMM: {vr}"
    frames = Frames()
    f = frames.next()
    net.send(f)
    assert tb.peer.recv() == f, "TX with rings in the DIMM"
    mark = b.mark()
    dimms.unplug(dev.id)  # the qtest OSPM ejects although the rings live there
    check_kept(m0, backend_mappings(tb), "after ejecting the DIMM with live rings", gone=gone)
    expect_memory_change(
        tb, mark, "the unplug of the DIMM with live rings", vhost_user=("REM_MEM_REG",),
        key=(dev.addr, dev.size), plug=False,
    )  # fmt: skip
    # the next kick: the ring memory is gone
    net.txq[0].kick(force=True)
    ring_unreachable(tb, mark, (dev.addr, dev.size), "a kick with the TX ring in removed memory")
    # the driver resets and puts its rings in base RAM: traffic again
    net.close()
    tb.init_net()  # the testbed's allocator: base RAM
    f = frames.next()
    tb.net.send(f)
    assert tb.peer.recv() == f, "TX after the driver moved its rings to base RAM"
