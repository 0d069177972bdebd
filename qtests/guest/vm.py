"""A QEMU process running the test guest: command line, QMP, serial console, shutdown.

The test listens on the console and QMP sockets and QEMU connects to them (client chardevs),
so no console output is lost and nothing polls for sockets to appear. Guest RAM is always a
shared memfd backend: vhost-user sees no memory at all otherwise (and QEMU says nothing).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest_images import GuestImage
from qtests.guest.console import BootInfo, GuestConsole
from qtests.qos.machine import QemuError, find_qemu, require_qemu
from qtests.qos.processes import die_with_parent, stop_process
from qtests.qos.qmp import QmpClient, QmpError

_log = logging.getLogger(__name__)
DEFAULT_MAC = "52:54:00:12:34:56"


@dataclass(frozen=True)
class VhostUserNic:
    """virtio-net-pci backed by ``-netdev vhost-user`` (our backend is the socket server)."""

    socket: str | Path
    queues: int = 1
    mac: str = DEFAULT_MAC
    reconnect_ms: int | None = None
    #: more virtio-net-pci properties, e.g. "bus=rp0,iommu_platform=on,ats=on" (vIOMMU)
    device_props: str = ""


@dataclass(frozen=True)
class DgramNic:
    """virtio-net-pci backed by QEMU's built-in ``-netdev dgram`` (frames as UDP payloads)."""

    local_port: int
    remote_port: int
    host: str = "127.0.0.1"
    mac: str = DEFAULT_MAC


@dataclass(frozen=True)
class VhostVdpaNic:
    """virtio-net-pci backed by ``-netdev vhost-vdpa`` on ``/dev/vhost-vdpa-N`` (e.g. our VDUSE
    device; guest RAM is the shared memfd the device maps). The guest reads the MAC from the
    device's config space: ``mac`` should equal the backend's."""

    vhostdev: str
    mac: str = DEFAULT_MAC


Nic = VhostUserNic | DgramNic | VhostVdpaNic


@dataclass
class VmConfig:
    nics: list[Nic] = field(default_factory=list)
    smp: int = 1
    mem_mb: int = 512
    slots: int = 0  # memory hotplug slots (pc-dimm); needs maxmem_mb
    maxmem_mb: int | None = None
    accel: str = "tcg"  # "kvm" only when asked for and usable
    kernel_args: list[str] = field(default_factory=list)  # e.g. vdpa.ip=10.0.0.2/24
    #: more -machine properties, e.g. "kernel-irqchip=split" (intel-iommu with intremap)
    machine_opts: list[str] = field(default_factory=list)
    #: arguments placed before the NICs: devices they depend on (intel-iommu, root ports)
    pre_nic_args: list[str] = field(default_factory=list)
    #: the QEMU binary; None: `find_qemu` ($QTEST_QEMU_BINARY, else qemu-system-x86_64)
    qemu: str | None = None
    extra_args: list[str] = field(default_factory=list)


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def memory_option(cfg: VmConfig) -> str:
    """``-m`` value: the boot RAM, plus hotplug slots and the maximum when asked for."""
    if cfg.slots and cfg.maxmem_mb:
        return f"{cfg.mem_mb}M,slots={cfg.slots},maxmem={cfg.maxmem_mb}M"
    return str(cfg.mem_mb)


def qemu_command(image: GuestImage, cfg: VmConfig, console: Path, qmp: Path) -> list[str]:
    append = ["console=ttyS0", "panic=-1", f"vdpa.nics={len(cfg.nics)}", *cfg.kernel_args]
    args = [
        find_qemu(cfg.qemu),
        "-name", "vdpa-guest",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", ",".join(["q35,memory-backend=mem", *cfg.machine_opts]),
        "-accel", cfg.accel,
        "-m", memory_option(cfg),
        "-smp", str(cfg.smp),
        "-object", f"memory-backend-memfd,id=mem,size={cfg.mem_mb}M,share=on",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(append),
        "-chardev", f"socket,id=console,path={console}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={qmp}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    args += cfg.pre_nic_args
    for i, nic in enumerate(cfg.nics):
        device = f"virtio-net-pci,id=nic{i},netdev=net{i},mac={nic.mac}"
        if isinstance(nic, VhostUserNic) and nic.device_props:
            device += f",{nic.device_props}"
        if isinstance(nic, VhostUserNic):
            chardev = f"socket,id=vu{i},path={nic.socket}"
            if nic.reconnect_ms is not None:
                chardev += f",reconnect-ms={nic.reconnect_ms}"
            args += ["-chardev", chardev,
                     "-netdev", f"vhost-user,id=net{i},chardev=vu{i},queues={nic.queues}"]  # fmt: skip
            if nic.queues > 1:
                device += f",mq=on,vectors={2 * nic.queues + 2}"
        elif isinstance(nic, VhostVdpaNic):
            args += ["-netdev", f"vhost-vdpa,id=net{i},vhostdev={nic.vhostdev}"]
        else:
            args += ["-netdev", f"dgram,id=net{i},local.type=inet,local.host={nic.host},"
                     f"local.port={nic.local_port},remote.type=inet,remote.host={nic.host},"
                     f"remote.port={nic.remote_port}"]  # fmt: skip
        args += ["-device", device]
    return [*args, *cfg.extra_args]


class GuestVM:
    #: Start QEMU in its own session, so a terminal's Ctrl-C meant for an interactive parent
    #: (qtests.shell) does not reach it. Off for tests: a killed test's group takes QEMU along.
    own_session = False

    def __init__(
        self,
        image: GuestImage,
        config: VmConfig,
        rundir: Path,
        logdir: Path,
        log: logging.Logger | None = None,
    ) -> None:
        self.image = image
        self.config = config
        self.log = log or _log
        self.console_path = rundir / "console.sock"
        self.qmp_path = rundir / "qmp.sock"
        self.qemu_log_path = logdir / "qemu.log"
        self.console_log_path = logdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.console: GuestConsole | None = None
        self.boot: BootInfo | None = None
        self.started_at = 0.0
        self._listener: socket.socket | None = None

    def qemu_tail(self, chars: int = 3000) -> str:
        try:
            return self.qemu_log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _died(self, what: str) -> AssertionError:
        assert self.proc is not None
        return AssertionError(
            f"QEMU exited with {self.proc.returncode} while {what}; "
            f"{self.qemu_log_path}:\n{self.qemu_tail()}"
        )

    def launch(self, timeout: float = 30.0) -> None:
        """Start QEMU and take its console and QMP connections (not yet the guest boot)."""
        try:
            require_qemu(binary=self.config.qemu)
        except QemuError as exc:
            raise AssertionError(str(exc)) from exc
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.console_path))
        self._listener.listen(1)
        self.qmp = QmpClient("qemu-qmp")
        self.qmp.listen(str(self.qmp_path))
        cmd = qemu_command(self.image, self.config, self.console_path, self.qmp_path)
        self.log.info("QEMU: %s", " ".join(cmd))
        with self.qemu_log_path.open("wb") as qlog:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
                preexec_fn=die_with_parent,  # only calls prctl()
            )
        self.started_at = time.monotonic()
        self.console = self._open_console(self._accept_console(timeout))
        try:
            self.qmp.accept(timeout)
        except QmpError as exc:
            if self.proc.poll() is not None:
                raise self._died("connecting QMP") from exc
            raise

    def _open_console(self, sock: socket.socket) -> GuestConsole | None:
        """What drives the accepted console connection (a subclass may relay it instead)."""
        return GuestConsole(sock, self.console_log_path)

    def _accept_console(self, timeout: float) -> socket.socket:
        assert self._listener is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while True:
                if sel.select(timeout=0.2):
                    conn, _ = self._listener.accept()
                    self._listener.close()
                    self._listener = None
                    return conn
                if self.proc.poll() is not None:
                    raise self._died("waiting for its console connection")
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"QEMU did not connect its console within {timeout:g}s: {self.qemu_tail()}"
                    )

    def wait_ready(self, timeout: float = 90.0) -> BootInfo:
        assert self.console is not None and self.proc is not None
        try:
            self.boot = self.console.wait_ready(timeout, self.started_at)
        except AssertionError as exc:
            if self.proc.poll() is not None:
                raise self._died(f"booting ({exc})") from exc
            raise
        self.log.info(
            "guest ready after %.2f s (guest uptime %s s): %s",
            self.boot.seconds,
            self.boot.guest_uptime,
            self.boot.interfaces,
        )
        return self.boot

    def run(self, command: str, timeout: float = 30.0) -> str:
        """Run a guest shell command that must succeed; its output."""
        assert self.console is not None
        return self.console.run(command, timeout).check()

    def shutdown(self, timeout: float = 15.0) -> int | None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and close everything; exit code."""
        rc = None
        asked = False
        if self.proc is not None and self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.command("quit", timeout=5)
                asked = True
            except QmpError as exc:
                self.log.info("QMP quit failed (%s): SIGTERM", exc)
        if self.proc is not None:
            rc = stop_process(self.proc, "QEMU", timeout, asked=asked, log=self.log)
        for closer in (self.qmp, self.console, self._listener):
            if closer is not None:
                try:
                    closer.close()
                except OSError as exc:
                    self.log.debug("close: %r", exc)
        self.qmp = self.console = self._listener = None
        return rc
