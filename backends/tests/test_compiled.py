"""The mypyc build of the hot-path modules is used only while it matches its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import compiled


def _fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digest: str) -> Path:
    out = tmp_path / "compiled"
    lib = out / "lib" / "backends" / "vdpa"
    lib.mkdir(parents=True)
    suffix = compiled.importlib.machinery.EXTENSION_SUFFIXES[0]
    (lib / f"iotlb{suffix}").write_bytes(b"")
    (out / "STAMP").write_text(f"backends/vdpa/iotlb.py {digest}\n")
    monkeypatch.setattr(compiled, "OUT", out)
    monkeypatch.setattr(compiled, "STAMP", out / "STAMP")
    monkeypatch.delenv("VDPA_INTERPRETED", raising=False)
    return lib


def test_current_build_goes_first_on_the_package_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = compiled._digest(compiled.REPO / "backends/vdpa/iotlb.py")
    lib = _fake_build(tmp_path, monkeypatch, digest)
    path = ["/src/backends/vdpa"]
    assert compiled.activate(path, "backends.vdpa")
    assert path == [str(lib), "/src/backends/vdpa"]


@pytest.mark.parametrize("why", ["edited source", "forced interpreted", "other package"])
def test_stale_or_unwanted_build_falls_back_to_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    digest = compiled._digest(compiled.REPO / "backends/vdpa/iotlb.py")
    _fake_build(tmp_path, monkeypatch, "0" * 64 if why == "edited source" else digest)
    if why == "forced interpreted":
        monkeypatch.setenv("VDPA_INTERPRETED", "1")
    package = "backends.net" if why == "other package" else "backends.vdpa"
    path = ["/src"]
    assert not compiled.activate(path, package)
    assert path == ["/src"]
