"""Hot-path modules compiled with mypyc, with a clean fall-back to the interpreted source.

The Python file stays the one source. ``python -m backends.compiled`` (``make compiled``, part
of ``make check``'s set-up) compiles the modules in :data:`MODULES` with mypyc into
``build/compiled/`` and records the SHA-256 of each source it compiled in
``build/compiled/STAMP``; a second run with unchanged sources does nothing. A package whose
``__init__`` calls :func:`activate` imports the compiled module only while its source still
hashes to the stamp: an edited source, a missing or failed build, no mypyc, another Python, or
``VDPA_INTERPRETED=1`` all mean the interpreted module, with the same behaviour.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "compiled"
STAMP = OUT / "STAMP"
#: Modules compiled (repository-relative paths). Each must type-check under mypyc's runtime
#: checks (annotations are enforced at call boundaries).
MODULES = ("backends/vdpa/iotlb.py",)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp_lines() -> dict[str, str]:
    try:
        text = STAMP.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, digest = line.partition(" ")
        out[name] = digest
    return out


def activate(package_path: list[str], package_name: str) -> bool:
    """Put the compiled modules of ``package_name`` first on its ``__path__`` when every one
    of them matches its current source and this interpreter can load it. True if it did."""
    if os.environ.get("VDPA_INTERPRETED"):
        return False
    rel = package_name.replace(".", "/")
    mine = [m for m in MODULES if m.rsplit("/", 1)[0] == rel]
    if not mine:
        return False
    stamp = _stamp_lines()
    lib = OUT / "lib" / rel
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for m in mine:
        src = REPO / m
        stem = Path(m).stem
        if stamp.get(m) != _digest(src) or not (lib / f"{stem}{suffix}").exists():
            return False
    package_path.insert(0, str(lib))
    return True


def is_compiled(module: object) -> bool:
    return not str(getattr(module, "__file__", "")).endswith(".py")


def build(log: bool = True) -> int:
    """Compile :data:`MODULES` unless the stamp says they are current. 0 on success or when
    nothing had to be done; 1 when mypyc is missing or fails (the interpreted code is used)."""
    sources = {m: _digest(REPO / m) for m in MODULES}
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    lib = OUT / "lib"
    if _stamp_lines() == sources and all(
        (lib / Path(m).with_suffix(suffix)).exists() for m in MODULES
    ):
        if log:
            print("compiled: up to date", flush=True)
        return 0
    if shutil.which("mypyc", path=str(Path(sys.executable).parent)) is None:
        print("compiled: mypyc not installed, using the interpreted modules", flush=True)
        _clear()
        return 1
    _clear()
    stage = OUT / "stage"
    shutil.copytree(REPO / "backends", stage / "backends", ignore=_ignore)
    t0 = time.monotonic()
    mypyc = str(Path(sys.executable).parent / "mypyc")
    r = subprocess.run(
        [mypyc, *MODULES], cwd=stage, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    (OUT / "build.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(
            f"compiled: mypyc failed (see {OUT / 'build.log'}), using the interpreted modules",
            flush=True,
        )
        _clear(keep_log=True)
        return 1
    for m in MODULES:
        pkg = Path(m).parent
        (lib / pkg).mkdir(parents=True, exist_ok=True)
        for so in (stage / pkg).glob(f"{Path(m).stem}*{suffix}"):
            shutil.move(str(so), lib / pkg / so.name)
    shutil.rmtree(stage, ignore_errors=True)
    STAMP.write_text("".join(f"{m} {d}\n" for m, d in sources.items()))
    if log:
        print(f"compiled: {', '.join(MODULES)} in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def _ignore(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", "tests") or n.endswith(".so")]


def _clear(keep_log: bool = False) -> None:
    for p in (OUT / "lib", OUT / "stage", STAMP, *(() if keep_log else (OUT / "build.log",))):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    build()  # a failed or impossible build is not an error: the interpreted code is used
    from backends.vdpa import sigbus_guard

    sigbus_guard.build()  # the native SIGBUS handler (built at first use otherwise)
    sys.exit(0)
