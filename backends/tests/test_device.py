"""VdpaDevice: status machine, features, kick path, errors -> NEEDS_RESET, suspend/resume,
stop_vq, vq state, IOTLB misses, dirty logging and every device-level fault hook."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.tests.conftest import UADDR_BASE, DriverRing, EchoPersonality
from backends.tests.test_virtqueue import RING_GPA, lay_out, ref_walk, ring_contents
from backends.vdpa.device import VdpaDevice
from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.faults import Faults
from backends.vdpa.iotlb import Perm
from backends.vdpa.journal import Journal
from backends.vdpa.memory import HostRegion
from backends.vdpa.virtqueue import VqState
from backends.virtio.features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    Status,
    bit,
)

MEM = 1 << 20
OK_STATUS = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK


class Rig:
    """A device with one anonymous region identity-mapped, and driver rings for 2 queues."""

    def __init__(
        self,
        features: int | None = None,
        faults: tuple[str, ...] = (),
        iommu: bool = False,
        num: int = 8,
    ) -> None:
        self.p = EchoPersonality()
        if features is not None:
            self.p.features = features
        self.journal = Journal()
        self.dev = VdpaDevice(self.p, self.journal, Faults(faults, journal=self.journal))
        self.region = HostRegion.anonymous(0, MEM, UADDR_BASE)
        self.dev.add_host_region(self.region)
        self.iova_offset = 0x1_0000_0000 if iommu else 0
        if not iommu:
            self.dev.dma_map(0, MEM, UADDR_BASE, Perm.RW)
        self.rings = [
            DriverRing(self.region, num, RING_GPA + q * 0x1000, self.iova_offset) for q in range(2)
        ]
        for q, r in enumerate(self.rings):
            r.heap = 0x40000 + q * 0x40000
        self.calls: list[int] = []
        self.misses: list[tuple[int, Perm]] = []
        self.config_changes = 0
        self.dev.on_vq_call = self.calls.append
        self.dev.on_iotlb_miss = lambda iova, perm: self.misses.append((iova, perm))
        self.dev.on_config_change = self._cfg

    def _cfg(self) -> None:
        self.config_changes += 1

    def map_all(self) -> None:
        self.dev.dma_map(self.iova_offset, MEM, UADDR_BASE, Perm.RW)

    def start(self, features: int | None = None, status: int = OK_STATUS) -> None:
        f = self.dev.get_device_features() if features is None else features
        if self.iova_offset:
            f |= bit(VIRTIO_F_ACCESS_PLATFORM)
        self.dev.set_driver_features(f)
        for q, r in enumerate(self.rings):
            self.dev.set_vq_num(q, r.num)
            self.dev.set_vq_address(q, r.desc_iova, r.avail_iova, r.used_iova)
            self.dev.set_vq_ready(q, True)
        self.dev.set_status(status)

    def kinds(self, prefix: str) -> list[dict]:
        return self.journal.query([prefix])


FEATS = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX)


def test_feature_negotiation_and_features_ok() -> None:
    rig = Rig(features=FEATS | bit(VIRTIO_F_RING_PACKED) | bit(VIRTIO_F_IN_ORDER) | bit(5))
    dev = rig.dev
    # in-order is not implemented (stripped); the packed ring is
    assert dev.get_device_features() == FEATS | bit(VIRTIO_F_RING_PACKED) | bit(5)
    dev.set_status(Status.ACKNOWLEDGE)
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    dev.set_driver_features(FEATS | bit(7))  # bit 7 was never offered
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert not dev.get_status() & Status.FEATURES_OK
    assert rig.kinds("error.status")[-1]["features"] == bit(7)
    dev.set_driver_features(FEATS | bit(26) | bit(30))  # vhost-level bits are ignored
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert dev.get_status() & Status.FEATURES_OK
    assert dev.vqs[0].event_idx and not dev.dma.iommu
    sets = rig.kinds("status.set")
    assert [(e["old"], e["new"]) for e in sets] == [(0, 1), (1, 3), (3, 3), (3, 11)]
    assert rig.kinds("features.set")[-1]["names"][:2] == ["bit 26", "EVENT_IDX"]


def test_driver_ok_starts_configured_queues_and_processes() -> None:
    rig = Rig(features=FEATS)
    head, ins = rig.rings[0].add_chain([b"early"], [8])  # posted before DRIVER_OK
    rig.rings[0].set_used_event(0)
    rig.start()
    starts = rig.kinds("vq.start")
    assert [e["vq"] for e in starts] == [0, 1]
    assert rig.rings[0].reclaim() == [(head, 8)]
    assert rig.region.read_gpa(ins[0], 8) == b"earlyear"
    assert rig.calls == [0]


def test_qemu_vhost_user_status_sequence_without_features_ok() -> None:
    """QEMU's vhost-user adds ACK|DRIVER|DRIVER_OK in one SET_STATUS."""
    rig = Rig(features=FEATS)
    rig.start(status=Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    assert rig.p.seen[-1] == b"x"


def test_kicks_are_ignored_until_driver_ok_and_ready() -> None:
    rig = Rig(features=FEATS)
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    assert rig.p.kicked == [] and rig.dev.kicks_ignored == 1
    rig.start()
    rig.dev.set_vq_ready(1, False)
    n = len(rig.p.kicked)
    rig.dev.kick_vq(1)
    assert len(rig.p.kicked) == n
    rig.dev.kick_vq(7)  # no such queue: journalled, no exception
    assert rig.kinds("error.protocol")


def test_reset_clears_device_but_keeps_memory_and_iotlb() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    rig.dev.suspend()
    mappings = rig.dev.iotlb.entries()
    rig.dev.set_status(0)
    dev = rig.dev
    assert dev.get_status() == 0 and dev.get_driver_features() == 0 and not dev.suspended
    assert all(not vq.ready and not vq.started and vq.num == 0 for vq in dev.vqs)
    assert dev.iotlb.entries() == mappings and dev.host.regions() == [rig.region]
    assert rig.p.resets == 1
    assert [e["vq"] for e in rig.kinds("vq.stop")] == [0, 1]
    assert rig.kinds("status.set")[-1]["new"] == 0


def test_malformed_ring_sets_needs_reset_and_never_raises() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    r = rig.rings[0]
    r.write_desc(0, 0x40000, 8, 1, 0)  # NEXT to itself: loop
    r.publish(0)
    rig.dev.kick_vq(0)
    (err,) = rig.kinds("error.vq")
    assert err["vq"] == 0 and err["error"] == "loop"
    assert rig.dev.get_status() & Status.NEEDS_RESET
    assert rig.config_changes == 1
    assert rig.kinds("status.set")[-1]["reason"] == "loop"
    n = len(rig.p.kicked)
    rig.dev.kick_vq(0)  # no more processing until reset
    rig.dev.kick_vq(1)
    assert len(rig.p.kicked) == n
    rig.dev.set_status(int(OK_STATUS))  # the driver cannot clear NEEDS_RESET
    assert rig.dev.get_status() & Status.NEEDS_RESET
    rig.dev.fail(1, "other", "second error")
    assert rig.config_changes == 1 and rig.dev.errors == 2
    json.dumps(rig.journal.query())


def test_personality_exception_is_error_device() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    rig.p.raise_on_kick = RuntimeError("boom")
    rig.dev.kick_vq(1)
    (err,) = rig.kinds("error.device")
    assert err["vq"] == 1 and "boom" in err["detail"]
    assert rig.dev.get_status() & Status.NEEDS_RESET


def test_callbacks_that_raise_are_contained() -> None:
    rig = Rig(features=FEATS)

    def bad(*_: object) -> None:
        raise OSError("transport gone")

    rig.dev.on_vq_call = bad
    rig.dev.on_config_change = bad
    rig.start()
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    rig.dev.fail(0, "x", "y")
    assert len(rig.kinds("error.device")) == 2


def test_per_queue_callback_wins_over_on_vq_call() -> None:
    rig = Rig(features=bit(VIRTIO_F_VERSION_1))
    got: list[int] = []
    rig.dev.set_vq_cb(1, got.append)
    rig.start()
    rig.rings[1].add_chain([b"x"], [])
    rig.rings[0].add_chain([b"y"], [])
    rig.dev.kick_vq(1)
    rig.dev.kick_vq(0)
    assert got == [1] and rig.calls == [0]


def test_event_idx_suppresses_calls_via_notify_used() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    r = rig.rings[0]
    r.set_used_event(5)
    for _ in range(3):
        r.add_chain([b"x"], [])
        rig.dev.kick_vq(0)
    assert rig.calls == []
    for _ in range(3):
        r.add_chain([b"x"], [])
        rig.dev.kick_vq(0)
    assert rig.calls == [0]  # only when used idx moved past 5


def test_notify_used_after_personality_flushed_itself() -> None:
    rig = Rig(features=bit(VIRTIO_F_VERSION_1))
    rig.start()
    vq = rig.dev.vqs[0]
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.suspend()  # keep the echo personality out of the way
    c = vq.pop()
    assert c is not None
    vq.push(c, 0)
    assert vq.flush() is True
    rig.dev.notify_used(0)
    assert rig.calls == [0]
    rig.dev.notify_used(0)
    assert rig.calls == [0]


def test_suspend_records_kicks_and_resume_replays_them() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    rig.dev.suspend()
    rig.rings[1].add_chain([b"a"], [])
    rig.rings[0].add_chain([b"b"], [])
    n = len(rig.p.kicked)
    rig.dev.kick_vq(1)
    rig.dev.kick_vq(0)
    rig.dev.kick_vq(1)
    assert len(rig.p.kicked) == n
    rig.dev.resume()
    assert rig.p.kicked[n:] == [1, 0]
    assert rig.kinds("device.resume")[-1]["replayed"] == [1, 0]
    assert rig.p.seen[-2:] == [b"a", b"b"]
    assert [e["kind"] for e in rig.journal.query(["device."])] == [
        "device.suspend",
        "device.resume",
    ]


def test_stop_vq_rewinds_inflight_and_returns_state() -> None:
    rig = Rig(features=FEATS)
    rig.start()
    rig.dev.suspend()
    vq = rig.dev.vqs[0]
    for k in range(3):
        rig.rings[0].add_chain([bytes([k])], [])
    chains = vq.pop_batch(3)
    assert len(chains) == 3
    vq.push(chains[0], 0)  # pushed but not flushed: stop_vq publishes it
    st = rig.dev.stop_vq(0)
    assert st == VqState(1, 1)
    assert rig.rings[0].used_idx() == 1
    assert not vq.started and rig.p.stopped == [0]
    stop = rig.kinds("vq.stop")[-1]
    gs = rig.kinds("vq.get_state")[-1]
    assert stop["vq"] == 0 and stop["reason"] == "get_base"
    assert (gs["last_avail_idx"], gs["used_idx"]) == (1, 1)
    assert rig.journal.query(["vq.rewind"])[-1]["count"] == 2
    # a stopped ring is not processed; restart on the same state works
    rig.dev.resume()
    rig.dev.set_vq_state(0, st)
    rig.dev.start_vq(0)
    assert rig.p.seen[-2:] == [b"\x01", b"\x02"]


def test_fault_no_drain_before_base() -> None:
    rig = Rig(features=FEATS, faults=("no-drain-before-base",))
    rig.start()
    rig.dev.suspend()
    vq = rig.dev.vqs[0]
    for _ in range(3):
        rig.rings[0].add_chain([b"x"], [])
    chains = vq.pop_batch(3)
    assert len(chains) == 3
    vq.push(chains[0], 0)
    st = rig.dev.stop_vq(0)
    assert st.last_avail_idx == 3 and st.used_idx == 1  # the two popped chains are lost
    assert rig.journal.query(["vq.rewind"]) == []


def test_fault_vring_base_off_by_one() -> None:
    rig = Rig(features=FEATS, faults=("vring-base-off-by-one",))
    rig.start()
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    assert rig.dev.get_vq_state(0).last_avail_idx == 2
    assert rig.dev.stop_vq(0).last_avail_idx == 2
    assert rig.kinds("vq.get_state")[-1]["last_avail_idx"] == 2
    rig.dev.faults.clear("vring-base-off-by-one")
    assert rig.dev.get_vq_state(0).last_avail_idx == 1


def test_set_vq_state_used_idx_defaults_to_last_avail() -> None:
    rig = Rig()
    rig.dev.set_vq_state(0, VqState(last_avail_idx=12))
    assert rig.dev.vqs[0].state == VqState(12, 12)
    rig.dev.set_vq_state(0, VqState(12, 10))
    assert rig.dev.vqs[0].state == VqState(12, 10)
    rig.dev.set_vq_state(0, VqState(70000, 0))
    assert rig.dev.vqs[0].state == VqState(70000 & 0xFFFF, 0)
    assert rig.kinds("vq.set_state")[0]["used_idx"] == 12


def test_bad_queue_index_and_size_raise_value_error_and_journal() -> None:
    rig = Rig()
    with pytest.raises(ValueError):
        rig.dev.set_vq_num(5, 8)
    with pytest.raises(ValueError):
        rig.dev.set_vq_num(0, 4096)
    with pytest.raises(ValueError):
        rig.dev.set_vq_num(0, 12)
    with pytest.raises(ValueError):
        rig.dev.get_vq_state(-1)
    assert len(rig.kinds("error.protocol")) == 4


def test_config_space() -> None:
    rig = Rig()
    assert rig.dev.get_config(0, 6) == bytes.fromhex("525400123456")
    assert rig.dev.get_config(6, 4) == b"\x01\x00\x00\x00"  # padded past the end
    rig.dev.set_config(0, b"\x02")
    assert rig.dev.get_config(0, 1) == b"\x02"
    assert rig.dev.get_config(-1, 4) == b""


def test_iotlb_miss_parks_asks_once_and_retries_on_update() -> None:
    rig = Rig(features=FEATS, iommu=True)
    rig.start()
    assert rig.dev.dma.iommu
    off = rig.iova_offset
    r0, r1 = rig.rings
    assert rig.dev.parked == {0: (off + r0.desc, Perm.RO), 1: (off + r1.desc, Perm.RO)}
    assert [(e["vq"], e["iova"], e["perm"]) for e in rig.kinds("iotlb.miss")] == [
        (0, off + r0.desc, int(Perm.RO)),
        (1, off + r1.desc, int(Perm.RO)),
    ]
    assert rig.misses == [(off + r0.desc, Perm.RO), (off + r1.desc, Perm.RO)]
    r0.add_chain([b"x"], [16])
    rig.dev.kick_vq(0)  # still missing: no second MISS for the same iova/perm
    assert len(rig.misses) == 2 and len(rig.kinds("iotlb.miss")) == 2
    rig.map_all()  # dma_map -> iotlb_updated retries the parked queues
    assert rig.dev.parked == {}
    assert rig.p.seen == [b"x"]
    assert rig.rings[0].reclaim()[0][1] == 16
    assert not rig.dev.get_status() & Status.NEEDS_RESET


def test_iotlb_miss_batch_and_explicit_iotlb_updated() -> None:
    rig = Rig(features=FEATS, iommu=True)
    rig.start()
    rig.dev.batch_begin()
    rig.map_all()
    assert rig.dev.parked  # not visible before commit
    rig.dev.batch_commit()
    assert not rig.dev.parked
    rig.dev.iotlb_updated()  # idempotent


def test_fault_no_miss_parks_silently() -> None:
    rig = Rig(features=FEATS, faults=("no-miss",), iommu=True)
    rig.start()
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    assert rig.misses == [] and rig.kinds("iotlb.miss") == []
    assert 0 in rig.dev.parked and rig.p.seen == []
    rig.map_all()
    assert rig.p.seen == [b"x"]


def test_fault_translate_by_gpa() -> None:
    """With a vIOMMU, IOVA != GPA: the faulty device reads the GPA instead."""
    rig = Rig(features=FEATS, faults=("translate-by-gpa",), iommu=True)
    rig.start()
    assert not rig.dev.parked  # no miss at all: it never looks at the IOTLB
    # the driver writes IOVAs; interpreted as GPAs they are outside guest memory
    rig.rings[0].add_chain([b"x"], [])
    rig.dev.kick_vq(0)
    err = rig.kinds("error.")
    assert err and rig.dev.get_status() & Status.NEEDS_RESET


def test_translate_by_gpa_only_matters_in_iommu_mode() -> None:
    rig = Rig(features=FEATS, faults=("translate-by-gpa",))
    rig.start()
    rig.rings[0].add_chain([b"ok"], [])
    rig.dev.kick_vq(0)
    assert rig.p.seen == [b"ok"]


def test_dirty_log_through_the_device_and_skip_dirty_log() -> None:
    for fault in ((), ("skip-dirty-log",)):
        rig = Rig(features=FEATS, faults=fault)
        log = DirtyLog(bytearray(MEM >> 15))
        rig.dev.set_dirty_log(log)
        rig.start()
        _, ins = rig.rings[0].add_chain([b"data"], [4096])
        rig.dev.kick_vq(0)
        assert log.is_dirty(rig.rings[0].used)
        assert log.is_dirty(ins[0]) is (not fault)
        assert not log.is_dirty(0x40000 + 0x80000)
        rig.dev.set_dirty_log(None)
        assert [e["enabled"] for e in rig.kinds("log.set")] == [True, False]


def test_fault_remap_all_through_the_device() -> None:
    rig = Rig(features=FEATS, faults=("remap-all",))
    before = rig.dev.iotlb.entries()
    rig.dev.set_map([(m.iova, m.size, m.uaddr, m.perm) for m in before])
    assert before[0] is rig.dev.iotlb.entries()[0]  # no change: nothing remapped
    rig.dev.dma_map(MEM, 0x1000, UADDR_BASE, Perm.RO)
    assert rig.dev.iotlb.entries()[0] is not before[0]


def test_host_region_add_remove_journal() -> None:
    rig = Rig()
    r = HostRegion.anonymous(MEM, 0x1000, UADDR_BASE + MEM)
    rig.dev.add_host_region(r)
    with pytest.raises(ValueError):
        rig.dev.add_host_region(HostRegion.anonymous(MEM, 0x1000, 0x1000))
    rig.dev.remove_host_region(r)
    with pytest.raises(ValueError):
        rig.dev.remove_host_region(r)
    assert [e["kind"] for e in rig.journal.query(["mem."])] == ["mem.add", "mem.add", "mem.remove"]
    assert len(rig.kinds("error.mem")) == 2
    d = rig.dev.describe()
    json.dumps(d)
    assert d["num_queues"] == 2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring_contents())
def test_kick_with_random_rings_fails_cleanly_or_processes(contents) -> None:
    num, descs, tables, last, pending, ring_entries = contents
    rig = Rig(features=FEATS)
    # buffers may overlap the descriptor tables: the device must not rewrite what it walks
    rig.p.fill_inputs = False
    lay_out(_Sp(rig), num, descs, tables, last, pending, ring_entries)
    dev = rig.dev
    dev.set_driver_features(FEATS)
    dev.set_vq_num(0, num)
    used = (RING_GPA + 16 * num + 6 + 2 * num + 3) & ~3
    dev.set_vq_address(0, RING_GPA, RING_GPA + 16 * num, used)
    dev.set_vq_state(0, VqState(last))
    dev.set_vq_ready(0, True)
    dev.set_status(int(OK_STATUS))  # processes the queue: must not raise
    # the device pops until the ring is empty or an error: walk the reference the same way
    k = 0
    while True:
        want = ref_walk(_Sp(rig), num, (last + k) & 0xFFFF)  # type: ignore[arg-type]
        if want is None or want[0] == "err":
            break
        k += 1
    if want is not None:
        assert dev.get_status() & Status.NEEDS_RESET
        assert rig.kinds("error.vq")[0]["error"] == want[1]
    else:
        assert not dev.get_status() & Status.NEEDS_RESET
        assert dev.vqs[0].state.last_avail_idx == (last + k) & 0xFFFF
        if k:
            assert rig.region.read_gpa(used + 2, 2) == ((last + k) & 0xFFFF).to_bytes(2, "little")


class _Sp:
    """The bits of conftest.Space that lay_out / ref_walk use."""

    def __init__(self, rig: Rig) -> None:
        self.region = rig.region


PAGES = [RING_GPA, *(0x40000 + k * 0x1000 for k in range(6))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["map", "unmap", "kick", "updated"]), st.sampled_from(PAGES)),
        max_size=40,
    )
)
def test_iommu_map_unmap_kick_interleavings(ops: list[tuple[str, int]]) -> None:
    """Random IOTLB churn under a running queue: never an exception or NEEDS_RESET, never
    progress through an unmapped page (no stale ring cache), and everything completes once
    all is mapped."""
    rig = Rig(features=FEATS, iommu=True)
    off = rig.iova_offset
    r = rig.rings[0]
    payloads = [bytes([0x30 + k]) * 8 for k in range(3)]
    for data in payloads:
        r.heap = (r.heap + 0xFFF) & ~0xFFF
        r.add_chain([data], [16])
    rig.start()
    mapped: set[int] = set()
    for op, page in ops:
        if op == "map":
            rig.dev.dma_map(off + page, 0x1000, UADDR_BASE + page, Perm.RW)
            mapped.add(page)
        elif op == "unmap":
            rig.dev.dma_unmap(off + page, 0x1000)
            mapped.discard(page)
        elif op == "kick":
            before = len(rig.p.seen)
            rig.dev.kick_vq(0)
            if RING_GPA not in mapped:
                assert len(rig.p.seen) == before and 0 in rig.dev.parked
        else:
            rig.dev.iotlb_updated()
        assert not rig.dev.get_status() & Status.NEEDS_RESET, rig.kinds("error.")
        assert rig.p.seen == payloads[: len(rig.p.seen)]
    rig.map_all()
    rig.dev.kick_vq(0)
    assert rig.p.seen == payloads
    assert r.used_idx() == 3 and not rig.dev.parked


def test_kick_during_an_outstanding_miss_asks_again_when_it_is_refused() -> None:
    """The guest maps the IOVA and kicks while the first MISS is still outstanding; the front-end
    then refuses that MISS (it was unmapped when it was asked): the kick must not be lost."""
    rig = Rig(features=FEATS, iommu=True)
    rig.start()
    off = rig.iova_offset
    r0 = rig.rings[0]
    key = (off + r0.desc, Perm.RO)
    assert rig.misses.count(key) == 1
    rig.dev.kick_vq(0)  # outstanding: no second MISS yet
    assert rig.misses.count(key) == 1
    rig.dev.iotlb_miss_refused(*key)
    assert rig.misses.count(key) == 2, "the kick that came meanwhile asked again"
    assert rig.dev.parked[0] == key
    rig.dev.iotlb_miss_refused(*key)  # refused again, no kick since: no third MISS (no loop)
    assert rig.misses.count(key) == 2
    rig.dev.iotlb_miss_refused(0x1234, 9)  # not a permission: ignored
