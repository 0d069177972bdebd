"""Launch and tear down QEMU for qtest-driven tests.

`find_qemu` is the one place that chooses the QEMU binary for the whole project:
``$QTEST_QEMU_BINARY`` (QEMU's qtest convention; ``$QEMU_TEST_QEMU_BINARY`` too), a ``--qemu``
option where a command has one, else ``qemu-system-x86_64`` on PATH; `require_qemu` checks
its version (>= 10.0).

`QemuMachine` builds the command line (q35, the qtest accelerator when the binary has one, else
TCG with a halting BIOS; shared memfd RAM, qtest and QMP sockets), launches QEMU, accepts its
qtest connection, connects QMP, and always kills it in `shutdown()`.  QEMU's stderr, the
command line and the qtest log go to a per-test log directory.

The VM is never started with ``-S``: vhost-user backends only start their rings on DRIVER_OK
while the VM runs.  Under TCG the vCPU stays halted in the BIOS (``cli; hlt``), so the driver
(qtest) owns the machine; Debian's QEMU has no qtest accelerator.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .alloc import FOUR_GIB, GuestAllocator, MiB
from .processes import die_with_parent
from .qmp import QmpClient, QmpError
from .qtest import QTest
from .waiting import poll_until

QEMU_DEFAULT_BINARY = "qemu-system-x86_64"
#: Environment variables naming the QEMU binary, first one set wins: QEMU's own qtest
#: convention, then the spelling of QEMU's functional tests.
QEMU_BINARY_ENV = ("QTEST_QEMU_BINARY", "QEMU_TEST_QEMU_BINARY")
#: Deprecated spelling, still honoured (after the two above) with a warning on stderr.
QEMU_BINARY_ENV_DEPRECATED = "QOS_QEMU_BINARY"
MIN_QEMU_VERSION = (10, 0)

HALT_BIOS_SIZE = 64 * 1024
#: Reset vector (0xFFFF0) code: cli; hlt; jmp $-3 (back to hlt).
HALT_BIOS_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])
HALT_BIOS_OFFSET = 0xFFF0


class QemuError(RuntimeError):
    """QEMU missing, too old, failed to launch, or died."""


class QemuNotFound(QemuError):
    pass


class QemuTooOld(QemuError):
    pass


class QemuLaunchError(QemuError):
    pass


# ---------------------------------------------------------------------- QEMU binary / version
def qemu_binary_setting(binary: str | None = None) -> tuple[str, str]:
    """(the QEMU binary asked for, who asked): ``binary`` (e.g. a ``--qemu`` option), else
    ``$QTEST_QEMU_BINARY``, ``$QEMU_TEST_QEMU_BINARY``, the deprecated ``$QOS_QEMU_BINARY``,
    else ``qemu-system-x86_64`` from PATH. Nothing is checked here (see `find_qemu`)."""
    if binary:
        return os.path.expanduser(binary), "the caller"
    for var in QEMU_BINARY_ENV:
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var]), f"${var}"
    if os.environ.get(QEMU_BINARY_ENV_DEPRECATED):
        _warn_deprecated_env()
        return os.path.expanduser(os.environ[QEMU_BINARY_ENV_DEPRECATED]), (
            f"${QEMU_BINARY_ENV_DEPRECATED}"
        )
    return QEMU_DEFAULT_BINARY, "PATH"


@functools.cache
def _warn_deprecated_env() -> None:
    print(
        f"warning: ${QEMU_BINARY_ENV_DEPRECATED} is deprecated: set ${QEMU_BINARY_ENV[0]}",
        file=sys.stderr,
    )


def find_qemu(binary: str | None = None) -> str:
    """The one place that chooses QEMU for every part of the project (qtests, avocado tests,
    the shell, bench, the lab): the absolute path of ``binary``, else of
    ``$QTEST_QEMU_BINARY`` (or ``$QEMU_TEST_QEMU_BINARY``; ``$QOS_QEMU_BINARY`` is a
    deprecated alias), else of ``qemu-system-x86_64`` on PATH. Raises `QemuNotFound`."""
    candidate, source = qemu_binary_setting(binary)
    path = shutil.which(candidate)
    if path is None:
        raise QemuNotFound(
            f"QEMU binary {candidate!r} (from {source}) not found or not executable: install "
            f"qemu-system-x86 >= {MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]} (Debian 12: from "
            f"bookworm-backports) or set ${QEMU_BINARY_ENV[0]} to a QEMU binary, e.g. "
            f"~/qemu/build/qemu-system-x86_64"
        )
    return os.path.abspath(path)


def qemu_accelerators(binary: str | None = None) -> frozenset[str]:
    """The accelerators ``qemu -accel help`` lists (e.g. tcg, kvm, and qtest in a QEMU built
    from source; Debian's packages have no qtest accelerator)."""
    return _qemu_accelerators(find_qemu(binary))


@functools.lru_cache(maxsize=16)
def _qemu_accelerators(path: str) -> frozenset[str]:
    try:
        out = subprocess.run(
            [path, "-accel", "help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuNotFound(f"cannot run {path} -accel help: {e}") from e
    lines = out.stdout.splitlines()
    return frozenset(w.strip() for w in lines[1:] if w.strip() and " " not in w.strip())


def qtest_accel(binary: str | None = None) -> str:
    """The accelerator for a qtest-driven machine: ``qtest`` when the binary has it (no vCPU
    runs at all), else ``tcg`` with the halting BIOS keeping the vCPU parked."""
    return "qtest" if "qtest" in qemu_accelerators(binary) else "tcg"


def qemu_version(binary: str | None = None) -> tuple[int, int, int]:
    """(major, minor, micro) reported by ``qemu --version`` (of the binary `find_qemu` picks)."""
    return _qemu_version(find_qemu(binary))


@functools.lru_cache(maxsize=16)  # keyed on the resolved path: the environment may change
def _qemu_version(path: str) -> tuple[int, int, int]:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuNotFound(f"cannot run {path} --version: {e}") from e
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if not m:
        raise QemuNotFound(f"cannot parse the version of {path}: {out.stdout.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def require_qemu(
    min: tuple[int, int] = MIN_QEMU_VERSION,  # the name the team asked for
    binary: str | None = None,
) -> tuple[int, int, int]:
    """Fail with a clear message unless QEMU >= ``min`` is installed; return its version."""
    version = qemu_version(binary)
    if version[: len(min)] < tuple(min):
        need = ".".join(map(str, min))
        have = ".".join(map(str, version))
        raise QemuTooOld(
            f"{find_qemu(binary)} is QEMU {have}; these tests need QEMU >= {need} "
            f"(Debian 12: apt-get install -t bookworm-backports qemu-system-x86)"
        )
    return version


def use_qemu(binary: str | None = None) -> str:
    """For a command with a ``--qemu`` option: resolve and version-check the binary
    (``binary``, else the environment, as `find_qemu`), then export it as
    ``$QTEST_QEMU_BINARY`` so that everything this process and its children start (testbeds,
    migration destinations, pytest or avocado runs) uses that same QEMU. Its path."""
    path = find_qemu(binary)
    require_qemu(binary=path)
    os.environ[QEMU_BINARY_ENV[0]] = path
    return path


def write_halt_bios(path: str | os.PathLike[str]) -> Path:
    """Write the 64 KiB BIOS image whose reset vector halts the vCPU for good."""
    image = bytearray(b"\xff" * HALT_BIOS_SIZE)
    image[HALT_BIOS_OFFSET : HALT_BIOS_OFFSET + len(HALT_BIOS_CODE)] = HALT_BIOS_CODE
    p = Path(path)
    p.write_bytes(image)
    return p


# ---------------------------------------------------------------------- command-line helpers
def _qemu_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def qemu_opts(head: str | None = None, props: dict[str, Any] | None = None, **kw: Any) -> str:
    """``head,key=value,...`` with QEMU escaping; None values are left out, bools become on/off.

    Property names are used verbatim (``disable-legacy`` via ``props``, ``mrg_rxbuf`` via kw).
    """
    items = dict(props or {})
    items.update(kw)
    parts = [head] if head else []
    parts += [f"{k}={_qemu_value(v)}" for k, v in items.items() if v is not None]
    return ",".join(parts)


def parse_size(size: int | str) -> int:
    """Bytes from an int (bytes) or a QEMU size string (``512M``, ``2G``; bare number = MiB)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", size)
    if not m:
        raise ValueError(f"bad size {size!r}")
    unit = {"": MiB, "k": 1 << 10, "m": MiB, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * unit


@dataclass(frozen=True)
class MemoryLayout:
    """Guest-physical layout of a PC machine, as QEMU reports it (or as q35 computes it)."""

    ram_size: int
    below_4g: int
    above_4g: int
    pci_hole_start: int
    pci_hole_end: int
    pci_hole64_start: int
    pci_hole64_end: int

    @classmethod
    def computed(cls, ram_size: int) -> MemoryLayout:
        """q35 rule (hw/i386/pc_q35.c): lowmem 0xb0000000, or 2 GiB if RAM >= 0xb0000000."""
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
        below = min(ram_size, lowmem)
        above = ram_size - below
        hole64 = max(FOUR_GIB + above, 0x40_0000_0000)
        return cls(ram_size, below, above, below, 0xFEC00000, hole64, hole64 + (32 << 30))


# ---------------------------------------------------------------------- the machine
class QemuMachine:
    """Builder + lifetime manager for one QEMU process driven over qtest and QMP.

    >>> with QemuMachine(log_dir).add_virtio_net("n0") as m:   # doctest: +SKIP
    ...     m.qtest.readl(0x1000); m.qmp.command("query-status")
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        name: str = "qemu",
        memory: int | str = "512M",
        maxmem: int | str | None = "2G",
        slots: int = 4,
        machine: str = "q35",
        machine_opts: dict[str, Any] | None = None,
        shared_memory: bool = True,
        binary: str | None = None,
        accel: str | None = None,
        launch_timeout: float = 30.0,
        qtest_timeout: float = 10.0,
        qmp_timeout: float = 10.0,
        min_version: tuple[int, int] = MIN_QEMU_VERSION,
    ) -> None:
        self.binary = find_qemu(binary)
        self.version = require_qemu(min_version, self.binary)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Two machines in one log dir (migration source/destination) never share log files.
        unique, n = name, 1
        while (self.log_dir / f"{unique}.cmdline").exists():
            n += 1
            unique = f"{name}-{n}"
        self.name = unique
        (self.log_dir / f"{unique}.cmdline").touch()
        name = unique
        # Unix socket paths are limited to 107 bytes: keep sockets in a short private dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="qos-"))
        self.ram_size = parse_size(memory)
        self.maxmem = parse_size(maxmem) if maxmem is not None and slots > 0 else None
        self.slots = slots if self.maxmem else 0
        self.machine = machine
        self.machine_opts: dict[str, Any] = dict(machine_opts or {})
        self.shared_memory = shared_memory
        #: None: `qtest_accel` (qtest when the binary has it, else TCG + the halting BIOS)
        self.accel = accel or qtest_accel(self.binary)
        self.launch_timeout = launch_timeout
        self.qtest_timeout = qtest_timeout
        self.qmp_timeout = qmp_timeout
        self.incoming: str | None = None
        self._args: list[str] = []
        self._ids: set[str] = set()

        self.stderr_path = self.log_dir / f"{name}.stderr"
        self.stdout_path = self.log_dir / f"{name}.stdout"
        self.qtest_log_path = self.log_dir / f"{name}.qtest.log"
        self.cmdline_path = self.log_dir / f"{name}.cmdline"
        self.bios_path = self.log_dir / f"{name}.halt.bin"
        self.qtest_sock_path = self.sock_dir / "qtest.sock"
        self.qmp_sock_path = self.sock_dir / "qmp.sock"

        self.process: subprocess.Popen[bytes] | None = None
        self.qtest: QTest = None  # type: ignore[assignment]  # set by launch()
        self.qmp: QmpClient = None  # type: ignore[assignment]  # set by launch()
        self.layout: MemoryLayout = MemoryLayout.computed(self.ram_size)
        self.exit_code: int | None = None
        self._stderr_file: Any = None
        self._stdout_file: Any = None
        self._shut_down = False

    # ------------------------------------------------------------------ builder
    def _claim_id(self, kind: str, ident: str | None) -> None:
        if ident is None:
            return
        key = f"{kind}:{ident}"
        if key in self._ids:
            raise ValueError(f"duplicate {kind} id {ident!r}")
        self._ids.add(key)

    def _check_not_launched(self) -> None:
        if self.process is not None:
            raise QemuError("the command line cannot change after launch() (use QMP)")

    def sock_path(self, name: str) -> str:
        """A path for a unix socket in this machine's private socket directory."""
        return str(self.sock_dir / name)

    def add_args(self, *args: str) -> QemuMachine:
        """Append raw command-line arguments."""
        self._check_not_launched()
        self._args.extend(args)
        return self

    def add_device(
        self, driver: str, props: dict[str, Any] | None = None, **kw: Any
    ) -> QemuMachine:
        """``-device driver,props...`` (``props`` for names with dashes, kw for the rest)."""
        merged = dict(props or {})
        merged.update(kw)
        self._claim_id("device", merged.get("id"))
        return self.add_args("-device", qemu_opts(driver, merged))

    def add_object(
        self, qom_type: str, props: dict[str, Any] | None = None, **kw: Any
    ) -> QemuMachine:
        merged = dict(props or {})
        merged.update(kw)
        self._claim_id("object", merged.get("id"))
        return self.add_args("-object", qemu_opts(qom_type, merged))

    def add_chardev_socket(
        self,
        ident: str,
        path: str | os.PathLike[str],
        *,
        server: bool = False,
        wait: bool | None = None,
        reconnect_ms: int | None = None,
    ) -> QemuMachine:
        """``-chardev socket,id=...,path=...[,server=on,wait=off][,reconnect-ms=N]``."""
        self._claim_id("chardev", ident)
        props: dict[str, Any] = {"id": ident, "path": os.fspath(path)}
        if server:
            props["server"] = True
            props["wait"] = False if wait is None else wait
        if reconnect_ms is not None:
            props["reconnect-ms"] = reconnect_ms  # QEMU >= 9.2; 'reconnect' is deprecated
        return self.add_args("-chardev", qemu_opts("socket", props))

    def add_netdev(
        self, backend: str, ident: str, props: dict[str, Any] | None = None, **kw: Any
    ) -> QemuMachine:
        self._claim_id("netdev", ident)
        merged = {"id": ident, **(props or {}), **kw}
        return self.add_args("-netdev", qemu_opts(backend, merged))

    def add_vhost_user_netdev(
        self,
        sock_path: str | os.PathLike[str],
        *,
        netdev_id: str = "n0",
        chardev_id: str | None = None,
        queues: int = 1,
        reconnect_ms: int | None = None,
        **extra: Any,
    ) -> QemuMachine:
        """Chardev (QEMU connects to the backend's listening socket) + vhost-user netdev."""
        chardev_id = chardev_id or f"chr-{netdev_id}"
        self.add_chardev_socket(chardev_id, sock_path, reconnect_ms=reconnect_ms)
        return self.add_netdev(
            "vhost-user",
            netdev_id,
            chardev=chardev_id,
            queues=queues if queues > 1 else None,
            **extra,
        )

    def add_vhost_vdpa_netdev(
        self,
        vhostdev: str,
        *,
        netdev_id: str = "n0",
        queues: int = 1,
        **extra: Any,
    ) -> QemuMachine:
        """A vhost-vdpa netdev on ``/dev/vhost-vdpa-N`` (a VDUSE device of ours, or any vDPA
        device). Guest RAM must be shared and fd-backed (the default here), or the device
        cannot map it (VDUSE_IOTLB_GET_FD hands out the memory's fd)."""
        return self.add_netdev(
            "vhost-vdpa",
            netdev_id,
            vhostdev=vhostdev,
            queues=queues if queues > 1 else None,
            **extra,
        )

    def add_dgram_netdev(
        self, local_path: str, remote_path: str, *, netdev_id: str = "n0"
    ) -> QemuMachine:
        """QEMU's built-in datagram backend over unix sockets (no vhost)."""
        return self.add_netdev(
            "dgram",
            netdev_id,
            {
                "local.type": "unix",
                "local.path": local_path,
                "remote.type": "unix",
                "remote.path": remote_path,
            },
        )

    def add_udp_netdev(
        self, local_port: int, remote_port: int, *, host: str = "127.0.0.1", netdev_id: str = "n0"
    ) -> QemuMachine:
        """QEMU's built-in datagram backend over UDP: binds host:local_port, sends to remote."""
        return self.add_netdev(
            "dgram",
            netdev_id,
            {
                "local.type": "inet",
                "local.host": host,
                "local.port": local_port,
                "remote.type": "inet",
                "remote.host": host,
                "remote.port": remote_port,
            },
        )

    def add_virtio_net(
        self,
        netdev: str = "n0",
        *,
        ident: str = "net0",
        mac: str | None = None,
        disable_legacy: bool = True,
        mq: bool | None = None,
        vectors: int | None = None,
        mrg_rxbuf: bool | None = None,
        event_idx: bool | None = None,
        indirect_desc: bool | None = None,
        ctrl_vq: bool | None = None,
        packed: bool | None = None,
        iommu_platform: bool | None = None,
        ats: bool | None = None,
        bus: str | None = None,
        addr: str | None = None,
        rx_queue_size: int | None = None,
        tx_queue_size: int | None = None,
        props: dict[str, Any] | None = None,
    ) -> QemuMachine:
        """``-device virtio-net-pci`` (modern-only by default: 1af4:1041)."""
        p: dict[str, Any] = {
            "id": ident,
            "netdev": netdev,
            "disable-legacy": "on" if disable_legacy else None,
            "mac": mac,
            "mq": mq,
            "vectors": vectors,
            "mrg_rxbuf": mrg_rxbuf,
            "event_idx": event_idx,
            "indirect_desc": indirect_desc,
            "ctrl_vq": ctrl_vq,
            "packed": packed,
            "iommu_platform": iommu_platform,
            "ats": ats,
            "bus": bus,
            "addr": addr,
            "rx_queue_size": rx_queue_size,
            "tx_queue_size": tx_queue_size,
        }
        p.update(props or {})
        return self.add_device("virtio-net-pci", p)

    def add_pcie_root_port(
        self, ident: str, *, chassis: int, slot: int | None = None, bus: str = "pcie.0", **kw: Any
    ) -> QemuMachine:
        return self.add_device(
            "pcie-root-port", id=ident, bus=bus, chassis=chassis, slot=slot, **kw
        )

    def add_intel_iommu(
        self,
        *,
        intremap: bool = True,
        device_iotlb: bool = True,
        caching_mode: bool = True,
        **kw: Any,
    ) -> QemuMachine:
        """intel-iommu (needs ``kernel-irqchip=split``, set here) — must precede PCI devices."""
        self.machine_opts.setdefault("kernel-irqchip", "split")
        props = {"intremap": intremap, "device-iotlb": device_iotlb, "caching-mode": caching_mode}
        return self.add_device("intel-iommu", props, **kw)

    def add_virtio_iommu(self, **kw: Any) -> QemuMachine:
        return self.add_device("virtio-iommu-pci", **kw)

    def set_incoming(self, uri: str = "defer") -> QemuMachine:
        """``-incoming URI`` (migration destination; ``defer`` = wait for migrate-incoming)."""
        self._check_not_launched()
        self.incoming = uri
        return self

    def command_line(self) -> list[str]:
        ram_m = self.ram_size // MiB
        if ram_m * MiB != self.ram_size:
            raise ValueError("guest RAM size must be a multiple of 1 MiB")
        mem = f"{ram_m}M"
        if self.slots and self.maxmem:
            mem += f",slots={self.slots},maxmem={self.maxmem // MiB}M"
        machine_props = {"memory-backend": "mem", **self.machine_opts}
        cmd = [
            self.binary,
            "-accel", self.accel,
            "-qtest", f"unix:{self.qtest_sock_path}",
            "-qtest-log", str(self.qtest_log_path),
            "-bios", str(self.bios_path),
            "-display", "none",
            "-nodefaults",
            "-no-user-config",
            "-smp", "1",
            "-machine", qemu_opts(self.machine, machine_props),
            "-m", mem,
            "-object", qemu_opts(
                "memory-backend-memfd", id="mem", size=f"{ram_m}M", share=self.shared_memory
            ),
            "-chardev", qemu_opts("socket", id="qos-qmp", path=str(self.qmp_sock_path),
                                  server=True, wait=False),
            "-mon", "chardev=qos-qmp,mode=control",
        ]  # fmt: skip
        if self.incoming is not None:
            cmd += ["-incoming", self.incoming]
        return cmd + self._args

    # ------------------------------------------------------------------ lifetime
    def launch(self) -> QemuMachine:
        """Start QEMU, accept its qtest connection and connect QMP.  Returns self."""
        self._check_not_launched()
        write_halt_bios(self.bios_path)
        cmd = self.command_line()
        self.cmdline_path.write_text(shlex.join(cmd) + "\n")
        with contextlib.suppress(FileNotFoundError):
            self.qtest_sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.qtest_sock_path))
            listener.listen(1)
            self._stderr_file = open(self.stderr_path, "wb")  # closed in shutdown()
            self._stdout_file = open(self.stdout_path, "wb")
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout_file,
                stderr=self._stderr_file,
                preexec_fn=die_with_parent,  # only calls prctl()
                close_fds=True,
                start_new_session=True,  # a terminal's Ctrl-C (qtests.shell) is not QEMU's
            )
            try:
                self.qtest = QTest.accept(
                    listener,
                    self.launch_timeout,
                    alive=self.is_running,
                    qtest_timeout=self.qtest_timeout,
                )
                self.qmp = QmpClient(self.name, timeout=self.qmp_timeout)
                self.qmp.connect(
                    str(self.qmp_sock_path), timeout=self.launch_timeout, alive=self.is_running
                )
                self.layout = self._query_layout()
            except Exception as e:
                self.shutdown()
                raise QemuLaunchError(
                    f"QEMU failed to start: {e}\n  command: {shlex.join(cmd)}\n"
                    f"  stderr ({self.stderr_path}):\n{self.stderr_tail()}"
                ) from e
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.qtest_sock_path.unlink()
        return self

    def _query_layout(self) -> MemoryLayout:
        fallback = MemoryLayout.computed(self.ram_size)
        for host in ("/machine/q35", "/machine/i440fx"):
            try:

                def get(prop: str, host: str = host) -> int:
                    return int(self.qmp.command("qom-get", path=host, property=prop))

                return MemoryLayout(
                    ram_size=self.ram_size,
                    below_4g=get("below-4g-mem-size"),
                    above_4g=get("above-4g-mem-size"),
                    pci_hole_start=get("pci-hole-start"),
                    pci_hole_end=get("pci-hole-end"),
                    pci_hole64_start=get("pci-hole64-start"),
                    pci_hole64_end=get("pci-hole64-end"),
                )
            except QmpError:
                continue
        return fallback

    def make_allocator(self) -> GuestAllocator:
        """A guest allocator over this machine's boot RAM (``low`` and, if any, ``high``)."""
        return GuestAllocator.for_ram(self.layout.below_4g, self.layout.above_4g)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def assert_running(self) -> None:
        """Raise `QemuError` (with stderr) if QEMU is no longer running."""
        if not self.is_running():
            code = self.process.returncode if self.process else None
            raise QemuError(f"QEMU is not running (exit {code}); stderr:\n{self.stderr_tail()}")

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 20) -> str:
        text = self.stderr_text().splitlines()[-lines:]
        return "\n".join("    " + t for t in text) if text else "    (empty)"

    def _wait(self, timeout: float) -> bool:
        assert self.process is not None
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def shutdown(
        self, *, quit_timeout: float = 3.0, term_timeout: float = 3.0, kill_timeout: float = 10.0
    ) -> int | None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL, each with a bounded wait).

        Always closes the qtest/QMP connections, log files and socket directory; never
        raises; idempotent.  Returns QEMU's exit code (negative: killed by that signal).
        """
        if self._shut_down:
            return self.exit_code
        self._shut_down = True
        proc = self.process
        if proc is not None and proc.poll() is None:
            if self.qmp is not None and self.qmp.connected:
                with contextlib.suppress(Exception):
                    self.qmp.command("quit", timeout=quit_timeout)
            if not self._wait(quit_timeout):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                if not self._wait(term_timeout):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    self._wait(kill_timeout)
        if proc is not None:
            self.exit_code = proc.poll()
        if self.qmp is not None:
            self.qmp.close()
        if self.qtest is not None:
            self.qtest.close()
        for f in (self._stderr_file, self._stdout_file):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        return self.exit_code

    def __enter__(self) -> QemuMachine:
        if self.process is None:
            self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:  # last resort: never leave a QEMU behind
        proc = getattr(self, "process", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()

    # ------------------------------------------------------------------ convenience
    def wait_for_status(self, status: str, timeout: float = 10.0) -> None:
        """Wait until QEMU's run state is ``status`` (e.g. ``running``, ``inmigrate``)."""
        seen: list[str] = []

        def check() -> bool:
            seen.append(str(self.qmp.command("query-status").get("status")))
            return seen[-1] == status

        poll_until(
            check,
            timeout,
            f"QEMU run state {status!r}",
            detail=lambda: f"last state {seen[-1] if seen else None!r}",
        )
