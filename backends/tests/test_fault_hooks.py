"""The fault hooks the qtest meta-tests rely on: no-chain-validation, rx-bad-num-buffers,
ignore-used-event, ignore-iotlb-perm. Each test shows the clean behaviour and what the fault
changes, at the spot the hook sits."""

from __future__ import annotations

import pytest

from backends.tests.test_net_datapath import (
    BASE_FEATURES,
    GPA,
    HDR,
    MRG,
    U16,
    UADDR,
    frame,
    hdr,
    make_rig,
)
from backends.tests.test_virtqueue import BUF, INDIRECT, NEXT, WRITE, _raw, setup
from backends.vdpa import Faults, Perm
from backends.vdpa.virtqueue import VqError
from backends.virtio.features import VIRTIO_F_EVENT_IDX, Status, mask
from backends.virtio.net_header import VirtioNetHdr

BAD_CHAINS = [
    ([(BUF, 8, NEXT, 9)], "next-range"),
    ([(BUF, 8, NEXT, 1), (BUF, 8, NEXT, 0)], "loop"),
    ([(BUF, 8, WRITE | NEXT, 1), (BUF, 8, 0, 0)], "order"),
    ([(0x50000, 24, INDIRECT, 0)], "indirect-len"),
    ([(0x50000, 32, INDIRECT | NEXT, 1), (BUF, 8, 0, 0)], "indirect-next"),
]


@pytest.mark.parametrize(("descs", "kind"), BAD_CHAINS, ids=[k for _, k in BAD_CHAINS])
def test_no_chain_validation_skips_bad_chains_silently(
    descs: list[tuple[int, int, int, int]], kind: str
) -> None:
    sp, ring, vq = setup()
    ring.free = ring.free[4:]  # good chains stay clear of the bad chain's slots
    _raw(ring, descs)
    with pytest.raises(VqError, match=kind):
        vq.pop()
    sp.faults.set("no-chain-validation")
    assert vq.pop() is None  # skipped: consumed, not in flight, nothing raised
    assert (vq.state.last_avail_idx, vq.inflight, vq.state.used_idx) == (1, 0, 0)
    head, _ = ring.add_chain([b"good"], [])  # the next good chain is taken as usual
    chain = vq.pop()
    assert chain is not None and chain.head == head
    # a skipped chain in front of a good one: pop and pop_batch skip it and go on
    _raw(ring, descs, head=0)
    ring.add_chain([b"next"], [])
    batch = vq.pop_batch(8)
    assert [c.out_len for c in batch] == [4]
    assert sp.journal.query(["error."]) == []


def test_no_chain_validation_ignores_an_avail_jump() -> None:
    sp, ring, vq = setup(num=4)
    ring.set_avail_idx(9)  # 9 ahead of last_avail_idx 0 on a ring of 4
    with pytest.raises(VqError, match="avail-jump"):
        vq.pop()
    sp.faults.set("no-chain-validation")
    assert vq.pop() is None and vq.state.last_avail_idx == 9


def test_no_chain_validation_device_keeps_running_without_error() -> None:
    rig = make_rig(faults=Faults(["no-chain-validation"]))
    tx = rig.vqs[1]
    loop_at = rig.alloc(64)
    tx._desc(0, loop_at, 16, 1, 1)
    tx._desc(1, loop_at, 16, 1, 0)
    rig.pack(U16, tx.avail + 4, 0)
    tx.avail_idx = 1
    tx.free.remove(0)
    tx.free.remove(1)
    rig.pack(U16, tx.avail + 2, 1)
    tx.kick()
    assert rig.dev.journal.query(["error."]) == []
    assert not rig.dev.get_status() & Status.NEEDS_RESET
    assert tx.used_idx() == 0 and rig.wire.sent == []


def test_rx_bad_num_buffers_writes_one() -> None:
    for bad in (False, True):
        rig = make_rig(
            features=BASE_FEATURES | MRG, faults=Faults(["rx-bad-num-buffers"] if bad else [])
        )
        posted = rig.post_rx(0, [1100], count=4)
        rig.net.inject(frame(3000, seed=3))
        used = rig.vqs[0].take_used()
        assert [ln for _, ln in used] == [1100, 1100, 812]
        first = rig.read_chain(posted[0][1], used[0][1])
        assert VirtioNetHdr.unpack(first[:HDR]).num_buffers == (1 if bad else 3)


def test_ignore_used_event_interrupts_on_every_publish() -> None:
    rig = make_rig(
        features=BASE_FEATURES | mask(VIRTIO_F_EVENT_IDX),
        faults=Faults(["ignore-used-event"]),
    )
    q = rig.vqs[1]
    q.set_used_event(5)  # a clean device interrupts once used idx passes 5
    for k in range(3):
        q.add(rig.tx_buffers([hdr() + frame(100, k)]))
        q.kick()
    assert rig.calls == [1, 1, 1]
    rig.dev.notify_used(1)  # nothing new published: still no call
    assert rig.calls == [1, 1, 1]


def test_ignore_used_event_ignores_no_interrupt_flag() -> None:
    for bad in (False, True):
        rig = make_rig(faults=Faults(["ignore-used-event"] if bad else []))
        q = rig.vqs[1]
        rig.pack(U16, q.avail, 1)  # VRING_AVAIL_F_NO_INTERRUPT
        q.add(rig.tx_buffers([hdr() + frame(100)]))
        q.kick()
        assert rig.calls == ([1] if bad else [])


def test_ignore_iotlb_perm_writes_read_only_and_asks_read_on_miss() -> None:
    for bad in (False, True):
        rig = make_rig(iommu=True, faults=Faults(["ignore-iotlb-perm"] if bad else []))
        (head, bufs), (head2, bufs2) = rig.post_rx(0, [2048], count=2)
        gpa = bufs[0][0]
        rig.dev.dma_map(rig.iova(gpa), 2048, UADDR + gpa - GPA, Perm.RO)
        f = frame(200, seed=5)
        rig.net.inject(f)
        if bad:
            assert rig.vqs[0].take_used() == [(head, HDR + len(f))]
            assert rig.read_chain(bufs, HDR + len(f))[HDR:] == f
            # the second buffer is unmapped: the MISS asks for RO although RX writes
            rig.net.inject(f)
            misses = rig.dev.journal.query(["iotlb.miss"])
            assert misses[-1]["iova"] == rig.iova(bufs2[0][0])
            assert misses[-1]["perm"] == Perm.RO
        else:
            assert rig.vqs[0].take_used() == []
            assert rig.read(gpa, 2048) == bytes(2048)
            errors = rig.dev.journal.query(["error.vq"])
            assert errors and "perm" in errors[-1]["detail"]
