"""The vDPA backend as a real child process (``python -m backends``), seen from a test.

`BackendProcess` starts the backend, waits for its ``READY`` line (bounded, naming what it
waited for), drains its stdout to a file so it can never block on a full pipe, connects to its
QMP-compatible monitor with the same `QmpClient` the suite uses for QEMU, and always stops it:
SIGTERM (the backend writes its journal file and exits 0), then SIGKILL. Logs, journal and
stdout/stderr stay in the test's log directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtests.qos.processes import die_with_parent, open_fd_count, stop_process
from qtests.qos.qmp import QmpClient

_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = b"READY"
_vduse_names = itertools.count(1)  # VDUSE device names are system-wide: unique per process


def backend_python() -> str:
    """The interpreter that runs the backend: the project's venv when present."""
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class BackendError(RuntimeError):
    pass


class BackendProcess:
    """One backend process with its vhost-user socket, monitor and logs."""

    def __init__(
        self,
        log_dir: Path,
        *,
        name: str = "backend",
        run_dir: Path | None = None,
        queues: int | None = 1,
        wire: str | None = "null",
        faults: Iterable[str] = (),
        mac: str | None = None,
        extra_args: Iterable[str] = (),
        log: logging.Logger | None = None,
        socket_path: str | None = None,
        monitor: bool = True,
        transport: str = "vhost-user",
        vduse_name: str | None = None,
    ) -> None:
        """Logs go to ``log_dir``, the sockets to ``run_dir`` (default: ``log_dir``; unix socket
        paths must stay under 108 bytes). ``log``: where to report (default: this module's).
        ``socket_path``: the vhost-user socket (default ``run_dir/NAME.sock``), e.g. the path of a
        backend this one replaces for a QEMU that reconnects. ``queues``/``wire`` None: the
        backend's own defaults. ``monitor=False``: no monitor socket. ``transport``:
        "vhost-user", or "vduse" for a VDUSE device named ``vduse_name`` on the kernel's vDPA
        bus (then :attr:`vhost_vdpa` is the ``/dev/vhost-vdpa-N`` its READY line named)."""
        if transport not in ("vhost-user", "vduse"):
            raise ValueError(f"unknown backend transport {transport!r}")
        self.transport = transport
        self.vduse_name = vduse_name or f"qos-{os.getpid()}-{next(_vduse_names)}"
        #: the vhost-vdpa device of a vduse backend, from its READY line
        self.vhost_vdpa: str | None = None
        self.name = name
        self.log = log or _log
        self.log_dir = Path(log_dir)
        run_dir = Path(run_dir) if run_dir is not None else self.log_dir
        self.queues = queues
        self.wire = wire
        self.faults = list(faults)
        self.mac = mac
        self.extra_args = list(extra_args)
        self.socket = socket_path or str(run_dir / f"{name}.sock")
        self.monitor_path = str(run_dir / f"{name}-mon.sock") if monitor else None
        self.log_path = self.log_dir / f"{name}.log"
        self.journal_path = self.log_dir / f"{name}-journal.jsonl"
        self.stdout_path = self.log_dir / f"{name}.stdout"
        self.stderr_path = self.log_dir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        #: True once the test killed it on purpose (kill()): its exit status is then expected
        self.killed = False
        self._qmp: QmpClient | None = None
        #: The line the backend printed when ready (``READY socket=PATH``).
        self.ready_line = ""
        self._drain: threading.Thread | None = None

    @classmethod
    def launch(
        cls, log_dir: Path, *args: str, monitor: bool = True, timeout: float = 30.0
    ) -> BackendProcess:
        """Start a backend with the command line's own defaults plus ``args`` (for tests of
        the command line itself, and benchmarks)."""
        bp = cls(log_dir, queues=None, wire=None, extra_args=args, monitor=monitor)
        return bp.start(timeout)

    # -- life cycle ------------------------------------------------------------------------
    def command(self) -> list[str]:
        if self.transport == "vduse":
            where = ["--transport", "vduse", "--name", self.vduse_name]
        else:
            where = ["--socket", self.socket]
        cmd = [backend_python(), "-m", "backends", *where,
               "--log", str(self.log_path), "--journal-file", str(self.journal_path)]  # fmt: skip
        if self.monitor_path:
            cmd += ["--monitor", self.monitor_path]
        if self.queues is not None:
            cmd += ["--queues", str(self.queues)]
        if self.wire is not None:
            cmd += ["--wire", self.wire]
        for fault in self.faults:
            cmd += ["--fault", fault]
        if self.mac:
            cmd += ["--mac", self.mac]
        return [*cmd, *self.extra_args]

    def tails(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            try:
                parts.append(f"--- {path}:\n{path.read_text(errors='replace')[-chars:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def start(self, timeout: float = 30.0) -> BackendProcess:
        for stale in (self.socket, self.monitor_path):
            if stale and os.path.exists(stale):
                os.unlink(stale)
        cmd = self.command()
        self.log.info("%s: %s", self.name, " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        assert self.proc.stdout is not None
        out = self.stdout_path.open("wb")
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while not any(line.split()[:1] == [READY] for line in buf.splitlines()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BackendError(
                            f"timed out after {timeout:g}s waiting for {self.name}'s READY line;"
                            f" stdout so far {buf[-500:]!r}\n{self.tails()}"
                        )
                    if not sel.select(remaining):
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        rc = self.proc.wait(timeout=10)
                        raise BackendError(
                            f"{self.name} exited ({rc}) before printing READY; "
                            f"stdout {buf[-500:]!r}\n{self.tails()}"
                        )
                    buf += chunk
            self._read_ready(buf)
        except BaseException:
            out.write(buf)
            out.close()
            self.stop()
            raise
        out.write(buf)
        out.flush()
        self.ready_line = next(
            line for line in buf.decode(errors="replace").splitlines() if line.startswith("READY")
        )
        self._drain = threading.Thread(
            target=self._drain_stdout, args=(fd, out), name=f"{self.name}-stdout", daemon=True
        )
        self._drain.start()
        self.log.info("%s ready (pid %d)", self.name, self.proc.pid)
        return self

    def _read_ready(self, stdout: bytes) -> None:
        """Take what the READY line names (``vhost-vdpa=PATH`` for a vduse backend)."""
        for line in stdout.splitlines():
            words = line.decode(errors="replace").split()
            if words[:1] == ["READY"]:
                for word in words[1:]:
                    key, _, value = word.partition("=")
                    if key == "vhost-vdpa":
                        self.vhost_vdpa = value
        if self.transport == "vduse" and not self.vhost_vdpa:
            raise BackendError(f"{self.name}'s READY line names no vhost-vdpa device: {stdout!r}")

    @staticmethod
    def _drain_stdout(fd: int, out: Any) -> None:
        try:
            while chunk := os.read(fd, 65536):
                out.write(chunk)
                out.flush()
        except OSError:
            pass
        finally:
            out.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL with no clean-up: simulates a crashed backend (reconnect tests)."""
        self.killed = True
        self._close_qmp()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.returncode = self.proc.wait(timeout=10)
        self._join_drain()

    def fd_count(self) -> int:
        """How many fds the backend process has open."""
        assert self.proc is not None
        return open_fd_count(self.proc.pid)

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process with ``sig`` (then SIGKILL after ``grace``); idempotent, never
        raises; returns its exit status."""
        self._close_qmp()
        if self.proc is None:
            return None
        try:
            self.returncode = stop_process(self.proc, self.name, grace, log=self.log, sig=sig)
        except Exception:  # never let clean-up hide the test's own failure
            self.log.exception("stopping %s failed", self.name)
        self._join_drain()
        self.log.info("%s exited with %s", self.name, self.returncode)
        return self.returncode

    def _join_drain(self) -> None:
        if self._drain is not None:
            self._drain.join(timeout=5)
            self._drain = None
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- monitor ---------------------------------------------------------------------------
    @property
    def qmp(self) -> QmpClient:
        if self.monitor_path is None:
            raise BackendError(f"{self.name} was started without a monitor")
        if self._qmp is None:
            client = QmpClient(f"{self.name}-monitor")
            client.connect(self.monitor_path)
            self._qmp = client
        return self._qmp

    def cmd(self, command: str, **args: Any) -> Any:
        return self.qmp.command(command, args)

    def journal(
        self, kinds: list[str] | None = None, since: int | None = None
    ) -> list[dict[str, Any]]:
        args: dict[str, Any] = {}
        if kinds is not None:
            args["kinds"] = kinds
        if since is not None:
            args["since"] = since
        return list(self.cmd("query-journal", **args)["entries"])

    def mark(self) -> int:
        return int(self.cmd("journal-mark")["seq"])

    def vrings(self) -> list[dict[str, Any]]:
        return list(self.cmd("query-vrings")["vrings"])

    def vring(self, index: int) -> dict[str, Any]:
        for vr in self.vrings():
            if vr["index"] == index:
                return vr
        raise KeyError(f"{self.name} has no vring {index}")

    def wire_spec(self) -> str:
        """The wire as the backend describes it (ephemeral ports resolved)."""
        return str(self.cmd("query-wire")["wire"]["kind"])

    def read_journal_file(self) -> list[dict[str, Any]]:
        """The JSON-lines journal the backend writes at exit (after :meth:`stop`)."""
        return [
            json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()
        ]
