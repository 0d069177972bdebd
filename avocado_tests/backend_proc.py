"""The vhost-user backend as a child process (``python -m backends``) and its monitor.

Start waits for the ``READY`` line on stdout (first word READY, bounded); stdout is then drained to a file by a
thread so the backend can never block on a full pipe. Stop sends SIGTERM (the backend then
writes its journal file and exits 0), escalating to SIGKILL.
"""

from __future__ import annotations

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

from avocado_tests.processes import stop_process
from avocado_tests.qmp_client import QmpConnection

_log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
READY = b"READY"


def backend_python() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class BackendProcess:
    def __init__(
        self,
        rundir: Path,
        logdir: Path,
        *,
        queues: int = 1,
        wire: str = "null",
        faults: Iterable[str] = (),
        mac: str | None = None,
        extra_args: Iterable[str] = (),
        name: str = "backend",
        log: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.queues = queues
        self.wire = wire
        self.faults = list(faults)
        self.mac = mac
        self.extra_args = list(extra_args)
        self.log = log or _log
        self.socket = rundir / f"{name}.sock"
        self.monitor_path = rundir / f"{name}-mon.sock"
        self.log_path = logdir / f"{name}.log"
        self.journal_path = logdir / f"{name}-journal.jsonl"
        self.stdout_path = logdir / f"{name}.stdout"
        self.stderr_path = logdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._monitor: QmpConnection | None = None
        self._drain: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [backend_python(), "-m", "backends",
               "--socket", str(self.socket), "--monitor", str(self.monitor_path),
               "--log", str(self.log_path), "--journal-file", str(self.journal_path),
               "--queues", str(self.queues), "--wire", self.wire]  # fmt: skip
        for fault in self.faults:
            cmd += ["--fault", fault]
        if self.mac:
            cmd += ["--mac", self.mac]
        return [*cmd, *self.extra_args]

    def _tails(self) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            try:
                parts.append(f"--- {path}:\n{path.read_text(errors='replace')[-2000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def start(self, timeout: float = 30.0) -> None:
        cmd = self.command()
        self.log.info("backend: %s", " ".join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        assert self.proc.stdout is not None
        out = self.stdout_path.open("wb")
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not any(line.split()[:1] == [READY] for line in buf.splitlines()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    out.close()
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for the backend's READY line; "
                        f"stdout so far {buf[-500:]!r}\n{self._tails()}"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    rc = self.proc.wait(timeout=10)
                    out.write(buf)
                    out.close()
                    raise AssertionError(
                        f"backend exited ({rc}) before printing READY; stdout {buf[-500:]!r}\n"
                        f"{self._tails()}"
                    )
                buf += chunk
        out.write(buf)
        out.flush()
        self._drain = threading.Thread(
            target=self._drain_stdout, args=(fd, out), name=f"{self.name}-stdout", daemon=True
        )
        self._drain.start()
        self.log.info("backend ready (pid %d)", self.proc.pid)

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

    # -- monitor ---------------------------------------------------------------------------
    @property
    def monitor(self) -> QmpConnection:
        if self._monitor is None:
            self._monitor = QmpConnection.connect(self.monitor_path, f"{self.name}-monitor")
        return self._monitor

    def cmd(self, command: str, **args: Any) -> Any:
        return self.monitor.cmd(command, **args)

    def journal(self, kinds: list[str] | None = None, since: int | None = None) -> list[dict]:
        args: dict[str, Any] = {}
        if kinds is not None:
            args["kinds"] = kinds
        if since is not None:
            args["since"] = since
        result = self.cmd("query-journal", **args)
        return list(result["entries"] if isinstance(result, dict) else result)

    def read_journal_file(self) -> list[dict]:
        """The JSON-lines journal the backend writes at exit (after :meth:`stop`)."""
        entries = []
        for line in self.journal_path.read_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries

    # -- stop ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM and wait (escalating); returns the exit status (0 = clean)."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.returncode = stop_process(self.proc, self.name, self.log, grace=grace)
        if self._drain is not None:
            self._drain.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.info("backend exited with %s", self.returncode)
        return self.returncode
