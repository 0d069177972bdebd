"""Memory hotplug scenarios (pc-dimm, virtio-mem) for both transports, as library code.

The qtest driver is the guest: it plugs DIMMs through QMP, acts as the ACPI OSPM to unplug them
(`acpi_memhp`), drives virtio-mem (`virtio_mem`) and moves its rings and packet buffers into
hotplugged memory (`memory_devices.PlacementAllocator`). A *memory path* says how a change
reaches the device:

* ``slots`` (vhost-user with CONFIGURE_MEM_SLOTS): one ADD_MEM_REG / REM_MEM_REG;
* ``table`` (vhost-user ``--no-mem-slots``): a full SET_MEM_TABLE applied as a set_map diff;
* ``iotlb`` (vhost-vdpa through VDUSE): QEMU's listener sends an IOTLB batch, the kernel turns
  it into one ``set_map`` of the whole table, VDUSE tells the device UPDATE_IOTLB [0, 2^64-1]
  and the device re-fetches the table (IOTLB_GET_FD) and applies it as a set_map diff.

After every change the scenarios assert the same things on every path: the device's map equals
QEMU's (QMP ``query-memory-devices`` + the RAM sections of ``info mtree -f``), the diff the
device applied is exactly the changed range, every other mapping kept its id and its host
mmap (the backend's /proc/PID/maps), chains posted before the change complete byte-exact
after it, new memory carries traffic byte-exact and removed memory is refused.

Every scenario is a plain function raising AssertionError, so meta-tests run it against a
backend with a fault and expect the failure.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qtests.qos.acpi_memhp import (
    OST_EVENT_DEVICE_CHECK,
    OST_EVENT_EJECT_REQUEST,
    AcpiMemoryHotplug,
)
from qtests.qos.alloc import GuestAllocator, MemRange
from qtests.qos.frames import make_frame
from qtests.qos.machine import QemuMachine
from qtests.qos.memory_devices import (
    DimmHotplug,
    MemoryDevice,
    PlacementAllocator,
    is_buffer_tag,
    is_ring_tag,
    query_memory_devices,
)
from qtests.qos.qmp import QmpClient
from qtests.qos.testbed import Testbed
from qtests.qos.virtio_mem import (
    STATE_MIXED,
    STATE_PLUGGED,
    STATE_UNPLUGGED,
    VirtioMemDriver,
)
from qtests.qos.virtio_net import NET_HDR_SIZE, VirtioNetDriver, VirtioNetHdr
from qtests.qos.waiting import poll_until

MiB = 1 << 20
GiB = 1 << 30
DIMM_SIZE = 128 * MiB
SLOTS = "slots"  # CONFIGURE_MEM_SLOTS: ADD_MEM_REG / REM_MEM_REG
TABLE = "table"  # --no-mem-slots: a full SET_MEM_TABLE per change
IOTLB = "iotlb"  # vhost-vdpa (VDUSE): UPDATE_IOTLB -> a set_map diff of the whole table
#: The transport each memory path runs on.
TRANSPORT = {SLOTS: "vhost-user", TABLE: "vhost-user", IOTLB: "vhost-vdpa"}
MEM_REQUESTS = ("ADD_MEM_REG", "REM_MEM_REG", "SET_MEM_TABLE")
#: A memory change must not stop or re-program the rings.
RING_REQUESTS = ("GET_VRING_BASE", "SET_VRING_BASE", "SET_VRING_ADDR")
#: Fills all four slots, unplugs DIMMs in the middle, re-plugs into the holes.
SEED = int(os.environ.get("QOS_HOTPLUG_SEED", "7"), 0)
RANDOM_STEPS = 8
TX_VQ = 1
#: Upper bound for a memory change's ``duration_us`` (mmap + host memory + IOTLB).
MAX_APPLY_US = 2_000_000

Key = tuple[int, int]  # (guest-physical address, size)


# ---------------------------------------------------------------------------- observation
@dataclass(frozen=True)
class BackendMap:
    """The backend's memory map: host regions and IOTLB mappings, (gpa, size) -> id."""

    regions: dict[Key, int]
    mappings: dict[Key, int]

    @classmethod
    def read(cls, tb: Testbed) -> BackendMap:
        b = tb.backend
        assert b is not None
        regions = {(r["gpa"], r["size"]): r["id"] for r in b.cmd("query-mem-table")["regions"]}
        maps = b.cmd("query-iotlb")["mappings"]
        return cls(regions, {(m["iova"], m["size"]): m["id"] for m in maps})


def check_untouched(
    before: BackendMap, after: BackendMap, *, added: set[Key], removed: set[Key]
) -> None:
    """Exactly ``added`` appeared and ``removed`` went; everything else kept its id."""
    for what, old, new in (
        ("region", before.regions, after.regions),
        ("IOTLB mapping", before.mappings, after.mappings),
    ):
        want = (set(old) - removed) | added
        assert set(new) == want, (
            f"backend {what}s {_keys(new)} after the change, expected {_keys(want)}"
        )
        changed = {k: (old[k], new[k]) for k in set(old) - removed if old[k] != new[k]}
        assert not changed, (
            f"{what}s the change did not touch were replaced (id before -> after): "
            + ", ".join(f"{k[0]:#x}+{k[1]:#x}: {a} -> {b}" for k, (a, b) in changed.items())
        )


def check_duration(entry: dict[str, Any]) -> None:
    """The transport's memory-change entries say how long the change took to apply."""
    d = entry.get("duration_us")
    assert isinstance(d, int | float) and 0 < d < MAX_APPLY_US, (
        f"{entry['kind']} entry has duration_us={d!r}, expected 0 < us < {MAX_APPLY_US}: {entry}"
    )


def _keys(keys: Iterable[Key]) -> str:
    return "[" + ", ".join(f"{g:#x}+{s:#x}" for g, s in sorted(keys)) + "]"


#: One RAM section of ``info mtree -f``: "  START-END (prio N, ram): name [@offset]".
_MTREE_RAM = re.compile(r"^\s+([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, ram\): ")


def qemu_ram_sections(qmp: QmpClient) -> set[Key]:
    """QEMU's guest memory as the device sees it over vhost-vdpa: the RAM sections of the
    flat view of the system address space (HMP ``info mtree -f`` through QMP), as (gpa,
    size). ROM sections (pc.rom, pc.bios) are left out: QEMU sends them to vhost-vdpa, but
    they are private anonymous memory and the kernel's vhost-vdpa maps only shared
    file-backed VMAs for a VA-based device such as VDUSE (vhost_vdpa_va_map skips the rest),
    so they never reach the device."""
    text = str(qmp.command("human-monitor-command", {"command-line": "info mtree -f"}))
    out: set[Key] = set()
    in_memory = False
    for line in text.splitlines():
        if line.startswith(" Root memory region:"):
            in_memory = line.split(":", 1)[1].strip() == "memory"
            continue
        if line.startswith("FlatView #") and out:
            break  # the first flat view rooted at "memory" is enough
        m = _MTREE_RAM.match(line) if in_memory else None
        if m is not None:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            out.add((start, end - start + 1))
    if not out:
        raise AssertionError(f"no RAM sections in QEMU's 'info mtree -f':\n{text[:2000]}")
    return out


def qemu_memory_map(tb: Testbed, base: set[Key], mode: str) -> set[Key]:
    """What the device must map, read from QEMU (QMP), never from the backend. vhost-vdpa:
    the RAM / ROM sections of QEMU's flat view. vhost-user: ``base`` (the first table, whose
    regions QEMU merges from those sections) + ``query-memory-devices``."""
    if mode == IOTLB:
        return qemu_ram_sections(tb.qmp)
    return set(base) | {(d.addr, d.size) for d in query_memory_devices(tb.qmp) if d.size}


def assert_map_matches_qemu(tb: Testbed, base: set[Key], mode: str = SLOTS) -> None:
    """Backend regions == IOTLB entries == QEMU's memory map (:func:`qemu_memory_map`)."""
    want = qemu_memory_map(tb, base, mode)
    now = BackendMap.read(tb)
    assert set(now.regions) == want, (
        f"backend map {_keys(now.regions)} != QEMU's base RAM + memory devices {_keys(want)}"
    )
    assert set(now.mappings) == want, (
        f"backend IOTLB {_keys(now.mappings)} != QEMU's base RAM + memory devices {_keys(want)}"
    )


# ---------------------------------------------------------------------------- host mmaps
HostKey = tuple[int, int, int, int]  # st_dev (major:minor packed), inode, file offset, length


def host_mappings(pid: int) -> dict[HostKey, int]:
    """The backend's shared file mappings of guest memory from /proc/PID/maps: memfds and
    files (not the interpreter's libraries): (dev, inode, offset, length) -> start address."""
    out: dict[HostKey, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[1][3] != "s":  # shared mappings only
                continue
            path = parts[5].strip()
            if not (path.startswith("/memfd:") or ".mem" in path):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            key = (major << 20 | minor, int(parts[4]), int(parts[2], 16), hi - lo)
            out[key] = lo
    return out


def check_host_mappings(
    before: dict[HostKey, int], after: dict[HostKey, int], *, added: int, removed: int
) -> None:
    """Guest-memory mmaps the change kept are at the same host address (not mapped again);
    the new ones cover ``added`` bytes, the gone ones ``removed`` bytes."""
    moved = {k: (before[k], after[k]) for k in set(before) & set(after) if before[k] != after[k]}
    assert not moved, f"kept guest memory was mapped again at another host address: {moved}"
    new = sum(k[3] for k in set(after) - set(before))
    gone = sum(k[3] for k in set(before) - set(after))
    assert (new, gone) == (added, removed), (
        f"the backend's guest-memory mmaps grew by {new:#x} and lost {gone:#x} bytes, "
        f"expected {added:#x} / {removed:#x} (/proc/PID/maps)"
    )


def mem_messages(tb: Testbed, since: int, requests: tuple[str, ...] = MEM_REQUESTS) -> list[str]:
    """The memory-table requests (or other ``requests``) QEMU sent since ``since``."""
    assert tb.backend is not None
    return [
        e["request"] for e in tb.backend.journal(["vhost.msg"], since) if e["request"] in requests
    ]


@dataclass(frozen=True)
class Snapshot:
    """The device's map and the backend's host mmaps just before a change."""

    map: BackendMap
    host: dict[HostKey, int]
    mark: int
    t0_ns: int  # CLOCK_MONOTONIC, as the backend's journal (``mono_ns``) on the same kernel

    @classmethod
    def take(cls, tb: Testbed) -> Snapshot:
        assert tb.backend is not None and tb.backend.pid is not None
        return cls(
            BackendMap.read(tb), host_mappings(tb.backend.pid), tb.backend.mark(),
            time.monotonic_ns(),
        )  # fmt: skip


#: Per change on the vhost-vdpa path: UPDATE_IOTLB count, the device's apply time and the
#: wall time from the QMP command to the new map (printed; the report's numbers).
CHANGE_STATS: list[dict[str, Any]] = []


def expect_one_change(tb: Testbed, mode: str, snap: Snapshot, *, key: Key, plug: bool) -> None:
    """Since ``snap``, exactly one memory change added (plug) or removed the region ``key``,
    applied as a diff; nothing else changed, in the device's map or in its host mmaps."""
    assert tb.backend is not None and tb.backend.pid is not None
    b = tb.backend
    since, before = snap.mark, snap.map
    if mode == IOTLB:
        _expect_iotlb_change(tb, snap, key=key, plug=plug)
    else:
        _expect_vhost_user_change(tb, mode, since, before, key=key, plug=plug)
    after = BackendMap.read(tb)
    check_untouched(before, after, added={key} if plug else set(), removed=set() if plug else {key})
    check_host_mappings(
        snap.host, host_mappings(b.pid or 0), added=key[1] if plug else 0,
        removed=0 if plug else key[1],
    )  # fmt: skip


def _expect_iotlb_change(tb: Testbed, snap: Snapshot, *, key: Key, plug: bool) -> None:
    """vhost-vdpa: UPDATE_IOTLB message(s) whose set_map diffs add (or remove) exactly
    ``key``; no reset, no ring stop (GET_VQ_STATE) for a memory change."""
    assert tb.backend is not None
    b = tb.backend
    msgs = b.journal(["vduse.msg"], snap.mark)
    updates = [m for m in msgs if m["type"] == "UPDATE_IOTLB"]
    others = [(m["type"], m.get("status")) for m in msgs if m["type"] != "UPDATE_IOTLB"]
    assert updates, "no UPDATE_IOTLB reached the device for the memory change"
    assert not others, f"a memory change also sent {others} (reset or ring stop)"
    assert all(m["result"] == "ok" for m in updates), f"UPDATE_IOTLB failed: {updates}"
    maps = [(e["iova"], e["size"]) for e in b.journal(["dma.map"], snap.mark)]
    unmaps = [(e["iova"], e["size"]) for e in b.journal(["dma.unmap"], snap.mark)]
    want = ([key], []) if plug else ([], [key])
    assert (maps, unmaps) == want, (
        f"the set_map diffs mapped {_keys(maps)} and unmapped {_keys(unmaps)}, expected "
        f"{_keys(want[0])} / {_keys(want[1])} ({len(updates)} UPDATE_IOTLB)"
    )
    diffs = b.journal(["vduse.iotlb"], snap.mark)
    CHANGE_STATS.append(
        {
            "change": ("plug" if plug else "unplug") + f" {key[0]:#x}+{key[1]:#x}",
            "update_iotlb": len(updates),
            "apply_us": [e["us"] for e in diffs],
            # the QMP plug / unplug request -> the device's map applied (same clock)
            "qmp_to_new_map_ms": round((max(e["mono_ns"] for e in diffs) - snap.t0_ns) / 1e6, 1),
        }
    )
    print("memory change over vhost-vdpa:", CHANGE_STATS[-1])


def _expect_vhost_user_change(
    tb: Testbed, mode: str, since: int, before: BackendMap, *, key: Key, plug: bool
) -> None:
    assert tb.backend is not None
    b = tb.backend
    verb = "ADD_MEM_REG" if plug else "REM_MEM_REG"
    request = verb if mode == SLOTS else "SET_MEM_TABLE"
    msgs = mem_messages(tb, since, MEM_REQUESTS + RING_REQUESTS)
    assert msgs == [request], f"QEMU sent {msgs}, expected exactly [{request}]"
    adds = b.journal(["mem.add"], since)
    removes = b.journal(["mem.remove"], since)
    mine, other = (adds, removes) if plug else (removes, adds)
    got = [(e["gpa"], e["size"], e.get("request")) for e in mine]
    assert got == [(*key, request)], (
        f"backend {'mem.add' if plug else 'mem.remove'} entries {got}, expected one for "
        f"{key[0]:#x}+{key[1]:#x} caused by {request}"
    )
    assert not other, f"backend also {'removed' if plug else 'added'} regions: {other}"
    for e in mine:
        check_duration(e)
    if mode == TABLE:
        (diff,) = b.journal(["dma.set_map"], since)
        check_duration(diff)
        want = (1, 0) if plug else (0, 1)
        assert (diff["added"], diff["removed"]) == want, f"set_map diff {diff}, expected {want}"
        assert diff["kept"] == len(before.mappings) - want[1], f"set_map kept {diff['kept']}"
        (table,) = b.journal(["mem.table"], since)
        untouched = sorted(v for k, v in before.regions.items() if k != key)
        assert sorted(table["kept"]) == untouched, (
            f"SET_MEM_TABLE kept regions {table['kept']}, expected {untouched}"
        )


# ---------------------------------------------------------------------------- traffic
class Traffic:
    """Numbered frames both ways through the backend, checked byte-exact."""

    def __init__(self, tb: Testbed, stream: int) -> None:
        self.tb = tb
        self.stream = stream
        self.seq = 0

    def frames(self, n: int, size: int = 200) -> list[bytes]:
        out = []
        for _ in range(n):
            self.seq += 1
            out.append(make_frame(self.seq, size + 37 * (self.seq % 7), stream=self.stream))
        return out

    def tx(self, net: VirtioNetDriver, n: int = 4) -> None:
        sent = self.frames(n)
        net.send_burst(sent)
        got = self.tb.peer.recv_n(n)
        assert got == sent, "guest TX frames arrived changed, lost or reordered"

    def rx(self, net: VirtioNetDriver, n: int = 4) -> None:
        sent = self.frames(n)
        for f in sent:
            self.tb.peer.send(f)
        got = [net.recv(0).data for _ in sent]
        assert got == sent, "frames to the guest arrived changed, lost or reordered"

    def both(self, net: VirtioNetDriver, n: int = 4) -> None:
        self.tx(net, n)
        self.rx(net, n)

    def stage_tx(self, net: VirtioNetDriver, n: int) -> list[bytes]:
        """Publish ``n`` TX chains without notifying the device: in flight until a kick.

        Token ``("alloc", addr)`` is the driver's own for separately allocated frames, so
        ``net.wait_tx`` reclaims them."""
        vq = net.txq[0]
        frames = self.frames(n)
        writes = []
        for f in frames:
            data = VirtioNetHdr().pack() + f
            addr = net.alloc.alloc(len(data), tag="tx0 big frame")
            writes.append((addr, data))
            vq.add([(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, len(f))], (), ("alloc", addr))
        net.qt.write_many(writes)
        vq.publish()
        return frames


def tx_packets(tb: Testbed) -> int:
    assert tb.backend is not None
    return int(tb.backend.vring(TX_VQ)["packets"])


def reinit_net(
    tb: Testbed, old: VirtioNetDriver | None, alloc: GuestAllocator, **init_kw: Any
) -> VirtioNetDriver:
    """Driver full reset, then init with everything allocated from ``alloc``."""
    assert tb.bus is not None
    if old is not None:
        old.close()
    net = VirtioNetDriver.find(tb.bus, alloc)
    net.init(**init_kw)
    return net


def placed(machine: QemuMachine, dimm: MemRange, *, rings: bool) -> PlacementAllocator:
    """Base RAM + the DIMM (GuestAllocator.add_range); packet buffers always in the DIMM,
    rings (and MSI-X words, everything else) too when ``rings``."""
    ranges = machine.make_allocator().ranges()
    alloc = PlacementAllocator(ranges, [(is_buffer_tag, dimm.name)])
    alloc.add_range(dimm.start, dimm.size, dimm.name)
    if rings:
        alloc.rules.append((lambda tag: True, dimm.name))
    return alloc


def check_placement(alloc: PlacementAllocator, dimm: MemRange, *, rings: bool) -> None:
    live = alloc.live()
    bufs = [a for a in live if is_buffer_tag(a.tag)]
    assert bufs and all(a.range == dimm.name for a in bufs), "packet buffers outside the DIMM"
    ring_allocs = [a for a in live if is_ring_tag(a.tag)]
    assert ring_allocs and all((a.range == dimm.name) == rings for a in ring_allocs), (
        f"rings {'outside' if rings else 'inside'} the DIMM: "
        + ", ".join(f"{a.tag}@{a.addr:#x}" for a in ring_allocs)
    )


def check_backend_rings_in(tb: Testbed, dimm: MemRange) -> None:
    assert tb.backend is not None
    for vr in tb.backend.vrings()[:2]:
        for field in ("desc", "avail", "used"):
            assert dimm.contains(vr[field]), (
                f"backend vring {vr['index']} {field} at {vr[field]:#x} is not in {dimm}"
            )


# ---------------------------------------------------------------------------- stale descriptors
def wait_error(tb: Testbed, since: int, addr: int, what: str) -> dict[str, Any]:
    """The first error.* journal entry since ``since`` that names ``addr``."""
    assert tb.backend is not None
    b = tb.backend

    def naming() -> dict[str, Any] | None:
        errs = [e for e in b.journal(["error."], since) if f"{addr:#x}" in str(e.get("detail"))]
        return errs[0] if errs else None

    what = f"the backend's error.* journal entry naming {addr:#x} for {what}"
    err = poll_until(naming, 20.0, what)
    assert err is not None
    return err


def check_rejected(tb: Testbed, since: int, addr: int, what: str) -> None:
    """The backend journalled an error naming the descriptor's address ``addr`` and is still
    alive and answering. vhost-user: a translation error and NEEDS_RESET. vhost-vdpa: the
    address is in no IOTLB entry, which VDUSE cannot ask QEMU about (no MISS message): the
    error says so and the queue waits for an UPDATE_IOTLB (the driver resets it)."""
    assert tb.backend is not None
    err = wait_error(tb, since, addr, what)
    if tb.transport == "vhost-vdpa":
        assert (err["kind"], err.get("op")) == ("error.vduse", "iotlb_miss"), f"{what}: {err}"
        assert "not in the VDUSE IOTLB" in str(err["detail"]), f"{what}: {err}"
    else:
        assert err["kind"] in ("error.translate", "error.vq"), f"{what}: unexpected {err}"
        status = tb.backend.cmd("query-status")
        assert "NEEDS_RESET" in status["status_names"], f"{what}: device status {status}"
    assert tb.backend.running, f"{what}: the backend died"


def stale_descriptor_scenario(
    tb: Testbed, net: VirtioNetDriver, gone: MemRange, traffic: Traffic
) -> VirtioNetDriver:
    """TX (device reads) and RX (device writes) descriptors into removed memory are rejected
    without access; the driver resets and traffic works again. Returns the new driver."""
    assert tb.alloc is not None and tb.machine is not None and tb.backend is not None
    addr = gone.start + 0x1000
    # TX: device-readable buffer in removed memory
    packets = tx_packets(tb)
    mark = tb.backend.mark()
    frame = make_frame(0xDEAD, 120, stream=traffic.stream)
    net.txq[0].add([(addr, NET_HDR_SIZE + len(frame))], (), ("stale", addr))
    net.txq[0].kick()
    check_rejected(tb, mark, addr, "a TX descriptor into removed memory")
    assert tx_packets(tb) == packets, "the backend transmitted from removed memory"
    net = reinit_net(tb, net, tb.machine.make_allocator())
    traffic.both(net, 2)
    # RX: device-writable buffer in removed memory, the only one posted
    net = reinit_net(tb, net, tb.machine.make_allocator(), post_rx=False)
    mark = tb.backend.mark()
    net.rxq[0].add((), [(addr, 2048)], 0)
    net.rxq[0].kick()
    tb.peer.send(make_frame(0xBEEF, 120, stream=traffic.stream))
    check_rejected(tb, mark, addr, "an RX descriptor into removed memory")
    assert net.rxq[0].pending_used() == 0, "the backend completed an RX buffer in removed memory"
    net = reinit_net(tb, net, tb.machine.make_allocator())
    traffic.both(net, 2)
    return net


# ---------------------------------------------------------------------------- DIMM scenarios
def start(
    make_testbed: Callable[..., Testbed], mode: str, faults: Iterable[str] = (), **kw: Any
) -> Testbed:
    """A started testbed on ``mode``'s transport (``--no-mem-slots`` for TABLE)."""
    args = ["--no-mem-slots"] if mode == TABLE else []
    return make_testbed(
        faults=list(faults), backend_args=args, transport=TRANSPORT[mode], **kw
    ).start()


def hotplug_for(tb: Testbed) -> DimmHotplug:
    assert tb.machine is not None
    return DimmHotplug(tb.qmp, AcpiMemoryHotplug(tb.machine.qtest, tb.machine.slots))


def plug_unplug_scenario(tb: Testbed, mode: str) -> None:
    """Plug with traffic in flight, use the DIMM for buffers and then whole rings, unplug
    through the OSPM, then prove removed memory is out of reach."""
    assert tb.backend is not None and tb.machine is not None
    b, machine = tb.backend, tb.machine
    dimms = hotplug_for(tb)
    traffic = Traffic(tb, stream=1)
    base = set(BackendMap.read(tb).regions)
    net = tb.net
    traffic.both(net)

    # -- plug, with TX posted (not kicked) and RX backlogged in the suspended backend
    staged = traffic.stage_tx(net, 4)
    b.cmd("suspend")
    rx_frames = traffic.frames(3)
    for f in rx_frames:
        tb.peer.send(f)
    poll_until(
        lambda: b.cmd("query-wire")["backlog"][0] == len(rx_frames),
        5.0,
        "the suspended backend to hold the RX frames",
    )
    snap = Snapshot.take(tb)
    packets = tx_packets(tb)
    dev = dimms.plug(DIMM_SIZE)
    key = (dev.addr, dev.size)
    expect_one_change(tb, mode, snap, key=key, plug=True)
    assert_map_matches_qemu(tb, base, mode)
    assert tx_packets(tb) == packets, "TX posted before the plug went out before its kick"
    b.cmd("resume")
    net.txq[0].kick()
    net.wait_tx()
    assert tb.peer.recv_n(len(staged)) == staged, "TX in flight across the plug"
    assert [net.recv(0).data for _ in rx_frames] == rx_frames, "RX in flight across the plug"

    # -- packet buffers in the DIMM, rings in base RAM
    plugged, mark = BackendMap.read(tb), b.mark()
    dimm = dev.range(f"dimm:{dev.id}")
    alloc = placed(machine, dimm, rings=False)
    net = reinit_net(tb, net, alloc)
    check_placement(alloc, dimm, rings=False)
    traffic.both(net, 8)
    # -- whole rings (and buffers, MSI-X words) in the DIMM
    alloc = placed(machine, dimm, rings=True)
    net = reinit_net(tb, net, alloc)
    check_placement(alloc, dimm, rings=True)
    check_backend_rings_in(tb, dimm)
    traffic.both(net, 8)
    if mode == IOTLB:
        # vhost-vdpa unmaps everything at a driver reset and maps it again at the restart:
        # the map is QEMU's again, whatever the ids
        assert_map_matches_qemu(tb, base, mode)
    else:
        # driver resets restart the rings: QEMU resends the table only without mem slots,
        # and a resend of the same table must leave every region and mapping as it was
        resent = mem_messages(tb, mark)
        assert set(resent) <= ({"SET_MEM_TABLE"} if mode == TABLE else set()), resent
        assert not b.journal(["mem.add", "mem.remove"], mark), "a resent table changed the map"
        check_untouched(plugged, BackendMap.read(tb), added=set(), removed=set())

    # -- back to base RAM, unplug
    net = reinit_net(tb, net, machine.make_allocator())
    snap = Snapshot.take(tb)
    tb.qmp.clear_events()  # the plug's DEVICE_CHECK _OST must not satisfy the wait below
    dimms.unplug(dev.id)
    # the OSPM's _OST for the eject request, reported by QEMU for this DIMM
    tb.qmp.wait_event(
        "ACPI_DEVICE_OST",
        10.0,
        match=lambda e: (
            (e["data"]["info"]["source"], e["data"]["info"].get("device"))
            == (OST_EVENT_EJECT_REQUEST, dev.id)
        ),
    )
    checks = [
        e
        for e in tb.qmp.get_events("ACPI_DEVICE_OST")
        if e["data"]["info"]["source"] == OST_EVENT_DEVICE_CHECK
    ]
    assert not checks, f"a DEVICE_CHECK _OST during the unplug: {checks}"
    assert_map_matches_qemu(tb, base, mode)
    expect_one_change(tb, mode, snap, key=key, plug=False)
    traffic.both(net)
    stale_descriptor_scenario(tb, net, dimm, traffic)
    assert not b.journal(["error.protocol"]), "the backend refused a QEMU request"


def random_sequence_scenario(tb: Testbed, mode: str, seed: int, steps: int = RANDOM_STEPS) -> None:
    """DIMMs plugged and unplugged in a seeded random order; after every step the backend's
    map equals QEMU's, only the changed region moved, and traffic flows."""
    assert tb.backend is not None and tb.machine is not None
    machine = tb.machine
    rng = random.Random(seed)
    dimms = hotplug_for(tb)
    traffic = Traffic(tb, stream=2)
    base = set(BackendMap.read(tb).regions)
    room = (machine.maxmem or 0) - machine.ram_size
    plugged: list[MemoryDevice] = []
    history: list[str] = []
    for step in range(steps):
        used = sum(d.size for d in plugged)
        sizes = [s * MiB for s in (64, 128, 256) if used + s * MiB <= room]
        can_plug = len(plugged) < machine.slots and sizes
        snap = Snapshot.take(tb)
        if plugged and (not can_plug or rng.random() < 0.4):
            dev = plugged.pop(rng.randrange(len(plugged)))
            history.append(f"unplug {dev.id}")
            dimms.unplug(dev.id)
            plug = False
        else:
            dev = dimms.plug(rng.choice(sizes))
            history.append(f"plug {dev.id} {dev.size // MiB}M@{dev.addr:#x}")
            plugged.append(dev)
            plug = True
        where = f"step {step} of seed {seed:#x} ({'; '.join(history)})"
        try:
            assert_map_matches_qemu(tb, base, mode)
            expect_one_change(tb, mode, snap, key=(dev.addr, dev.size), plug=plug)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from e
        traffic.both(tb.net, 2)
    assert {d.id for d in query_memory_devices(tb.qmp)} == {d.id for d in plugged}


# ---------------------------------------------------------------------------- mmap offsets
OFFSET_DIMM = 64 * MiB
FILE_OFFSET = 32 * MiB


def offset_dimm_scenario(tb: Testbed) -> None:
    """A DIMM whose region does not start at offset 0 of its fd (memory-backend-file with
    ``offset=``: QEMU sends mmap_offset = that offset in ADD_MEM_REG) carries packet buffers
    byte-exact. Rings and everything else live in a second, plain memfd DIMM, so nothing but
    the offset DIMM depends on the backend honouring a non-zero mmap_offset -- in base RAM the
    region above 1 MiB has one too (mmap_offset 1 MiB), so the scenario sends no traffic
    before its driver lives in the DIMMs."""
    assert tb.backend is not None and tb.machine is not None and tb.run_dir is not None
    b, machine = tb.backend, tb.machine
    dimms = hotplug_for(tb)
    traffic = Traffic(tb, stream=4)
    base = set(BackendMap.read(tb).regions)
    rings_dev = dimms.plug(OFFSET_DIMM)
    mark = b.mark()
    path = tb.run_dir / "offset-dimm.mem"
    file_props = {"qom-type": "memory-backend-file", "mem-path": str(path), "offset": FILE_OFFSET}
    bufs_dev = dimms.plug(OFFSET_DIMM, memdev_props=file_props)
    (add,) = b.journal(["mem.add"], mark)
    assert (add["gpa"], add["size"], add["mmap_offset"]) == (
        bufs_dev.addr,
        bufs_dev.size,
        FILE_OFFSET,
    ), f"QEMU's region for the offset DIMM: {add}"
    check_duration(add)
    assert_map_matches_qemu(tb, base)
    rings, bufs = rings_dev.range("dimm:rings"), bufs_dev.range("dimm:bufs")
    alloc = PlacementAllocator(machine.make_allocator().ranges(), [(is_buffer_tag, bufs.name)])
    for r in (rings, bufs):
        alloc.add_range(r.start, r.size, r.name)
    alloc.rules.append((lambda tag: True, rings.name))
    net = reinit_net(tb, tb.net, alloc)
    assert {a.range for a in alloc.live() if is_buffer_tag(a.tag)} == {bufs.name}
    check_backend_rings_in(tb, rings)
    traffic.both(net, 8)
    written = {r["gpa"]: r["written"] for r in b.cmd("query-mem-table")["regions"]}
    assert written[bufs.start] > 0, f"no RX data written into the offset DIMM: {written}"
    net = reinit_net(tb, net, machine.make_allocator())
    for dev in (bufs_dev, rings_dev):
        dimms.unplug(dev.id)
    assert_map_matches_qemu(tb, base)
    traffic.both(net)


# ---------------------------------------------------------------------------- virtio-mem
VMEM_SIZE = 2 * GiB  # two memslots of 1 GiB (QEMU's minimum memslot size)
VMEM_BLOCK = 2 * MiB


def add_virtio_mem(m: QemuMachine) -> QemuMachine:
    """virtio-mem-pci ``vm0`` on a shared 2 GiB memfd, nothing plugged, dynamic memslots."""
    m.add_object("memory-backend-memfd", id="vmem0", size=VMEM_SIZE, share=True)
    props = {"id": "vm0", "memdev": "vmem0", "requested-size": 0, "dynamic-memslots": True}
    return m.add_device("virtio-mem-pci", props, **{"block-size": VMEM_BLOCK})


def virtio_mem_testbed(
    make_testbed: Callable[..., Testbed], mode: str = SLOTS, faults: Iterable[str] = ()
) -> Testbed:
    tb = make_testbed(faults=list(faults), maxmem="4G", transport=TRANSPORT[mode])
    tb.start_backend()
    tb.start_qemu(add_virtio_mem(tb.build_machine()))
    tb.init_net()
    return tb


def virtio_mem_scenario(tb: Testbed, mode: str = SLOTS) -> None:
    """Blocks plugged into two memslots: one ADD_MEM_REG per memslot that gains its first
    block, none for more blocks in it, one REM_MEM_REG when its last block goes; buffers and
    rings in plugged blocks carry traffic byte-exact; unplugged memory is out of reach."""
    assert tb.backend is not None and tb.machine is not None
    assert tb.bus is not None and tb.alloc is not None
    b, machine = tb.backend, tb.machine
    traffic = Traffic(tb, stream=3)
    base = set(BackendMap.read(tb).regions)
    vmem = VirtioMemDriver.find(tb.bus, tb.alloc)
    vmem.init()
    tb.qmp.command("qom-set", path="vm0", property="requested-size", value=GiB)
    cfg = vmem.config()
    assert (cfg.block_size, cfg.region_size, cfg.requested_size) == (VMEM_BLOCK, VMEM_SIZE, GiB)
    assert cfg.usable_region_size > GiB, cfg  # the second memslot is reachable
    slot0, slot1 = (cfg.addr, GiB), (cfg.addr + GiB, GiB)

    def step(action: Callable[[], None], change: Key | None, plug: bool) -> None:
        snap = Snapshot.take(tb)
        action()
        if change is None:
            if mode == IOTLB:
                msgs = [m["type"] for m in b.journal(["vduse.msg"], snap.mark)]
                assert msgs == [], f"a block change inside a live memslot sent {msgs}"
            else:
                assert mem_messages(tb, snap.mark) == [], "a block change inside a live memslot"
            check_untouched(snap.map, BackendMap.read(tb), added=set(), removed=set())
        else:
            expect_one_change(tb, mode, snap, key=change, plug=plug)
        if mode == IOTLB:  # memslots are flat-view sections; query-memory-devices has no slots
            assert_map_matches_qemu(tb, base, mode)

    step(lambda: vmem.plug(cfg.block_addr(0), 2), slot0, True)
    step(lambda: vmem.plug(cfg.block_addr(8)), None, True)
    blk = GiB // VMEM_BLOCK
    step(lambda: vmem.plug(cfg.block_addr(blk)), slot1, True)
    assert vmem.config().plugged_size == 4 * VMEM_BLOCK
    assert vmem.state(cfg.block_addr(0), 2) == STATE_PLUGGED
    assert vmem.state(cfg.block_addr(0), 4) == STATE_MIXED
    (dev,) = query_memory_devices(tb.qmp)
    assert dev.size == 4 * VMEM_BLOCK

    # buffers in memslot 0's blocks, rings in memslot 1's block
    bufs = MemRange("vmem:bufs", cfg.block_addr(0), 2 * VMEM_BLOCK)
    rings = MemRange("vmem:rings", cfg.block_addr(blk), VMEM_BLOCK)
    alloc = PlacementAllocator(machine.make_allocator().ranges(), [(is_buffer_tag, bufs.name)])
    for r in (bufs, rings):
        alloc.add_range(r.start, r.size, r.name)
    alloc.rules.append((is_ring_tag, rings.name))
    net = reinit_net(tb, tb.net, alloc)
    assert {a.range for a in alloc.live() if is_buffer_tag(a.tag)} == {bufs.name}
    assert {a.range for a in alloc.live() if is_ring_tag(a.tag)} == {rings.name}
    check_backend_rings_in(tb, rings)
    traffic.both(net, 8)
    net = reinit_net(tb, net, machine.make_allocator())

    step(lambda: vmem.unplug(cfg.block_addr(blk)), slot1, False)
    step(lambda: vmem.unplug(cfg.block_addr(8)), None, False)
    step(lambda: vmem.unplug(cfg.block_addr(0), 2), slot0, False)
    assert set(BackendMap.read(tb).regions) == base
    assert vmem.state(cfg.block_addr(0), 2) == STATE_UNPLUGGED
    traffic.both(net)
    stale_descriptor_scenario(tb, net, bufs, traffic)
    vmem.close()
