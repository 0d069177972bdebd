"""Named, deliberately wrong behaviours (``--fault NAME``) that the test suites must catch.

The device model checks :meth:`Faults.active` at the exact spot where a buggy backend would go
wrong; nothing else changes. Each entry of :data:`FAULTS` says what is wrong and which suite is
expected to notice.
"""

from __future__ import annotations

from collections.abc import Iterable

from .journal import Journal

FAULTS: dict[str, str] = {
    "stale-iotlb": (
        "dma_unmap / IOTLB invalidate is journalled but the translation keeps working (a cached "
        "stale translation): the device still reaches memory the guest unmapped. Hook: "
        "vdpa/iotlb.py IOTLB.dma_unmap; on VDUSE vduse/iotlb_mirror.py IotlbMirror._update "
        "(cached entries survive UPDATE_IOTLB, new ones overlapping them are not taken, "
        "caught by test_meta_stale_iotlb_is_caught_over_vhost_vdpa). Caught by the vIOMMU suite (qtests/test_viommu.py "
        "test_meta_stale_iotlb_is_caught: an RX into a remapped IOVA lands in the old page; "
        "per-packet map/unmap sends another packet's bytes)."
    ),
    "remap-all": (
        "every IOTLB change (map, unmap, batch commit, set_map) drops and recreates every "
        "mapping with new ids, so regions in use are remapped. Caught by the memory hotplug "
        "suite (unchanged regions must keep their mapping id; no unmap of untouched regions; "
        "over vhost-vdpa also qtests/test_memory_inflight.py "
        "test_meta_held_chains_scenario_catches_over_vhost_vdpa[remap-all]: the plug's "
        "set_map diff is the whole table)."
    ),
    "keep-stale-map": (
        "while the device runs (DRIVER_OK) the VDUSE transport answers UPDATE_IOTLB OK without "
        "fetching the range again, as a device that reads the table only at start: it keeps "
        "the table it had (new memory never mapped, removed memory still mapped). Hook: vduse/transport.py VduseTransport._update_iotlb. Caught by the memory "
        "hotplug suite (qtests/test_memory_hotplug.py test_keep_stale_map_is_caught: the "
        "set_map diffs must add exactly the plugged DIMM; qtests/test_memory_inflight.py "
        "test_meta_held_chains_scenario_catches_over_vhost_vdpa[keep-stale-map]: the plug "
        "adds no mmap; qtests/test_vdpa_inflight_migration.py "
        "test_meta_vdpa_unplug_pending_catches_keep_stale_map: the DIMM ejected on the "
        "destination after the migration stays mapped)."
    ),
    "vring-base-off-by-one": (
        "get_vq_state / GET_VRING_BASE returns last_avail_idx + 1. Caught by the migration and "
        "ring-state suites (the destination's SET_VRING_BASE / used idx no longer match); on "
        "VDUSE through the kernel's GET_VQ_STATE, which QEMU 10 never sends to a VDUSE device "
        "(qtests/test_vdpa_migration.py test_vring_base_off_by_one_is_caught_over_vhost_vdpa)."
    ),
    "ignore-restored-base": (
        "the VDUSE transport ignores the ring state the front-end set (VDUSE_VQ_GET_INFO at "
        "DRIVER_OK: the split avail index, the packed indexes and wrap counters) and starts "
        "every queue from the initial state. Hook: vduse/transport.py "
        "VduseTransport._load_vqs. Caught by the vhost-vdpa migration suite "
        "(qtests/test_vdpa_migration.py test_ignore_restored_base_is_caught: after stop / cont "
        "QEMU restores the index from the guest ring and the device sends old chains again). "
        "Under x-svq=on the restored shadow index is always 0, so only stop / cont shows it."
    ),
    "skip-dirty-log": (
        "packet data and header writes are not marked in the dirty log (used ring writes still "
        "are). Caught by the migration suite (RX payload pages missing from the log)."
    ),
    "drop-tx": (
        "the virtio-net personality completes TX chains without sending the frame to the wire. "
        "Caught by the datapath suites (loopback / peer frame counts)."
    ),
    "translate-by-gpa": (
        "with a vIOMMU (ACCESS_PLATFORM) the device treats IOVAs as guest-physical addresses "
        "instead of translating them through the IOTLB. Hook: vdpa/dma.py DmaSpace.translate "
        "(on VDUSE, whose regions know no GPAs, the IOVA is read as an offset in the guest's "
        "RAM file: vduse/iotlb_mirror.py IotlbMirror.lookup_offset). "
        "Caught by the vIOMMU suite (qtests/test_viommu.py test_meta_translate_by_gpa_is_caught: "
        "IOVAs far above RAM, no traffic and an unmapped-translation error)."
    ),
    "no-miss": (
        "on an IOTLB miss the device parks the queue silently and never sends a MISS to the "
        "front-end: TX stalls. Hook: vdpa/device.py VdpaDevice.handle_miss. Caught by the "
        "vIOMMU suite (qtests/test_viommu.py test_meta_no_miss_is_caught: bounded wait for TX, "
        "'0 MISS sent')."
    ),
    "ignore-rem-mem-reg": (
        "REM_MEM_REG is acknowledged but the region stays mapped (host memory and IOTLB), so "
        "the device can still reach a DIMM QEMU unplugged. Hook: vhost_user/memory_table.py "
        "MemoryTable.remove. Caught by the memory hotplug suite (qtests/test_memory_hotplug.py: "
        "the backend's map must equal QEMU's memory devices after every unplug, and a "
        "descriptor into the removed range must be rejected)."
    ),
    "mem-table-full-replace": (
        "every SET_MEM_TABLE unmaps and re-maps every region (new region ids) instead of "
        "keeping the unchanged ones, as naive backends do. Hook: vhost_user/memory_table.py "
        "MemoryTable._apply_table. Caught by the memory hotplug suite with --no-mem-slots "
        "(regions a plug or unplug did not touch must keep their id)."
    ),
    "stale-region-offset": (
        "ADD_MEM_REG / SET_MEM_TABLE ignore a region's mmap_offset: the new region is mapped "
        "from offset 0 of its fd (the journal and query-mem-table still show QEMU's offset), so "
        "every guest-physical address in it reaches the wrong bytes. Hook: "
        "vhost_user/memory_table.py MemoryTable._map. Caught by the memory hotplug suite "
        "(qtests/test_memory_hotplug.py test_stale_region_offset_is_caught: a DIMM on a "
        "memory-backend-file with offset=, packet buffers inside it: 'guest TX frames arrived "
        "changed')."
    ),
    "no-drain-before-base": (
        "stop_vq / GET_VRING_BASE neither finishes nor rewinds popped-but-unfinished chains: the "
        "returned last_avail_idx counts them. Unfinished chains exist while TX completions are "
        "held (monitor hold-tx). Caught by the migration / ring-state suites "
        "(qtests/test_migration.py: held TX frames never reach either wire; "
        "last_avail - used != inflight-free state)."
    ),
    "no-chain-validation": (
        "the device does not validate descriptor chains: a chain that fails a loop / index "
        "range / order / indirect-table check (or an avail idx that jumps by more than the "
        "queue size) is silently skipped (consumed, never used, nothing journalled, no "
        "NEEDS_RESET) instead of failing the queue. Hook: vdpa/virtqueue.py "
        "SplitVirtqueue._take / _avail. Caught by the bad-guest suite (qtests/test_bad_guest.py "
        "test_meta_no_chain_validation_is_caught: 'to journal an error for the bad ...')."
    ),
    "rx-bad-num-buffers": (
        "with MRG_RXBUF the RX header's num_buffers is always 1, even when a frame spans "
        "several buffers. Hook: net/datapath.py NetDevice._rx. Caught by the datapath suite "
        "(qtests/test_datapath.py test_meta_rx_bad_num_buffers_is_caught: 'num_buffers 1, "
        "expected 2')."
    ),
    "ignore-used-event": (
        "the device interrupts the driver on every used-index publish, ignoring EVENT_IDX "
        "used_event and VRING_AVAIL_F_NO_INTERRUPT. Hook: vdpa/device.py "
        "VdpaDevice._flush_and_call. Caught by the datapath suite (qtests/test_datapath.py "
        "test_meta_ignore_used_event_is_caught: 'interrupted before used_event', "
        "'interrupted despite VRING_AVAIL_F_NO_INTERRUPT')."
    ),
    "ignore-iotlb-perm": (
        "the device ignores vhost access permissions: IOTLB translate does not check a "
        "mapping's perm, and an IOTLB MISS always asks for read access (RO) whatever access "
        "the device needs, so a vIOMMU that checks permissions on the MISS grants it and the "
        "device writes a READ-only buffer. Hooks: vdpa/iotlb.py IOTLB.translate, vdpa/dma.py "
        "DmaSpace._remember, vdpa/device.py VdpaDevice.handle_miss. Caught by the vIOMMU suite "
        "(qtests/test_viommu.py test_meta_ignore_iotlb_perm_is_caught: 'QEMU accepted the "
        "MISS' / 'the device wrote a READ-only buffer')."
    ),
    "used-ring-not-logged": (
        "device writes into the rings (split: used ring; packed: the used descriptors written "
        "back into the descriptor ring) are not marked in the dirty log; packet data still is. "
        "Hook: vdpa/dma.py DmaSpace.mark_dirty. Caught by the migration suite "
        "(qtests/test_migration.py test_variant_fault[packed-used-log] and [viommu-used-log]: the "
        "used entries A wrote during precopy are missing on the destination). With a split ring QEMU "
        "itself marks the whole used ring dirty when it stops vhost at the switchover "
        "(vhost_virtqueue_stop unmaps it for writing), which hides this fault there."
    ),
    "log-at-iova": (
        "behind a vIOMMU (ACCESS_PLATFORM) the dirty log is written at the IOVA the device was "
        "given instead of the guest-physical address it translated to (ring and data writes). "
        "Hooks: vdpa/dma.py DmaSpace.mark_dirty and DmaSpace._log_data. Caught by the migration "
        "suite (qtests/test_migration.py test_variant_fault[viommu-log-at-iova]: the used "
        "entries and RX frames A wrote during precopy are missing on the destination)."
    ),
    "ignore-set-vring-base": (
        "set_vq_state / SET_VRING_BASE is acknowledged but ignored: the queue keeps the state it "
        "had (0 on a fresh backend). Hook: vdpa/device.py VdpaDevice.set_vq_state. Caught by the "
        "migration suite (qtests/test_migration.py test_variant_fault[split|packed|dimm-ignore-base]: "
        "the destination transmits frames the source already sent, or none) and the reconnect "
        "suites (qtests/test_reconnect.py test_ignored_set_vring_base_after_reconnect_is_caught, "
        "qtests/test_reconnect_inflight.py test_meta_reconnect_in_flight_catches)."
    ),
    "reattach-from-vq-info-base": (
        "a backend re-attaching to a VDUSE device (--vduse-reattach) resumes each split ring at "
        "the avail index VDUSE_VQ_GET_INFO reports (the base the front-end set at the last "
        "start) instead of the used index in guest memory: it processes again chains the dead "
        "process had completed. Hook: vduse/transport.py VduseTransport._recover. Caught by the "
        "VDUSE re-attach suite (qtests/test_vdpa_reconnect.py "
        "test_meta_reattach_from_vq_info_base_is_caught: 'used entries lost or doubled')."
    ),
    "complete-held-rx-on-reset": (
        "at a device reset (SET_STATUS 0) the RX buffers the device popped and held unfilled "
        "(monitor hold-rx) are returned as used with 0 bytes written instead of being left to "
        "the driver. Over vhost-vdpa with shadow virtqueues QEMU resets the source device at "
        "the switchover and then flushes the shadow used ring to the guest "
        "(vhost_vdpa_suspend -> vhost_svq_stop -> vhost_svq_flush), so the guest sees empty "
        "RX completions. Hook: net/datapath.py NetDevice.device_resetting. Caught by the "
        "vhost-vdpa migration suite (qtests/test_vdpa_inflight_migration.py "
        "test_meta_complete_held_rx_on_reset_is_caught: 'RX frame')."
    ),
    "stale-translation-cache": (
        "every translation the device computed is remembered as a window that no IOTLB "
        "INVALIDATE / unmap or REM_MEM_REG drops (a translation cache keyed on nothing): after "
        "the change the device still reaches the old page or the removed region. Hooks: "
        "vdpa/dma.py DmaSpace.translate (_stale_keep / _stale_hit). Caught by the vIOMMU suite "
        "(qtests/test_viommu.py and qtests/test_viommu_inflight.py "
        "test_meta_stale_translation_cache_is_caught, test_meta_race_in_traffic_catches_stale_"
        "translations: the old page's bytes, no MISS after the INVALIDATE) and the memory "
        "hotplug suite (qtests/test_memory_inflight.py test_meta_held_chains_scenario_catches"
        "[stale-translation-cache]: TX from a DIMM re-plugged at the same address). Over "
        "vhost-vdpa the remembered window survives the UPDATE_IOTLB and leads into the closed "
        "mmap of the removed entry ('region closed' instead of the new page): "
        "test_meta_held_chains_scenario_catches_over_vhost_vdpa[stale-translation-cache] and "
        "qtests/test_viommu_inflight.py test_meta_*_catches_stale_translation_cache_over_"
        "vhost_vdpa (held chain, ring unmap) and test_meta_race_in_traffic_catches_stale_"
        "translations_over_vhost_vdpa."
    ),
    "skip-shrink-guard": (
        "the event loop's guard no longer fstat()s unsealed mem-table files before each "
        "callback (sizes are checked only when a region is mapped), so a region the front-end "
        "shrank is touched by the next ring access: only the SIGBUS guard "
        "(vdpa/sigbus_guard.py) stands between it and the process, exactly as for a shrink "
        "that lands inside one callback. Hook: vhost_user/memory_table.py "
        "MemoryTable.check_backing. Caught by the hostile front-end suite "
        "(qtests/test_hostile_memory.py test_meta_skip_shrink_guard_is_caught: 'the ring "
        "access faulted'; the shrunk region must be found before any access)."
    ),
}


class Faults:
    """The set of active faults; unknown names raise ValueError listing the known ones."""

    def __init__(self, names: Iterable[str] = (), journal: Journal | None = None) -> None:
        self.journal = journal
        self._active: set[str] = set()
        self.generation = 0  # bumps on set/clear (translation caches key on it)
        for name in names:
            self.set(name)

    @staticmethod
    def _check(name: str) -> None:
        if name not in FAULTS:
            known = ", ".join(sorted(FAULTS))
            raise ValueError(f"unknown fault {name!r}; known faults: {known}")

    def active(self, name: str) -> bool:
        if name in self._active:
            return True
        self._check(name)
        return False

    def set(self, name: str) -> None:
        self._check(name)
        self._active.add(name)
        self.generation += 1
        if self.journal is not None:
            self.journal.record("fault.set", name=name)

    def clear(self, name: str) -> None:
        self._check(name)
        self._active.discard(name)
        self.generation += 1
        if self.journal is not None:
            self.journal.record("fault.clear", name=name)

    def names(self) -> list[str]:
        """The active fault names, sorted."""
        return sorted(self._active)

    @staticmethod
    def known() -> dict[str, str]:
        return dict(FAULTS)
