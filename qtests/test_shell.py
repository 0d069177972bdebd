"""The interactive session (``qtests.shell``) used as a person would: typed into a terminal.

The shell runs in a tmux pane on a private tmux server (``tmux -L``); the test types commands
with ``send-keys`` and reads the screen with ``capture-pane``, waiting (bounded, naming what it
waited for) for each command's output and the next prompt. After ``quit`` no QEMU or backend
process of the session may remain (checked by the PIDs the shell printed).

Also: the non-interactive mode (commands on stdin) through memory hotplug and migration on the
qtest machine, and, when the guest image is already cached, the real-guest mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import guest_images
from qtests.qemu_wrapper import QEMU_ENV_VARS, RecordingQemu
from qtests.qos.machine import find_qemu
from qtests.qos.waiting import poll_until

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = (
    str(REPO_ROOT / ".venv" / "bin" / "python")
    if (REPO_ROOT / ".venv").exists()
    else sys.executable
)
PROMPT_LINE = re.compile(r"^\(vdpa\)", re.MULTILINE)
PIDS = re.compile(r"processes: QEMU pid (\d+), backend pid (\d+)")

pytestmark = pytest.mark.qemu


class TmuxPane:
    """One tmux session, on a private server whose socket is ``socket``, running ``command`` in
    a 200x50 pane."""

    def __init__(self, name: str, command: str, socket: Path) -> None:
        self.name = name
        self.socket = socket
        self.command = command

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True,
                             text=True, timeout=10, check=True)  # fmt: skip
        return out.stdout

    def start(self) -> TmuxPane:
        # remain-on-exit is set before the pane exists: its output and exit status stay
        self.tmux("start-server", ";", "set-option", "-g", "remain-on-exit", "on", ";",
                  "new-session", "-d", "-s", self.name, "-x", "200", "-y", "50",
                  self.command)  # fmt: skip
        return self

    def screen(self) -> str:
        """Everything the pane showed (history included), wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", line)
        self.tmux("send-keys", "-t", self.name, "Enter")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        return poll_until(
            lambda: re.search(pattern, self.screen()),
            timeout,
            what,
            detail=lambda: f"screen:\n{self.screen()[-3000:]}",
            max_interval=0.05,
        )

    def prompts(self) -> int:
        return len(PROMPT_LINE.findall(self.screen()))

    def run(self, line: str, timeout: float = 15.0) -> str:
        """Type ``line`` at the prompt; its output once the next prompt shows."""
        before = self.prompts()
        self.type(line)
        poll_until(
            lambda: self.prompts() > before,
            timeout,
            f"the prompt after {line!r}",
            detail=lambda: f"screen:\n{self.screen()[-3000:]}",
            max_interval=0.05,
        )
        chunks = PROMPT_LINE.split(self.screen())
        return chunks[before].split("\n", 1)[1] if "\n" in chunks[before] else ""

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=10, check=False)  # fmt: skip
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def pane(log_dir: Path) -> Iterator[TmuxPane]:
    # the pane's shell reports the exit status on screen (tmux 3.3 can miss the exit of a
    # pane's only process for a long time, so pane_dead is not reliable)
    command = (f"cd {REPO_ROOT} && {PYTHON} -m qtests.shell --qtest --log-dir {log_dir};"
               ' echo "[shell exited with $?]"')  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="vdpa-tmux-"))  # short: a unix socket path
    p = TmuxPane("shell", command, run_dir / "tmux.sock")
    try:
        p.start()
        yield p
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            (log_dir / "screen.txt").write_text(p.screen())
        p.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"processes still running after quit: {alive}"


def test_interactive_session_in_a_terminal(pane: TmuxPane) -> None:
    pane.wait_for(r"(?m)^\(vdpa\)", 30, "the shell's first prompt")
    screen = pane.screen()
    qemu_pid, backend_pid = map(int, PIDS.search(screen).groups())  # type: ignore[union-attr]
    assert re.search(r"QEMU QMP: /\S+qmp-user\.sock", screen), screen
    assert re.search(r"backend monitor: /\S+-mon\.sock\n\s+\S*qmp-shell /\S+-mon\.sock", screen)
    assert Path(f"/proc/{qemu_pid}").exists() and Path(f"/proc/{backend_pid}").exists()

    out = pane.run("vrings")
    assert re.search(r"index\s+ready\s+started\s+num", out), out
    assert re.search(r"(?m)^\s+0\s+yes\s+yes\s+256\s", out), out  # rx0 runs
    assert re.search(r"(?m)^\s+1\s+yes\s+yes\s+256\s", out), out  # tx0 runs

    out = pane.run("mem-table")
    assert re.search(r"id\s+gpa\s+size\s+uaddr\s+mmap_offset", out), out
    assert re.search(r"(?m)^\s*\d+\s+0x100000\s+511M\s+0x[0-9a-f]+", out), out  # RAM above 1M

    mark = int(re.search(r"mark: journal seq (\d+)", pane.run("mark")).group(1))  # type: ignore[union-attr]

    out = pane.run("inject")
    assert "injected 64 bytes on queue pair 0: queued" in out, out
    assert "driver received 64 bytes on rx0 (test frame stream 0 seq 1, intact)" in out, out

    assert "fault drop-tx active" in pane.run("fault-set drop-tx")
    assert re.search(r"(?m)^\*\s+drop-tx\s", pane.run("faults"))
    assert "fault drop-tx cleared" in pane.run("fault-clear drop-tx")

    out = pane.run("journal")  # what happened since the mark: the fault went on and off
    assert re.search(rf"journal since mark {mark}: \d+ entries", out), out
    kinds = re.findall(r"(?m)^\s*\d+ (\S+)\s+name=drop-tx", out)
    assert kinds == ["fault.set", "fault.clear"], out

    out = pane.run("qemu query-status")
    assert json.loads(out) == {"status": "running", "running": True}

    faults = json.loads(pane.run("backend query-faults"))
    assert faults["active"] == []
    assert "drop-tx" in {f["name"] for f in faults["known"]}

    out = pane.run("console")
    assert "error: no guest console in qtest mode" in out, out

    pane.type("quit")
    exited = pane.wait_for(r"\[shell exited with (\d+)\]", 30, "the shell to exit after quit")
    assert exited.group(1) == "0"
    screen = pane.screen()
    assert f"stopped QEMU (pid {qemu_pid}, exit 0)" in screen, screen[-2000:]
    assert f"stopped backend (pid {backend_pid}, exit 0)" in screen, screen[-2000:]
    assert_gone([qemu_pid, backend_pid])


def run_batch(
    commands: list[str],
    log_dir: Path,
    *extra: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    proc = subprocess.run([PYTHON, "-m", "qtests.shell", "--log-dir", str(log_dir), *extra],
                          input="\n".join(commands) + "\n", capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, check=False, env=env)  # fmt: skip
    (log_dir / "transcript.txt").write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def all_pids(out: str) -> list[int]:
    return [int(p) for m in PIDS.finditer(out) for p in m.groups()]


def test_commands_on_stdin_hotplug_and_migration(log_dir: Path) -> None:
    rc, out = run_batch(["dimm-add 256M", "mem-table", "migrate", "inject", "dimms",
                         "dimm-del dimm1", "mem-table", "fault-set no-such-fault"],
                        log_dir, "--qtest")  # fmt: skip
    assert rc == 1, out  # the bad fault name failed; the rest worked
    assert "plugged dimm1: 256M at gpa 0x100000000 (slot 0)" in out, out
    assert re.search(r"(?m)^\s*\d+\s+0x100000000\s+256M\s", out), out  # in the backend's table
    assert re.search(r"migration completed in \d+ ms", out), out
    # the driver goes on against the destination: the frame injected there arrives
    assert "driver received 64 bytes on rx0 (test frame stream 0 seq 1, intact)" in out, out
    assert "unplugged dimm1 (gpa 0x100000000, 256M)" in out, out
    assert out.count("error:") == 1 and "error: QMP set-fault" in out, out
    assert len(all_pids(out)) >= 4, out  # source and destination processes
    assert_gone(all_pids(out))


@pytest.mark.slow
def test_real_guest_session(log_dir: Path) -> None:
    """A real guest behind the shell, booted by the QEMU ``$QTEST_QEMU_BINARY`` names (a
    recording wrapper: the one real-guest boot of the QEMU-choice checks in
    test_qemu_binary.py)."""
    try:  # built (or found cached) here: a failed build is no question of the shell
        guest_images.build(log=lambda _msg: None)
    except guest_images.BuildError as exc:  # e.g. not root and the apt lists are stale
        pytest.skip(f"cannot build the guest image: {exc}")
    wrapper = RecordingQemu.create(log_dir / "wrapper", find_qemu())
    env = {k: v for k, v in os.environ.items() if k not in QEMU_ENV_VARS}
    env["QTEST_QEMU_BINARY"] = str(wrapper.path)
    rc, out = run_batch(["guest cat /sys/class/net/eth0/operstate", "vrings", "inject",
                         "guest cat /sys/class/net/eth0/statistics/rx_packets",
                         "guest ping -c 1 -W 5 10.0.0.1", "dimm-add", "mem-table"],
                        log_dir, timeout=180, env=env)  # fmt: skip
    assert rc == 0, out
    (guest,) = wrapper.machines()
    assert " -kernel " in f" {guest} ", guest
    assert re.search(r"guest console: /\S+guest-console\.sock\n\s+socat ", out), out
    assert "(vdpa) guest cat /sys/class/net/eth0/operstate\nup\n" in out, out
    assert "1 packets transmitted, 1 packets received" in out, out
    assert re.search(r"plugged dimm1: 128M at gpa 0x100000000", out), out
    assert re.search(r"(?m)^\s*\d+\s+0x100000000\s+128M\s", out), out
    assert_gone(all_pids(out))
