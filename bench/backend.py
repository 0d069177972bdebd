"""``python -m bench.backend``: our backend as a benchmark process.

The same wiring as :class:`backends.process.Backend` (event loop, journal, faults, virtio-net,
vDPA device, vhost-user server, monitor) with one difference: the wire may be a
:class:`~bench.genwire.GeneratorWire` (``--wire gen:SIZE``) so the RX path can be driven
without a peer. ``--cpu N`` pins the process. Prints ``READY`` once listening; exits 0 on
SIGTERM/SIGINT (delivered to the loop through a wakeup pipe).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from backends.loop import EventLoop
from backends.monitor import Monitor
from backends.net.datapath import NetDevice
from backends.net.wire import make_wire
from backends.vdpa.device import VdpaDevice
from backends.vdpa.faults import Faults
from backends.vdpa.journal import Journal
from backends.vhost_user.server import VhostUserServer
from bench.genwire import GeneratorWire


def build_wire(spec: str) -> object:
    if spec.startswith("gen:"):
        return GeneratorWire(int(spec[4:]))
    return make_wire(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    p.add_argument("--socket", required=True)
    p.add_argument("--monitor")
    p.add_argument("--wire", default="null", help="null | loopback | gen:SIZE | any wire spec")
    p.add_argument("--cpu", type=int, help="pin to this CPU")
    p.add_argument("--no-iommu", action="store_true")
    p.add_argument("--queues", type=int, default=1, help="queue pairs")
    args = p.parse_args(argv)
    if args.cpu is not None and args.cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {args.cpu})

    loop = EventLoop()
    journal = Journal()
    faults = Faults((), journal=journal)
    wire = build_wire(args.wire)
    net = NetDevice(wire, queue_pairs=args.queues, faults=faults, loop=loop)  # type: ignore[arg-type]
    if isinstance(wire, GeneratorWire):
        wire.room = lambda: net.backlog_limit - net.backlog(0)
    device = VdpaDevice(net, journal, faults)
    server = VhostUserServer(args.socket, device, loop, offer_iommu=not args.no_iommu)
    monitor = Monitor(args.monitor, loop, device, net, server) if args.monitor else None

    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal() -> None:
        try:
            os.read(r, 512)
        except BlockingIOError:
            return
        loop.stop()

    loop.add_reader(r, on_signal)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.start()
        if monitor is not None:
            monitor.start()
        print(f"READY socket={args.socket}", flush=True)
        loop.run_forever()
        return 0
    finally:
        signal.set_wakeup_fd(-1)
        if monitor is not None:
            monitor.close()
        server.close()
        wire.close()  # type: ignore[attr-defined]
        loop.close()
        os.close(r)
        os.close(w)


if __name__ == "__main__":
    sys.exit(main())
