"""Ring state restored by QEMU across stop / cont on vhost-vdpa (no shadow virtqueues).

VDUSE cannot suspend, so QEMU 10 never asks the device for its ring state (no GET_VQ_STATE):
at ``stop`` it resets the device and takes last_avail_idx from the used index in guest
memory; at ``cont`` it hands it back, which the device reads with ``VDUSE_VQ_GET_INFO`` at
DRIVER_OK. The device must resume from that index: no chain transmitted twice, none lost.
The kernel's own GET_VQ_STATE path is reached only by a front-end that asks for the ring
base itself (:func:`get_vq_state_round_trip`).
"""

from __future__ import annotations

import time
from typing import Any

from .backend_process import BackendProcess
from .frames import make_frame
from .testbed import Testbed
from .vhost_vdpa import VhostVdpa
from .waiting import poll_until

TX_VQ = 1
TIMEOUT = 30.0


def _statuses(tb: Testbed, since: int) -> list[int]:
    assert tb.backend is not None
    return [int(e["new"]) for e in tb.backend.journal(["status.set"], since)]


def _stop(tb: Testbed) -> None:
    """QMP stop; wait until QEMU reset the device (VDUSE cannot suspend)."""
    assert tb.backend is not None
    mark = tb.backend.mark()
    tb.qmp.command("stop")
    poll_until(lambda: 0 in _statuses(tb, mark), TIMEOUT, "the device reset at stop")


def stop_cont_scenario(tb: Testbed, cycles: int = 2, per_cycle: int = 4) -> list[dict[str, Any]]:
    """Frames out, stop, cont, frames out again, ``cycles`` times: after each cont the device
    resumes TX at the index QEMU restored, and the next frame on the wire is the next one
    the guest sent (not an old chain again). Returns each cycle's restored index."""
    assert tb.backend is not None
    b = tb.backend
    seq = 0
    seen: list[dict[str, Any]] = []
    for cycle in range(cycles):
        frames = [make_frame(seq + i, 100 + 50 * i, stream=21) for i in range(per_cycle)]
        seq += per_cycle
        tb.net.send_burst(frames, timeout=TIMEOUT)
        assert tb.peer.recv_n(per_cycle, timeout=TIMEOUT) == frames, f"cycle {cycle}: TX"
        tb.net.wait_tx(0, TIMEOUT)
        guest = tb.net.txq[0].avail_idx
        _stop(tb)
        mark = b.mark()
        tb.qmp.command("cont")
        poll_until(lambda: b.vring(TX_VQ)["started"], TIMEOUT, "TX started after cont")
        info = [e for e in b.journal(["vduse.vq_info"], mark) if e["vq"] == TX_VQ]
        assert info and info[-1]["split_avail"] == guest, (
            f"cycle {cycle}: QEMU restored TX at {info[-1]['split_avail'] if info else None}, "
            f"the guest ring is at {guest}"
        )
        nxt = make_frame(seq, 333, stream=21)
        seq += 1
        tb.net.send(nxt, timeout=TIMEOUT)
        got = tb.peer.recv(timeout=TIMEOUT)
        assert got == nxt, (
            f"cycle {cycle}: the first frame on the wire after cont is not the one the guest "
            f"sent after it ({len(got)} bytes {got[:20].hex()}...): the device resumed TX at "
            f"{b.vring(TX_VQ)['last_avail_idx'] - 1}, QEMU restored {guest}"
        )
        vr = b.vring(TX_VQ)
        assert vr["last_avail_idx"] == guest + 1, f"cycle {cycle}: device TX ring {vr}"
        seen.append({"cycle": cycle, "restored": guest, "get_vq_state": 0})
    asked = [m for m in b.journal(["vduse.msg"]) if m["type"] == "GET_VQ_STATE"]
    assert not asked, f"QEMU asked GET_VQ_STATE without SVQ or suspend: {asked}"
    return seen


def get_vq_state_round_trip(
    backend: BackendProcess, bases: dict[int, int], repeat: int = 20
) -> dict[str, float]:
    """The kernel's GET_VQ_STATE path, which QEMU 10 never takes with VDUSE: a vhost-vdpa
    front-end of our own (qtests/qos/vhost_vdpa.py) sets each ring's base (SET_VRING_BASE,
    kept by the kernel) and reads it back (VHOST_GET_VRING_BASE -> VDUSE GET_VQ_STATE -> the
    device's get_vq_state). The answer must be the base that was set; returns the round trip
    (ioctl to answer) in microseconds, median and max over ``repeat`` asks per ring."""
    assert backend.vhost_vdpa
    times: list[float] = []
    with VhostVdpa(backend.vhost_vdpa) as dev:
        dev.set_owner()
        for index, base in bases.items():
            dev.set_vring_num(index, 256)
            dev.set_vring_base(index, base)
            for _ in range(repeat):
                t0 = time.perf_counter()
                got = dev.get_vring_base(index)
                times.append((time.perf_counter() - t0) * 1e6)
                assert got == base, (
                    f"vq {index}: GET_VQ_STATE answered {got}, the front-end set {base}"
                )
    times.sort()
    return {"median_us": round(times[len(times) // 2], 1), "max_us": round(times[-1], 1)}
