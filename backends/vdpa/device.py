"""VdpaDevice: the device model behind the vDPA bus ops (``struct vdpa_config_ops``).

The transport calls the bus ops; the device calls the personality (``queue_kicked``) and
calls back into the transport only through the plain callables it was given
(``on_vq_call``/per-queue callbacks, ``on_iotlb_miss``, ``on_config_change``). No exception
from the personality or from ring content escapes into the event loop: malformed rings become
``error.vq`` + NEEDS_RESET, personality exceptions ``error.device`` + NEEDS_RESET, and an IOTLB
miss parks the queue until :meth:`VdpaDevice.iotlb_updated`.

Reset (status 0) clears features, status, suspension and every virtqueue (vdpa_sim does the
same) but keeps host memory and the IOTLB: for vhost-user the mem table outlives a device
reset (QEMU sends SET_STATUS 0 on every stop and does not resend the table), and without a
vIOMMU the IOTLB is the identity map the transport derived from it. The dirty log and the
transport callbacks are kept too. Bus ops given an invalid queue index or size journal
``error.protocol`` and raise ValueError (the transport turns that into a failed reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from backends.virtio.features import (
    UNSUPPORTED_RING_FEATURES,
    VHOST_LEVEL_FEATURES,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    Status,
    feature_names,
    has,
)

from .access import Access, TranslationError
from .dirty_log import DirtyLog
from .dma import DmaSpace
from .faults import Faults
from .iotlb import IOTLB, Mapping, Perm, SetMapDiff
from .journal import Journal
from .memory import HostMemory, HostRegion
from .packed_virtqueue import PackedVirtqueue
from .split_virtqueue import SplitVirtqueue
from .virtqueue import Virtqueue, VqError, VqState

__all__ = ["DevicePersonality", "VdpaDevice"]

log = logging.getLogger(__name__)

ACK = int(Status.ACKNOWLEDGE)
DRIVER = int(Status.DRIVER)
DRIVER_OK = int(Status.DRIVER_OK)
FEATURES_OK = int(Status.FEATURES_OK)
NEEDS_RESET = int(Status.NEEDS_RESET)
FAILED = int(Status.FAILED)


class DevicePersonality(Protocol):
    """What a device type (virtio-net) provides. Optional extra hook: ``queue_stopped(i)``,
    called by :meth:`VdpaDevice.stop_vq` before inflight chains are rewound (drop any popped
    chains you still hold)."""

    device_id: int

    def device_features(self) -> int: ...
    def config_space(self) -> bytes: ...
    def write_config(self, offset: int, data: bytes) -> None: ...
    def num_queues(self) -> int: ...
    def attach(self, dev: VdpaDevice) -> None: ...
    def queue_kicked(self, vq_index: int) -> None: ...
    def reset(self) -> None: ...


VqCallback = Callable[[int], None]


class VdpaDevice:
    def __init__(
        self,
        personality: DevicePersonality,
        journal: Journal | None = None,
        faults: Faults | None = None,
        max_queue_size: int = 1024,
    ) -> None:
        self.personality = personality
        self.journal = journal if journal is not None else Journal()
        if faults is None:
            faults = Faults(journal=self.journal)
        elif faults.journal is None:
            faults.journal = self.journal
        self.faults = faults
        self.iotlb = IOTLB(self.journal, self.faults)
        self.host = HostMemory()
        self.dma = DmaSpace(self.iotlb, self.host, self.journal, self.faults)
        self.max_queue_size = max_queue_size
        nq = personality.num_queues()
        self.vqs: list[Virtqueue] = [SplitVirtqueue(i, self.dma, self.journal) for i in range(nq)]
        self.status = 0
        self.driver_features = 0
        self.suspended = False
        self._suspended_kicks: dict[int, None] = {}  # ordered set of queues kicked meanwhile
        self._parked: dict[int, tuple[int, Perm]] = {}  # vq -> (iova, perm) it waits for
        self._misses: set[tuple[int, Perm]] = set()  # outstanding MISS requests
        # queues kicked while parked on an outstanding MISS: if that MISS is refused, the kick
        # (the guest may have mapped the IOVA since) must ask again, not be lost
        self._kicked_on_miss: set[int] = set()
        self._vq_cbs: list[VqCallback | None] = [None] * nq
        self.on_vq_call: VqCallback | None = None
        self.on_iotlb_miss: Callable[[int, Perm], None] | None = None
        self.on_config_change: Callable[[], None] | None = None
        self.errors = 0
        self.kicks = 0
        self.kicks_ignored = 0
        personality.attach(self)

    # -- helpers ---------------------------------------------------------------------------
    def _rec(self, kind: str, **fields: Any) -> None:
        self.journal.record(kind, **fields)

    def _vq(self, i: int) -> Virtqueue:
        if not isinstance(i, int) or not 0 <= i < len(self.vqs):
            self._rec("error.protocol", detail=f"no virtqueue {i!r} (device has {len(self.vqs)})")
            raise ValueError(f"no virtqueue {i!r} (device has {len(self.vqs)})")
        return self.vqs[i]

    @property
    def device_id(self) -> int:
        return self.personality.device_id

    # -- features --------------------------------------------------------------------------
    def get_device_features(self) -> int:
        """What the personality offers, minus ring features this model does not implement."""
        return self.personality.device_features() & ~UNSUPPORTED_RING_FEATURES

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features
        self.dma.iommu = has(features, VIRTIO_F_ACCESS_PLATFORM)
        event_idx = has(features, VIRTIO_F_EVENT_IDX)
        self._select_ring_layout(has(features, VIRTIO_F_RING_PACKED))
        for vq in self.vqs:
            vq.event_idx = event_idx
        self._rec("features.set", features=features, names=feature_names(features))

    def _select_ring_layout(self, packed: bool) -> None:
        """Split or packed virtqueues, as negotiated. A queue whose layout changes is
        replaced (keeping size, addresses and ready; indexes restart at the initial state)."""
        cls: type[Virtqueue] = PackedVirtqueue if packed else SplitVirtqueue
        for i, vq in enumerate(self.vqs):
            if type(vq) is cls:
                continue
            new = cls(i, self.dma, self.journal)
            if vq.num:
                try:
                    new.set_num(vq.num)
                except ValueError:
                    pass
            if vq.addr_set:
                new.set_address(vq.desc, vq.avail, vq.used)
            new.ready = vq.ready
            new.started = vq.started
            self.vqs[i] = new
            self._rec("vq.layout", vq=i, packed=packed)

    def get_driver_features(self) -> int:
        return self.driver_features

    get_features = get_device_features
    set_features = set_driver_features

    # -- status ----------------------------------------------------------------------------
    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        status &= 0xFF
        if status == 0:
            self.reset()
            return
        old = self.status
        new = status | (old & NEEDS_RESET)  # only a reset clears NEEDS_RESET
        if new & FEATURES_OK and not old & FEATURES_OK:
            extra = self.driver_features & ~VHOST_LEVEL_FEATURES & ~self.get_device_features()
            if extra:
                new &= ~FEATURES_OK
                self._rec(
                    "error.status",
                    detail="FEATURES_OK refused: driver features not offered",
                    features=extra,
                    names=feature_names(extra),
                )
        cleared = old & ~status & ~NEEDS_RESET
        if cleared:  # the driver may only clear bits by writing 0 (virtio 1.2, 2.1.1)
            self._rec("error.status", detail="driver cleared status bits", bits=cleared)
        self.status = new
        self._rec("status.set", old=old, new=new)
        if new & DRIVER_OK and not old & DRIVER_OK:
            self._start_all()
        elif old & DRIVER_OK and not new & DRIVER_OK:
            for vq in self.vqs:
                self._stop(vq, reason="status")

    def reset(self) -> None:
        """Status 0: clear features, status, suspension and all virtqueues (see module doc)."""
        old = self.status
        hook = getattr(self.personality, "device_resetting", None)
        if hook is not None and old & DRIVER_OK:  # the rings are still there: last words
            self._guard(None, hook)
        for vq in self.vqs:
            self._stop(vq, reason="reset")
            vq.reset()
        self.driver_features = 0
        self.dma.iommu = False
        self.status = 0
        self.suspended = False
        self._suspended_kicks.clear()
        self._parked.clear()
        self._misses.clear()
        self._kicked_on_miss.clear()
        try:
            self.personality.reset()
        except Exception as e:  # the personality must not take the device down
            log.exception("personality reset failed")
            self._rec("error.device", vq=None, error="reset", detail=f"{type(e).__name__}: {e}")
        self._rec("status.set", old=old, new=0)

    def _start_all(self) -> None:
        for vq in self.vqs:
            if vq.configured and not vq.started:
                self._start(vq)
        for vq in self.vqs:
            if self.vq_active(vq.index):
                self._run(vq.index)

    def _start(self, vq: Virtqueue) -> None:
        vq.started = True
        self._rec(
            "vq.start",
            vq=vq.index,
            num=vq.num,
            ready=vq.ready,
            last_avail_idx=vq.state.last_avail_idx,
            used_idx=vq.state.used_idx,
        )

    def _stop(self, vq: Virtqueue, reason: str) -> None:
        if vq.started:
            vq.started = False
            self._rec("vq.stop", vq=vq.index, reason=reason, inflight=vq.inflight)
        self._parked.pop(vq.index, None)

    # -- config space ----------------------------------------------------------------------
    def get_config(self, offset: int, length: int) -> bytes:
        cfg = self.personality.config_space()
        if offset < 0 or length < 0:
            return b""
        data = cfg[offset : offset + length]
        return bytes(data) + bytes(length - len(data))

    def set_config(self, offset: int, data: bytes) -> None:
        self._rec("config.set", offset=offset, data=bytes(data))
        try:
            self.personality.write_config(offset, bytes(data))
        except Exception as e:
            log.exception("write_config failed")
            self._rec("error.device", vq=None, error="config", detail=f"{type(e).__name__}: {e}")

    # -- virtqueue setup -------------------------------------------------------------------
    def get_vq_num_max(self) -> int:
        return self.max_queue_size

    def set_vq_num(self, i: int, num: int) -> None:
        vq = self._vq(i)
        if num > self.max_queue_size:
            self._rec("error.protocol", vq=i, detail=f"queue size {num} > {self.max_queue_size}")
            raise ValueError(f"vq {i}: queue size {num} > max {self.max_queue_size}")
        try:
            vq.set_num(num)
        except ValueError as e:
            self._rec("error.protocol", vq=i, detail=str(e))
            raise
        self._rec("vq.num", vq=i, num=num)

    def set_vq_address(self, i: int, desc: int, driver: int, device: int) -> None:
        """Ring IOVAs: descriptor table, driver area (avail), device area (used)."""
        self._vq(i).set_address(desc, driver, device)
        self._rec("vq.address", vq=i, desc=desc, avail=driver, used=device)

    def set_vq_ready(self, i: int, ready: bool) -> None:
        vq = self._vq(i)
        vq.ready = bool(ready)
        self._rec("vq.ready", vq=i, ready=vq.ready)
        if vq.ready and self.status & DRIVER_OK:
            if not vq.started and vq.configured:
                self._start(vq)
            if self.vq_active(i):
                self._run(i)

    def get_vq_ready(self, i: int) -> bool:
        return self._vq(i).ready

    def set_vq_state(self, i: int, state: VqState) -> None:
        """Where the ring continues (vDPA ``set_vq_state``): the queue takes what its layout
        uses (split: the two indexes; packed: positions and wrap counters)."""
        vq = self._vq(i)
        if self.faults.active("ignore-set-vring-base"):  # the fault: keep the queue's own state
            state = vq.get_state()
        vq.set_state(state)
        self._parked.pop(i, None)
        self._rec("vq.set_state", vq=i, **vq.get_state().journal_fields())

    def get_vq_state(self, i: int) -> VqState:
        """The ring's state (vDPA ``get_vq_state``); ``VqState.packed`` tells the layout."""
        vq = self._vq(i)
        st = vq.get_state()
        if self.faults.active("vring-base-off-by-one"):
            st = st.advanced(vq.num)
        self._rec("vq.get_state", vq=i, inflight=vq.inflight, **st.journal_fields())
        return st

    def set_vq_cb(self, i: int, fn: VqCallback | None) -> None:
        """``fn(i)`` interrupts the driver for queue ``i`` (else ``on_vq_call(i)`` is used)."""
        self._vq(i)
        self._vq_cbs[i] = fn

    def start_vq(self, i: int) -> None:
        """Start a ring explicitly (vhost-user: its kick fd became usable) and process it."""
        vq = self._vq(i)
        if not vq.started:
            self._start(vq)
        if self.vq_active(i):
            self._run(i)

    def stop_vq(self, i: int) -> VqState:
        """For GET_VRING_BASE: publish pushed elements, let the personality drop held
        chains, rewind inflight ones (fault 'no-drain-before-base' skips that), stop the ring,
        return its state."""
        vq = self._vq(i)
        if vq.configured:
            self._guard(i, self._flush_and_call, i)
        hook = getattr(self.personality, "queue_stopped", None)
        if hook is not None:
            self._guard(i, hook, i)
        if not self.faults.active("no-drain-before-base"):
            vq.rewind()
        if vq.started:
            vq.started = False
            self._rec("vq.stop", vq=i, reason="get_base", inflight=vq.inflight)
        self._parked.pop(i, None)
        return self.get_vq_state(i)

    # -- data path -------------------------------------------------------------------------
    def vq_active(self, i: int) -> bool:
        """True when queue ``i`` may be processed: DRIVER_OK (no NEEDS_RESET / FAILED), ring
        ready and started, device not suspended."""
        vq = self.vqs[i]
        return (
            self.status & (DRIVER_OK | NEEDS_RESET | FAILED) == DRIVER_OK
            and vq.ready
            and vq.started
            and not self.suspended
        )

    def kick_vq(self, i: int) -> None:
        """The driver notified queue ``i``."""
        if not 0 <= i < len(self.vqs):
            self._rec("error.protocol", detail=f"kick for missing virtqueue {i}")
            return
        self.kicks += 1
        if self.suspended:
            self._suspended_kicks[i] = None
            return
        if not self.vq_active(i):
            self.kicks_ignored += 1
            return
        if self._parked.get(i) in self._misses:
            self._kicked_on_miss.add(i)
        self._run(i)

    def _run(self, i: int) -> None:
        self._parked.pop(i, None)
        self._guard(i, self.personality.queue_kicked, i)

    def call_guarded(self, vq_index: int | None, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` the way a kick runs: a miss parks ``vq_index``, VqError and other
        exceptions fail the device. For datapath work that does not start from a kick (RX
        from the wire). True when ``fn`` returned normally."""
        return self._guard(vq_index, fn, *args)

    def _guard(self, i: int | None, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except TranslationError as e:
            if e.kind == "miss":
                self.handle_miss(i, e)
            else:
                self.fail(i, "translate", str(e), journal_kind="error.translate")
        except VqError as e:
            self.fail(i, e.kind, e.detail)
        except Exception as e:
            log.exception("device personality failed on vq %s", i)
            self.fail(i, "exception", f"{type(e).__name__}: {e}", journal_kind="error.device")
        return False

    def handle_miss(self, i: int | None, e: TranslationError) -> None:
        """Park queue ``i`` on an IOTLB miss and ask the front-end (once per iova+perm)."""
        perm = Perm.WO if e.access & Access.WRITE else Perm.RO
        if self.faults.active("ignore-iotlb-perm"):
            perm = Perm.RO  # the fault: ask for read access whatever the device needs
        if i is not None:
            self._parked[i] = (e.addr, perm)
        key = (e.addr, perm)
        if key in self._misses:
            return
        self._misses.add(key)
        if self.faults.active("no-miss"):
            return  # the fault: park silently, never ask
        self._rec("iotlb.miss", vq=i, iova=e.addr, perm=perm, length=e.length)
        cb = self.on_iotlb_miss
        if cb is not None:
            try:
                cb(e.addr, perm)
            except Exception as ex:
                log.exception("on_iotlb_miss failed")
                self._rec("error.device", vq=i, error="miss-callback", detail=str(ex))

    def iotlb_miss_refused(self, iova: int, perm: int) -> None:
        """The front-end answered the MISS for (iova, perm) without an UPDATE (vIOMMU fault,
        device stopped). Queues parked on it stay parked, but the next kick asks again:
        the guest may map the IOVA meanwhile, and nothing else would ever retry. A queue
        kicked while this MISS was outstanding asks again now: that kick is not lost."""
        try:
            key = (iova, Perm(perm))
        except ValueError:
            return
        self._misses.discard(key)
        for i in sorted(self._kicked_on_miss):
            if self._parked.get(i) == key:
                self._kicked_on_miss.discard(i)
                if self.vq_active(i):
                    self._run(i)  # the kick that came meanwhile asks again

    @property
    def parked(self) -> dict[int, tuple[int, Perm]]:
        """Queues waiting for an IOTLB update: vq -> (iova, perm)."""
        return dict(self._parked)

    def iotlb_updated(self) -> None:
        """The transport applied IOTLB updates: retry every queue parked on a miss."""
        self._misses.clear()
        self._kicked_on_miss.clear()
        if not self._parked:
            return
        parked = list(self._parked)
        self._parked.clear()
        for i in parked:
            if self.suspended:
                self._suspended_kicks[i] = None
            elif self.vq_active(i):
                self._run(i)

    def notify_used(self, vq_index: int) -> None:
        """Publish what was pushed on the queue and interrupt the driver if the ring says so
        (EVENT_IDX used_event / VRING_AVAIL_F_NO_INTERRUPT). Call after push (+flush)."""
        self._guard(vq_index, self._flush_and_call, vq_index)

    def _flush_and_call(self, i: int) -> None:
        vq = self.vqs[i]
        published = vq.used_published
        vq.flush()
        if vq.used_published != published and self.faults.active("ignore-used-event"):
            vq.need_call = True  # the fault: interrupt on every publish, suppression ignored
        if vq.need_call:
            vq.need_call = False
            self._call(i)

    def _call(self, i: int) -> None:
        cb = self._vq_cbs[i] or self.on_vq_call
        if cb is None:
            return
        try:
            cb(i)
        except Exception as e:
            log.exception("vq call callback failed")
            self._rec("error.device", vq=i, error="call-callback", detail=str(e))

    def fail(
        self, vq_index: int | None, kind: str, detail: str, journal_kind: str = "error.vq"
    ) -> None:
        """Journal an error and set NEEDS_RESET (telling the driver via a config change)."""
        self.errors += 1
        log.warning("device error on vq %s: %s: %s", vq_index, kind, detail)
        self._rec(journal_kind, vq=vq_index, error=kind, detail=detail)
        if self.status & NEEDS_RESET:
            return
        old = self.status
        self.status |= NEEDS_RESET
        self._rec("status.set", old=old, new=self.status, reason=kind)
        cb = self.on_config_change
        if cb is not None:
            try:
                cb()
            except Exception as e:
                log.exception("on_config_change failed")
                self._rec("error.device", vq=vq_index, error="config-callback", detail=str(e))

    # -- suspend / resume ------------------------------------------------------------------
    def suspend(self) -> None:
        if self.suspended:
            return
        self.suspended = True
        self._rec("device.suspend")

    def resume(self) -> None:
        if not self.suspended:
            return
        self.suspended = False
        replay = list(self._suspended_kicks)
        self._suspended_kicks.clear()
        self._rec("device.resume", replayed=replay)
        for i in replay:
            if self.vq_active(i):
                self._run(i)

    # -- DMA -------------------------------------------------------------------------------
    def dma_map(self, iova: int, size: int, uaddr: int, perm: Perm | int) -> Mapping:
        m = self.iotlb.dma_map(iova, size, uaddr, perm)
        if not self.iotlb.in_batch:
            self.iotlb_updated()
        return m

    def dma_unmap(self, iova: int, size: int) -> list[Mapping]:
        return self.iotlb.dma_unmap(iova, size)

    def batch_begin(self) -> None:
        self.iotlb.batch_begin()

    def batch_commit(self) -> None:
        self.iotlb.batch_commit()
        self.iotlb_updated()

    def set_map(self, entries: Iterable[tuple[int, int, int, int]]) -> SetMapDiff:
        diff = self.iotlb.set_map(entries)
        if not self.iotlb.in_batch:
            self.iotlb_updated()
        return diff

    # -- host memory / dirty log -----------------------------------------------------------
    def add_host_region(self, r: HostRegion) -> None:
        try:
            self.host.add(r)
        except ValueError as e:
            self._rec("error.mem", op="add", detail=str(e))
            raise
        self._rec(
            "mem.add", id=r.id, gpa=r.gpa, size=r.size, uaddr=r.uaddr, mmap_offset=r.mmap_offset
        )

    def remove_host_region(self, r: HostRegion) -> None:
        """Forget a region (the caller closes it)."""
        try:
            self.host.remove(r)
        except ValueError as e:
            self._rec("error.mem", op="remove", detail=str(e))
            raise
        self._rec("mem.remove", id=r.id, gpa=r.gpa, size=r.size, uaddr=r.uaddr)

    def set_dirty_log(self, dirty_log: DirtyLog | None) -> None:
        self.dma.dirty_log = dirty_log
        self._rec(
            "log.set",
            enabled=dirty_log is not None,
            size=dirty_log.size if dirty_log is not None else 0,
        )

    # -- introspection ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "status": self.status,
            "status_names": [s.name for s in Status if self.status & s],
            "device_features": self.get_device_features(),
            "driver_features": self.driver_features,
            "iommu": self.dma.iommu,
            "suspended": self.suspended,
            "parked": {str(k): [v[0], int(v[1])] for k, v in self._parked.items()},
            "errors": self.errors,
            "kicks": self.kicks,
            "kicks_ignored": self.kicks_ignored,
            "dirty_log": self.dma.dirty_log is not None,
            "num_queues": len(self.vqs),
        }
