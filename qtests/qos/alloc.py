"""Guest-physical memory allocator for the qtest driver.

The driver is the guest: rings, buffers and MSI-X words live in guest RAM that this allocator
hands out.  It knows named RAM ranges (``low`` below 4 GiB, ``high`` above, hotplugged DIMMs
added later with `add_range`), allocates first-fit with alignment (page-aligned by default),
refuses double frees, and reports what was never freed (`leaks`, `assert_no_leaks`).
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass

PAGE_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30

#: q35/pc: everything below 1 MiB is legacy (IVT/BDA, VGA hole 0xa0000-0xc0000, PAM/BIOS
#: shadow 0xc0000-0x100000).  The allocator never hands it out.
LOW_RAM_START = 1 * MiB
FOUR_GIB = 4 * GiB


class AllocError(Exception):
    """Allocation failure, bad free, overlapping range, or leaked allocations."""


@dataclass(frozen=True, slots=True)
class MemRange:
    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.start <= addr and addr + size <= self.end


@dataclass(frozen=True, slots=True)
class Allocation:
    addr: int
    size: int
    range: str
    tag: str


class _Holes:
    """Sorted, disjoint free intervals [start, end) of one range."""

    def __init__(self, start: int, end: int) -> None:
        self.starts = [start]
        self.ends = [end]

    def take(self, size: int, align: int) -> int | None:
        for i, (s, e) in enumerate(zip(self.starts, self.ends, strict=True)):
            a = (s + align - 1) & ~(align - 1)
            if a + size <= e:
                self._carve(i, a, a + size)
                return a
        return None

    def _carve(self, i: int, a: int, b: int) -> None:
        s, e = self.starts[i], self.ends[i]
        del self.starts[i], self.ends[i]
        if b < e:
            self.starts.insert(i, b)
            self.ends.insert(i, e)
        if s < a:
            self.starts.insert(i, s)
            self.ends.insert(i, a)

    def give(self, a: int, b: int) -> None:
        i = bisect.bisect_left(self.starts, a)
        if i > 0 and self.ends[i - 1] == a:  # merge with the hole before
            i -= 1
            a = self.starts[i]
            del self.starts[i], self.ends[i]
        if i < len(self.starts) and self.starts[i] == b:  # merge with the hole after
            b = self.ends[i]
            del self.starts[i], self.ends[i]
        self.starts.insert(i, a)
        self.ends.insert(i, b)

    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))


class GuestAllocator:
    """First-fit allocator over named guest-physical RAM ranges."""

    def __init__(self, ranges: list[MemRange] | None = None, *, page_size: int = PAGE_SIZE) -> None:
        self.page_size = page_size
        self._ranges: dict[str, MemRange] = {}
        self._holes: dict[str, _Holes] = {}
        self._live: dict[int, Allocation] = {}
        self._recently_freed: collections.OrderedDict[int, Allocation] = collections.OrderedDict()
        for r in ranges or []:
            self.add_range(r.start, r.size, r.name)

    # ------------------------------------------------------------------ ranges
    @classmethod
    def for_ram(cls, below_4g: int, above_4g: int = 0) -> GuestAllocator:
        """Ranges of a q35/pc guest: ``low`` = [1 MiB, below_4g), ``high`` = [4 GiB, +above_4g)."""
        alloc = cls()
        if below_4g > LOW_RAM_START:
            alloc.add_range(LOW_RAM_START, below_4g - LOW_RAM_START, "low")
        if above_4g > 0:
            alloc.add_range(FOUR_GIB, above_4g, "high")
        return alloc

    def add_range(self, start: int, size: int, name: str | None = None) -> str:
        """Make [start, start+size) allocatable (e.g. a hotplugged DIMM); returns its name."""
        if size <= 0:
            raise AllocError(f"range at 0x{start:x} has no size")
        name = name or f"ram@0x{start:x}"
        if name in self._ranges:
            raise AllocError(f"range name {name!r} already used")
        for r in self._ranges.values():
            if start < r.end and r.start < start + size:
                raise AllocError(
                    f"range 0x{start:x}+0x{size:x} overlaps {r.name} (0x{r.start:x}+0x{r.size:x})"
                )
        self._ranges[name] = MemRange(name, start, size)
        self._holes[name] = _Holes(start, start + size)
        return name

    def remove_range(self, name_or_start: str | int, *, force: bool = False) -> list[Allocation]:
        """Forget a range (e.g. before unplugging its DIMM).

        Refuses while allocations live in it unless ``force``; returns what was still live
        (and drops it).
        """
        r = self._range(name_or_start)
        inside = [a for a in self._live.values() if a.range == r.name]
        if inside and not force:
            listing = ", ".join(f"0x{a.addr:x}+0x{a.size:x} ({a.tag})" for a in inside[:8])
            raise AllocError(f"range {r.name} still has {len(inside)} allocation(s): {listing}")
        for a in inside:
            del self._live[a.addr]
        del self._ranges[r.name]
        del self._holes[r.name]
        return inside

    def ranges(self) -> list[MemRange]:
        return list(self._ranges.values())

    def _range(self, name_or_start: str | int) -> MemRange:
        if isinstance(name_or_start, str):
            try:
                return self._ranges[name_or_start]
            except KeyError:
                raise AllocError(f"no range named {name_or_start!r}") from None
        for r in self._ranges.values():
            if r.start == name_or_start:
                return r
        raise AllocError(f"no range starts at 0x{name_or_start:x}")

    # ------------------------------------------------------------------ alloc / free
    def _round(self, size: int, align: int) -> int:
        if size <= 0:
            raise AllocError(f"cannot allocate {size} bytes")
        if align <= 0 or align & (align - 1):
            raise AllocError(f"alignment {align} is not a power of two")
        return (size + align - 1) & ~(align - 1)

    def alloc(self, size: int, align: int | None = None, *, tag: str = "") -> int:
        """Allocate ``size`` bytes (rounded up to ``align``, default one page) from any range."""
        align = align or self.page_size
        rounded = self._round(size, align)
        for name in self._ranges:
            addr = self._holes[name].take(rounded, align)
            if addr is not None:
                return self._record(addr, rounded, name, tag)
        raise AllocError(
            f"out of guest memory: {size} bytes (align {align}) for {tag or 'untagged'}; "
            f"free: {self.free_bytes()} bytes in {len(self._ranges)} range(s)"
        )

    def alloc_in(
        self, name_or_start: str | int, size: int, align: int | None = None, *, tag: str = ""
    ) -> int:
        """Allocate from one given range (e.g. a hotplugged DIMM)."""
        r = self._range(name_or_start)
        align = align or self.page_size
        rounded = self._round(size, align)
        addr = self._holes[r.name].take(rounded, align)
        if addr is None:
            raise AllocError(f"range {r.name} cannot fit {size} bytes (align {align})")
        return self._record(addr, rounded, r.name, tag)

    def _record(self, addr: int, size: int, range_name: str, tag: str) -> int:
        self._live[addr] = Allocation(addr, size, range_name, tag)
        self._recently_freed.pop(addr, None)
        return addr

    def free(self, addr: int) -> None:
        """Release an allocation; a double or unknown free raises `AllocError`."""
        a = self._live.pop(addr, None)
        if a is None:
            prev = self._recently_freed.get(addr)
            if prev is not None:
                raise AllocError(f"double free of 0x{addr:x} ({prev.tag or 'untagged'})")
            raise AllocError(f"free of 0x{addr:x}, which was never allocated")
        if a.range in self._holes:
            self._holes[a.range].give(a.addr, a.addr + a.size)
        self._recently_freed[addr] = a
        if len(self._recently_freed) > 4096:
            self._recently_freed.popitem(last=False)

    # ------------------------------------------------------------------ inspection
    def size_of(self, addr: int) -> int | None:
        a = self._live.get(addr)
        return a.size if a else None

    def live(self) -> list[Allocation]:
        return sorted(self._live.values(), key=lambda a: a.addr)

    def leaks(self) -> list[Allocation]:
        """Everything still allocated (call at the end of a test)."""
        return self.live()

    def assert_no_leaks(self) -> None:
        live = self.live()
        if live:
            listing = ", ".join(f"0x{a.addr:x}+0x{a.size:x} ({a.tag or '?'})" for a in live[:16])
            raise AllocError(f"{len(live)} guest allocation(s) leaked: {listing}")

    def free_bytes(self) -> int:
        return sum(h.free_bytes() for h in self._holes.values())

    def range_of(self, addr: int) -> MemRange | None:
        for r in self._ranges.values():
            if r.contains(addr):
                return r
        return None
