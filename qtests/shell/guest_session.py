"""A session with a real Linux guest (the default): the avocado suite's guest VM plumbing.

guest eth0 (10.0.0.2) -- virtio-net-pci -- vhost-user -- backend --UDP-- `UdpPeer` (10.0.0.1,
answers ARP and ping). The guest image comes from `guest_images` (cached); QEMU is started by
`qtests.guest.vm.GuestVM`, with hotplug slots, a second QMP monitor for the user, and
its serial console handed to a `ConsoleRelay` (a socket users can attach to). The guest kernel
is its own ACPI OSPM: it onlines a plugged DIMM (``memhp_default_state=online_movable``) and
offlines + ejects one on ``device_del``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
from pathlib import Path
from typing import Any

import guest_images
from qtests.guest.console import ConsoleError, GuestConsole
from qtests.guest.peer import UdpPeer
from qtests.guest.ports import free_udp_port
from qtests.guest.vm import GuestVM, VhostUserNic, VmConfig, kvm_usable
from qtests.qos.acpi_memhp import STATUS_ENABLED, MemSlot
from qtests.qos.backend_process import BackendProcess
from qtests.qos.memory_devices import DimmHotplug, MemoryDevice, query_memory_devices
from qtests.qos.qmp import QmpClient
from qtests.shell.console_relay import ConsoleRelay
from qtests.shell.session import (
    GUEST_MAC,
    Endpoint,
    Session,
    SessionError,
    dimm_args,
    qmp_endpoint,
    stopped_line,
    try_quietly,
    user_monitor_args,
    wait_migration,
)

GUEST_IP = "10.0.0.2"
PEER_IP = "10.0.0.1"
PEER_MAC = "52:54:00:00:00:01"
USER_QMP = "qmp-user.sock"
HOTPLUG_SLOTS = 4
MAXMEM_MB = 2048


class GuestKernelOspm:
    """The guest kernel answers ACPI memory hotplug itself; this only reports what QEMU says.

    Stands in for `AcpiMemoryHotplug` in `DimmHotplug`: nothing to accept on insert, nothing
    to eject on unplug (DEVICE_DELETED comes once the guest has offlined the memory)."""

    def __init__(self, qmp: QmpClient) -> None:
        self.qmp = qmp

    def accept_insert(self, slot: int) -> MemSlot:
        for dev in query_memory_devices(self.qmp):
            if dev.slot == slot:
                return MemSlot(slot, dev.addr, dev.size, 0, STATUS_ENABLED)
        raise SessionError(f"QEMU reports no DIMM in slot {slot}")

    def eject(self, slot: int, timeout: float = 5.0) -> None:
        return None


class RelayedGuestVM(GuestVM):
    """A GuestVM whose console connection goes to the session's relay, not to pexpect.

    ``adopt_console=False`` (a migration destination): keep the connection in
    ``console_socket`` until the session switches over to this VM."""

    own_session = True  # Ctrl-C at the prompt is the shell's, not QEMU's

    def __init__(self, relay: ConsoleRelay, *args: Any, adopt_console: bool = True) -> None:
        super().__init__(*args)
        self.relay = relay
        self.adopt_console = adopt_console
        self.console_socket: socket.socket | None = None

    def _open_console(self, sock: socket.socket) -> GuestConsole | None:
        if self.adopt_console:
            self.relay.replace_guest(sock)
        else:
            self.console_socket = sock
        return None

    def switch_console(self) -> None:
        if self.console_socket is not None:
            self.relay.replace_guest(self.console_socket)
            self.console_socket = None


class GuestSession(Session):
    mode = "guest"

    def __init__(
        self,
        *args: Any,
        accel: str = "tcg",
        boot_timeout: float = 120.0,
        guest_cache: Path | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.accel = "kvm" if accel == "kvm" and kvm_usable() else "tcg"
        self.boot_timeout = boot_timeout
        self.guest_cache = guest_cache
        self.peer: UdpPeer | None = None
        self.relay: ConsoleRelay | None = None
        self.console: GuestConsole | None = None
        self._backend: BackendProcess | None = None
        self.vm: RelayedGuestVM | None = None
        self.config: VmConfig | None = None
        self.image: guest_images.GuestImage | None = None
        self._pending: list[Any] = []  # a destination being brought up (closed on failure)

    @property
    def qmp(self) -> QmpClient:
        assert self.vm is not None and self.vm.qmp is not None, "start() first"
        return self.vm.qmp

    @property
    def backend(self) -> BackendProcess:
        assert self._backend is not None, "start() first"
        return self._backend

    # -- start -----------------------------------------------------------------------------
    def _start_backend(self, name: str) -> BackendProcess:
        assert self.peer is not None
        port = free_udp_port()  # the backend's end of the wire
        backend = BackendProcess(self.log_dir, name=name, run_dir=self.run_dir,
                                 queues=self.queues, wire=f"udp:127.0.0.1:{port}:{self.peer.port}",
                                 faults=self.faults, mac=GUEST_MAC, log=self.log)  # fmt: skip
        self._pending.append(backend)
        backend.start()
        return backend

    def _vm(self, name: str, backend: BackendProcess, extra: list[str]) -> RelayedGuestVM:
        assert self.relay is not None and self.image is not None and self.config is not None
        run_dir, log_dir = self.run_dir / name, self.log_dir / name
        run_dir.mkdir()
        log_dir.mkdir(exist_ok=True)
        nic = VhostUserNic(backend.socket, self.queues, mac=GUEST_MAC)
        user_qmp = str(run_dir / USER_QMP)
        cfg = dataclasses.replace(self.config, nics=[nic],
                                  extra_args=[*user_monitor_args(user_qmp), *extra])  # fmt: skip
        first = self.vm is None
        vm = RelayedGuestVM(self.relay, self.image, cfg, run_dir, log_dir, self.log,
                            adopt_console=first)  # fmt: skip
        self._pending.append(vm)
        vm.launch()
        return vm

    def start(self) -> None:
        self.image = guest_images.build(self.guest_cache, log=self.log.info)
        self.peer = UdpPeer(PEER_IP, PEER_MAC, pcap=self.log_dir / "peer.pcap", log=self.log)
        self.peer.start()
        self._backend = self._start_backend("backend")
        self.peer.remote = ("127.0.0.1", self._wire_port(self._backend))
        self.relay = ConsoleRelay(self.run_dir / "guest-console.sock", self.log_dir / "console.log")
        self.console = GuestConsole(self.relay.command_end, self.log_dir / "console-commands.log")
        args = [
            f"vdpa.ip={GUEST_IP}/24",
            f"vdpa.peer={PEER_IP}",
            "memhp_default_state=online_movable",
        ]
        self.config = VmConfig(accel=self.accel, kernel_args=args, slots=HOTPLUG_SLOTS,
                               maxmem_mb=MAXMEM_MB)  # fmt: skip
        with self.relay.feeding():
            self.vm = self._vm("vm", self._backend, [])
            try:
                boot = self.console.wait_ready(self.boot_timeout, self.vm.started_at)
            except ConsoleError as exc:
                raise SessionError(f"the guest did not boot: {exc}\n{self.vm.qemu_tail()}") from exc
        self._pending.clear()
        if boot.errors:
            raise SessionError(f"the guest's init reported errors: {boot.errors}")
        self.boot_seconds = boot.seconds
        self.hotplug = DimmHotplug(self.qmp, GuestKernelOspm(self.qmp))  # type: ignore[arg-type]

    @staticmethod
    def _wire_port(backend: BackendProcess) -> int:
        return int(backend.wire.split(":")[2])

    # -- what the shell shows / does -------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        assert self.vm is not None and self.relay is not None
        qmp = str(self.vm.console_path.parent / USER_QMP)
        con = str(self.relay.user_path)
        return [
            qmp_endpoint("QEMU QMP", qmp),
            *self.common_endpoints(),
            Endpoint("guest console", con, f"socat -,raw,echo=0,escape=0x1d UNIX-CONNECT:{con}"),
        ]

    def processes(self) -> dict[str, int | None]:
        assert self.vm is not None and self.vm.proc is not None
        return {"QEMU": self.vm.proc.pid, "backend": self.backend.pid}

    def console_socket(self) -> socket.socket:
        assert self.relay is not None
        return self.relay.connect_local()

    def console_history(self) -> bytes:
        return self.relay.history() if self.relay is not None else b""

    def guest_run(self, command: str, timeout: float) -> tuple[int, str]:
        assert self.relay is not None and self.console is not None
        with self.relay.feeding():
            pending = self.console.start(command)
            try:
                result = self.console.finish(pending, timeout)
            except BaseException:  # timeout or Ctrl-C: stop it, so the console stays usable
                self.console.interrupt()  # the guest shell drops the line, prints a prompt
                with contextlib.suppress(Exception):
                    prompt = re.escape(guest_images.PROMPT)
                    self.console.expect([prompt], 5.0, "the guest prompt after Ctrl-C")
                self.console.pending = None
                raise
        return result.rc, result.output

    def dimm_del(self, ident: str, timeout: float = 30.0) -> MemoryDevice:
        try:
            return super().dimm_del(ident, timeout)
        except TimeoutError as exc:
            raise SessionError(
                f"{exc}: the guest did not release {ident} (device_del is pending; the guest "
                f"must offline its memory blocks: 'guest dmesg | tail' shows why not)"
            ) from exc

    # -- migration -------------------------------------------------------------------------
    def _migrate(self, tag: str) -> dict[str, Any]:
        assert self.vm is not None and self.peer is not None
        plugged = dict(self.hotplug.plugged) if self.hotplug else {}
        try:
            backend = self._start_backend(f"{tag}-backend")
            vm = self._vm(tag, backend, [*dimm_args(plugged), "-incoming", "defer"])
            uri = f"unix:{self.run_dir / tag / 'migration.sock'}"
            assert vm.qmp is not None
            vm.qmp.command("migrate-incoming", uri=uri)
            self.qmp.command("migrate", uri=uri)
            info = wait_migration(self.qmp)
        except BaseException:
            self._close_pending()
            raise
        self._pending.clear()
        old_vm, old_backend = self.vm, self._backend
        self.vm, self._backend = vm, backend
        vm.switch_console()
        self.peer.remote = ("127.0.0.1", self._wire_port(backend))
        self.hotplug = DimmHotplug(self.qmp, GuestKernelOspm(self.qmp))  # type: ignore[arg-type]
        self.hotplug.plugged.update(plugged)
        try_quietly("source QEMU", old_vm.shutdown, self.log)
        if old_backend is not None:
            try_quietly("source backend", old_backend.stop, self.log)
        return info

    def _close_pending(self) -> None:
        for part in reversed(self._pending):
            if isinstance(part, GuestVM):
                try_quietly("QEMU", part.shutdown, self.log)
                if isinstance(part, RelayedGuestVM) and part.console_socket is not None:
                    part.console_socket.close()
            else:
                try_quietly(part.name, part.stop, self.log)
        self._pending.clear()

    def _stop_all(self) -> list[str]:
        lines = []
        self._close_pending()
        if self.vm is not None:
            pid = self.vm.proc.pid if self.vm.proc is not None else None
            lines.append(stopped_line("QEMU", pid, try_quietly("QEMU", self.vm.shutdown, self.log)))
        if self._backend is not None:
            rc = try_quietly("backend", self._backend.stop, self.log)
            lines.append(stopped_line("backend", self._backend.pid, rc))
        for part in (self.relay, self.peer):
            if part is not None:
                try_quietly(type(part).__name__, part.close, self.log)
        return lines
