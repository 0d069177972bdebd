"""The IOTLB: an interval map IOVA -> QEMU user address, with vhost permissions.

Sorted starts + bisect over non-overlapping :class:`Mapping` objects, with a parallel list of
plain-int ``(end, uaddr - iova, perm)`` spans so that the common lookup (one mapping, access
allowed) touches no enum and no attribute: ``translate`` runs >= 1 M lookups/s with 100 000
entries (``make bench``: ``iotlb_lookups_per_s_100k``). Every visible change
bumps :attr:`IOTLB.generation` and is journalled (``dma.map``, ``dma.unmap``,
``dma.batch_begin``, ``dma.batch_commit``, ``dma.set_map``). Inside a batch edits go to a
pending copy; ``translate`` keeps seeing the committed map until ``batch_commit``.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import logging
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .access import Access, TranslationError
from .faults import Faults
from .journal import Journal

__all__ = ["IOTLB", "Mapping", "Perm", "SetMapDiff", "TranslationError"]

log = logging.getLogger(__name__)

ADDR_LIMIT = 1 << 64
_mapping_ids = itertools.count(1)


class Perm(enum.IntEnum):
    """vhost access permissions (``VHOST_ACCESS_*``). RO: the device may only read."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class Mapping:
    """One IOTLB entry. Compared by identity: an unchanged entry keeps its very object."""

    __slots__ = ("id", "iova", "perm", "size", "uaddr")

    def __init__(self, iova: int, size: int, uaddr: int, perm: Perm | int) -> None:
        self.id = next(_mapping_ids)
        self.iova = iova
        self.size = size
        self.uaddr = uaddr
        self.perm = Perm(perm)

    @property
    def end(self) -> int:
        return self.iova + self.size

    def key(self) -> tuple[int, int, int, int]:
        return (self.iova, self.size, self.uaddr, int(self.perm))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "iova": self.iova,
            "size": self.size,
            "uaddr": self.uaddr,
            "perm": int(self.perm),
        }

    def __repr__(self) -> str:
        return (
            f"Mapping(id={self.id}, iova={self.iova:#x}, size={self.size:#x}, "
            f"uaddr={self.uaddr:#x}, perm={self.perm.name})"
        )


@dataclass
class SetMapDiff:
    added: list[Mapping] = field(default_factory=list)
    removed: list[Mapping] = field(default_factory=list)
    kept: list[Mapping] = field(default_factory=list)


def _check_range(iova: int, size: int) -> None:
    if size <= 0 or iova < 0 or iova + size > ADDR_LIMIT:
        raise ValueError(f"bad IOTLB range iova={iova:#x} size={size:#x}")


class _Table:
    """Sorted, non-overlapping mappings (one committed, one pending during a batch).

    ``starts[i]`` is ``maps[i].iova`` and ``spans[i]`` is ``(end, uaddr - iova, int(perm))``
    of ``maps[i]``: the three lists change together, only through the methods here.
    """

    __slots__ = ("maps", "spans", "starts")

    def __init__(self, maps: list[Mapping] | None = None) -> None:
        self.maps: list[Mapping] = []
        self.starts: list[int] = []
        self.spans: list[tuple[int, int, int]] = []
        self.assign(maps or [])

    def assign(self, maps: list[Mapping]) -> None:
        """Replace the whole table by ``maps`` (sorted, non-overlapping)."""
        self.maps = maps
        self.starts = [m.iova for m in maps]
        self.spans = [_span(m) for m in maps]

    def copy(self) -> _Table:
        t = _Table()
        t.maps, t.starts, t.spans = list(self.maps), list(self.starts), list(self.spans)
        return t

    def overlapping(self, lo: int, hi: int) -> tuple[int, int]:
        """Index range [i, j) of the mappings overlapping [lo, hi)."""
        i = bisect_right(self.starts, lo) - 1
        if i < 0 or self.spans[i][0] <= lo:
            i += 1
        j = bisect.bisect_left(self.starts, hi, lo=max(i, 0))
        return i, j

    def cut(self, lo: int, hi: int) -> tuple[list[Mapping], list[Mapping]]:
        """Remove [lo, hi): returns (removed originals, new split remainders)."""
        i, j = self.overlapping(lo, hi)
        if i >= j:
            return [], []
        removed = self.maps[i:j]
        splits: list[Mapping] = []
        first, last = removed[0], removed[-1]
        if first.iova < lo:
            splits.append(Mapping(first.iova, lo - first.iova, first.uaddr, first.perm))
        if last.end > hi:
            splits.append(Mapping(hi, last.end - hi, last.uaddr + (hi - last.iova), last.perm))
        self.maps[i:j] = splits
        self.starts[i:j] = [m.iova for m in splits]
        self.spans[i:j] = [_span(m) for m in splits]
        return removed, splits

    def insert(self, m: Mapping) -> None:
        i = bisect.bisect_left(self.starts, m.iova)
        self.maps.insert(i, m)
        self.starts.insert(i, m.iova)
        self.spans.insert(i, _span(m))


def _span(m: Mapping) -> tuple[int, int, int]:
    return (m.iova + m.size, m.uaddr - m.iova, int(m.perm))


class IOTLB:
    """IOVA -> uaddr interval map, journalled through an optional Journal."""

    def __init__(self, journal: Journal | None = None, faults: Faults | None = None) -> None:
        self.journal = journal
        self.faults = faults
        self._t = _Table()
        self._pending: _Table | None = None
        self._pending_changes = 0
        self.generation = 0

    # -- helpers ---------------------------------------------------------------------------
    def _rec(self, kind: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.record(kind, **fields)

    def _fault(self, name: str) -> bool:
        return self.faults is not None and self.faults.active(name)

    @property
    def in_batch(self) -> bool:
        return self._pending is not None

    def _work(self) -> _Table:
        return self._pending if self._pending is not None else self._t

    def _changed(self) -> None:
        """A change happened on the working table: publish it now unless batching."""
        if self._pending is not None:
            self._pending_changes += 1
            return
        self._after_change(self._t)
        self.generation += 1

    def _after_change(self, t: _Table) -> None:
        if self._fault("remap-all"):
            self._remap_all(t)

    def _rec_whole_unmap(self, m: Mapping, **extra: object) -> None:
        """Journal the removal of the whole of ``m`` (no split)."""
        self._rec(
            "dma.unmap", ids=[m.id], iova=m.iova, size=m.size, uaddr=m.uaddr, perm=m.perm,
            split=[], **extra,
        )  # fmt: skip

    def _rec_whole_map(self, m: Mapping, **extra: object) -> None:
        """Journal ``m`` as a new mapping that replaced nothing."""
        self._rec(
            "dma.map", id=m.id, iova=m.iova, size=m.size, uaddr=m.uaddr, perm=m.perm,
            replaced=[], **extra,
        )  # fmt: skip

    def _remap_all(self, t: _Table) -> None:
        """Fault 'remap-all': drop every mapping and recreate it (new ids)."""
        old = t.maps
        new = [Mapping(m.iova, m.size, m.uaddr, m.perm) for m in old]
        for m in old:
            self._rec_whole_unmap(m)
        for m in new:
            self._rec_whole_map(m)
        t.assign(new)

    # -- edits -----------------------------------------------------------------------------
    def dma_map(self, iova: int, size: int, uaddr: int, perm: Perm | int) -> Mapping:
        """Map [iova, iova+size) -> uaddr, replacing whatever it overlaps."""
        try:
            _check_range(iova, size)
            if uaddr < 0 or uaddr + size > ADDR_LIMIT:
                raise ValueError(f"bad IOTLB uaddr {uaddr:#x} size={size:#x}")
            perm = Perm(perm)
        except ValueError as e:
            self._rec("error.dma", op="map", detail=str(e))
            raise
        t = self._work()
        removed, _ = t.cut(iova, iova + size)
        m = Mapping(iova, size, uaddr, perm)
        t.insert(m)
        self._rec(
            "dma.map",
            id=m.id,
            iova=iova,
            size=size,
            uaddr=uaddr,
            perm=perm,
            replaced=[r.id for r in removed],
        )
        self._changed()
        return m

    def dma_unmap(self, iova: int, size: int) -> list[Mapping]:
        """Unmap [iova, iova+size). Returns the removed Mappings; entries that overlap only
        partly are split and their remaining parts come back as new Mapping objects."""
        try:
            _check_range(iova, size)
        except ValueError as e:
            self._rec("error.dma", op="unmap", detail=str(e))
            raise
        stale = self._fault("stale-iotlb")
        t = self._work()
        if stale:
            t = t.copy()  # compute what would go, but keep translating through it
        removed, splits = t.cut(iova, iova + size)
        self._rec(
            "dma.unmap",
            ids=[r.id for r in removed],
            iova=iova,
            size=size,
            split=[s.id for s in splits],
        )
        if removed and not stale:
            self._changed()
        return removed

    def batch_begin(self) -> None:
        if self._pending is not None:
            self._rec("error.dma", op="batch_begin", detail="nested batch_begin ignored")
            log.warning("nested IOTLB batch_begin ignored")
            return
        self._pending = self._t.copy()
        self._pending_changes = 0
        self._rec("dma.batch_begin")

    def batch_commit(self) -> None:
        if self._pending is None:
            self._rec("error.dma", op="batch_commit", detail="batch_commit without batch_begin")
            log.warning("IOTLB batch_commit without batch_begin ignored")
            return
        pending, changes = self._pending, self._pending_changes
        self._pending = None
        self._pending_changes = 0
        if changes:
            self._after_change(pending)
            self._t = pending
            self.generation += 1
        self._rec("dma.batch_commit", changes=changes, entries=len(self._t.maps))

    def set_map(self, entries: Iterable[tuple[int, int, int, int]]) -> SetMapDiff:
        """Make the map exactly ``entries`` (iova, size, uaddr, perm), applied as a diff:
        unchanged entries keep their Mapping object, changed ones are removed + added."""
        wanted: list[tuple[int, int, int, int]] = []
        try:
            for iova, size, uaddr, perm in entries:
                _check_range(iova, size)
                if uaddr < 0 or uaddr + size > ADDR_LIMIT:
                    raise ValueError(f"bad uaddr {uaddr:#x}")
                wanted.append((iova, size, uaddr, int(Perm(perm))))
            wanted.sort()
            for a, b in itertools.pairwise(wanted):
                if a[0] + a[1] > b[0]:
                    raise ValueError(f"set_map entries overlap at iova {b[0]:#x}")
        except (ValueError, TypeError) as e:
            self._rec("error.dma", op="set_map", detail=str(e))
            raise ValueError(str(e)) from e
        t = self._work()
        current = {m.key(): m for m in t.maps}
        diff = SetMapDiff()
        new_maps: list[Mapping] = []
        for key in wanted:
            m = current.pop(key, None)
            if m is not None:
                diff.kept.append(m)
                new_maps.append(m)
            else:
                m = Mapping(*key)
                diff.added.append(m)
                new_maps.append(m)
        diff.removed = sorted(current.values(), key=lambda m: m.iova)
        for m in diff.removed:
            self._rec_whole_unmap(m, via="set_map")
        for m in diff.added:
            self._rec_whole_map(m, via="set_map")
        changed = bool(diff.added or diff.removed)
        if changed:
            t.assign(new_maps)
        self._rec(
            "dma.set_map", added=len(diff.added), removed=len(diff.removed), kept=len(diff.kept)
        )
        if changed:
            self._changed()
        return diff

    def reset(self) -> None:
        """Drop every mapping (and any open batch)."""
        self._pending = None
        self._pending_changes = 0
        if self._t.maps:
            self._rec("dma.reset", removed=len(self._t.maps))
            self._t = _Table()
            self.generation += 1

    # -- queries ---------------------------------------------------------------------------
    def entries(self) -> list[Mapping]:
        """The committed (visible) mappings, sorted by IOVA."""
        return list(self._t.maps)

    def pending_entries(self) -> list[Mapping] | None:
        """The batch's pending mappings, or None outside a batch."""
        return None if self._pending is None else list(self._pending.maps)

    def __len__(self) -> int:
        return len(self._t.maps)

    def lookup(self, iova: int) -> Mapping | None:
        """The committed mapping containing ``iova``."""
        t = self._t
        i = bisect_right(t.starts, iova) - 1
        if i >= 0 and iova < t.spans[i][0]:
            return t.maps[i]
        return None

    def translate(self, iova: int, length: int, access: Access) -> list[tuple[int, int]]:
        """(uaddr, len) pieces covering [iova, iova+length), one per mapping crossed.
        Raises TranslationError ('unmapped', 'partial' or 'perm'); never a partial result."""
        if length <= 0:
            return []
        t = self._t
        i = bisect_right(t.starts, iova) - 1
        if i < 0:
            raise TranslationError("unmapped", iova, length, access)
        end_m, delta, perm = t.spans[i]
        if iova >= end_m:
            raise TranslationError("unmapped", iova, length, access)
        if iova + length <= end_m and not int(access) & ~perm:  # one mapping, allowed
            return [(iova + delta, length)]
        return self._translate_from(t, i, iova, length, access)

    def _translate_from(
        self, t: _Table, i: int, iova: int, length: int, access: Access
    ) -> list[tuple[int, int]]:
        """``translate``'s general case: mapping ``i`` holds ``iova``; the range may cross
        into the next mappings or need a permission a mapping lacks."""
        starts, spans, maps = t.starts, t.spans, t.maps
        end = iova + length
        pos = iova
        out: list[tuple[int, int]] = []
        need = int(access)
        n = len(spans)
        while True:
            end_m, delta, perm = spans[i]
            if need & ~perm and not self._fault("ignore-iotlb-perm"):  # the fault: no check
                raise TranslationError(
                    "perm", pos, end - pos, access, f"mapping perm {maps[i].perm.name}"
                )
            take = min(end, end_m) - pos
            out.append((pos + delta, take))
            pos += take
            if pos >= end:
                return out
            i += 1
            if i >= n or starts[i] != pos:
                raise TranslationError("partial", pos, end - pos, access)
