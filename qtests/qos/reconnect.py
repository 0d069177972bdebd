"""Backend restarts under a running guest: take the backend down, start a replacement on the
same socket, wait until QEMU reconnected (``-chardev socket,reconnect-ms=N``).

What QEMU 10 guarantees for the rings (hw/virtio/vhost.c ``vhost_virtqueue_stop``): when the
backend is gone, GET_VRING_BASE fails and QEMU "syncs internal last avail idx to the device
used idx" (``virtio_queue_restore_last_avail_idx``: last_avail_idx = the used idx in guest
memory); on reconnect vhost starts again with SET_VRING_BASE = that index. So:

* a chain the dead backend completed (its used entry published) is never offered again;
* a chain it had popped but not completed is offered again to the replacement (popped chains
  are not state QEMU can see): a TX frame the dead backend had already put on the wire but
  not completed would go out twice (at-least-once); one it only held goes out once;
* RX frames the dead backend had in its backlog, or had written without publishing the used
  entry, are lost; their buffers are offered again;
* every chain made available after the reconnect is handled exactly once.
`qtests.qos.inflight_reconnect` tests exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backend_process import BackendProcess
from .testbed import Testbed
from .waiting import poll_until

RX_Q, TX_Q = 0, 1


def take_backend_down(tb: Testbed, *, crash: bool) -> BackendProcess:
    """SIGKILL (crash) or SIGTERM the backend; wait until the guest sees the link go down."""
    old = tb.backend
    assert old is not None
    cfg_irq = tb.net.dev.config_interrupt
    cfg_irq.clear()
    if crash:
        old.kill()
    else:
        assert old.stop() == 0, f"{old.name} did not exit cleanly on SIGTERM"
        disconnects = [e for e in old.read_journal_file() if e["kind"] == "vhost.disconnect"]
        assert disconnects and disconnects[-1]["reason"] == "backend shutting down"
    poll_until(lambda: not tb.net.config().link_up, 10, "the guest to see LINK_UP cleared")
    poll_until(cfg_irq.fired, 5, "the config interrupt for the link change")
    return old


def start_replacement(tb: Testbed, old: BackendProcess, faults: Sequence[str]) -> BackendProcess:
    """A new backend process in place of ``old`` (which is gone), talking to the same wire
    peer: over vhost-user on the old one's socket path (QEMU reconnects to it); over VDUSE
    re-attached (``--vduse-reattach``) to the old one's device, which QEMU's vhost-vdpa fd
    kept open (qtests/qos/vdpa_reattach.py)."""
    n = 2
    while (tb.log_dir / f"backend-{n}.log").exists():
        n += 1
    if old.transport == "vduse":
        where: dict[str, Any] = {"transport": "vduse", "vduse_name": old.vduse_name}
        extra = [*tb.backend_args, "--vduse-reattach"]
    else:
        where, extra = {"socket_path": old.socket}, list(tb.backend_args)
    new = BackendProcess(
        tb.log_dir,
        name=f"backend-{n}",
        run_dir=tb.run_dir,
        queues=tb.queues,
        wire=tb.peer.backend_wire_spec(),
        faults=list(faults),
        mac=tb.backend_mac,
        extra_args=extra,
        **where,
    )
    tb.backend = new  # from now on the testbed stops this one (the old one is gone)
    new.start(timeout=60.0 if old.transport == "vduse" else 30.0)
    if old.transport == "vduse":
        assert new.vhost_vdpa == old.vhost_vdpa, (
            f"the replacement serves {new.vhost_vdpa}, QEMU holds {old.vhost_vdpa}"
        )
    spec = new.wire_spec()
    assert spec.endswith(f":{tb.peer.port}"), f"{spec}: not the same peer port"
    tb.peer.connect(spec)
    return new


def wait_device_back(tb: Testbed, backend: BackendProcess) -> dict[int, dict[str, Any]]:
    """QEMU reconnected: both rings started, DRIVER_OK, the guest's link up. Returns the
    SET_VRING_BASE (vq.set_state) entries by ring."""

    def started() -> bool:
        rings = {e["vq"] for e in backend.journal(kinds=["vq.start"])}
        return {RX_Q, TX_Q} <= rings and backend.cmd("query-status")["running"]

    poll_until(started, 15, f"QEMU to reconnect to {backend.name} and start both rings")
    st = backend.cmd("query-status")
    assert st["connection"]["connected"] and "DRIVER_OK" in st["status_names"]
    poll_until(lambda: tb.net.config().link_up, 10, "the guest to see LINK_UP again")
    return {e["vq"]: e for e in backend.journal(kinds=["vq.set_state"])}
