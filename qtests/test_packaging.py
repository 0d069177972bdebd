"""The package as a user installs it: ``pip install .`` into a fresh venv.

The base install needs nothing beyond the standard library (installed with ``--no-deps``; its
metadata requires nothing outside the extras) and ``vdpa-backend --help`` runs; with the
``shell`` extra's requirements, ``vdpa-shell --help`` runs and a qtest-mode session writes its
logs under the current directory, never into the install tree. The wheel carries the guest
image recipe's files and the licence text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtests.qos.machine import find_qemu

REPO_ROOT = Path(__file__).resolve().parent.parent
#: not part of a source tree a user would install from
NOT_SOURCE = (".venv", ".git", "build", "test-logs", "*.egg-info", "__pycache__",
              ".pytest_cache", ".ruff_cache", ".mypy_cache", "results")  # fmt: skip

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out}"
    return out


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install --no-deps .`` of a copy of the source tree."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    pip_install(venv / "bin" / "python", "--no-deps", src, cwd=base)
    return venv


def pip_install(python: Path, *args: str | Path, cwd: Path) -> None:
    """``pip install`` into the venv of ``python``, by this venv's pip (``pip --python``):
    the venv is made without its own pip, which would cost seconds of ensurepip per run."""
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", *args, cwd=cwd)


def site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def metadata(venv: Path, expr: str) -> object:
    out = run(venv / "bin" / "python", "-c",
              f"import importlib.metadata as m, json; print(json.dumps({expr}))", cwd=venv)  # fmt: skip
    return json.loads(out)


def test_base_install_needs_only_the_standard_library(installed: Path) -> None:
    requires = metadata(installed, "m.requires('vdpa-qtest') or []")
    assert isinstance(requires, list)
    assert all("extra ==" in r for r in requires), f"base requirements: {requires}"
    out = run(installed / "bin" / "vdpa-backend", "--help", cwd=installed)
    assert "--socket" in out and "--fault" in out, out


def test_wheel_carries_the_recipe_files_and_the_licence(installed: Path) -> None:
    site = site_packages(installed)
    for name in ("init.sh", "udpseq.c"):
        shipped = site / "guest_images" / name
        assert shipped.read_bytes() == (REPO_ROOT / "guest_images" / name).read_bytes(), name
    # the recipe reads them where it is installed (the image key covers both)
    run(installed / "bin" / "python", "-c", "from guest_images.builder import recipe_hash; "
        "recipe_hash()", cwd=installed)  # fmt: skip
    (licence,) = site.glob("vdpa_qtest-*.dist-info/licenses/LICENSE")
    text = licence.read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text
    assert text == (REPO_ROOT / "LICENSE").read_text()
    assert metadata(installed, "m.metadata('vdpa-qtest')['License-Expression']") == (
        "GPL-2.0-or-later"
    )


@pytest.mark.qemu
def test_shell_with_its_extra_runs_and_logs_under_the_current_directory(
    installed: Path, tmp_path: Path
) -> None:
    python = installed / "bin" / "python"
    extra = metadata(
        installed,
        "[r.split(';')[0] for r in m.requires('vdpa-qtest') if 'extra == \"shell\"' in r]",
    )
    assert isinstance(extra, list) and extra, "no shell extra declared"
    pip_install(python, *extra, cwd=installed)
    out = run(installed / "bin" / "vdpa-shell", "--help", cwd=tmp_path)
    assert "--qtest" in out and "--qemu" in out, out

    site = site_packages(installed)
    before = files_under(site)
    batch = tmp_path / "batch.txt"
    batch.write_text("vrings\n")
    out = run(installed / "bin" / "vdpa-shell", "--qtest", "--qemu", find_qemu(), "--batch",
              batch, cwd=tmp_path, timeout=180)  # fmt: skip
    (log_dir,) = (tmp_path / "test-logs" / "shell").iterdir()
    assert f"logs: {log_dir}" in out, out
    assert (log_dir / "shell.log").exists() and (log_dir / "backend.log").exists()
    assert files_under(site) == before, "the installed shell wrote into the install tree"
