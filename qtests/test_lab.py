"""The lab runner itself (on the host): L1 runs a command and brings back its results; an L1
that does not boot fails with the reason named and its console log kept.

These boot L1 (a few seconds each under TCG); they skip only where the lab cannot run at all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from guest_images import lab as image
from qtests.lab import host
from qtests.lab.lane import InnerResult, inner_command, read_results
from qtests.lab.vm import LabBootError, run_in_lab
from qtests.qemu_wrapper import RecordingQemu
from qtests.qos.machine import find_qemu

REPO = Path(__file__).resolve().parents[1]

_LAB_PROBLEM = "we are inside the lab" if host.inside_lab() else host.lab_problem()
needs_lab = pytest.mark.skipif(
    _LAB_PROBLEM is not None, reason=f"the lab cannot run here: {_LAB_PROBLEM}"
)


@needs_lab
@pytest.mark.qemu
@pytest.mark.lab
def test_lab_runs_a_command_in_the_host_root_under_qtest_qemu_binary(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L1 runs a script in the host's root (the checkout, its venv, stdout, stderr, exit
    status, files in the share) and $QTEST_QEMU_BINARY picks the QEMU that boots L1, and the
    lane hands the same binary to the L2 QEMUs inside it. The recording wrapper lives in the
    writable share, so runs made inside L1 are recorded too. (One boot for both: each costs
    seconds of TCG.)"""
    workdir = log_dir / "lab"
    wrapper = RecordingQemu.create(workdir / "share" / "qemu", find_qemu())
    monkeypatch.setenv("QTEST_QEMU_BINARY", str(wrapper.path))
    exports = [
        line
        for line in inner_command([], REPO, sys.executable, find_qemu()).splitlines()
        if line.startswith("export QTEST_QEMU_BINARY=")
    ]
    assert exports, "the lane does not hand its QEMU to L1"
    script = "\n".join(
        [
            f"cd {REPO}",
            'echo "cwd=$(pwd) inside=$VDPA_LAB_INSIDE"',
            *exports,
            f'{sys.executable} -c \'import qtests.lab; print("venv ok"); '
            "from qtests.qos.machine import find_qemu, require_qemu; "
            'require_qemu(); print("inner qemu", find_qemu())\'',
            'echo "to stderr" >&2',
            'uname -r > "$VDPA_LAB_SHARE/uname"',
            "exit 7",
        ]
    )
    result = run_in_lab(script, workdir)
    assert result.rc == 7, result
    assert f"cwd={REPO} inside=1" in result.stdout
    assert "venv ok" in result.stdout
    assert result.stderr == "to stderr\n"
    assert (result.share / "uname").read_text().strip().endswith("-amd64"), "not L1's kernel"
    assert image.DONE_MARKER + " rc=7" in result.console_log.read_text()
    assert 0 < result.boot_seconds < result.total_seconds
    assert f"inner qemu {wrapper.path}" in result.stdout
    assert any(" -kernel " in f" {r} " for r in wrapper.machines()), wrapper.runs()
    assert "--version" in wrapper.runs(), "the version check inside L1 ran another QEMU"


@needs_lab
@pytest.mark.qemu
@pytest.mark.lab
def test_lab_kernel_panic_is_named_and_console_kept(log_dir: Path) -> None:
    with pytest.raises(LabBootError) as err:
        run_in_lab("true", log_dir / "lab", kernel_args=["rdinit=/no-such-init"])
    assert err.value.reason.startswith("L1 kernel panic: Kernel panic - not syncing")
    assert err.value.console_log.is_file()
    assert "Kernel panic" in err.value.console_log.read_text()


@needs_lab
@pytest.mark.qemu
@pytest.mark.lab
def test_lab_init_failure_is_named(log_dir: Path) -> None:
    # A later lab.share= wins: a path on the read-only root where the share cannot be mounted.
    with pytest.raises(LabBootError) as err:
        run_in_lab("true", log_dir / "lab", kernel_args=["lab.share=/proc/no-such-dir"])
    assert "L1's /init failed: mount of the writable share" in err.value.reason
    assert image.FAILED_MARKER in err.value.console_log.read_text()


@needs_lab
@pytest.mark.qemu
@pytest.mark.lab
def test_lab_boot_timeout_names_the_marker(log_dir: Path) -> None:
    with pytest.raises(LabBootError) as err:
        run_in_lab("true", log_dir / "lab", boot_timeout=0.2)
    assert f"waiting for {image.READY_MARKER}" in err.value.reason
    assert err.value.console_log.is_file()


# -- the lane's bookkeeping (no VM) -------------------------------------------------------------
def _rec(nodeid: str, when: str, outcome: str, text: str = "") -> str:
    return json.dumps(
        {"kind": "test", "nodeid": nodeid, "when": when, "outcome": outcome,
         "longrepr": text, "duration": 0.1, "sections": [], "wasxfail": None}
    )  # fmt: skip


def test_lane_results_merge_phases(tmp_path: Path) -> None:
    lines = [
        _rec("a", "setup", "passed"), _rec("a", "call", "passed"), _rec("a", "teardown", "passed"),
        _rec("b", "setup", "passed"), _rec("b", "call", "failed", "E   boom"),
        _rec("b", "teardown", "passed"),
        _rec("c", "setup", "skipped", "no device"),
        _rec("d", "setup", "passed"), _rec("d", "call", "passed"),
        _rec("d", "teardown", "failed", "E   leak"),
        json.dumps({"kind": "collect", "nodeid": "qtests/x.py", "longrepr": "ImportError"}),
        json.dumps({"kind": "log_dir", "nodeid": "b", "path": "/s/test-logs/qtests_t.py_b"}),
        '{"kind": "test", "nodeid": "cut sh',  # a line cut short by a killed L1
    ]  # fmt: skip
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    results, collect_errors = read_results(path, ["a", "b", "c", "d", "e"])
    assert {n: r.outcome for n, r in results.items()} == {
        "a": "passed", "b": "failed", "c": "skipped", "d": "failed", "e": "missing"
    }  # fmt: skip
    assert results["b"].text == "E   boom"
    assert results["d"].text == "error in teardown: E   leak"
    assert results["c"].text == "no device"
    assert results["b"].log_dir_name == "qtests_t.py_b" and results["a"].log_dir_name == ""
    assert collect_errors == ["qtests/x.py: ImportError"]
    assert read_results(tmp_path / "absent", ["a"])[0]["a"] == InnerResult("a")


def test_lane_inner_command_runs_exactly_the_given_tests() -> None:
    script = inner_command(["qtests/t.py::test_a[x y]", "qtests/t.py::test_b"], REPO, "/py")
    assert f"cd {REPO}\n" in script
    assert "'qtests/t.py::test_a[x y]' qtests/t.py::test_b" in script
    assert "-p qtests.lab.inner_report" in script and "-p no:cacheprovider" in script
    assert 'QOS_LOG_DIR="$VDPA_LAB_SHARE/test-logs"' in script


def test_kept_host_paths_name_what_l1s_tmpfs_would_hide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout, venv or QEMU under /tmp, /run or /var/tmp is passed as lab.keep= (L1 mounts
    its own tmpfs there, a clean clone in /tmp would be invisible); anything elsewhere is not;
    a parent covers its children."""
    from guest_images.builder import GuestImage
    from qtests.lab import vm

    assert str(tmp_path.resolve()).startswith(vm.L1_TMPFS_DIRS), "pytest's tmp_path is in /tmp"
    monkeypatch.setattr(vm, "REPO_ROOT", tmp_path / "checkout")
    qemu = tmp_path / "qemu" / "build" / "qemu-system-x86_64"
    kept = vm.kept_host_paths(str(qemu), extra=(tmp_path / "checkout" / "sub",))
    root = str(tmp_path.resolve())
    assert f"{root}/checkout" in kept and f"{root}/qemu/build" in kept, kept
    assert f"{root}/checkout/sub" not in kept, "covered by its parent"
    assert vm.kept_host_paths(str(qemu), extra=(tmp_path,))[-1] == root
    img = GuestImage(directory=tmp_path, manifest={}, cached=True)
    argv = vm.qemu_command(str(qemu), img, tmp_path / "share", 512, [])
    append = argv[argv.index("-append") + 1]
    assert f"lab.keep={','.join(vm.kept_host_paths(str(qemu)))}" in append.split(), append


def test_lane_shards_alternate_and_the_scheduler_cuts_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under xdist the lane is cut into shards, one L1 each: neighbouring lane tests go to
    different shards, other tests are untouched, and the scheduler's scopes (conftest) follow
    the same cut, so each worker's L1 runs exactly the lane tests it was sent."""
    import conftest
    from qtests.lab.plugin import lane_shard, lane_shards, usable_cpus

    collection = [
        "qtests/test_a.py::test_one",
        "qtests/test_vdpa_x.py::test_p",
        "qtests/test_datapath.py::test_tx[vhost-user]",
        "qtests/test_datapath.py::test_tx[vhost-vdpa]",
        "qtests/test_vdpa_x.py::test_q",
        "qtests/test_vdpa_x.py::test_r",
    ]
    lane = [n for n in collection if "vdpa" in n and "vhost-user" not in n]
    assert [lane_shard(n, collection, 2) for n in lane] == [0, 1, 0, 1]
    assert [lane_shard(n, collection, 1) for n in lane] == [0, 0, 0, 0]
    monkeypatch.setenv("VDPA_LANE_SHARDS", "2")
    assert lane_shards() == 2
    scopes = [conftest.xdist_scope(n, collection) for n in collection]
    assert scopes == [
        "qtests/test_a.py::test_one",
        "vdpa-lane-0",
        "qtests/test_datapath.py::test_tx[vhost-user]",
        "vdpa-lane-1",
        "vdpa-lane-0",
        "vdpa-lane-1",
    ]
    assert lane_shards(workers=1) == 1  # never more L1s than workers
    assert {conftest.xdist_scope(n, collection, 1) for n in lane} == {"vdpa-lane"}
    monkeypatch.setenv("VDPA_LANE_SHARDS", "1")
    assert {conftest.xdist_scope(n, collection) for n in lane} == {"vdpa-lane"}
    monkeypatch.delenv("VDPA_LANE_SHARDS")
    assert 1 <= lane_shards() <= usable_cpus()


def test_workers_lane_summaries_reach_the_controller() -> None:
    """Under xdist each worker's lane run reports through ``workeroutput``; the controller
    prints each line once (the lines used to be lost under ``make check``)."""
    from types import SimpleNamespace

    from qtests.lab import plugin

    config = SimpleNamespace(stash=pytest.Stash())
    line = "vdpa lane in the lab: 32 test(s), lane 212.6 s (logs: test-logs/vdpa-lab)"
    for lines in ([line], [line], [], None):
        node = SimpleNamespace(config=config, workeroutput={"vdpa_lane_summary": lines})
        plugin.pytest_testnodedown(node, None)
    written: list[str] = []
    plugin.pytest_terminal_summary(SimpleNamespace(write_line=written.append), config)  # type: ignore[arg-type]
    assert written == [line]
