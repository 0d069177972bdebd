"""Wiring of one backend process: loop, journal, faults, wire, virtio-net, device, vhost-user
server and monitor. Used by ``python -m backends`` and by in-process tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.loop import EventLoop
from backends.monitor import Monitor
from backends.net.config import DEFAULT_MAC, MAX_MTU, MIN_MTU, parse_mac
from backends.net.datapath import NetDevice
from backends.net.wire import make_wire
from backends.vdpa.device import VdpaDevice
from backends.vdpa.faults import Faults
from backends.vdpa.journal import Journal
from backends.vduse.kernel import LinuxVduse, VduseKernel
from backends.vduse.transport import VduseTransport
from backends.vhost_user.rarp import rarp_frame
from backends.vhost_user.server import VhostUserServer

log = logging.getLogger(__name__)


@dataclass
class BackendOptions:
    socket: str
    monitor: str | None = None
    queues: int = 1  # queue pairs
    wire: str = "loopback"
    faults: Sequence[str] = ()
    offer_mem_slots: bool = True
    offer_iommu: bool = True
    offer_log: bool = True
    #: virtio feature bits the device does not offer (--withhold-feature)
    withhold_features: int = 0
    mac: str | None = None
    journal_file: str | None = None
    reconnect: bool = True
    #: "vhost-user" (listen on ``socket``) or "vduse" (a VDUSE device named ``name`` on the
    #: kernel's vDPA bus; QEMU uses ``-netdev vhost-vdpa``)
    transport: str = "vhost-user"
    name: str | None = None
    kernel: VduseKernel | None = None  # vduse: the kernel interface (default: the real one)
    #: vduse: take over the existing device ``name`` (a backend that died) instead of creating it
    reattach: bool = False


class Backend:
    """Everything one backend process runs. Construction validates (ValueError / OSError);
    :meth:`start` listens; :meth:`close` tears down and writes the journal file."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        if options.queues < 1:
            raise ValueError(f"--queues must be >= 1, got {options.queues}")
        mac = parse_mac(options.mac) if options.mac else DEFAULT_MAC
        self.loop = EventLoop()
        self.journal = Journal()
        self.faults = Faults(options.faults, journal=self.journal)
        self.wire = make_wire(options.wire)
        try:
            self.net = NetDevice(
                self.wire,
                queue_pairs=options.queues,
                mac=mac,
                faults=self.faults,
                loop=self.loop,
                withhold=options.withhold_features,
            )
            self.device = VdpaDevice(self.net, self.journal, self.faults)
            self.server: VhostUserServer | VduseTransport
            if options.transport == "vduse":
                if not options.name:
                    raise ValueError("the vduse transport needs a device name (--name)")
                self.server = VduseTransport(
                    self.device,
                    self.loop,
                    options.kernel if options.kernel is not None else LinuxVduse(),
                    options.name,
                    queue_pairs=options.queues,
                    reattach=options.reattach,
                )
            elif options.transport != "vhost-user":
                raise ValueError(f"unknown transport {options.transport!r}")
            else:
                self.server = VhostUserServer(
                    options.socket,
                    self.device,
                    self.loop,
                    offer_mem_slots=options.offer_mem_slots,
                    offer_iommu=options.offer_iommu,
                    offer_log=options.offer_log,
                    reconnect=options.reconnect,
                    max_queues=options.queues,
                    on_rarp=self._send_rarp,
                    on_mtu=self._set_mtu,
                )
            self.monitor: Monitor | None = None
            if options.monitor:
                self.monitor = Monitor(
                    options.monitor,
                    self.loop,
                    self.device,
                    self.net,
                    self.server,
                    on_quit=self.loop.stop,
                )
        except BaseException:
            self.wire.close()
            raise
        self._closed = False

    def start(self) -> str:
        """Start the transport; returns what the READY line names (``socket=PATH`` or
        ``vhost-vdpa=/dev/vhost-vdpa-N``)."""
        if isinstance(self.server, VduseTransport):
            ready = f"vhost-vdpa={self.server.start()}"
        else:
            self.server.start()
            ready = f"socket={self.options.socket}"
        if self.monitor is not None:
            self.monitor.start()
        return ready

    def run(self) -> None:
        self.loop.run_forever()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.monitor is not None:
            self.monitor.close()
        self.server.close()
        self.wire.close()
        if self.options.journal_file:
            self.write_journal(self.options.journal_file)
        self.loop.close()

    def write_journal(self, path: str) -> None:
        with Path(path).open("w") as f:
            for entry in self.journal.query():
                f.write(json.dumps(entry) + "\n")

    # -- transport hooks ----------------------------------------------------------------------
    def _send_rarp(self, mac: bytes) -> None:
        self.wire.send(rarp_frame(mac), 0)

    def _set_mtu(self, mtu: int) -> None:
        if MIN_MTU <= mtu <= MAX_MTU:
            self.net.config.mtu = mtu
