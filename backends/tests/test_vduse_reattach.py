"""Re-attaching to a VDUSE device whose backend died (``--vduse-reattach``), against the fake
kernel: the new process takes over the same device, recovers features, IOTLB and queues from
the kernel, resumes each split ring at the used index in guest memory, answers the messages
the dead process read but never answered, and never creates a device."""

from __future__ import annotations

import errno
import os

import pytest

from backends.__main__ import parse_args
from backends.loop import EventLoop
from backends.net.datapath import NetDevice
from backends.tests.capture_wire import CaptureWire
from backends.tests.vduse_rig import NAME, Rig, make_rig, tx_chain
from backends.vdpa.device import VdpaDevice
from backends.vdpa.faults import Faults
from backends.vduse import uapi
from backends.vduse.transport import VduseError, VduseTransport
from backends.virtio.net_header import HDR_LEN

DONE, HELD = 3, 2


def frame(seq: int) -> bytes:
    return bytes([seq]) * (60 + seq)


def _crash(rig: Rig) -> None:
    """What SIGKILL leaves: the kernel closes the process's fds (vduse_dev_release); the
    device, its queues, IOTLB and kick eventfd contexts stay with the kernel."""
    rig.kernel.close_dev()
    for q in rig.transport.rings:
        if q.kickfd >= 0:
            rig.loop.remove_reader(q.kickfd)
    rig.transport._closed = True  # the dead process never tears anything down


def _replacement(rig: Rig, faults: tuple[str, ...] = ()) -> Rig:
    loop = EventLoop()
    wire = CaptureWire()
    net = NetDevice(wire, queue_pairs=1, loop=loop)
    device = VdpaDevice(net, faults=Faults(list(faults)))
    transport = VduseTransport(device, loop, rig.kernel, NAME, max_queue_size=256, reattach=True)
    return Rig(rig.kernel, loop, net, device, wire, transport, rig.mem, rig.region, rig.rings)


def _close_replacement(new: Rig) -> None:
    new.transport.close()
    new.loop.close()


def _stream_and_hold(rig: Rig) -> list[int]:
    """DONE TX chains completed, HELD popped and held (neither sent nor used), two RX
    buffers posted and not filled; returns the RX buffers' GPAs."""
    rig.bring_up()
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "queues ready")
    tx = rig.rings[1]
    for s in range(DONE):
        tx_chain(tx, frame(s))
    rig.kernel.kick(1)
    rig.wait(lambda: tx.used_idx() == DONE, f"{DONE} TX chains used")
    rig.net.hold_tx(True)
    for s in range(DONE, DONE + HELD):
        tx_chain(tx, frame(s))
    rig.kernel.kick(1)
    rig.wait(lambda: rig.net.tx_held == HELD, f"{HELD} TX chains held")
    gpas = []
    for _ in range(2):
        _, g = rig.rings[0].add_chain(inp=[HDR_LEN + 1514])
        gpas += g
    rig.kernel.kick(0)
    assert [f for f, _ in rig.wire.sent] == [frame(s) for s in range(DONE)]
    assert tx.used_idx() == DONE
    return gpas


def test_reattach_resumes_at_the_used_index_and_processes_chains_in_flight(rig: Rig) -> None:
    gpas = _stream_and_hold(rig)
    old_fds = [q.kickfd for q in rig.transport.rings]
    _crash(rig)
    calls = list(rig.kernel.calls)
    new = _replacement(rig)
    try:
        assert new.transport.start() == "/dev/vhost-vdpa-0"
        assert rig.kernel.calls == calls, "re-attach created, destroyed or closed something"
        (entry,) = new.journal("vduse.reattach")
        queues = {q["vq"]: q for q in entry["queues"]}
        assert queues[1]["info_base"] == 0 and queues[1]["used_idx"] == DONE
        assert queues[1]["resumed_at"] == DONE
        assert entry["status"] & 0x4, "DRIVER_OK inferred from the enabled queues"
        assert all(q.kickfd >= 0 and q.kickfd not in old_fds for q in rig.kernel.vqs)
        tx = rig.rings[1]
        # the held chains: processed once by the replacement, without a new kick
        new.wait(lambda: tx.used_idx() == DONE + HELD, "the held TX chains used")
        assert [f for f, _ in new.wire.sent] == [frame(s) for s in range(DONE, DONE + HELD)]
        ids = [i for i, _ in tx.reclaim()]
        assert len(ids) == len(set(ids)) == DONE + HELD, f"used ids doubled: {ids}"
        # after the reconnect: TX and RX, each once
        tx_chain(tx, frame(9))
        rig.kernel.kick(1)
        new.wait(lambda: tx.used_idx() == DONE + HELD + 1, "TX after the reconnect")
        assert new.wire.sent[-1][0] == frame(9) and len(new.wire.sent) == HELD + 1
        new.wire.deliver(frame(20))
        new.wait(lambda: rig.rings[0].used_idx() == 1, "RX after the reconnect")
        assert rig.region is not None
        assert rig.region.read_gpa(gpas[0] + HDR_LEN, len(frame(20))) == frame(20)
    finally:
        _close_replacement(new)
        for fd in old_fds:
            os.close(fd)


def test_reattach_answers_the_messages_the_dead_process_read(rig: Rig) -> None:
    rig.bring_up()
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "queues ready")
    rid = rig.kernel.get_vq_state(1)
    assert rig.kernel.read_request() is not None  # read by the old process, never answered
    old_fds = [q.kickfd for q in rig.transport.rings]
    _crash(rig)
    new = _replacement(rig)
    try:
        new.transport.start()
        union = new.ok(rid)
        assert uapi.VQ_STATE_SPLIT.unpack_from(union, 4)[0] == 0
    finally:
        _close_replacement(new)
        for fd in old_fds:
            os.close(fd)


def test_reattach_fault_resumes_at_the_stale_base_and_sends_again(rig: Rig) -> None:
    _stream_and_hold(rig)
    old_fds = [q.kickfd for q in rig.transport.rings]
    _crash(rig)
    new = _replacement(rig, faults=("reattach-from-vq-info-base",))
    try:
        new.transport.start()
        (entry,) = new.journal("vduse.reattach")
        assert {q["vq"]: q["resumed_at"] for q in entry["queues"]}[1] == 0
        tx = rig.rings[1]
        new.wait(lambda: tx.used_idx() == DONE + HELD, "the used index back at the end")
        # the device's used index restarted at 0 (it went backwards under the driver's feet)
        # and the chains the dead process had completed were transmitted a second time
        assert [f for f, _ in new.wire.sent] == [frame(s) for s in range(DONE + HELD)]
    finally:
        _close_replacement(new)
        for fd in old_fds:
            os.close(fd)


def test_reattach_while_the_device_is_held_is_refused(rig: Rig) -> None:
    new = _replacement(rig)
    try:
        with pytest.raises(VduseError, match="held by another process"):
            new.transport.start()
        (err,) = new.journal("error.vduse")
        assert err["op"] == "reattach" and err["errno"] == errno.EBUSY
        assert rig.kernel.name == NAME and "destroy" not in rig.kernel.calls
    finally:
        new.loop.close()


def test_reattach_without_a_device_is_refused_and_creates_none() -> None:
    r = make_rig(start=False)
    new = _replacement(r)
    try:
        with pytest.raises(VduseError, match="no VDUSE device named"):
            new.transport.start()
        assert "create" not in r.kernel.calls
    finally:
        new.loop.close()
        r.loop.close()
        r.kernel.release()


def test_reattach_before_features_waits_for_the_driver(rig: Rig) -> None:
    old_fds = [q.kickfd for q in rig.transport.rings]
    _crash(rig)
    new = _replacement(rig)
    try:
        new.transport.start()
        (entry,) = new.journal("vduse.reattach")
        assert entry["status"] == 0 and entry["features"] == 0
        new.bring_up()  # the driver comes later: an ordinary bring-up on the same device
        new.wait(lambda: all(vq.ready for vq in new.device.vqs), "queues ready")
        tx_chain(new.rings[1], frame(1))
        rig.kernel.kick(1)
        new.wait(lambda: new.wire.sent, "TX after a late bring-up")
    finally:
        _close_replacement(new)
        for fd in old_fds:
            os.close(fd)


def test_command_line_reattach_needs_the_vduse_transport(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args(["--transport", "vduse", "--name", "n0", "--vduse-reattach"])
    assert args.vduse_reattach
    with pytest.raises(SystemExit):
        parse_args(["--socket", "/tmp/x.sock", "--vduse-reattach"])
    assert "--vduse-reattach needs --transport vduse" in capsys.readouterr().err
