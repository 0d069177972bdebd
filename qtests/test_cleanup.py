"""Every suite leaves no QEMU or backend process behind, even when a test fails.

Generated test files run in a separate ``pytest`` process with the suite's fixtures
(``-p qtests.conftest``) and a private ``QOS_LOG_DIR``; their tests fail on purpose (an
assertion, an unexpected exception with the VM stopped, a QEMU that fails to launch after the
backend started). Afterwards no ``qemu-system-*`` or ``python -m backends`` process whose command
line names that log root may remain (``/proc/*/cmdline``; nothing is killed by name), and each
test's log directory holds QEMU's stderr and qtest log, the backend's log and its journal.
A generated test that leaks a backend on purpose shows the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtests.qos.backend_process import REPO_ROOT, backend_python
from qtests.qos.testbed import Testbed
from qtests.qos.waiting import poll_until

pytestmark = pytest.mark.qemu

RUN_TIMEOUT = 60.0


def processes_referencing(path: str | Path) -> list[tuple[int, str]]:
    """Live QEMU / backend processes whose command line mentions ``path``: (pid, cmdline)."""
    needle = str(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if not raw:  # a zombie or a kernel thread
            continue
        cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        if needle in cmd and ("qemu-system" in cmd or "-m backends" in cmd):
            found.append((int(entry.name), cmd))
    return found


def assert_no_leftovers(path: str | Path) -> None:
    left = processes_referencing(path)
    assert not left, f"processes left behind for {path}: " + "; ".join(
        f"pid {pid}: {cmd[:200]}" for pid, cmd in left
    )


FAILING_TESTS = '''
import json
import os
from pathlib import Path

import pytest

from qtests.qos.frames import make_frame, parse_frame
from qtests.test_cleanup import processes_referencing


def _record(tb, name):
    """What was running for this test, as the leak scan saw it (proves the scan sees them)."""
    root = os.environ["QOS_LOG_DIR"]
    seen = sorted(pid for pid, _ in processes_referencing(root))
    info = {"qemu": tb.machine.pid if tb.machine else None, "backend": tb.backend.pid,
            "seen": seen}
    Path(os.environ["CLEANUP_RECORD_DIR"], name + ".json").write_text(json.dumps(info))


@pytest.mark.qemu
def test_fails_on_assertion(testbed):
    _record(testbed, "assertion")
    testbed.net.send(make_frame(1, 100))
    assert parse_frame(testbed.peer.recv()) == (0, 2), "deliberate assertion failure"


@pytest.mark.qemu
def test_raises_mid_test(testbed):
    testbed.qmp.command("stop")
    _record(testbed, "exception")
    raise RuntimeError("deliberate unexpected exception")


@pytest.mark.qemu
def test_qemu_launch_fails_after_backend_started(make_testbed):
    tb = make_testbed(net_props={"rx_queue_size": 3})  # QEMU refuses it
    tb.start_backend()
    _record(tb, "launch")
    tb.start_qemu()
'''

# A leak the harness cannot prevent: a backend spawned around it (BackendProcess children die
# with the runner through PR_SET_PDEATHSIG, so the leak is made with a plain Popen).
LEAKING_TEST = """
import os
import subprocess
from pathlib import Path

from qtests.qos.backend_process import BackendProcess


def test_leaks_a_backend(log_dir):
    record = Path(os.environ["CLEANUP_RECORD_DIR"])
    cmd = BackendProcess(log_dir, run_dir=record).command()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    (record / "leaked.pid").write_text(str(p.pid))
"""


# The runner itself dies (SIGKILL: no teardown, no atexit) while QEMU and the backend run.
KILLED_RUNNER_TEST = """
import json
import os
import signal
from pathlib import Path


def test_runner_is_killed(testbed):
    record = Path(os.environ["CLEANUP_RECORD_DIR"])
    pids = [testbed.machine.pid, testbed.backend.pid]
    (record / "killed.json").write_text(json.dumps(pids))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_pytest(source: str, workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``source`` as a test file in a separate pytest; returns (result, log root)."""
    test_file = workdir / "test_generated.py"
    test_file.write_text(textwrap.dedent(source))
    log_root = workdir / "logs"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "QOS_LOG_DIR": str(log_root),
        "CLEANUP_RECORD_DIR": str(workdir),
    }
    cmd = [
        backend_python(), "-m", "pytest", str(test_file), "-q", "-p", "qtests.conftest",
        "-p", "no:cacheprovider", "-c", str(REPO_ROOT / "pyproject.toml"),
        "--rootdir", str(workdir),
    ]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    return result, log_root


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Short private directory (backend sockets live in it for the leak test)."""
    path = Path(tempfile.mkdtemp(prefix="qos-cl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _test_log_dir(log_root: Path, test_name: str) -> Path:
    dirs = [d for d in log_root.iterdir() if d.name.endswith(test_name)]
    assert len(dirs) == 1, f"log dirs for {test_name}: {sorted(log_root.iterdir())}"
    return dirs[0]


def test_failing_tests_leave_no_process_behind(workdir: Path) -> None:
    result, log_root = run_pytest(FAILING_TESTS, workdir)
    out = result.stdout + result.stderr
    assert result.returncode == 1, f"pytest exit {result.returncode}:\n{out[-3000:]}"
    assert "3 failed" in out, out[-3000:]
    assert "deliberate assertion failure" in out
    assert "RuntimeError: deliberate unexpected exception" in out
    assert "Invalid rx_queue_size" in out  # QEMU's own complaint, from its stderr
    assert_no_leftovers(log_root)

    for name, test in (
        ("assertion", "test_fails_on_assertion"),
        ("exception", "test_raises_mid_test"),
        ("launch", "test_qemu_launch_fails_after_backend_started"),
    ):
        seen = json.loads((workdir / f"{name}.json").read_text())
        running = [p for p in (seen["qemu"], seen["backend"]) if p is not None]
        assert running and set(running) <= set(seen["seen"]), (name, seen)
        logs = _test_log_dir(log_root, test)
        files = {p.name for p in logs.iterdir()}
        want = {"backend.log", "backend-journal.jsonl"}
        want |= {"qemu.stderr"} if name == "launch" else {"qemu.stderr", "qemu.qtest.log"}
        assert want <= files, f"{logs}: {sorted(files)}"
        journal = (logs / "backend-journal.jsonl").read_text().splitlines()
        assert journal and json.loads(journal[0])["kind"], f"{logs}: empty journal"
        if name != "launch":
            assert (logs / "qemu.qtest.log").stat().st_size > 0


def test_leak_check_catches_a_leaked_backend(workdir: Path) -> None:
    result, log_root = run_pytest(LEAKING_TEST, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pid = int((workdir / "leaked.pid").read_text())
    try:
        with pytest.raises(AssertionError, match=f"pid {pid}"):
            assert_no_leftovers(log_root)
    finally:
        if any(p == pid for p, _ in processes_referencing(log_root)):
            os.kill(pid, signal.SIGKILL)  # the leak we caused on purpose, by its pid
    poll_until(
        lambda: not processes_referencing(log_root), 10, f"the leaked backend (pid {pid}) to go"
    )


def test_a_killed_runner_takes_qemu_and_the_backend_with_it(workdir: Path) -> None:
    result, log_root = run_pytest(KILLED_RUNNER_TEST, workdir)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]
    qemu, backend = json.loads((workdir / "killed.json").read_text())
    assert qemu and backend, "the inner test did not record its QEMU and backend"
    poll_until(
        lambda: not processes_referencing(log_root),
        10,
        f"QEMU (pid {qemu}) and the backend (pid {backend}) to die with their killed runner",
        detail=lambda: str(processes_referencing(log_root)),
    )


def test_testbed_sockets_fit_a_long_log_dir(tmp_path: Path) -> None:
    """Regression: the backend's unix sockets used to live in the log dir, and a long test id
    made the path exceed 108 bytes ("AF_UNIX path too long"). They now go to a short private
    run dir, which close() removes."""
    log_dir = tmp_path / ("very-long-test-id-" * 8)
    log_dir.mkdir()
    tb = Testbed(log_dir)
    try:
        backend = tb.start_backend()
        assert tb.run_dir is not None
        assert len(backend.monitor_path) < 108 and len(backend.socket) < 108
        assert backend.cmd("query-status")["connection"]["connected"] is False
    finally:
        tb.close()
    assert not tb.run_dir.exists()
    assert_no_leftovers(log_dir)
