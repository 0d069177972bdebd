"""Plain avocado, as an avocado user types it, from the checkout with nothing set.

``avocado list avocado_tests/`` finds every test (the suite's modules import
``avocado_tests.*``: the set-up puts the checkout on the venv's path, so avocado's resolver
follows those imports); ``-t`` filters as avocado documents it (``a,b`` both, repeated either)
and ``run.py --ci -t A`` means both; ``-p`` reaches the tests; and ``avocado run`` of one real
guest boot uses the QEMU ``$QTEST_QEMU_BINARY`` names (a wrapper that records its runs).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from avocado import Test

import guest_images
from avocado_tests.run import tag_filters
from qtests.qemu_wrapper import QEMU_ENV_VARS, RecordingQemu
from qtests.qos.machine import find_qemu

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = REPO_ROOT / "avocado_tests"
AVOCADO = Path(sys.executable).with_name("avocado")
TAGS = re.compile(r":avocado:\s*tags=(\S+)")

pytestmark = pytest.mark.skipif(not AVOCADO.exists(), reason=f"no {AVOCADO}")


def plain_env(**extra: str) -> dict[str, str]:
    """A fresh shell's environment: no PYTHONPATH, no QEMU choice unless given."""
    drop = {"PYTHONPATH", *QEMU_ENV_VARS}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def expected_tests() -> dict[str, set[str]]:
    """{"avocado_tests/test_x.py:Class.test_y": tags} for every avocado test class defined in
    the suite's modules (by importing them, independently of avocado's resolver)."""
    found: dict[str, set[str]] = {}
    for path in sorted(SUITE.glob("test_*.py")):
        module = importlib.import_module(f"avocado_tests.{path.stem}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, Test):
                continue
            tags = set()  # avocado merges the tags of the classes a test class derives from
            for klass in cls.__mro__:
                m = TAGS.search(klass.__dict__.get("__doc__") or "")
                tags |= set(m.group(1).split(",")) if m else set()
            for method in dir(cls):
                fn = getattr(cls, method)
                if method.startswith("test") and callable(fn):
                    # and the tags of the method's own docstring (also an inherited method's)
                    m = TAGS.search(fn.__doc__ or "")
                    own = set(m.group(1).split(",")) if m else set()
                    found[f"avocado_tests/{path.name}:{name}.{method}"] = tags | own
    return found


def avocado_list(*args: str) -> set[str]:
    proc = subprocess.run([str(AVOCADO), "list", *args, "avocado_tests/"], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=plain_env(), timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {
        line.split()[1]
        for line in proc.stdout.splitlines()
        if line.startswith("avocado-instrumented ")
    }


def test_plain_avocado_list_finds_every_test() -> None:
    expected = expected_tests()
    assert len(expected) >= 10, expected  # the suite is there at all
    assert avocado_list() == set(expected)


def test_tags_as_avocado_documents_them_and_ci_intersects() -> None:
    expected = expected_tests()
    assert tag_filters(["selfcheck"], ci=True) == ["ci,selfcheck"]
    assert tag_filters([], ci=True) == ["ci"]
    assert tag_filters(["net", "boot"], ci=True) == ["ci,net", "ci,boot"]
    assert tag_filters(["net,udp"], ci=False) == ["net,udp"]

    def having(*need: str) -> set[str]:
        return {t for t, tags in expected.items() if set(need) <= tags}

    filters = [a for f in tag_filters(["selfcheck"], ci=True) for a in ("-t", f)]
    both = avocado_list(*filters)
    assert both == having("ci", "selfcheck") and both, both  # not every ci test: both tags
    assert avocado_list("-t", "viommu", "-t", "boot") == having("viommu") | having("boot")
    # method tags: the fault variants run under `make avocado`, never in the CI subset
    faults = avocado_list("-t", "fault")
    assert faults == having("fault") and faults, faults
    assert not faults & avocado_list("-t", "ci"), faults


def test_parameters_reach_the_tests(tmp_path: Path) -> None:
    """``-p netdev=...`` is read in setUp: an invalid value errors there, before any boot."""
    proc = subprocess.run([str(AVOCADO), "run", "--disable-sysinfo", "--job-results-dir",
                           str(tmp_path), "-p", "netdev=no-such-netdev",
                           "avocado_tests/test_boot.py:BootLinkUp.test_link_up"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=plain_env(),
                          timeout=300, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    (results,) = tmp_path.glob("job-*/results.json")
    (test,) = json.loads(results.read_text())["tests"]
    assert test["status"] == "ERROR", test
    assert "netdev parameter must be vhost-user or dgram, not 'no-such-netdev'" in str(
        test.get("fail_reason")
    ), test


@pytest.mark.slow
@pytest.mark.qemu
def test_plain_avocado_run_boots_with_qtest_qemu_binary(tmp_path: Path) -> None:
    try:  # what the test's setUp would do; built here, a build failure is no QEMU question
        guest_images.build(log=lambda _msg: None)
    except guest_images.BuildError as exc:  # e.g. not root and the apt lists are stale
        pytest.skip(f"cannot build the guest image: {exc}")
    wrapper = RecordingQemu.create(tmp_path / "wrapper", find_qemu())
    proc = subprocess.run([str(AVOCADO), "run", "--disable-sysinfo", "--max-parallel-tasks", "1",
                           "--job-results-dir", str(tmp_path / "results"),
                           "avocado_tests/test_boot.py:BootLinkUp.test_link_up"],
                          capture_output=True, text=True, cwd=REPO_ROOT,
                          env=plain_env(QTEST_QEMU_BINARY=str(wrapper.path)),
                          timeout=600, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    (tmp_path / "avocado-output.txt").write_text(out)
    assert proc.returncode == 0, out
    (results,) = (tmp_path / "results").glob("job-*/results.json")
    summary = json.loads(results.read_text())
    assert (summary["pass"], summary["total"]) == (1, 1), summary
    (guest,) = wrapper.machines()
    assert " -kernel " in f" {guest} ", guest


def test_runner_passes_ci_and_t_as_one_filter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``python -m avocado_tests.run --ci -t net`` asks avocado for tests tagged ci AND net."""
    import avocado_tests.run as runner

    seen: list[list[str]] = []

    class NoAvocado:  # stands in for the avocado process: records its command line, runs nothing
        def __init__(self, cmd: list[str], **_kw: object) -> None:
            seen.append(cmd)
            self.stdout: list[str] = []

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(runner, "use_qemu", lambda binary: binary or "qemu-system-x86_64")
    monkeypatch.setattr(runner, "build", lambda *_a, **_k: guest_images_stub())
    monkeypatch.setattr(subprocess, "Popen", NoAvocado)
    # no job ran, so run.py says "found no tests" (exit 2) after building the command
    assert runner.main(["--ci", "-t", "net", "--results", str(tmp_path)]) == 2
    (cmd,) = seen
    filters = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--filter-by-tags"]
    assert filters == ["ci,net"], cmd


def guest_images_stub() -> object:
    class Image:
        key, cached, kernel, initrd = "stub", True, "vmlinuz", "initrd"

    return Image()
