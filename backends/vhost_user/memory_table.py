"""The vhost-user memory table mapped onto the device model.

Every region QEMU hands over (SET_MEM_TABLE, ADD_MEM_REG) becomes a :class:`HostRegion` the
device can reach through ``add_host_region``. Without a vIOMMU (ACCESS_PLATFORM not
negotiated) each region is also identity-mapped by guest-physical address in the IOTLB
(``dma_map(gpa, size, uaddr, RW)``), exactly like QEMU's vhost-vdpa does. With a vIOMMU the
IOTLB is fed only by IOTLB_MSG, so the table gives host memory and nothing else.

A full SET_MEM_TABLE re-send keeps every region whose (gpa, size, uaddr, mmap_offset) is
unchanged (its mmap and its id survive, the duplicate fd is closed) and hands the device the
whole identity list through ``set_map`` so only the difference is applied.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import HostRegion
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import close_fds
from backends.vhost_user.messages import MAX_MEM_SLOTS, MEM_TABLE_MAX_REGIONS, MemRegion

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

_U64_LIMIT = 1 << 64


def _key(r: HostRegion | MemRegion) -> tuple[int, int, int, int]:
    return (r.gpa, r.size, r.uaddr, r.mmap_offset)


def _check_region(m: MemRegion) -> None:
    if m.size == 0:
        raise ProtocolError("bad-region", f"zero-size region at gpa {m.gpa:#x}")
    if m.gpa + m.size > _U64_LIMIT or m.uaddr + m.size > _U64_LIMIT:
        raise ProtocolError(
            "bad-region",
            f"region gpa={m.gpa:#x} uaddr={m.uaddr:#x} size={m.size:#x} wraps around",
        )


def _check_fd(m: MemRegion, fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError("bad-fd", f"region fd {fd}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(
            "bad-fd", f"region fd {fd} at gpa {m.gpa:#x} is not a shared-memory file"
        )
    if m.mmap_offset + m.size > st.st_size:
        raise ProtocolError(
            "bad-region",
            f"region gpa={m.gpa:#x} needs mmap_offset+size {m.mmap_offset + m.size:#x} "
            f"but its fd holds {st.st_size:#x} bytes",
        )


def _overlap(a: MemRegion | HostRegion, b: MemRegion | HostRegion) -> str | None:
    if a.gpa < b.gpa + b.size and b.gpa < a.gpa + a.size:
        return "guest-physical"
    if a.uaddr < b.uaddr + b.size and b.uaddr < a.uaddr + a.size:
        return "user-address"
    return None


def _check_no_overlap(regions: Sequence[MemRegion]) -> None:
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            space = _overlap(a, b)
            if space:
                raise ProtocolError(
                    "overlap",
                    f"regions gpa={a.gpa:#x}+{a.size:#x} and gpa={b.gpa:#x}+{b.size:#x} "
                    f"overlap in {space} space",
                )


class MemoryTable:
    """The transport's view of QEMU's memory table and its mapping into the device."""

    def __init__(self, device: VdpaDevice, *, max_slots: int = MAX_MEM_SLOTS) -> None:
        self.device = device
        self.max_slots = max_slots
        self.iommu = False
        self._regions: list[HostRegion] = []

    # -- queries ------------------------------------------------------------------------------
    def regions(self) -> list[HostRegion]:
        return list(self._regions)

    def uaddr_to_gpa(self, uaddr: int) -> int | None:
        return self.device.host.uaddr_to_gpa(uaddr)

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self._regions]

    # -- the identity map (no vIOMMU) ---------------------------------------------------------
    def _identity(self) -> list[tuple[int, int, int, Perm]]:
        return [(r.gpa, r.size, r.uaddr, Perm.RW) for r in self._regions]

    def set_iommu(self, enabled: bool) -> None:
        """ACCESS_PLATFORM negotiated or dropped (SET_FEATURES): rebuild what the IOTLB holds.

        With a vIOMMU every SET_FEATURES starts an empty IOTLB, as the kernel's vhost-net does
        (vhost_init_device_iotlb): QEMU sends SET_FEATURES on every vhost start, but no
        INVALIDATE for what the guest unmaps while vhost is stopped (device reset, VM stop),
        so a translation cached before the stop may point at a page the IOVA no longer maps.
        """
        if enabled == self.iommu:
            if enabled and len(self.device.iotlb):
                self.device.set_map([])
            return
        self.iommu = enabled
        # With a vIOMMU the IOTLB starts empty (fed by UPDATE); without, it is the identity.
        self.device.set_map([] if enabled else self._identity())

    def resync(self) -> None:
        """After a device reset: make sure the device still has every region and mapping."""
        known = {id(r) for r in self.device.host.regions()}
        for r in self._regions:
            if id(r) not in known:
                self.device.add_host_region(r)
        if not self.iommu:
            self.device.set_map(self._identity())

    # -- SET_MEM_TABLE ------------------------------------------------------------------------
    def set_table(self, table: Sequence[MemRegion], fds: list[int], request: str) -> None:
        """Replace the whole table. Takes ownership of ``fds`` (all closed on return)."""
        started = time.perf_counter_ns()
        try:
            if not 0 < len(table) <= MEM_TABLE_MAX_REGIONS:
                raise ProtocolError(
                    "bad-mem-table",
                    f"{len(table)} regions (1..{MEM_TABLE_MAX_REGIONS} allowed)",
                )
            if len(fds) != len(table):
                raise ProtocolError(
                    "fd-count", f"{len(table)} regions but {len(fds)} file descriptors"
                )
            for m, fd in zip(table, fds, strict=True):
                _check_region(m)
                _check_fd(m, fd)
            _check_no_overlap(table)
            with self._attributed(request, started):
                self._apply_table(table, fds, request)
        finally:
            close_fds(fds)

    def _apply_table(self, table: Sequence[MemRegion], fds: list[int], request: str) -> None:
        old = {_key(r): r for r in self._regions}
        replace_all = self.device.faults.active("mem-table-full-replace")
        kept: list[HostRegion] = []
        new: list[HostRegion] = []
        created: list[HostRegion] = []
        try:
            for m, fd in zip(table, fds, strict=True):
                r = None if replace_all else old.pop(_key(m), None)
                if r is not None:
                    kept.append(r)  # identity preserved; the duplicate fd is closed later
                else:
                    r = self._map(m, fd)
                    created.append(r)
                new.append(r)
        except ProtocolError:
            for r in created:
                r.close()
            raise
        dev = self.device
        stale = list(old.values())
        self._regions = sorted(new, key=lambda r: r.gpa)
        if not self.iommu:
            # the IOTLB diff first: unchanged regions keep their mapping, stale ones go
            dev.set_map(self._identity())
        for r in stale:
            self._remove_host(r, unmap=False)
            r.close()
        for r in created:
            dev.add_host_region(r)
        dev.journal.record(
            "mem.table",
            request=request,
            kept=[r.id for r in kept],
            added=[r.id for r in created],
            removed=[r.id for r in stale],
        )

    # -- ADD_MEM_REG / REM_MEM_REG ------------------------------------------------------------
    def add(self, m: MemRegion, fd: int, request: str) -> HostRegion:
        """Map one more region. Takes ownership of ``fd``."""
        started = time.perf_counter_ns()
        try:
            _check_region(m)
            _check_fd(m, fd)
            if len(self._regions) >= self.max_slots:
                raise ProtocolError(
                    "too-many-regions", f"all {self.max_slots} memory slots are in use"
                )
            for r in self._regions:
                space = _overlap(m, r)
                if space:
                    raise ProtocolError(
                        "overlap",
                        f"region gpa={m.gpa:#x}+{m.size:#x} overlaps region {r.id} "
                        f"(gpa={r.gpa:#x}+{r.size:#x}) in {space} space",
                    )
            r = self._map(m, fd)
        finally:
            close_fds([fd])
        dev = self.device
        with self._attributed(request, started):
            if self.iommu:
                dev.add_host_region(r)
            else:
                dev.batch_begin()
                try:
                    dev.add_host_region(r)
                    dev.dma_map(r.gpa, r.size, r.uaddr, Perm.RW)
                finally:
                    dev.batch_commit()
        self._regions.append(r)
        self._regions.sort(key=lambda x: x.gpa)
        return r

    def remove(self, m: MemRegion, request: str) -> HostRegion:
        """Unmap the region named by gpa + uaddr + size (the mmap offset is ignored)."""
        started = time.perf_counter_ns()
        for r in self._regions:
            if (r.gpa, r.size, r.uaddr) == (m.gpa, m.size, m.uaddr):
                break
        else:
            raise ProtocolError(
                "unknown-region",
                f"no region gpa={m.gpa:#x} size={m.size:#x} uaddr={m.uaddr:#x} to remove",
            )
        if self.device.faults.active("ignore-rem-mem-reg"):
            return r  # the fault: acknowledged, still mapped
        self._regions.remove(r)
        with self._attributed(request, started):
            self._remove_host(r)
            r.close()
        return r

    def clear(self, request: str) -> None:
        """Drop every region and every IOTLB entry (disconnect)."""
        regions, self._regions = self._regions, []
        self.device.set_map([])
        self.iommu = False
        with self._attributed(request):
            for r in regions:
                self._remove_host(r, unmap=False)
                r.close()

    # -- a peer that shrinks what it handed over ---------------------------------------------
    def check_backing(self) -> list[HostRegion]:
        """Drop every region whose backing file the front-end truncated below the region
        (only files without F_SEAL_SHRINK are checked: one fstat each), and every region an
        access faulted in (the SIGBUS guard mapped zero pages over it: the shrink landed
        during a callback, after this check). Each is journalled (``error.mem``
        ``region-shrunk`` naming the region, ``found_by`` ``size-check`` or ``sigbus``) and
        the device gets NEEDS_RESET; later accesses to its addresses fail translation.
        Returns the dropped ones.

        Called before every event-loop callback, so no ring work starts on a shrunk region,
        and after a callback in which the SIGBUS guard caught a fault."""
        fstat = not self.device.faults.active("skip-shrink-guard")
        shrunk = [r for r in self._regions if r.backing_fd >= 0 and not r.backing_ok(fstat=fstat)]
        for r in shrunk:
            faulted = r.faulted
            try:
                size = os.fstat(r.backing_fd).st_size
            except OSError:
                size = -1
            self._regions.remove(r)
            self._remove_host(r)
            r.close()
            how = (
                "an access faulted (SIGBUS caught, zero pages mapped over the missing part)"
                if faulted
                else "found before the callback"
            )
            self.device.fail(
                None,
                "region-shrunk",
                f"region {r.id} gpa={r.gpa:#x} size={r.size:#x} uaddr={r.uaddr:#x}: its file "
                f"now holds {size:#x} bytes, needs {r.mmap_offset + r.size:#x}; {how}; "
                "region dropped",
                journal_kind="error.mem",
            )
        return shrunk

    # -- helpers ------------------------------------------------------------------------------
    def _map(self, m: MemRegion, fd: int) -> HostRegion:
        stale = self.device.faults.active("stale-region-offset")
        try:
            r = HostRegion.from_fd(fd, m.gpa, m.size, m.uaddr, 0 if stale else m.mmap_offset)
        except (OSError, ValueError) as e:
            raise ProtocolError("mmap", f"cannot map region gpa={m.gpa:#x}: {e}") from e
        r.mmap_offset = m.mmap_offset  # the fault is silent: QEMU's offset is what is reported
        return r

    @contextlib.contextmanager
    def _attributed(self, request: str, started: int | None = None) -> Iterator[None]:
        """Name the request that caused the device's ``mem.add`` / ``mem.remove`` entries, and
        give them and ``dma.set_map`` ``duration_us``: microseconds from the start of handling
        ``request`` (``started``, a perf_counter_ns value) until the whole change was applied
        (mmap, host memory, IOTLB, munmap of a removed region)."""
        if started is None:
            started = time.perf_counter_ns()
        timed: list[dict[str, Any]] = []

        def tag(entry: dict[str, Any]) -> None:
            if entry["kind"] in ("mem.add", "mem.remove"):
                entry.setdefault("request", request)
                entry.setdefault("region", entry.get("id"))
                timed.append(entry)
            elif entry["kind"] == "dma.set_map":
                timed.append(entry)

        journal = self.device.journal
        journal.subscribe(tag)
        try:
            yield
        finally:
            journal.unsubscribe(tag)
            duration_us = round((time.perf_counter_ns() - started) / 1000, 3)
            for entry in timed:
                entry.setdefault("duration_us", duration_us)

    def _remove_host(self, r: HostRegion, *, unmap: bool = True) -> None:
        dev = self.device
        if unmap and not self.iommu:
            dev.dma_unmap(r.gpa, r.size)
        if any(o is r for o in dev.host.regions()):
            dev.remove_host_region(r)
