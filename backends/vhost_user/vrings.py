"""Per-virtqueue transport state: the kick, call and err eventfds and ring start/stop.

A ring starts when its kick eventfd first becomes readable (or on SET_VRING_KICK with the
no-fd bit, which means "poll"); each readable kick is drained and becomes ``kick_vq``.
GET_VRING_BASE stops the ring and stops watching its kick fd. The call eventfd becomes the
device's per-queue interrupt callback. Every replaced or dropped descriptor is closed.

The eventfds belong to the peer as much as to us (it can clear O_NONBLOCK on the shared file
description, or fill a counter to 2^64-2): every read and write goes through
:mod:`backends.vhost_user.eventfd`, which never waits. An interrupt that cannot be written is
journalled (``error.call``, once per episode), logged, and coalesced into the next one.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backends.loop import EventLoop
from backends.vdpa.virtqueue import VqState
from backends.vhost_user import eventfd
from backends.vhost_user.errors import ProtocolError

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.005  # a ring whose kick is "no fd" is polled this often while started
_EVENTFD_LINK = "anon_inode:[eventfd]"


def check_eventfd(fd: int, what: str) -> None:
    """ProtocolError unless ``fd`` is an eventfd."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ProtocolError("bad-fd", f"{what} fd {fd}: {e}") from e
    if target != _EVENTFD_LINK:
        raise ProtocolError("bad-fd", f"{what} fd is not an eventfd ({target})")


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class VringFiles:
    index: int
    kick: int = -1
    call: int = -1
    err: int = -1
    polling: bool = False  # kick set with the no-fd bit
    poll_timer: int | None = None
    watching: bool = False  # kick fd registered with the loop
    log: bool = False
    log_guest_addr: int = 0
    kicks: int = 0
    calls: int = 0
    calls_pending: int = 0  # interrupts not delivered yet (counter full): coalesced
    calls_lost: int = 0  # writes refused (each coalesced into the next attempt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kick": self.kick >= 0 or self.polling,
            "call": self.call >= 0,
            "err": self.err >= 0,
            "polling": self.polling,
            "log": self.log,
            "log_guest_addr": self.log_guest_addr,
            "kicks": self.kicks,
            "calls": self.calls,
            "calls_pending": self.calls_pending,
            "calls_lost": self.calls_lost,
        }


class Vrings:
    """The transport side of every virtqueue of ``device``."""

    def __init__(
        self,
        device: VdpaDevice,
        loop: EventLoop,
        *,
        before_start: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.loop = loop
        self.before_start = before_start
        self.rings = [VringFiles(i) for i in range(len(device.vqs))]

    def __len__(self) -> int:
        return len(self.rings)

    def get(self, index: int) -> VringFiles:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(
                "bad-index", f"vring index {index} out of range (device has {len(self.rings)})"
            )
        return self.rings[index]

    # -- kick ---------------------------------------------------------------------------------
    def set_kick(self, index: int, fd: int | None) -> None:
        """New kick eventfd (owned from now on) or ``None`` for polling; starts polling rings."""
        ring = self.rings[index]
        self._unwatch(ring)
        _close(ring.kick)
        ring.kick = -1
        ring.polling = fd is None
        if fd is None:
            self._poll(ring)
            return
        ring.kick = fd
        self.loop.add_reader(fd, lambda: self._on_kick(ring))
        ring.watching = True

    def _on_kick(self, ring: VringFiles) -> None:
        if not ring.watching:  # unwatched earlier in this loop iteration
            return
        try:
            if eventfd.drain(ring.kick) is None:
                return  # someone else drained it (the same eventfd on two rings, the peer)
        except OSError as e:
            log.warning("vring %d: kick fd failed (%s); no longer watched", ring.index, e)
            self._unwatch(ring)
            return
        ring.kicks += 1
        self._kick(ring)

    def _kick(self, ring: VringFiles) -> None:
        """A kick: the first one on a configured ring starts it."""
        vq = self.device.vqs[ring.index]
        if vq.started:
            self.device.kick_vq(ring.index)
        elif vq.configured:
            if self.before_start is not None:
                self.before_start(ring.index)
            self.device.start_vq(ring.index)

    def _poll(self, ring: VringFiles) -> None:
        """The no-fd kick: look at the ring now and every POLL_INTERVAL_S while polling."""
        ring.poll_timer = None
        if not ring.polling:
            return
        self._kick(ring)
        ring.poll_timer = self.loop.call_later(POLL_INTERVAL_S, lambda: self._poll(ring))

    def _unwatch(self, ring: VringFiles) -> None:
        if ring.watching:
            self.loop.remove_reader(ring.kick)
            ring.watching = False
        if ring.poll_timer is not None:
            self.loop.cancel(ring.poll_timer)
            ring.poll_timer = None

    # -- call / err ---------------------------------------------------------------------------
    def set_call(self, index: int, fd: int | None) -> None:
        ring = self.rings[index]
        old = ring.call
        ring.call = -1 if fd is None else fd
        if fd is None:
            self.device.set_vq_cb(index, None)
        else:
            self.device.set_vq_cb(index, functools.partial(self._signal_vq, ring, fd))
        _close(old)

    def _signal_vq(self, ring: VringFiles, fd: int, _index: int) -> None:
        self._signal(ring, fd)

    def _signal(self, ring: VringFiles, fd: int) -> None:
        """Interrupt the driver. Never blocks: a counter with no room (or a broken fd) makes
        the interrupt pending, reported once, and retried with the next one."""
        ring.calls_pending += 1
        try:
            ok = eventfd.signal(fd)
        except OSError as e:
            ok = False
            why = str(e)
        else:
            why = "counter full (the front-end does not drain it)"
        if ok:
            ring.calls += ring.calls_pending
            ring.calls_pending = 0
            return
        ring.calls_lost += 1
        if ring.calls_lost & (ring.calls_lost - 1) == 0:  # 1st, 2nd, 4th, ...: no flood
            self.device.journal.record(
                "error.call",
                vq=ring.index,
                detail=f"call eventfd not written: {why}",
                pending=ring.calls_pending,
                lost=ring.calls_lost,
            )
            log.warning(
                "vring %d: call eventfd not written (%s); %d interrupt(s) pending",
                ring.index,
                why,
                ring.calls_pending,
            )

    def set_err(self, index: int, fd: int | None) -> None:
        ring = self.rings[index]
        _close(ring.err)
        ring.err = -1 if fd is None else fd

    def signal_err(self, index: int) -> None:
        ring = self.rings[index]
        if ring.err >= 0:
            try:
                ok = eventfd.signal(ring.err)
            except OSError:
                ok = False
            if not ok:
                log.warning("vring %d: err eventfd not written (counter full or broken)", index)

    # -- stop / teardown ----------------------------------------------------------------------
    def stop(self, index: int) -> VqState:
        """GET_VRING_BASE: stop the ring (drained or rewound), stop watching its kick."""
        ring = self.rings[index]
        self._unwatch(ring)
        _close(ring.kick)
        ring.kick = -1
        ring.polling = False
        return self.device.stop_vq(index)

    def stop_kicks(self) -> None:
        """Device reset: every ring is stopped until a new kick fd comes; call and err
        eventfds stay (QEMU sends them at init, not on every start)."""
        for ring in self.rings:
            self._unwatch(ring)
            _close(ring.kick)
            ring.kick = -1
            ring.polling = False

    def close(self) -> None:
        """Drop every descriptor (disconnect)."""
        for ring in self.rings:
            self._unwatch(ring)
            for fd in (ring.kick, ring.call, ring.err):
                _close(fd)
            ring.kick = ring.call = ring.err = -1
            ring.polling = False
            try:
                self.device.set_vq_cb(ring.index, None)
            except ValueError:
                pass

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.rings]
