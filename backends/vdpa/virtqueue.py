"""The device side of a split virtqueue (virtio 1.2, 2.7): pop with full validation, push,
publish used, notification suppression (EVENT_IDX). The one place for the split-ring layout.

Ring memory is reached through :class:`~backends.vdpa.dma.DmaSpace` only. The three ring areas
are translated once and cached per ``DmaSpace.generation`` (IOTLB + host memory generations),
so the hot path reads descriptors with ``struct.unpack_from`` straight from the host buffer;
any IOTLB or mem-table change invalidates the cache.
"""

from __future__ import annotations

import functools
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .access import Access, TranslationError
from .dma import DmaSpace
from .journal import Journal
from .memory import Piece

__all__ = [
    "Chain",
    "SplitVirtqueue",
    "VqError",
    "VqState",
    "vring_need_event",
]

# -- split ring layout -------------------------------------------------------------------
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
# Ring indexes / flags / event fields are read and written concurrently by the other side, so
# each access must be ONE 16-bit load or store. struct's explicit little-endian codecs ("<H")
# move one byte at a time: a driver polling used->idx while it goes 0x00ff -> 0x0100 can read
# 0x0000 (or we read a torn avail->idx). The native codec is a single memcpy of 2 bytes (one
# aligned store on x86); virtio rings are little-endian, so native is right on LE hosts.
U16 = struct.Struct("H" if sys.byteorder == "little" else "<H")
USED_ELEM = struct.Struct("<II")  # id, len
DESC_SIZE = DESC.size

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4

MAX_INDIRECT_ENTRIES = 65536  # bound for one indirect table (1 MiB of descriptors)
MAX_CHAIN_BYTES = 1 << 32  # virtio 1.2 2.7.5.2: a chain must not exceed 2^32 bytes
#: VqError kinds of chain validation (what the ``no-chain-validation`` fault skips silently).
CHAIN_CHECKS = frozenset(
    {
        "head-range",
        "head-inflight",
        "next-range",
        "loop",
        "indirect-len",
        "indirect-nested",
        "indirect-next",
        "order",
        "len-overflow",
    }
)


@functools.lru_cache(maxsize=512)
def _used_elems(n: int) -> struct.Struct:
    """``n`` consecutive used elements (id, len) as one struct."""
    return struct.Struct("<" + "II" * n)


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return AVAIL_RING + 2 * num + 2  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return USED_RING + USED_ELEM.size * num + 2  # flags, idx, ring[num], avail_event


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event``: did the index move past ``event`` going old -> new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass
class VqState:
    """What migrates (GET/SET_VRING_BASE). Split rings use the two indexes (free-running
    u16); the wrap counters are for packed rings."""

    last_avail_idx: int = 0
    used_idx: int = 0
    avail_wrap: bool = True
    used_wrap: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VqError(Exception):
    """Malformed ring content: the device goes to NEEDS_RESET.

    Kinds: 'avail-jump', 'head-range', 'head-inflight', 'next-range', 'loop', 'indirect-len',
    'indirect-nested', 'indirect-next', 'order', 'len-overflow', 'translate' (a buffer or
    indirect table the IOTLB refuses, not a miss), 'ring-translate' (the rings themselves),
    'ring-access' (ring memory vanished).
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)


@dataclass(slots=True)
class Chain:
    """A popped descriptor chain: driver-written ``out`` pieces, device-writable ``inp``."""

    head: int
    out: list[Piece]
    inp: list[Piece]
    out_len: int
    in_len: int
    avail_idx: int = 0  # the avail-ring position (free-running u16) it was popped from
    ndesc: int = 0  # descriptors walked (indirect ones included)


class RingArea:
    """A translated ring area: its pieces and fast accessors. Single-piece areas (the norm)
    are accessed with ``struct.*_from/_into`` on the host buffer directly."""

    __slots__ = ("_base", "_buf", "_dma", "_gpa", "_offs", "length", "pieces", "single")

    def __init__(self, pieces: list[Piece], dma: DmaSpace) -> None:
        self.pieces = pieces
        self.length = sum(p.length for p in pieces)
        self._dma = dma
        self.single = len(pieces) == 1
        p = pieces[0]
        self._buf = p.region.buf
        self._base = p.region.base + p.offset
        self._gpa = p.gpa
        offs = []
        o = 0
        for q in pieces:
            offs.append(o)
            o += q.length
        self._offs = offs

    def _locate(self, off: int) -> tuple[Piece, int]:
        i = len(self._offs) - 1
        while self._offs[i] > off:
            i -= 1
        return self.pieces[i], off - self._offs[i]

    def read(self, off: int, n: int) -> bytes:
        if self.single:
            return bytes(self._buf[self._base + off : self._base + off + n])
        out = bytearray()
        while n > 0:
            p, inner = self._locate(off)
            take = min(n, p.length - inner)
            s = p.region.base + p.offset + inner
            out += p.region.buf[s : s + take]
            off += take
            n -= take
        return bytes(out)

    def unpack(self, s: struct.Struct, off: int) -> tuple[Any, ...]:
        if self.single:
            return s.unpack_from(self._buf, self._base + off)
        return s.unpack(self.read(off, s.size))

    def u16(self, off: int) -> int:
        if self.single:
            return U16.unpack_from(self._buf, self._base + off)[0]
        return U16.unpack(self.read(off, 2))[0]

    def write(self, off: int, data: bytes) -> None:
        """Device write into the ring; always dirty-logged (the used ring is never skipped)."""
        n = len(data)
        if self.single:
            self._buf[self._base + off : self._base + off + n] = data
            self._dma.mark_dirty(self._gpa + off, n)
            return
        done = 0
        while done < n:
            p, inner = self._locate(off + done)
            take = min(n - done, p.length - inner)
            s = p.region.base + p.offset + inner
            p.region.buf[s : s + take] = data[done : done + take]
            self._dma.mark_dirty(p.gpa + inner, take)
            done += take

    def pack(self, s: struct.Struct, off: int, *values: int) -> None:
        """Store ``values`` with one copy of the final bytes. Not ``pack_into``: CPython
        zero-fills the target before packing, so a driver polling used->idx could read 0
        between the two stores (seen in qtests as used idx 0x2d80 -> 0 -> 0x2e00)."""
        data = s.pack(*values)
        if self.single:
            start = self._base + off
            self._buf[start : start + len(data)] = data
            self._dma.mark_dirty(self._gpa + off, len(data))
            return
        self.write(off, data)


@dataclass
class _Rings:
    gen: tuple[int, ...]
    desc: RingArea
    avail: RingArea
    used: RingArea


class VirtqueueBase:
    """What the split and the packed queue share: configuration, the state and counters the
    monitor and the transport read, and the translated ring areas (one translation per DMA
    space generation: any IOTLB or memory change drops them)."""

    packed = False

    def __init__(self, index: int, dma: DmaSpace, journal: Journal | None = None) -> None:
        self.index = index
        self.dma = dma
        self.journal = journal
        self.num = 0
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.addr_set = False
        self.ready = False
        self.started = False
        self.event_idx = False
        self.notification = True  # driver kicks wanted (set_notification)
        self.state = VqState()
        self.inflight = 0
        self._pending_used: list[Any] = []  # completions not yet published
        self._rings: Any = None
        self.need_call = False  # a flush decided the driver must be interrupted
        self.popped_total = 0
        self.pushed_total = 0

    # -- configuration ---------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return self.num > 0 and self.addr_set

    def set_address(self, desc: int, avail: int, used: int) -> None:
        self.desc, self.avail, self.used = desc, avail, used
        self.addr_set = True
        self._rings = None

    def set_state(self, state: VqState) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.addr_set = False
        self.ready = False
        self.started = False
        self.event_idx = False
        self.notification = True
        self.set_state(VqState())
        self._rings = None

    def invalidate(self) -> None:
        """Drop the cached ring translation (it is also dropped on any generation change)."""
        self._rings = None

    def _ring_area(self, what: str, iova: int, size: int, access: Access) -> RingArea:
        try:
            pieces = self.dma.translate(iova, size, access)
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("ring-translate", f"{what} at {iova:#x}+{size:#x}: {e}") from None
        return RingArea(pieces, self.dma)

    @property
    def used_pending(self) -> int:
        return len(self._pending_used)

    def set_notification(self, enabled: bool) -> None:
        raise NotImplementedError

    def avail_pending(self) -> int:
        raise NotImplementedError

    def enable_notification_and_check(self) -> bool:
        """Re-enable kicks and report whether buffers arrived meanwhile (the race check)."""
        self.set_notification(True)
        return self.avail_pending() > 0


class SplitVirtqueue(VirtqueueBase):
    """Device side of one split virtqueue. Addresses are IOVAs (GPAs without a vIOMMU)."""

    def __init__(self, index: int, dma: DmaSpace, journal: Journal | None = None) -> None:
        super().__init__(index, dma, journal)
        self._popped: dict[int, int] = {}  # head -> avail position of popped-unpushed chains
        self._pending_used: list[tuple[int, int]] = []
        self._used_pub = 0  # used idx last published in guest memory
        self._rings: _Rings | None = None

    # -- configuration ---------------------------------------------------------------------
    def set_num(self, num: int) -> None:
        if num <= 0 or num > 32768 or num & (num - 1):
            raise ValueError(f"vq {self.index}: split ring size {num} is not a power of 2 <= 32768")
        self.num = num
        self._rings = None

    def set_state(self, state: VqState) -> None:
        """Restore indexes; forgets inflight chains and unpublished used elements."""
        self.state = VqState(
            state.last_avail_idx & 0xFFFF,
            state.used_idx & 0xFFFF,
            state.avail_wrap,
            state.used_wrap,
        )
        self._used_pub = self.state.used_idx
        self.inflight = 0
        self._popped.clear()
        self._pending_used.clear()
        self.need_call = False

    def get_state(self) -> VqState:
        return VqState(
            self.state.last_avail_idx,
            self.state.used_idx,
            self.state.avail_wrap,
            self.state.used_wrap,
        )

    # -- ring access -----------------------------------------------------------------------
    def rings(self) -> _Rings:
        """The translated rings (cached per DmaSpace generation). Raises TranslationError
        (kind 'miss') or VqError('ring-translate')."""
        gen = self.dma.generation
        r = self._rings
        if r is not None and r.gen == gen:
            return r
        num = self.num
        r = _Rings(
            gen,
            self._ring_area("descriptor ring", self.desc, desc_table_size(num), Access.READ),
            self._ring_area("avail ring", self.avail, avail_ring_size(num), Access.READ),
            self._ring_area("used ring", self.used, used_ring_size(num), Access.WRITE),
        )
        self._rings = r
        return r

    def avail_idx(self) -> int:
        return self.rings().avail.u16(AVAIL_IDX)

    def avail_pending(self) -> int:
        """avail idx - last_avail_idx (0 for an unconfigured queue)."""
        if not self.configured:
            return 0
        return (self.avail_idx() - self.state.last_avail_idx) & 0xFFFF

    # -- pop -------------------------------------------------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, validated; None when there is none. Raises VqError, or
        TranslationError(kind='miss') with no state change (retry after the IOTLB update)."""
        if not self.configured:
            return None
        rings, pending = self._avail()
        while pending:
            chain = self._take(rings, self.state.last_avail_idx)
            if chain is not None:
                return chain
            pending -= 1  # skipped (the no-chain-validation fault)
        return None

    def pop_batch(self, limit: int) -> list[Chain]:
        """Up to ``limit`` available chains, validated, with one read of the avail index.

        A chain that fails stops the batch and is left available (state unchanged): the
        chains before it are returned, and the next call raises what :meth:`pop` would
        (VqError, or TranslationError(kind='miss')). Raises only when the first one fails."""
        if not self.configured or limit <= 0:
            return []
        rings, pending = self._avail()
        chains: list[Chain] = []
        take = self._take
        for _ in range(min(pending, limit)):
            try:
                chain = take(rings, self.state.last_avail_idx)
            except (VqError, TranslationError):
                if not chains:
                    raise
                break
            if chain is not None:
                chains.append(chain)
        return chains

    def _fault(self, name: str) -> bool:
        faults = self.dma.faults
        return faults is not None and faults.active(name)

    def _avail(self) -> tuple[_Rings, int]:
        """The translated rings and how many chains the driver has made available."""
        try:
            rings = self.rings()
            aidx = rings.avail.u16(AVAIL_IDX)
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("translate", str(e)) from None
        except (ValueError, IndexError) as e:  # ring memory unmapped underneath us
            raise VqError("ring-access", str(e)) from None
        last = self.state.last_avail_idx
        pending = (aidx - last) & 0xFFFF
        if pending > self.num:
            if self._fault("no-chain-validation"):  # the fault: skip to avail idx silently
                self.state.last_avail_idx = aidx
                return rings, 0
            raise VqError(
                "avail-jump",
                f"avail idx {aidx} is {pending} ahead of last_avail_idx {last} (size {self.num})",
            )
        return rings, pending

    def _take(self, rings: _Rings, last: int) -> Chain | None:
        """Validate and take the chain at avail position ``last``; state changes only when
        it succeeds. None: the chain was skipped (only with the no-chain-validation fault)."""
        num = self.num
        avail = rings.avail
        try:
            if avail.single:
                head = U16.unpack_from(
                    avail._buf, avail._base + AVAIL_RING + 2 * (last & (num - 1))
                )[0]
            else:
                head = avail.u16(AVAIL_RING + 2 * (last & (num - 1)))
            if head >= num:
                raise VqError("head-range", f"head {head} >= queue size {num} (avail {last})")
            if head in self._popped:
                raise VqError("head-inflight", f"head {head} made available again while in use")
            chain = self._walk(rings.desc, head, num)
        except VqError as e:
            if e.kind in CHAIN_CHECKS and self._fault("no-chain-validation"):
                self.state.last_avail_idx = (last + 1) & 0xFFFF  # the fault: skip silently
                return None
            raise
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("translate", str(e)) from None
        except (ValueError, IndexError) as e:  # ring memory unmapped underneath us
            raise VqError("ring-access", str(e)) from None
        chain.avail_idx = last
        self.state.last_avail_idx = (last + 1) & 0xFFFF
        self.inflight += 1
        self._popped[head] = last
        self.popped_total += 1
        return chain

    def _walk(self, table: RingArea, head: int, num: int) -> Chain:
        if table.single:  # fast path: a chain of one plain descriptor (DPDK TX, most RX)
            addr, length, flags, _ = DESC.unpack_from(table._buf, table._base + head * DESC_SIZE)
            if length:
                if flags == 0:
                    return Chain(
                        head, self.dma.translate(addr, length, Access.READ), [], length, 0, 0, 1
                    )
                if flags == VRING_DESC_F_WRITE:
                    return Chain(
                        head, [], self.dma.translate(addr, length, Access.WRITE), 0, length, 0, 1
                    )
        out: list[Piece] = []
        inp: list[Piece] = []
        out_len = in_len = 0
        writing = False
        indirect: bytes | None = None
        limit = num
        translate = self.dma.translate
        unpack_from = DESC.unpack_from
        tbuf, tbase = (table._buf, table._base) if table.single else (None, 0)
        idx = head
        count = 0
        total = 0
        while True:
            count += 1
            if count > limit:
                where = "indirect table" if indirect is not None else "chain"
                raise VqError("loop", f"{where} from head {head} longer than {limit}")
            if indirect is None:
                if tbuf is not None:
                    addr, length, flags, nxt = unpack_from(tbuf, tbase + idx * DESC_SIZE)
                else:
                    addr, length, flags, nxt = table.unpack(DESC, idx * DESC_SIZE)
            else:
                addr, length, flags, nxt = DESC.unpack_from(indirect, idx * DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if indirect is not None:
                    raise VqError("indirect-nested", f"indirect descriptor {idx} in a table")
                if flags & VRING_DESC_F_NEXT:
                    raise VqError("indirect-next", f"descriptor {idx} has INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE or length > MAX_INDIRECT_ENTRIES * DESC_SIZE:
                    raise VqError("indirect-len", f"indirect table length {length}")
                pieces = self.dma.translate(addr, length, Access.READ)
                indirect = self.dma.read_pieces(pieces)
                limit = length // DESC_SIZE
                idx = 0
                count = 0
                continue
            total += length
            if flags & VRING_DESC_F_WRITE:
                if length:
                    inp.extend(translate(addr, length, Access.WRITE))
                in_len += length
                writing = True
            else:
                if writing:
                    raise VqError("order", f"readable descriptor {idx} after a writable one")
                if length:
                    out.extend(translate(addr, length, Access.READ))
                out_len += length
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise VqError("next-range", f"next {nxt} >= {limit} (descriptor {idx})")
            idx = nxt
        if total > MAX_CHAIN_BYTES:
            raise VqError("len-overflow", f"chain from head {head} is {total} bytes")
        return Chain(head, out, inp, out_len, in_len, 0, count)

    # -- push / flush ----------------------------------------------------------------------
    def push(self, chain: Chain, written: int) -> None:
        """Queue a used element for ``chain`` (published by :meth:`flush`)."""
        if self._popped.pop(chain.head, None) is None:
            raise ValueError(f"vq {self.index}: push of head {chain.head} that is not in flight")
        self._pending_used.append((chain.head, written))
        self.state.used_idx = (self.state.used_idx + 1) & 0xFFFF
        self.inflight -= 1
        self.pushed_total += 1

    def flush(self) -> bool:
        """Write pending used elements, then publish the used idx. True when the driver must
        be interrupted (EVENT_IDX / NO_INTERRUPT honoured). A miss leaves them pending."""
        pending = self._pending_used
        if not pending:
            return False
        rings = self.rings()
        used = rings.used
        num = self.num
        old = self._used_pub
        n = len(pending)
        new = (old + n) & 0xFFFF
        try:
            # the elements in runs up to the ring's end (normally one or two struct stores)
            flat = [v for elem in pending for v in elem]
            pos = 0
            idx = old
            while pos < n:
                start = idx & (num - 1)
                k = min(n - pos, num - start)
                used.pack(_used_elems(k), USED_RING + 8 * start, *flat[2 * pos : 2 * (pos + k)])
                pos += k
                idx += k
            used.pack(U16, USED_IDX, new)  # after the elements: the publish
        except (ValueError, IndexError) as e:
            raise VqError("ring-access", str(e)) from None
        self._used_pub = new
        pending.clear()
        if self.event_idx:
            event = rings.avail.u16(AVAIL_RING + 2 * self.num)
            need = vring_need_event(event, new, old)
        else:
            need = not rings.avail.u16(AVAIL_FLAGS) & VRING_AVAIL_F_NO_INTERRUPT
        if need:
            self.need_call = True
        return need

    @property
    def used_published(self) -> int:
        return self._used_pub

    def rewind(self) -> int:
        """Give back popped-but-unpushed chains (``last_avail_idx -= inflight``); returns how
        many. Exact when completions are in order (the unpushed ones are the newest)."""
        n = self.inflight
        if n == 0:
            return 0
        last = self.state.last_avail_idx
        expected = {(last - k) & 0xFFFF for k in range(1, n + 1)}
        in_order = set(self._popped.values()) == expected
        self.state.last_avail_idx = (last - n) & 0xFFFF
        self.inflight = 0
        self._popped.clear()
        if self.journal is not None:
            self.journal.record(
                "vq.rewind",
                vq=self.index,
                count=n,
                last_avail_idx=self.state.last_avail_idx,
                in_order=in_order,
            )
        return n

    # -- notifications ---------------------------------------------------------------------
    def set_notification(self, enabled: bool) -> None:
        """Ask for (or suppress) driver kicks: avail_event with EVENT_IDX, else used flags."""
        self.notification = enabled
        if not self.configured:
            return
        used = self.rings().used
        if self.event_idx:
            if enabled:
                used.pack(U16, USED_RING + 8 * self.num, self.state.last_avail_idx)
        else:
            used.pack(U16, USED_FLAGS, 0 if enabled else VRING_USED_F_NO_NOTIFY)

    # -- introspection ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "num": self.num,
            "desc": self.desc,
            "avail": self.avail,
            "used": self.used,
            "ready": self.ready,
            "started": self.started,
            "event_idx": self.event_idx,
            "last_avail_idx": self.state.last_avail_idx,
            "used_idx": self.state.used_idx,
            "used_published": self._used_pub,
            "inflight": self.inflight,
            "popped": self.popped_total,
            "pushed": self.pushed_total,
        }
        try:
            d["avail_idx"] = self.avail_idx() if self.configured else None
        except (TranslationError, VqError, ValueError):
            d["avail_idx"] = None
        return d
