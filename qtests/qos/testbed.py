"""One backend process + one QEMU + the qtest virtio-net driver + the wire peer, wired up.

This is the unit every qtest suite builds on::

    with Testbed(log_dir, queues=2) as tb:
        tb.start()                       # backend, QEMU, driver at DRIVER_OK
        tb.net.send(frame)               # guest TX ...
        assert tb.peer.recv() == frame   # ... arrives on the wire byte-exact

Everything it starts it stops in :meth:`close`, also after a failure.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtests.qos.alloc import GuestAllocator
from qtests.qos.backend_process import BackendProcess
from qtests.qos.machine import QemuMachine
from qtests.qos.pci import PciBus
from qtests.qos.virtio_net import VirtioNetDriver
from qtests.qos.wire_peer import WirePeer

GUEST_MAC = "52:54:00:12:34:56"
#: How QEMU reaches the backend: a vhost-user socket, or ``-netdev vhost-vdpa`` on the
#: /dev/vhost-vdpa-N of the backend's VDUSE device (needs vduse + vhost_vdpa: the lane).
TRANSPORTS = ("vhost-user", "vhost-vdpa")
#: Exit statuses that mean a process crashed rather than stopped.
CRASH_STATUSES = {-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, -signal.SIGFPE}


class Testbed:
    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        log_dir: Path,
        *,
        name: str = "",
        queues: int = 1,
        faults: Iterable[str] = (),
        backend_args: Iterable[str] = (),
        memory: str = "512M",
        maxmem: str = "2G",
        slots: int = 4,
        reconnect_ms: int | None = None,
        net_props: dict[str, Any] | None = None,
        netdev_props: dict[str, Any] | None = None,
        transport: str = "vhost-user",
        backend_mac: str = GUEST_MAC,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        #: the MAC the backend's config space carries (vhost-vdpa: what the guest reads)
        self.backend_mac = backend_mac
        self.log_dir = Path(log_dir)
        self.name = name
        self.queues = queues
        self.faults = list(faults)
        self.backend_args = list(backend_args)
        self.memory = memory
        self.maxmem = maxmem
        self.slots = slots
        self.reconnect_ms = reconnect_ms
        self.net_props = dict(net_props or {})
        #: extra ``-netdev vhost-vdpa`` properties (``{"x-svq": True}``)
        self.netdev_props = dict(netdev_props or {})
        self.peer = WirePeer()
        self.backend: BackendProcess | None = None
        #: Short private directory for the backend's unix sockets (a test's log dir can be too
        #: long for a 108-byte socket path); created by start_backend, removed by close.
        self.run_dir: Path | None = None
        self.machine: QemuMachine | None = None
        self.alloc: GuestAllocator | None = None
        self.bus: PciBus | None = None
        self._net: VirtioNetDriver | None = None

    # -- parts -----------------------------------------------------------------------------
    def start_backend(self) -> BackendProcess:
        prefix = f"{self.name}-" if self.name else ""
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="qos-tb-"))
        self.backend = BackendProcess(
            self.log_dir,
            name=f"{prefix}backend",
            run_dir=self.run_dir,
            queues=self.queues,
            wire=self.peer.backend_wire_spec(),
            faults=self.faults,
            mac=self.backend_mac,
            extra_args=self.backend_args,
            transport="vduse" if self.transport == "vhost-vdpa" else "vhost-user",
        ).start()
        self.peer.connect(self.backend.wire_spec())
        return self.backend

    def build_machine(self) -> QemuMachine:
        assert self.backend is not None, "start_backend() first"
        prefix = f"{self.name}-" if self.name else ""
        m = QemuMachine(
            self.log_dir,
            name=f"{prefix}qemu",
            memory=self.memory,
            maxmem=self.maxmem,
            slots=self.slots,
        )
        self.add_platform(m)
        if self.transport == "vhost-vdpa":
            assert self.backend.vhost_vdpa is not None
            m.add_vhost_vdpa_netdev(
                self.backend.vhost_vdpa, queues=self.queues, **self.netdev_props
            )
        else:
            m.add_vhost_user_netdev(
                self.backend.socket, queues=self.queues, reconnect_ms=self.reconnect_ms
            )
        m.add_virtio_net(**{**self.nic_props(), **self.net_props})
        return m

    def add_platform(self, m: QemuMachine) -> None:
        """Devices that must be created before the NIC (a vIOMMU, root ports): none here."""

    def nic_props(self) -> dict[str, Any]:
        """virtio-net-pci properties (``net_props`` given to the constructor override them)."""
        props: dict[str, Any] = {"mac": GUEST_MAC}
        if self.queues > 1:
            props.update(mq=True, vectors=2 * self.queues + 2)
        return props

    def start_qemu(self, machine: QemuMachine | None = None) -> QemuMachine:
        self.machine = (machine or self.build_machine()).launch()
        self.alloc = self.machine.make_allocator()
        self.bus = PciBus.for_machine(self.machine)
        self.bus.enumerate()
        return self.machine

    def init_net(self, **init_kw: Any) -> VirtioNetDriver:
        assert self.machine is not None and self.bus is not None and self.alloc is not None
        net = VirtioNetDriver.find(self.bus, self.alloc)
        if self.queues > 1:
            init_kw.setdefault("mq", True)
            init_kw.setdefault("queue_pairs", self.queues)
        net.init(**init_kw)
        self._net = net
        return net

    def start(self, **init_kw: Any) -> Testbed:
        """Backend, QEMU and a driver at DRIVER_OK with RX buffers posted."""
        self.start_backend()
        self.start_qemu()
        self.init_net(**init_kw)
        return self

    @property
    def net(self) -> VirtioNetDriver:
        if self._net is None:
            raise RuntimeError("the virtio-net driver is not initialised (init_net())")
        return self._net

    @property
    def qmp(self) -> Any:
        assert self.machine is not None
        return self.machine.qmp

    @property
    def qom_path(self) -> str:
        return "/machine/peripheral/net0/virtio-backend"

    def vring_base_from_qemu(self, queue: int) -> dict[str, Any]:
        """QEMU's view of a virtqueue. Only meaningful while vhost is stopped (QMP 'stop'):
        on a running vhost device this QMP command itself sends GET_VRING_BASE, which stops
        the backend's ring."""
        return dict(
            self.qmp.command("x-query-virtio-queue-status", path=self.qom_path, queue=queue)
        )

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        errors: list[BaseException] = []
        if self.machine is not None:
            try:
                rc = self.machine.shutdown()
            except BaseException as e:  # keep stopping the rest
                errors.append(e)
            else:
                if rc in CRASH_STATUSES:  # QEMU aborted or faulted: never a pass
                    errors.append(
                        AssertionError(
                            f"QEMU {self.machine.name} crashed (status {rc}):\n"
                            f"{self.machine.stderr_tail()}"
                        )
                    )
        if self.backend is not None:
            backend = self.backend
            rc = backend.stop()
            if rc not in (0, None) and not backend.killed:
                # a backend that crashed after the test's last check must not pass silently
                errors.append(
                    AssertionError(
                        f"{backend.name} exited with status {rc} (0 expected after SIGTERM)\n"
                        f"{backend.tails()}"
                    )
                )
        self.peer.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
