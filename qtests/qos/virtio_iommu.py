"""virtio-iommu driver (virtio 1.2, 5.13) over the qtest virtio-pci transport, and the DMA
mapper that puts a virtio-net device's rings and buffers behind it.

QEMU: ``-device virtio-iommu-pci,boot-bypass=off`` *before* the devices it translates (their
bus-master address space is chosen when they are realized).  On q35 QEMU gives it the MSI
reserved region 0xfee00000-0xfeefffff (PROBE reports it); everything else a translated device
reaches must be mapped.

Layouts (all little-endian; this module is the one place for them):

* config: page_size_mask u64 @0, input_range {start, end} u64 @8/@16, domain_range {start,
  end} u32 @24/@28, probe_size u32 @32, bypass u8 @36;
* request = head {u8 type, 3 reserved} + body; QEMU reads the request without the tail
  from the device-readable part and writes the 4-byte tail {u8 status, 3 reserved} (PROBE:
  ``probe_size`` bytes of properties, then the tail) into the device-writable part;
* ATTACH {domain u32, endpoint u32, flags u32, 4 reserved}, DETACH {domain, endpoint, 8
  reserved}, MAP {domain u32, virt_start u64, virt_end u64 (inclusive), phys_start u64,
  flags u32}, UNMAP {domain u32, virt_start u64, virt_end u64, 4 reserved}, PROBE {endpoint
  u32, 64 reserved};
* probe property {type u16, length u16}; RESV_MEM (type 1) {subtype u8, 3 reserved, start
  u64, end u64 (inclusive)}, subtype 0 reserved, 1 MSI;
* fault event {reason u8, 3 reserved, flags u32, endpoint u32, 4 reserved, address u64}.

The endpoint ID of a PCI device is its requester ID: ``bus << 8 | slot << 3 | function``.

Interrupts: the driver polls the virtio-iommu's used rings (no MSI-X there; requests complete
within the notify under TCG anyway).  A *translated* device's MSI-X writes are DMA like any
other (QEMU's msix_notify writes through the device's bus-master address space; only the MSI
reserved region bypasses translation): `ViommuDma.map_msi` maps the RAM words the qtest driver
routes vectors to at IOVA == GPA (write-only), so they keep working - without it every
interrupt is a "no mapping" fault event.  Data IOVAs come from a high window
(`DEFAULT_IOVA_WINDOW`) that never equals a RAM GPA, so a device that skips translation
reaches absent memory and fails loudly instead of silently working.
"""

from __future__ import annotations

import collections
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from backends.virtio.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_IOMMU,
    VIRTIO_PCI_MODERN_BASE,
    VIRTIO_PCI_VENDOR,
)

from .alloc import GuestAllocator
from .driver_queue import DriverQueue
from .iova import PAGE_SIZE, DmaDir, DmaError, IovaAllocator, page_span
from .pci import PciBus, PciDevice
from .virtio_pci import VirtioPciDevice

VIRTIO_IOMMU_PCI_DEVICE_ID = VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_IOMMU  # 0x1057

# feature bits
F_INPUT_RANGE = 0
F_DOMAIN_RANGE = 1
F_MAP_UNMAP = 2
F_BYPASS = 3
F_PROBE = 4
F_MMIO = 5
F_BYPASS_CONFIG = 6

# config
CONFIG = struct.Struct("<QQQIIIB")  # page_size_mask, input start/end, domain start/end, probe
CONFIG_BYPASS = 36

# requests
T_ATTACH = 1
T_DETACH = 2
T_MAP = 3
T_UNMAP = 4
T_PROBE = 5

REQ_ATTACH = struct.Struct("<B3xIII4x")
REQ_DETACH = struct.Struct("<B3xII8x")
REQ_MAP = struct.Struct("<B3xIQQQI")
REQ_UNMAP = struct.Struct("<B3xIQQ4x")
REQ_PROBE = struct.Struct("<B3xI64x")
TAIL = struct.Struct("<B3x")

ATTACH_F_BYPASS = 1
MAP_F_READ = 1
MAP_F_WRITE = 2
MAP_F_MMIO = 4

PROBE_PROP = struct.Struct("<HH")
PROBE_T_NONE = 0
PROBE_T_RESV_MEM = 1
PROBE_T_MASK = 0xFFF
RESV_MEM = struct.Struct("<B3xQQ")
RESV_MEM_T_RESERVED = 0
RESV_MEM_T_MSI = 1

FAULT = struct.Struct("<B3xII4xQ")
FAULT_R_UNKNOWN = 0
FAULT_R_DOMAIN = 1
FAULT_R_MAPPING = 2
FAULT_F_READ = 1
FAULT_F_WRITE = 2
FAULT_F_EXEC = 4
FAULT_F_ADDRESS = 0x100

REQUEST_QUEUE = 0
EVENT_QUEUE = 1

#: IOVAs for translated buffers: above any RAM GPA the suites use (512 MiB - 2 GiB guests,
#: RAM above 4 GiB starts at 0x1_0000_0000) and inside q35's default 39-bit input range.
DEFAULT_IOVA_WINDOW = (0x8_0000_0000, 0x10_0000_0000)


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2
    DEVERR = 3
    INVAL = 4
    RANGE = 5
    NOENT = 6
    FAULT = 7
    NOMEM = 8


class ViommuError(Exception):
    """A request the device failed (``status``), or a driver misuse."""

    def __init__(self, what: str, status: int | None = None) -> None:
        self.status = status
        if status is not None:
            try:
                name = Status(status).name
            except ValueError:
                name = str(status)
            what = f"{what}: status {name}"
        super().__init__(what)


def endpoint_id(pci: PciDevice) -> int:
    """virtio-iommu endpoint ID of a PCI function: its requester ID (BDF)."""
    bus, slot, fn = pci.bdf
    return bus << 8 | slot << 3 | fn


def map_flags(direction: DmaDir) -> int:
    return (MAP_F_READ if direction & DmaDir.TO_DEVICE else 0) | (
        MAP_F_WRITE if direction & DmaDir.FROM_DEVICE else 0
    )


@dataclass(frozen=True, slots=True)
class IommuConfig:
    page_size_mask: int
    input_start: int
    input_end: int  # inclusive
    domain_start: int
    domain_end: int
    probe_size: int
    bypass: int

    @property
    def granule(self) -> int:
        """Smallest page size (the unit of MAP/UNMAP and of QEMU's IOTLB entries)."""
        mask = self.page_size_mask
        return mask & -mask if mask else PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ResvRegion:
    subtype: int
    start: int
    end: int  # inclusive

    @property
    def is_msi(self) -> bool:
        return self.subtype == RESV_MEM_T_MSI


@dataclass(frozen=True, slots=True)
class FaultEvent:
    reason: int
    flags: int
    endpoint: int
    address: int

    @property
    def write(self) -> bool:
        return bool(self.flags & FAULT_F_WRITE)

    @property
    def read(self) -> bool:
        return bool(self.flags & FAULT_F_READ)

    def __str__(self) -> str:
        reason = {0: "unknown", 1: "domain", 2: "mapping"}.get(self.reason, str(self.reason))
        acc = "".join(c for c, on in (("r", self.read), ("w", self.write)) if on) or "-"
        return f"fault({reason}, ep {self.endpoint:#x}, {acc}, addr {self.address:#x})"


@dataclass(slots=True)
class _Mapping:
    iova: int
    size: int
    gpa: int
    flags: int
    fixed: bool = False  # IOVA chosen by the caller: not returned to the allocator


@dataclass(frozen=True, slots=True)
class MapOp:
    """`ViommuDma.apply`: map [gpa, gpa+size) with ``flags`` (at ``iova`` if given)."""

    gpa: int
    size: int
    flags: int
    iova: int | None = None


@dataclass(frozen=True, slots=True)
class UnmapOp:
    """`ViommuDma.apply`: unmap the mapping containing ``iova``."""

    iova: int


@dataclass
class MapStats:
    maps: int = 0
    unmaps: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    """One encoded request (device-readable part) and what to call it in errors."""

    body: bytes
    what: str

    @classmethod
    def attach(cls, endpoint: int, domain: int, *, bypass: bool = False) -> Request:
        flags = ATTACH_F_BYPASS if bypass else 0
        return cls(
            REQ_ATTACH.pack(T_ATTACH, domain, endpoint, flags),
            f"ATTACH endpoint {endpoint:#x} to domain {domain}",
        )

    @classmethod
    def detach(cls, endpoint: int, domain: int) -> Request:
        return cls(
            REQ_DETACH.pack(T_DETACH, domain, endpoint),
            f"DETACH endpoint {endpoint:#x} from domain {domain}",
        )

    @classmethod
    def map(cls, domain: int, iova: int, size: int, phys: int, flags: int) -> Request:
        """MAP [iova, iova+size) -> phys (``MAP_F_*`` flags)."""
        if size <= 0:
            raise ViommuError(f"MAP of an empty range at {iova:#x}")
        return cls(
            REQ_MAP.pack(T_MAP, domain, iova, iova + size - 1, phys, flags),
            f"MAP {iova:#x}+{size:#x} -> {phys:#x} flags {flags}",
        )

    @classmethod
    def unmap(cls, domain: int, iova: int, size: int) -> Request:
        if size <= 0:
            raise ViommuError(f"UNMAP of an empty range at {iova:#x}")
        return cls(
            REQ_UNMAP.pack(T_UNMAP, domain, iova, iova + size - 1), f"UNMAP {iova:#x}+{size:#x}"
        )


class VirtioIommuDriver:
    """One virtio-iommu-pci function: probe, request queue, event queue."""

    REQ_SLOT = 128  # bytes per request slot: request at 0, tail at REQ_SLOT - 4
    REQ_SLOTS = 32  # requests per batch (one kick)
    EVENT_BUFS = 32

    def __init__(self, dev: VirtioPciDevice) -> None:
        if dev.device_type != VIRTIO_ID_IOMMU:
            raise ViommuError(f"{dev.name} is virtio type {dev.device_type}, not iommu")
        self.dev = dev
        self.qt = dev.qt
        self.alloc: GuestAllocator = dev.alloc
        self.features = 0
        self.config: IommuConfig | None = None
        self.reqq: DriverQueue | None = None
        self.eventq: DriverQueue | None = None
        self._req_buf: int | None = None
        self._probe_buf: int | None = None
        self._event_buf: int | None = None
        self.requests = 0
        self.faults: list[FaultEvent] = []

    @classmethod
    def find(cls, bus: PciBus, alloc: GuestAllocator, index: int = 0) -> VirtioIommuDriver:
        pci = bus.find(VIRTIO_PCI_VENDOR, VIRTIO_IOMMU_PCI_DEVICE_ID, index)
        return cls(VirtioPciDevice(pci, alloc, name=f"virtio-iommu {pci}"))

    # ------------------------------------------------------------------ init
    def init(self, *, queue_size: int = 64) -> IommuConfig:
        """Negotiate, read the config, set up both queues, DRIVER_OK, post event buffers."""
        d = self.dev
        wanted = (
            1 << F_INPUT_RANGE
            | 1 << F_DOMAIN_RANGE
            | 1 << F_MAP_UNMAP
            | 1 << F_PROBE
            | 1 << F_BYPASS_CONFIG
        )
        self.features = d.negotiate(wanted, required=1 << VIRTIO_F_VERSION_1 | 1 << F_MAP_UNMAP)
        self.config = self.read_config()
        self.reqq = d.setup_queue(REQUEST_QUEUE, queue_size, name="viommu-req")
        self.eventq = eventq = d.setup_queue(EVENT_QUEUE, queue_size, name="viommu-event")
        self._req_buf = self.alloc.alloc(self.REQ_SLOT * self.REQ_SLOTS, tag="viommu requests")
        self._event_buf = self.alloc.alloc(FAULT.size * self.EVENT_BUFS, tag="viommu events")
        d.driver_ok()
        for slot in range(self.EVENT_BUFS):
            eventq.add((), [(self._event_buf + FAULT.size * slot, FAULT.size)], slot)
        eventq.kick(force=True)
        return self.config

    def has_feature(self, n: int) -> bool:
        return bool(self.features >> n & 1)

    def read_config(self) -> IommuConfig:
        raw = self.dev.config_bytes(0, CONFIG.size)
        return IommuConfig(*CONFIG.unpack(raw))

    @property
    def bypass(self) -> bool:
        return bool(self.dev.config_read(CONFIG_BYPASS, 1))

    # ------------------------------------------------------------------ requests
    def submit(self, requests: Sequence[Request], *, timeout: float = 5.0) -> list[int]:
        """Queue ``requests`` in order behind one kick (batches of `REQ_SLOTS`) and return
        their statuses.  QEMU handles every request of a kick in one go, in ring order, before
        it returns to its main loop (the notify is handled synchronously under TCG)."""
        vq, buf = self.reqq, self._req_buf
        if vq is None or buf is None:
            raise ViommuError("virtio-iommu not initialised (init())")
        statuses: list[int] = []
        for start in range(0, len(requests), self.REQ_SLOTS):
            chunk = requests[start : start + self.REQ_SLOTS]
            writes: list[tuple[int, bytes]] = []
            for i, r in enumerate(chunk):
                if len(r.body) > self.REQ_SLOT - TAIL.size:
                    raise ViommuError(f"{r.what}: request of {len(r.body)} bytes too large")
                slot = buf + i * self.REQ_SLOT
                writes += [(slot, r.body), (slot + self.REQ_SLOT - TAIL.size, b"\xff" * 4)]
            self.qt.write_many(writes)
            for i, r in enumerate(chunk):
                slot = buf + i * self.REQ_SLOT
                vq.add([(slot, len(r.body))], [(slot + self.REQ_SLOT - TAIL.size, TAIL.size)], i)
            vq.kick(force=True)
            used = vq.wait_used(len(chunk), timeout=timeout)
            if sorted(e.token for e in used) != list(range(len(chunk))):
                raise ViommuError(f"request queue returned {[e.token for e in used]}")
            tails = self.qt.read_many(
                [
                    (buf + i * self.REQ_SLOT + self.REQ_SLOT - TAIL.size, 1)
                    for i in range(len(chunk))
                ]
            )
            statuses += [t[0] for t in tails]
            self.requests += len(chunk)
        return statuses

    def execute(self, requests: Sequence[Request]) -> None:
        """`submit` and raise `ViommuError` for the first request that did not succeed."""
        for r, status in zip(requests, self.submit(requests), strict=True):
            if status != Status.OK:
                raise ViommuError(r.what, status)

    def attach(self, endpoint: int, domain: int, *, bypass: bool = False) -> None:
        self.execute([Request.attach(endpoint, domain, bypass=bypass)])

    def detach(self, endpoint: int, domain: int) -> None:
        self.execute([Request.detach(endpoint, domain)])

    def map(self, domain: int, iova: int, size: int, phys: int, flags: int) -> None:
        """MAP [iova, iova+size) -> phys in ``domain`` (``MAP_F_*`` flags)."""
        self.execute([Request.map(domain, iova, size, phys, flags)])

    def unmap(self, domain: int, iova: int, size: int) -> None:
        self.execute([Request.unmap(domain, iova, size)])

    def probe(self, endpoint: int) -> list[ResvRegion]:
        """PROBE ``endpoint``: its reserved regions (QEMU's only probe property)."""
        if not self.has_feature(F_PROBE):
            raise ViommuError("PROBE not negotiated")
        vq, buf = self.reqq, self._req_buf
        if vq is None or buf is None or self.config is None:
            raise ViommuError("virtio-iommu not initialised (init())")
        size = self.config.probe_size
        if self._probe_buf is None:
            self._probe_buf = self.alloc.alloc(size + TAIL.size, tag="viommu probe")
        resp = self._probe_buf
        req = REQ_PROBE.pack(T_PROBE, endpoint)
        self.qt.write_many([(buf, req), (resp + size, b"\xff" * TAIL.size)])
        vq.add([(buf, len(req))], [(resp, size + TAIL.size)], "probe")
        vq.kick(force=True)
        vq.wait_used(1, timeout=5.0)
        data = self.qt.read(resp, size + TAIL.size)
        if data[size] != Status.OK:
            raise ViommuError(f"PROBE {endpoint:#x}", data[size])
        regions: list[ResvRegion] = []
        off = 0
        while off + PROBE_PROP.size <= size:
            ptype, length = PROBE_PROP.unpack_from(data, off)
            ptype &= PROBE_T_MASK
            if ptype == PROBE_T_NONE:
                break
            body = off + PROBE_PROP.size
            if ptype == PROBE_T_RESV_MEM and length >= RESV_MEM.size:
                regions.append(ResvRegion(*RESV_MEM.unpack_from(data, body)))
            off = body + length
        return regions

    # ------------------------------------------------------------------ events
    def poll_faults(self) -> list[FaultEvent]:
        """Fault events the device reported since the last call (buffers re-posted)."""
        vq, buf = self.eventq, self._event_buf
        if vq is None or buf is None:
            return []
        used = vq.get_used()
        if not used:
            return []
        raws = self.qt.read_many([(buf + FAULT.size * e.token, FAULT.size) for e in used])
        new = [FaultEvent(*FAULT.unpack(r)) for r in raws]
        for e in used:
            vq.add((), [(buf + FAULT.size * e.token, FAULT.size)], e.token)
        vq.kick(force=True)
        self.faults.extend(new)
        return new

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        try:
            self.dev.close()
        finally:
            for addr in (self._req_buf, self._probe_buf, self._event_buf):
                if addr is not None:
                    self.alloc.free(addr)
            self._req_buf = self._probe_buf = self._event_buf = None
            self.reqq = self.eventq = None


HistoryEntry = tuple[str, int, int, int, int]
HISTORY_MAX = 200_000


class ViommuDma:
    """`DmaMapper` for one endpoint's domain on a `VirtioIommuDriver`.

    ``strict=True``: every streaming buffer gets its own IOVA pages, MAPped in `map` and
    UNMAPped in `unmap` (Linux ``iommu.strict=1``: the UNMAP completes only after QEMU told
    vhost to INVALIDATE).  ``strict=False``: a streaming buffer's pages are mapped once per
    (page, direction) and stay mapped (`unmap` does nothing) - a warm, static IOMMU.
    Coherent memory (rings) is mapped read+write until `unmap_coherent`; MSI-X words are
    identity-mapped write-only.
    """

    identity = False

    def __init__(
        self,
        viommu: VirtioIommuDriver,
        domain: int,
        *,
        strict: bool = True,
        window: tuple[int, int] = DEFAULT_IOVA_WINDOW,
    ) -> None:
        cfg = viommu.config
        if cfg is None:
            raise ViommuError("virtio-iommu not initialised (init())")
        self.viommu = viommu
        self.domain = domain
        self.strict = strict
        self.page = max(cfg.granule, PAGE_SIZE)
        lo, hi = window
        if lo < cfg.input_start or hi - 1 > cfg.input_end:
            raise ViommuError(
                f"IOVA window {lo:#x}..{hi:#x} outside the input range "
                f"{cfg.input_start:#x}..{cfg.input_end:#x}"
            )
        self.iova = IovaAllocator(lo, hi, page=self.page)
        self._maps: dict[int, _Mapping] = {}  # page-aligned iova -> mapping
        self._static: dict[tuple[int, int], int] = {}  # (gpa page, flags) -> iova page
        self._msi_pages: set[int] = set()
        self.stats = MapStats()
        #: Map/unmap operations, oldest first: (op 'map'|'unmap', iova, size, gpa, flags) -
        #: what a test needs to find the IOVA a buffer was given (`history_since`).
        self.history: collections.deque[HistoryEntry] = collections.deque(maxlen=HISTORY_MAX)
        self._history_total = 0

    # -- explicit page mappings (tests use these for odd permissions) ---------------------------
    def map_pages(self, gpa: int, size: int, flags: int, *, iova: int | None = None) -> int:
        """MAP the pages covering [gpa, gpa+size) with ``flags``; returns the IOVA of ``gpa``.
        ``iova``: a fixed page-aligned IOVA for the first page (else one from the window); the
        caller owns it (take it from ``self.iova`` to keep it clear of the driver's own)."""
        start, length = page_span(gpa, size, self.page)
        fixed = iova is not None
        base = iova if iova is not None else self.iova.alloc(length)
        if base % self.page:
            raise DmaError(f"IOVA {base:#x} is not page aligned")
        try:
            self.viommu.map(self.domain, base, length, start, flags)
        except BaseException:
            if not fixed:
                self.iova.free(base)
            raise
        self._maps[base] = _Mapping(base, length, start, flags, fixed)
        self.stats.maps += 1
        self._log(("map", base, length, start, flags))
        return base + (gpa - start)

    def unmap_pages(self, iova: int) -> None:
        """UNMAP the mapping containing ``iova`` (made by `map_pages`)."""
        base = iova & ~(self.page - 1)
        m = self._maps.pop(base, None)
        if m is None:
            raise DmaError(f"IOVA {iova:#x} is not mapped by this driver")
        try:
            self.viommu.unmap(self.domain, m.iova, m.size)
        finally:
            if not m.fixed:
                self.iova.free(m.iova)
            self.stats.unmaps += 1
            self._log(("unmap", m.iova, m.size, m.gpa, m.flags))

    def apply(self, ops: Sequence[MapOp | UnmapOp]) -> list[int | None]:
        """Several maps/unmaps as one batch behind one kick, in order (QEMU handles them all
        before it looks at anything else, e.g. a MISS).  Returns the IOVA of each MapOp's
        ``gpa`` (None for UnmapOps).  Raises `ViommuError` if any request failed."""
        reqs: list[Request] = []
        out: list[int | None] = []
        staged: list[tuple[str, _Mapping, bool]] = []
        for op in ops:
            if isinstance(op, MapOp):
                start, length = page_span(op.gpa, op.size, self.page)
                fixed = op.iova is not None
                base = op.iova if op.iova is not None else self.iova.alloc(length)
                m = _Mapping(base, length, start, op.flags, fixed)
                reqs.append(Request.map(self.domain, base, length, start, op.flags))
                staged.append(("map", m, fixed))
                out.append(base + (op.gpa - start))
            else:
                old = self._maps.get(op.iova & ~(self.page - 1))
                if old is None:
                    raise DmaError(f"IOVA {op.iova:#x} is not mapped by this driver")
                reqs.append(Request.unmap(self.domain, old.iova, old.size))
                staged.append(("unmap", old, False))
                out.append(None)
        statuses = self.viommu.submit(reqs)
        failed: list[str] = []
        for (kind, m, fixed), r, status in zip(staged, reqs, statuses, strict=True):
            if kind == "map":
                if status == Status.OK:
                    self._maps[m.iova] = m
                    self.stats.maps += 1
                    self._log(("map", m.iova, m.size, m.gpa, m.flags))
                else:
                    failed.append(str(ViommuError(r.what, status)))
                    if not fixed:
                        self.iova.free(m.iova)
            else:
                if status != Status.OK:
                    failed.append(str(ViommuError(r.what, status)))
                self._maps.pop(m.iova, None)
                if not m.fixed:
                    self.iova.free(m.iova)
                self.stats.unmaps += 1
                self._log(("unmap", m.iova, m.size, m.gpa, m.flags))
        if failed:
            raise ViommuError("; ".join(failed))
        return out

    def _log(self, entry: HistoryEntry) -> None:
        self.history.append(entry)
        self._history_total += 1

    def history_mark(self) -> int:
        """Position in `history` (pass to `history_since`)."""
        return self._history_total

    def history_since(self, mark: int) -> list[HistoryEntry]:
        """Operations logged after `history_mark` returned ``mark`` (raises if some already
        fell out of the bounded history)."""
        first = self._history_total - len(self.history)
        if mark < first:
            raise DmaError(f"history from {mark} is gone (kept from {first})")
        return list(self.history)[mark - first :]

    def mappings(self) -> dict[int, tuple[int, int, int]]:
        """Live mappings: iova -> (size, gpa, flags)."""
        return {k: (m.size, m.gpa, m.flags) for k, m in self._maps.items()}

    def gpa_of(self, iova: int) -> int | None:
        for m in self._maps.values():
            if m.iova <= iova < m.iova + m.size:
                return m.gpa + (iova - m.iova)
        return None

    # -- DmaMapper ------------------------------------------------------------------------------
    def map(self, gpa: int, size: int, direction: DmaDir) -> int:
        flags = map_flags(direction)
        if self.strict:
            return self.map_pages(gpa, size, flags)
        start, length = page_span(gpa, size, self.page)
        first = None
        for page in range(start, start + length, self.page):
            key = (page, flags)
            iova = self._static.get(key)
            if iova is None or (first is not None and iova != first + (page - start)):
                break
            if first is None:
                first = iova
        else:
            if first is not None:
                return first + (gpa - start)
        base = self.map_pages(start, length, flags)
        for off in range(0, length, self.page):
            self._static.setdefault((start + off, flags), base + off)
        return base + (gpa - start)

    def unmap(self, addr: int, size: int, direction: DmaDir) -> None:
        if self.strict:
            self.unmap_pages(addr)

    def map_coherent(self, gpa: int, size: int) -> int:
        return self.map_pages(gpa, size, MAP_F_READ | MAP_F_WRITE)

    def unmap_coherent(self, addr: int, size: int) -> None:
        self.unmap_pages(addr)

    def map_msi(self, gpa: int, size: int) -> int:
        """Identity-map (IOVA == GPA) the MSI words' pages write-only; idempotent (the driver
        routes vectors again after every device re-init)."""
        if self.iova.contains(gpa):
            raise DmaError(f"MSI words at {gpa:#x} collide with the IOVA window")
        start, length = page_span(gpa, size, self.page)
        for page in range(start, start + length, self.page):
            if page not in self._msi_pages:
                self.map_pages(page, self.page, MAP_F_WRITE, iova=page)
                self._msi_pages.add(page)
        return gpa

    def unmap_all(self) -> int:
        """UNMAP everything this mapper mapped (e.g. before a DETACH); returns how many."""
        n = 0
        for base in list(self._maps):
            self.unmap_pages(base)
            n += 1
        self._static.clear()
        self._msi_pages.clear()
        return n
