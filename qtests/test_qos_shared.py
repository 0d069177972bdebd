"""Driver-library pieces the avocado suite shares with the qtest suites: `stop_process` and
`QmpClient.listen` / `accept` (QEMU connects to the test's QMP socket)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qtests.qos import processes
from qtests.qos.machine import find_qemu
from qtests.qos.processes import stop_process
from qtests.qos.qmp import QmpClient, QmpError

IGNORES_SIGTERM = (
    "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); sys.stdin.read()"
)


def _started(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_stop_process_escalates_to_sigkill() -> None:
    proc = _started(IGNORES_SIGTERM)
    try:
        assert stop_process(proc, "stubborn", grace=0.2) == -9
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            assert f is not None
            f.close()


def test_stop_process_after_being_asked_waits_then_terminates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "TERM_GRACE", 0.1)
    proc = _started("import sys; print('ready', flush=True); sys.stdin.read()")
    try:
        assert proc.stdin is not None
        proc.stdin.close()  # "asked": it exits on end of input
        assert stop_process(proc, "polite", grace=10, asked=True) == 0
        stuck = _started(IGNORES_SIGTERM)
        assert stop_process(stuck, "stuck", grace=0.1, asked=True) == -9
        assert stuck.stdin is not None and stuck.stdout is not None
        stuck.stdin.close()
        stuck.stdout.close()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.qemu
def test_qmp_listen_accepts_qemu_as_client(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    client = QmpClient("listen-test", timeout=10)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        client.listen(str(sock))
        assert not client.connected
        qemu = subprocess.Popen(
            [find_qemu(), "-nodefaults", "-display", "none", "-machine", "none",
             "-chardev", f"socket,id=qmp,path={sock}", "-mon", "chardev=qmp,mode=control"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client.accept(10)
        assert client.connected
        assert client.command("query-status")["status"] in ("running", "prelaunch")
        client.command("quit")
        assert stop_process(qemu, "QEMU", 10, asked=True) == 0
    finally:
        client.close()
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def test_qmp_accept_without_listen_is_an_error() -> None:
    with QmpClient("no-listen") as client, pytest.raises(QmpError, match="listen"):
        client.accept(1)
