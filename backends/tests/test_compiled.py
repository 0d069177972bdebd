"""The mypyc build of the hot-path modules is used only while it matches its sources, and
then as a whole (the compiled modules call each other natively)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends import compiled


def _fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stale: str | None = None) -> Path:
    """A build directory that looks current: an (empty) extension per module, the group's
    shared library and a stamp; ``stale`` names a module whose stamp line is wrong."""
    out = tmp_path / "compiled"
    monkeypatch.setattr(compiled, "OUT", out)
    monkeypatch.setattr(compiled, "STAMP", out / "STAMP")
    monkeypatch.delenv("VDPA_INTERPRETED", raising=False)
    for so in compiled._libraries():
        so.parent.mkdir(parents=True, exist_ok=True)
        so.write_bytes(b"")
    lines = []
    for m in compiled.MODULES:
        digest = "0" * 64 if m == stale else compiled._digest(compiled.REPO / m)
        lines.append(f"{m} {digest}\n")
    (out / "STAMP").write_text("".join(lines))
    return out / "lib"


@pytest.mark.parametrize("package", ["backends.vdpa", "backends.net"])
def test_current_build_goes_first_on_the_package_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    lib = _fake_build(tmp_path, monkeypatch)
    path = ["/src"]
    assert compiled.current()
    assert compiled.activate(path, package)
    assert path == [str(lib / package.replace(".", "/")), "/src"]


@pytest.mark.parametrize(
    "why", ["edited source", "edited source elsewhere", "forced interpreted", "other package",
            "missing library"],
)  # fmt: skip
def test_stale_or_unwanted_build_falls_back_to_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    stale = {
        "edited source": "backends/vdpa/iotlb.py",
        "edited source elsewhere": "backends/net/datapath.py",  # vdpa's modules are current
    }.get(why)
    _fake_build(tmp_path, monkeypatch, stale)
    if why == "forced interpreted":
        monkeypatch.setenv("VDPA_INTERPRETED", "1")
    if why == "missing library":
        compiled._libraries()[-1].unlink()  # the group's shared library
    package = "backends.vhost_user" if why == "other package" else "backends.vdpa"
    path = ["/src"]
    assert not compiled.activate(path, package)
    assert path == ["/src"]


def test_every_compiled_module_is_in_an_activating_package() -> None:
    """A module of the set whose package never calls activate would silently stay
    interpreted (and its group's native calls into it would break)."""
    for m in compiled.MODULES:
        init = compiled.REPO / Path(m).parent / "__init__.py"
        assert "activate(__path__, __name__)" in init.read_text(), init


def test_failed_build_leaves_the_interpreted_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mypyc refusing a module: no stamp, no libraries, the log kept, exit status 1."""
    out = tmp_path / "compiled"
    monkeypatch.setattr(compiled, "OUT", out)
    monkeypatch.setattr(compiled, "STAMP", out / "STAMP")
    fake_py = tmp_path / "bin" / "python"
    fake_py.parent.mkdir()
    fake_py.write_text("#!/bin/sh\necho 'error: mypyc says no' >&2\nexit 1\n")
    fake_py.chmod(0o755)
    monkeypatch.setattr(compiled.sys, "executable", str(fake_py))
    assert compiled.build(log=False) == 1
    assert not compiled.current()
    assert not (out / "STAMP").exists() and not (out / "lib").exists()
    assert "mypyc says no" in (out / "build.log").read_text()


@pytest.mark.skipif(not compiled.current(), reason="no current build (make compiled)")
@pytest.mark.parametrize("interpreted", [False, True])
def test_a_current_build_is_what_the_packages_import(interpreted: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VDPA_INTERPRETED"}
    if interpreted:
        env["VDPA_INTERPRETED"] = "1"
    names = [m.removesuffix(".py").replace("/", ".") for m in compiled.MODULES]
    code = (
        "import importlib, sys; from backends.compiled import is_compiled; "
        "print(sorted({is_compiled(importlib.import_module(n)) for n in sys.argv[1:]}))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=compiled.REPO, env=env, capture_output=True,
        text=True, timeout=120, check=True,
    )  # fmt: skip
    assert r.stdout.strip() == ("[False]" if interpreted else "[True]")
