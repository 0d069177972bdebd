"""One QEMU choice for every part: ``$QTEST_QEMU_BINARY`` (or ``--qemu``), through
``qtests.qos.machine.find_qemu``.

The order of the variables, the version check, the accelerator choice (``-accel qtest`` when
the binary has it) on fake binaries; then the qtest driver, the shell, bench and the set-up
script pointed at a second QEMU (a wrapper around the real one that records each run), each
checked to have run that binary. (The avocado suite: ``avocado_tests/unit/test_plain_avocado.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qtests.qemu_wrapper import QEMU_ENV_VARS, RecordingQemu
from qtests.qos.machine import (
    QemuMachine,
    QemuNotFound,
    QemuTooOld,
    find_qemu,
    qemu_accelerators,
    qtest_accel,
    require_qemu,
)
from qtests.qos.testbed import Testbed

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def fake_qemu(path: Path, version: str = "10.1.50", accels: tuple[str, ...] = ("tcg",)) -> str:
    """An executable that answers ``--version`` and ``-accel help`` like a QEMU build would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    listing = "\\n".join(["Accelerators supported in QEMU binary:", *accels])
    path.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  --version) printf "QEMU emulator version {version} (v{version}-dirty)\\n";;\n'
        f'  "-accel help") printf "{listing}\\n";;\n'
        "  *) exit 1;;\n"
        "esac\n"
    )
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in QEMU_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def wrapper(tmp_path: Path) -> RecordingQemu:
    """A recording wrapper around the QEMU this suite runs with (its own choice, made before a
    test changes the environment)."""
    return RecordingQemu.create(tmp_path / "wrapper", find_qemu())


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in QEMU_ENV_VARS}
    env.update(extra)
    return env


# ------------------------------------------------------------------------- the choice itself
def test_variables_in_order_and_the_caller_first(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c, d = (fake_qemu(tmp_path / n / "qemu") for n in "abcd")
    clean_env.setenv("QTEST_QEMU_BINARY", a)
    clean_env.setenv("QEMU_TEST_QEMU_BINARY", b)
    clean_env.setenv("QOS_QEMU_BINARY", c)
    assert find_qemu() == a
    assert find_qemu(d) == d, "an explicit binary (a --qemu option) wins over the environment"
    clean_env.delenv("QTEST_QEMU_BINARY")
    assert find_qemu() == b
    clean_env.delenv("QEMU_TEST_QEMU_BINARY")
    assert find_qemu() == c  # the deprecated alias still works ...
    assert "QOS_QEMU_BINARY is deprecated" in capsys.readouterr().err  # ... and says so
    clean_env.delenv("QOS_QEMU_BINARY")
    clean_env.setenv("PATH", str(tmp_path / "d"))
    (tmp_path / "d" / "qemu-system-x86_64").symlink_to(d)
    assert find_qemu() == str(tmp_path / "d" / "qemu-system-x86_64")


def test_build_tree_path_with_tilde(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = fake_qemu(tmp_path / "qemu" / "build" / "qemu-system-x86_64")
    clean_env.setenv("HOME", str(tmp_path))
    clean_env.setenv("QTEST_QEMU_BINARY", "~/qemu/build/qemu-system-x86_64")
    assert find_qemu() == binary
    assert require_qemu() == (10, 1, 50)


def test_missing_binary_names_where_it_came_from(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("QTEST_QEMU_BINARY", str(tmp_path / "no-such-qemu"))
    with pytest.raises(QemuNotFound, match=r"no-such-qemu.*\$QTEST_QEMU_BINARY"):
        find_qemu()


def test_the_version_check_applies_to_the_chosen_binary(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = fake_qemu(tmp_path / "old" / "qemu", version="9.2.0")
    clean_env.setenv("QTEST_QEMU_BINARY", old)
    with pytest.raises(QemuTooOld, match=r"old/qemu is QEMU 9\.2\.0.*>= 10\.0"):
        require_qemu()
    with pytest.raises(QemuTooOld):
        QemuMachine(tmp_path / "logs")


def test_qtest_accelerator_when_the_binary_has_one(tmp_path: Path) -> None:
    built = fake_qemu(tmp_path / "built" / "qemu", accels=("tcg", "kvm", "qtest"))
    debian = fake_qemu(tmp_path / "debian" / "qemu", accels=("tcg", "kvm"))
    assert qemu_accelerators(built) == {"tcg", "kvm", "qtest"}
    assert (qtest_accel(built), qtest_accel(debian)) == ("qtest", "tcg")
    for binary, accel in ((built, "qtest"), (debian, "tcg")):
        machine = QemuMachine(tmp_path / "logs", binary=binary)
        cmd = machine.command_line()
        machine.shutdown()  # never launched: removes its socket directory
        assert cmd[cmd.index("-accel") + 1] == accel, cmd
        assert "-bios" in cmd  # the halting BIOS either way (harmless when no vCPU runs)


# ------------------------------------------------------------------------- every part follows
def test_qtests_follow_qtest_qemu_binary(
    clean_env: pytest.MonkeyPatch, wrapper: RecordingQemu, make_testbed: Callable[..., Testbed]
) -> None:
    clean_env.setenv("QTEST_QEMU_BINARY", str(wrapper.path))
    tb = make_testbed().start()
    assert tb.machine is not None and tb.machine.binary == str(wrapper.path)
    (run,) = wrapper.machines()
    assert f"-qtest-log {tb.machine.qtest_log_path}" in run, run
    assert tb.machine.is_running()


def shell(log_dir: Path, commands: list[str], *args: str, env: dict[str, str]) -> str:
    """``python -m qtests.shell`` with ``commands`` on stdin (``--qtest`` unless ``--guest``)."""
    mode = [] if "--guest" in args else ["--qtest"]
    args = tuple(a for a in args if a != "--guest")
    proc = subprocess.run([PYTHON, "-m", "qtests.shell", *mode, "--log-dir", str(log_dir),
                           *args], input="\n".join(commands) + "\n", capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=180, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    (log_dir / "transcript.txt").write_text(out)
    assert proc.returncode == 0, out
    return out


def test_shell_follows_the_qemu_option_also_after_migration(
    wrapper: RecordingQemu, log_dir: Path
) -> None:
    out = shell(log_dir, ["migrate"], "--qemu", str(wrapper.path), env=child_env())
    assert f"QEMU: {wrapper.path}" in out, out
    runs = wrapper.machines()
    assert len(runs) == 2, runs  # the source and the migration destination
    assert "-incoming defer" in runs[1], runs


def test_shell_follows_qtest_qemu_binary(wrapper: RecordingQemu, log_dir: Path) -> None:
    out = shell(log_dir, ["vrings"], env=child_env(QTEST_QEMU_BINARY=str(wrapper.path)))
    assert f"QEMU: {wrapper.path}" in out, out
    assert len(wrapper.machines()) == 1, wrapper.runs()


# The shell's real-guest mode under $QTEST_QEMU_BINARY: test_shell.py::test_real_guest_session
# (the same guest boot serves both checks).


@pytest.mark.slow
def test_bench_follows_the_qemu_option(wrapper: RecordingQemu, tmp_path: Path) -> None:
    out_dir = tmp_path / "bench"
    proc = subprocess.run([PYTHON, "-m", "bench", "--qemu", str(wrapper.path), "--only", "iotlb",
                           "--quick", "--no-dpdk", "--no-dpdk-install", "--no-plots",
                           "--out", str(out_dir)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=child_env(), timeout=600, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"QEMU: {wrapper.path}" in out, out
    report = json.loads((out_dir / "report.json").read_text())
    assert report.get("iotlb_miss_rtt_us") is not None, report  # the figure taken with QEMU
    assert len(wrapper.machines()) == 1, wrapper.runs()


@pytest.mark.skipif(
    not (REPO_ROOT / ".venv" / ".installed").exists(), reason="needs the checkout's set-up venv"
)
def test_setup_checks_the_chosen_binary_instead_of_installing(
    wrapper: RecordingQemu, tmp_path: Path
) -> None:
    def setup(binary: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "scripts/setup-host.sh"], capture_output=True, text=True,
                              cwd=REPO_ROOT, env=child_env(QTEST_QEMU_BINARY=binary),
                              timeout=300, check=False)  # fmt: skip

    ok = setup(str(wrapper.path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok: {wrapper.path}: QEMU emulator version" in ok.stdout, ok.stdout
    assert any(r == "--version" for r in wrapper.runs()), wrapper.runs()

    old = fake_qemu(tmp_path / "old" / "qemu-system-x86_64", version="9.2.0")
    refused = setup(old)
    assert refused.returncode != 0
    assert f"$QTEST_QEMU_BINARY names {old} (version 9.2)" in refused.stderr, refused.stderr
    assert "apt-get" not in refused.stdout  # nothing installed in its place
