"""The device side of a split virtqueue (virtio 1.2, 2.7): pop with full validation, push,
publish used, notification suppression (EVENT_IDX).

Ring memory is reached through :class:`~backends.vdpa.dma.DmaSpace` only. The three ring areas
are translated once and cached per ``DmaSpace.generation`` (IOTLB + host memory generations),
so the hot path reads descriptors with ``struct.unpack_from`` straight from the host buffer;
any IOTLB or mem-table change invalidates the cache. The layout is in
:mod:`backends.virtio.ring`, the chain walk in :mod:`backends.vdpa.descriptor_chain`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from backends.virtio.ring import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    SPLIT_DESC,
    U16,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

from .access import Access, TranslationError
from .descriptor_chain import CHAIN_CHECKS, Chain, VqError
from .dma import DmaSpace
from .journal import Journal
from .virtqueue import RingArea, Virtqueue, VqState

__all__ = ["SplitVirtqueue"]


# Final: mypyc keeps these in C statics instead of looking them up in the module dict
_READ: Final = Access.READ
_WRITE: Final = Access.WRITE
_F_WRITE: Final = VRING_DESC_F_WRITE
_unpack_desc: Final = SPLIT_DESC.unpack_from


@functools.lru_cache(maxsize=512)
def _used_elems(n: int) -> struct.Struct:
    """``n`` consecutive used elements (id, len) as one struct."""
    return struct.Struct("<" + "II" * n)


@functools.lru_cache(maxsize=512)
def _avail_entries(n: int) -> struct.Struct:
    """``n`` consecutive avail ring entries (heads) as one struct."""
    return struct.Struct(f"<{n}H")


@dataclass
class _Rings:
    gen: tuple[int, ...]
    desc: RingArea
    avail: RingArea
    used: RingArea
    walk: Callable[[int], Chain]  # the chain walker over ``desc``


class SplitVirtqueue(Virtqueue):
    """Device side of one split virtqueue. Addresses are IOVAs (GPAs without a vIOMMU)."""

    def __init__(self, index: int, dma: DmaSpace, journal: Journal | None = None) -> None:
        super().__init__(index, dma, journal)
        self._popped: dict[int, int] = {}  # head -> avail position of popped-unpushed chains
        self._pending_used: list[int] = []  # id, len, id, len, ... (what flush writes)
        self._rings: _Rings | None = None

    # -- configuration ---------------------------------------------------------------------
    def set_num(self, num: int) -> None:
        if num <= 0 or num > 32768 or num & (num - 1):
            raise ValueError(f"vq {self.index}: split ring size {num} is not a power of 2 <= 32768")
        self.num = num
        self._rings = None

    def set_state(self, state: VqState) -> None:
        """Restore indexes; forgets inflight chains and unpublished used elements."""
        self.state = VqState(state.last_avail_idx & 0xFFFF, state.used_idx & 0xFFFF)
        self._used_pub = self.state.used_idx
        self.inflight = 0
        self._popped.clear()
        self._pending_used.clear()
        self.need_call = False

    def state_from_base(self, num: int) -> VqState:
        return VqState.from_vhost_base(num, packed=False)

    def invalidate(self) -> None:
        self._rings = None

    # -- ring access -----------------------------------------------------------------------
    def rings(self) -> _Rings:
        """The translated rings (cached per DmaSpace generation). Raises TranslationError
        (kind 'miss') or VqError('ring-translate')."""
        gen = self.dma.generation
        r = self._rings
        if r is not None and r.gen == gen:
            return r
        num = self.num
        desc = self._ring_area("descriptor ring", self.desc, desc_table_size(num), Access.READ)
        r = _Rings(
            gen,
            desc,
            self._ring_area("avail ring", self.avail, avail_ring_size(num), Access.READ),
            self._ring_area("used ring", self.used, used_ring_size(num), Access.WRITE),
            self._walker(desc),
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
        (VqError, or TranslationError(kind='miss')). Raises only when the first one fails.

        The heads are read with one unpack; a head that names a single plain descriptor
        inside the DMA space's remembered window (what DPDK and Linux post nearly always)
        is taken right here, anything else goes through :meth:`_take` (the full walk)."""
        if not self.configured or limit <= 0:
            return []
        rings, pending = self._avail()
        n = min(pending, limit)
        chains: list[Chain] = []
        if n <= 0:
            return chains
        st = self.state
        last = st.last_avail_idx
        num = self.num
        try:
            heads = self._heads(rings, last, n)
        except (ValueError, IndexError, struct.error) as e:  # ring memory unmapped underneath
            raise VqError("ring-access", str(e)) from None
        desc = rings.desc
        fast = desc.single  # the table is one host piece: descriptors read in place
        buf, base = desc._buf, desc._base
        popped = self._popped
        dma = self.dma
        taken = 0  # chains taken here and not yet counted in the queue's state
        try:
            for head in heads:
                if fast and head < num and head not in popped:
                    addr, length, flags, _ = _unpack_desc(buf, base + (head << 4))
                    if length and flags == 0:
                        p = dma.window_piece(addr, length, _READ)
                        if p is not None:
                            chains.append(Chain(head, [p], [], length, 0, last, 1, 1))
                            popped[head] = last
                            last = (last + 1) & 0xFFFF
                            taken += 1
                            continue
                    elif length and flags == _F_WRITE:
                        p = dma.window_piece(addr, length, _WRITE)
                        if p is not None:
                            chains.append(Chain(head, [], [p], 0, length, last, 1, 1))
                            popped[head] = last
                            last = (last + 1) & 0xFFFF
                            taken += 1
                            continue
                # the general path: the full walk and every check, on an up-to-date state
                st.last_avail_idx = last
                self._count_popped(taken)
                taken = 0
                try:
                    chain = self._take(rings, last)
                except (VqError, TranslationError):
                    if not chains:
                        raise
                    break
                last = st.last_avail_idx
                if chain is not None:
                    chains.append(chain)
        except (ValueError, IndexError, struct.error) as e:  # the table unmapped underneath
            if not chains:
                raise VqError("ring-access", str(e)) from None
        finally:
            st.last_avail_idx = last
            self._count_popped(taken)
        return chains

    def _count_popped(self, n: int) -> None:
        self.inflight += n
        self.popped_total += n

    def _heads(self, rings: _Rings, last: int, n: int) -> tuple[int, ...]:
        """The ``n`` avail ring entries from position ``last`` (one unpack per run)."""
        num = self.num
        start = last & (num - 1)
        k = min(n, num - start)
        avail = rings.avail
        heads: tuple[int, ...] = avail.unpack(_avail_entries(k), AVAIL_RING + 2 * start)
        if k < n:
            heads += avail.unpack(_avail_entries(n - k), AVAIL_RING)
        return heads

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
            chain = rings.walk(head)
        except VqError as ve:
            if ve.kind in CHAIN_CHECKS and self._fault("no-chain-validation"):
                self.state.last_avail_idx = (last + 1) & 0xFFFF  # the fault: skip silently
                return None
            raise
        except TranslationError as te:
            if te.kind == "miss":
                raise
            raise VqError("translate", str(te)) from None
        except (ValueError, IndexError, struct.error) as ae:  # ring memory unmapped underneath
            raise VqError("ring-access", str(ae)) from None
        chain.avail_idx = last
        self.state.last_avail_idx = (last + 1) & 0xFFFF
        self.inflight += 1
        self._popped[head] = last
        self.popped_total += 1
        return chain

    # -- push / flush ----------------------------------------------------------------------
    def push(self, chain: Chain, written: int) -> None:
        """Queue a used element for ``chain`` (published by :meth:`flush`)."""
        head = chain.head
        if self._popped.pop(head, -1) < 0:
            raise ValueError(f"vq {self.index}: push of head {head} that is not in flight")
        pending = self._pending_used
        pending.append(head)
        pending.append(written)
        st = self.state
        st.used_idx = (st.used_idx + 1) & 0xFFFF
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
        n = len(pending) // 2
        new = (old + n) & 0xFFFF
        try:
            # the elements in runs up to the ring's end (normally one or two struct stores)
            flat = pending
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

    @property
    def used_pending(self) -> int:
        return len(self._pending_used) // 2

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
        self._journal_rewind(n, in_order)
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
