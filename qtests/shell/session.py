"""What an interactive session drives, whatever the guest: QEMU, the backend, DIMMs, migration.

`Session` holds what both kinds share: the backend monitor, DIMM hotplug through
`qtests.qos.memory_devices.DimmHotplug` (``object-add memory-backend-memfd,share=on`` +
``device_add pc-dimm``), packet injection, the migration skeleton and the clean-up. The kinds
(`qtests.shell.qtest_session`, `qtests.shell.guest_session`) say how QEMU is started, who acts
as the ACPI OSPM, how a destination comes up and what "console" means.
"""

from __future__ import annotations

import abc
import itertools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtests.qos.backend_process import BackendProcess, backend_python
from qtests.qos.memory_devices import DimmHotplug, MemoryDevice
from qtests.qos.qmp import QmpClient
from qtests.qos.waiting import poll_until

_log = logging.getLogger(__name__)

GUEST_MAC = "52:54:00:12:34:56"
DEFAULT_DIMM_SIZE = 128 << 20
MIGRATION_TIMEOUT = 60.0


class SessionError(Exception):
    """Something the user asked for cannot be done (shown as ``error: ...``, session lives on)."""


@dataclass(frozen=True)
class Endpoint:
    """A socket a user can reach from another terminal, and the command that does it."""

    what: str
    path: str
    how: str


def qmp_shell_command(path: str) -> str:
    beside = Path(backend_python()).with_name("qmp-shell")
    tool = str(beside) if beside.exists() else "qmp-shell"
    return f"{tool} {path}"


def qmp_endpoint(what: str, path: str) -> Endpoint:
    return Endpoint(what, path, f"{qmp_shell_command(path)}   (or: socat - UNIX-CONNECT:{path})")


def user_monitor_args(path: str) -> list[str]:
    """A second QMP monitor for the user (the session holds the first one)."""
    return ["-chardev", f"socket,id=qmp-user,path={path},server=on,wait=off",
            "-mon", "chardev=qmp-user,mode=control"]  # fmt: skip


def dimm_args(dimms: dict[str, MemoryDevice]) -> list[str]:
    """The command-line twin of hotplugged DIMMs (a migration destination needs them)."""
    args: list[str] = []
    for ident, dev in dimms.items():
        memdev = dev.memdev.rsplit("/", 1)[-1]  # QEMU reports the QOM path /objects/ID
        args += ["-object", f"memory-backend-memfd,id={memdev},size={dev.size},share=on",
                 "-device", f"pc-dimm,id={ident},memdev={memdev},addr={dev.addr},"
                 f"slot={dev.slot}"]  # fmt: skip
    return args


class Session(abc.ABC):
    mode = ""

    def __init__(
        self,
        log_dir: Path,
        *,
        queues: int = 1,
        faults: list[str] | tuple[str, ...] = (),
        log: logging.Logger | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # unix socket paths must stay under 108 bytes
        self.run_dir = Path(tempfile.mkdtemp(prefix="vdpa-shell-", dir="/tmp"))
        self.queues = queues
        self.faults = list(faults)
        self.log = log or _log
        self.hotplug: DimmHotplug | None = None
        self.migrations = 0
        self._dimm_ids = itertools.count(1)
        self._closed = False

    # -- what each kind provides -----------------------------------------------------------
    @property
    @abc.abstractmethod
    def qmp(self) -> QmpClient:
        """The session's connection to the current QEMU."""

    @property
    @abc.abstractmethod
    def backend(self) -> BackendProcess:
        """The current backend process."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def endpoints(self) -> list[Endpoint]: ...

    @abc.abstractmethod
    def processes(self) -> dict[str, int | None]:
        """Name -> pid of every process the session runs now."""

    @abc.abstractmethod
    def _migrate(self, tag: str) -> dict[str, Any]:
        """Start a destination called ``tag``, migrate to it, continue there; the source goes."""

    @abc.abstractmethod
    def _stop_all(self) -> list[str]:
        """Stop everything; one line per process: what it was and how it ended."""

    def console_socket(self) -> Any:
        raise SessionError(f"no guest console in {self.mode} mode (no guest OS runs)")

    def console_history(self) -> bytes:
        """The guest console's recent output (shown when someone attaches)."""
        return b""

    def guest_run(self, command: str, timeout: float) -> tuple[int, str]:
        raise SessionError(f"no guest shell in {self.mode} mode (no guest OS runs)")

    def after_inject(self, queue: int, timeout: float) -> str | None:
        """What the guest side saw of an injected frame (None: nothing to report)."""
        return None

    # -- shared ----------------------------------------------------------------------------
    def common_endpoints(self) -> list[Endpoint]:
        mon = self.backend.monitor_path
        return [qmp_endpoint("backend monitor", mon)]

    def inject(self, frame: bytes, queue: int = 0) -> dict[str, Any]:
        return dict(self.backend.cmd("inject-packet", data=frame.hex(), queue=queue))

    def dimm_add(self, size: int = DEFAULT_DIMM_SIZE, timeout: float = 10.0) -> MemoryDevice:
        """Plug a DIMM; returns it once the backend's memory table shows it."""
        if self.hotplug is None:
            raise SessionError("memory hotplug is not set up")
        dev = self.hotplug.plug(size, ident=f"dimm{next(self._dimm_ids)}")
        poll_until(
            lambda: any(r["gpa"] == dev.addr for r in self.mem_table()),
            timeout,
            f"{dev.id} at {dev.addr:#x} in the backend's memory table",
            max_interval=0.05,
        )
        return dev

    def dimm_del(self, ident: str, timeout: float = 10.0) -> MemoryDevice:
        if self.hotplug is None or ident not in self.hotplug.plugged:
            known = sorted(self.hotplug.plugged) if self.hotplug else []
            raise SessionError(f"no DIMM {ident!r} plugged by this session (have {known})")
        return self.hotplug.unplug(ident, timeout)

    def mem_table(self) -> list[dict[str, Any]]:
        return list(self.backend.cmd("query-mem-table")["regions"])

    def migrate(self) -> dict[str, Any]:
        """Migrate to a new QEMU + backend (``-incoming defer``, a unix socket) and continue
        the session there. Returns the source's final ``query-migrate``."""
        self.migrations += 1
        return self._migrate(f"mig{self.migrations}")

    def close(self) -> list[str]:
        """Stop everything the session started (idempotent); what was stopped, one per line."""
        if self._closed:
            return []
        self._closed = True
        try:
            return self._stop_all()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def stopped_line(what: str, pid: int | None, rc: int | None) -> str:
    return f"stopped {what} (pid {pid}, exit {rc})"


def try_quietly(what: str, fn: Any, log: logging.Logger) -> Any:
    """Run a clean-up step; log (not raise) its failure so the next step still runs."""
    try:
        return fn()
    except Exception:
        log.exception("clean-up: %s failed", what)
        return None


def wait_migration(qmp: QmpClient, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
    """Poll the source's ``query-migrate`` until ``completed``; SessionError on failure."""
    last: list[dict[str, Any]] = [{}]

    def done() -> bool:
        last[0] = info = dict(qmp.command("query-migrate"))
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise SessionError(f"migration {status}: {info.get('error-desc', '')}")
        return status == "completed"

    poll_until(
        done,
        timeout,
        "the migration to complete",
        detail=lambda: f"status {last[0].get('status')!r}",
        max_interval=0.05,
    )
    return last[0]
