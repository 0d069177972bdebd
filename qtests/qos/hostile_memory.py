"""A front-end that shrinks unsealable guest memory after handing it over (issue #12).

:func:`shrink_then_poll` drives a real backend process over vhost-user: one 1 MiB memfd made
*without* ``MFD_ALLOW_SEALING`` (the backend cannot seal it, as QEMU's ``memory-backend-file``),
a TX ring inside it, the memfd truncated to 0 bytes, then a polling kick (no fd) so the backend
touches the ring. It waits for the backend's ``error.mem`` ``region-shrunk`` entry, checks the
device reports NEEDS_RESET, the process lives and a fresh connection is served, and returns the
entry. :func:`assert_found_before_access` is the scenario's stricter half: the shrink must have
been seen by the pre-callback size check, not caught as a SIGBUS during a ring access (the
last line of defence, which the ``skip-shrink-guard`` fault leaves alone on duty).
"""

from __future__ import annotations

import os
from typing import Any

from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend, VhostUserRing
from qtests.qos.waiting import poll_until

VERSION_1 = 1 << 32
NEEDS_RESET = 0x40
TX = 1


def shrink_then_poll(bp: BackendProcess, timeout: float = 15.0) -> dict[str, Any]:
    """Run the scenario; returns the backend's ``error.mem`` journal entry."""
    mem = SharedGuestMemory(1 << 20)
    ring = VhostUserRing(mem, TX, 16)
    fe = Frontend(bp.socket, timeout=timeout)
    try:
        fe.set_owner()
        fe.set_features(VERSION_1)
        fe.set_mem_table(mem)
        fe.set_vring_num(TX, ring.num)
        fe.set_vring_addr(ring.vring_addr())
        fe.get_features()  # a round trip: the table is mapped
        os.ftruncate(mem.slots[0].fd, 0)
        fe.set_vring_kick(TX, None)  # polling: the backend reads the ring from now on
        errors = poll_until(
            lambda: bp.journal(["error.mem"]), timeout, "an error.mem entry for the shrunk region"
        )
        entry: dict[str, Any] = errors[0]
        assert entry["error"] == "region-shrunk", entry
        assert "gpa=0x0" in entry["detail"], entry
        assert bp.running, f"backend died: {bp.tails()}"
        assert bp.cmd("query-mem-table")["regions"] == [], "the shrunk region is still mapped"
        assert fe.get_status() & NEEDS_RESET, "the device does not report NEEDS_RESET"
        assert fe.get_features() & VERSION_1  # the same connection still answers
    finally:
        fe.close()
        ring.close()
        mem.close()
    with Frontend(bp.socket, timeout=timeout) as fresh:  # and a new one is served
        assert fresh.get_features() & VERSION_1, "a fresh connection is not served"
    assert bp.running, f"backend died: {bp.tails()}"
    return entry


def assert_found_before_access(entry: dict[str, Any]) -> None:
    """The shrunk region was dropped before any callback touched it."""
    assert "found before the callback" in entry["detail"], (
        f"the ring access faulted on the shrunk region instead: {entry['detail']}"
    )
