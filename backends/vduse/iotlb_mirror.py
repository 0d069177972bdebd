"""UPDATE_IOTLB -> IOTLB_GET_FD walk -> one ``set_map`` diff on the device model.

VDUSE implements the vDPA bus op ``set_map`` (one-shot, the whole table): every map change
vhost-vdpa makes reaches userspace as UPDATE_IOTLB [start, last] (in practice [0, 2^64-1]),
meaning "drop what you cached in that range and fetch it again". :class:`IotlbMirror` walks
the range entry by entry with ``VDUSE_IOTLB_GET_FD``, mmaps what is new, and hands the device
the resulting table as :meth:`VdpaDevice.set_map`, which applies it as a diff.

Each IOTLB entry becomes one host region (``HostRegion``), keyed by everything that defines
its bytes: IOVA range, permission, file offset and the file's identity (st_dev, st_ino). An
entry whose key did not change keeps its region, its mmap and its synthetic user address, so
the set_map diff keeps its mapping and buffers in use are undisturbed. A changed entry gets a
new region at a new, never reused, user address (the IOTLB's "uaddr" side is this process's
address space for the mirrored memory; the region's gpa is the entry's IOVA).

A fetch that fails (an ioctl error, an mmap error, entries that make no sense) changes
nothing: the previous table and its mappings stay, and :class:`IotlbFetchError` says why.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

from backends.vdpa.access import Access, TranslationError
from backends.vdpa.device import VdpaDevice
from backends.vdpa.iotlb import SetMapDiff
from backends.vdpa.memory import HostRegion, Piece

from .kernel import VduseKernel
from .uapi import IotlbEntry

__all__ = ["IotlbFetchError", "IotlbMirror", "MirrorEntry"]

log = logging.getLogger(__name__)

ADDR_MAX = (1 << 64) - 1
#: Where synthetic user addresses start, and the gap between two regions (2 MiB aligned).
UADDR_BASE = 1 << 44
UADDR_ALIGN = 1 << 21
#: More entries than this in one walk means a kernel (or a fake) that does not make progress.
MAX_ENTRIES = 65536

Key = tuple[int, int, int, int, int, int]  # start, last, offset, perm, st_dev, st_ino


class IotlbFetchError(Exception):
    """The range could not be fetched; nothing was changed."""


@dataclass
class MirrorEntry:
    entry: IotlbEntry
    key: Key
    region: HostRegion

    def to_dict(self) -> dict[str, int]:
        return {
            "iova": self.entry.start,
            "size": self.entry.size,
            "offset": self.entry.offset,
            "perm": self.entry.perm,
            "region": self.region.id,
            "uaddr": self.region.uaddr,
        }


class IotlbMirror:
    """The device's view of the VDUSE IOTLB: one host region per entry (module doc)."""

    def __init__(self, kernel: VduseKernel, device: VdpaDevice) -> None:
        self.kernel = kernel
        self.device = device
        self.entries: dict[Key, MirrorEntry] = {}
        self._next_uaddr = UADDR_BASE
        self.fetches = 0
        self.failures = 0

    # -- fetching ------------------------------------------------------------------------------
    def _walk(self, start: int, last: int) -> list[tuple[IotlbEntry, int]]:
        """Every entry overlapping [start, last] with its fd (the caller closes them)."""
        got: list[tuple[IotlbEntry, int]] = []
        pos = start
        try:
            while pos <= last:
                if len(got) >= MAX_ENTRIES:
                    raise IotlbFetchError(f"more than {MAX_ENTRIES} IOTLB entries in one range")
                try:
                    entry, fd = self.kernel.iotlb_get_fd(pos, last)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        break  # no (more) entries overlap [pos, last]
                    raise IotlbFetchError(
                        f"VDUSE_IOTLB_GET_FD [{pos:#x}, {last:#x}] failed: {e}"
                    ) from e
                got.append((entry, fd))
                if entry.start > entry.last or entry.last < pos or entry.start > last:
                    raise IotlbFetchError(
                        f"kernel returned IOTLB entry [{entry.start:#x}, {entry.last:#x}] for "
                        f"the query [{pos:#x}, {last:#x}]"
                    )
                if entry.last >= ADDR_MAX:
                    break
                pos = entry.last + 1
        except BaseException:
            for _, fd in got:
                _close(fd)
            raise
        return got

    def _key(self, entry: IotlbEntry, fd: int) -> Key:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise IotlbFetchError(f"cannot stat the fd of IOTLB entry {entry}: {e}") from e
        return (entry.start, entry.last, entry.offset, entry.perm, st.st_dev, st.st_ino)

    def _map(self, entry: IotlbEntry, fd: int) -> HostRegion:
        size = entry.size
        gran = mmap.ALLOCATIONGRANULARITY
        aligned = entry.offset - entry.offset % gran
        delta = entry.offset - aligned
        try:
            mm = self.kernel.map_fd(fd, aligned, size + delta, entry.perm)
        except (OSError, ValueError, OverflowError) as e:
            raise IotlbFetchError(
                f"cannot mmap IOTLB entry iova [{entry.start:#x}, {entry.last:#x}] "
                f"offset {entry.offset:#x} perm {entry.perm}: {e}"
            ) from e
        uaddr = self._next_uaddr
        self._next_uaddr += -(-(size + UADDR_ALIGN) // UADDR_ALIGN) * UADDR_ALIGN
        try:
            return HostRegion(entry.start, size, uaddr, entry.offset, mm, base=delta)
        except ValueError as e:
            mm.close()
            raise IotlbFetchError(f"IOTLB entry {entry}: {e}") from e

    # -- updating ------------------------------------------------------------------------------
    def update(self, start: int, last: int) -> SetMapDiff:
        """Fetch [start, last] again and apply the whole table to the device as a set_map
        diff. Raises IotlbFetchError (nothing changed) when the range cannot be fetched."""
        self.fetches += 1
        try:
            return self._update(start, last)
        except IotlbFetchError:
            self.failures += 1
            raise

    def _update(self, start: int, last: int) -> SetMapDiff:
        if start > last:
            raise IotlbFetchError(f"empty IOVA range [{start:#x}, {last:#x}]")
        fetched = self._walk(start, last)
        new_regions: list[HostRegion] = []
        try:
            # the fault 'stale-iotlb': cached entries survive the update, new ones that
            # overlap them are not taken (the device keeps translating the old way)
            stale = self.device.faults.active("stale-iotlb")
            table: dict[Key, MirrorEntry] = {
                k: e
                for k, e in self.entries.items()
                if stale or e.entry.last < start or e.entry.start > last  # outside: kept
            }
            for entry, fd in fetched:
                key = self._key(entry, fd)
                old = self.entries.get(key)
                if stale and old is None and _overlaps(entry, table.values()):
                    continue
                if old is None:
                    region = self._map(entry, fd)
                    new_regions.append(region)
                    old = MirrorEntry(entry, key, region)
                table[key] = old
            ordered = sorted(table.values(), key=lambda m: m.entry.start)
            for a, b in zip(ordered, ordered[1:], strict=False):
                if a.entry.last >= b.entry.start:
                    raise IotlbFetchError(
                        f"IOTLB entries overlap: [{a.entry.start:#x}, {a.entry.last:#x}] and "
                        f"[{b.entry.start:#x}, {b.entry.last:#x}]"
                    )
            diff = self._apply(table, ordered)
        except BaseException:
            for r in new_regions:
                r.close()
            raise
        finally:
            for _, fd in fetched:
                _close(fd)
        return diff

    def _apply(self, table: dict[Key, MirrorEntry], ordered: list[MirrorEntry]) -> SetMapDiff:
        removed = [m for k, m in self.entries.items() if k not in table]
        added = [m for k, m in table.items() if k not in self.entries]
        dev = self.device
        done_remove: list[MirrorEntry] = []
        done_add: list[MirrorEntry] = []
        try:
            for m in removed:
                dev.remove_host_region(m.region)
                done_remove.append(m)
            for m in added:
                dev.add_host_region(m.region)
                done_add.append(m)
            diff = dev.set_map(
                (m.entry.start, m.entry.size, m.region.uaddr, m.entry.perm) for m in ordered
            )
        except ValueError as e:  # roll back: the old regions and table stay
            for m in done_add:
                dev.remove_host_region(m.region)
            for m in done_remove:
                dev.add_host_region(m.region)
            raise IotlbFetchError(f"the fetched table was refused: {e}") from e
        for m in removed:
            m.region.close()
        self.entries = table
        return diff

    def clear(self) -> None:
        """Forget every entry (device destroyed): drop the regions and close the mmaps."""
        if self.entries:
            try:
                self.device.set_map([])
            except ValueError:
                pass
        for m in self.entries.values():
            try:
                self.device.remove_host_region(m.region)
            except ValueError:
                pass
            m.region.close()
        self.entries = {}

    def lookup_offset(self, addr: int, length: int, access: Access) -> list[Piece]:
        """Guest memory by file offset: what a device reaches that takes an IOVA for a
        guest-physical address (for the guest's RAM file, offset == GPA below 4 GiB). The
        fault 'translate-by-gpa' on VDUSE, where regions know no GPAs."""
        for m in self.entries.values():
            off, size = m.entry.offset, m.entry.size
            if off <= addr and addr + length <= off + size:
                return [m.region.piece(addr - off, length)]
        raise TranslationError("unmapped", addr, length, access)

    def to_list(self) -> list[dict[str, int]]:
        return [m.to_dict() for m in sorted(self.entries.values(), key=lambda m: m.entry.start)]


def _overlaps(entry: IotlbEntry, kept: Iterable[MirrorEntry]) -> bool:
    return any(m.entry.start <= entry.last and entry.start <= m.entry.last for m in kept)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
