"""Hot-path modules compiled with mypyc, with a clean fall-back to the interpreted source.

The Python file stays the one source. ``python -m backends.compiled`` (``make compiled``, part
of ``make check``'s set-up) compiles the modules in :data:`MODULES` with mypyc, as one group
(one shared library, :data:`GROUP`, so calls and attribute accesses between the modules are
native), into ``build/compiled/lib`` and records the SHA-256 of each source it compiled in
``build/compiled/STAMP``; a second run with unchanged sources does nothing. A package whose
``__init__`` calls :func:`activate` imports its compiled modules only while *every* source of
the set still hashes to the stamp (the set is used whole or not at all: a compiled module
calls the others natively): an edited source, a missing or failed build, no mypyc, another
Python, or ``VDPA_INTERPRETED=1`` all mean the interpreted modules, with the same behaviour.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
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
MODULES = (
    "backends/vdpa/access.py",
    "backends/vdpa/faults.py",
    "backends/vdpa/iotlb.py",
    "backends/vdpa/memory.py",
    "backends/vdpa/dma.py",
    "backends/vdpa/descriptor_chain.py",
    "backends/vdpa/virtqueue.py",
    "backends/vdpa/split_virtqueue.py",
    "backends/vdpa/packed_virtqueue.py",
    "backends/net/datapath.py",
)
#: The group's shared library (``<GROUP>__mypyc``): inside ``backends.vdpa``, which every
#: compiled module imports, so it is found on that package's (activated) path.
GROUP = "backends.vdpa._compiled"


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
    if not any(m.rsplit("/", 1)[0] == rel for m in MODULES):
        return False
    if not current():
        return False
    package_path.insert(0, str(OUT / "lib" / rel))
    return True


def _libraries() -> list[Path]:
    """Every extension the build leaves: one per module plus the group's shared library."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    lib = OUT / "lib"
    out = [lib / Path(m).with_suffix(suffix) for m in MODULES]
    out.append(lib / (GROUP.replace(".", "/") + "__mypyc" + suffix))
    return out


def current() -> bool:
    """True when the build in :data:`OUT` matches every source of :data:`MODULES`."""
    stamp = _stamp_lines()
    if any(stamp.get(m) != _digest(REPO / m) for m in MODULES):
        return False
    return all(p.exists() for p in _libraries())


def is_compiled(module: object) -> bool:
    return not str(getattr(module, "__file__", "")).endswith(".py")


def build(log: bool = True) -> int:
    """Compile :data:`MODULES` unless the stamp says they are current. 0 on success or when
    nothing had to be done; 1 when mypyc is missing or fails (the interpreted code is used)."""
    sources = {m: _digest(REPO / m) for m in MODULES}
    lib = OUT / "lib"
    if _stamp_lines() == sources and all(p.exists() for p in _libraries()):
        if log:
            print("compiled: up to date", flush=True)
        return 0
    if importlib.util.find_spec("mypyc") is None:
        print("compiled: mypyc not installed, using the interpreted modules", flush=True)
        _clear()
        return 1
    _clear()
    stage = OUT / "stage"
    shutil.copytree(REPO / "backends", stage / "backends", ignore=_ignore)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", _SETUP, *MODULES], cwd=stage, capture_output=True, text=True,
        timeout=900, env={**os.environ, "VDPA_MYPYC_GROUP": GROUP},
    )  # fmt: skip
    (OUT / "build.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(
            f"compiled: mypyc failed (see {OUT / 'build.log'}), using the interpreted modules",
            flush=True,
        )
        _clear(keep_log=True)
        return 1
    for so in _libraries():
        built = stage / so.relative_to(lib)
        if not built.exists():
            print(f"compiled: mypyc left no {built.name}, using the interpreted modules")
            _clear(keep_log=True)
            return 1
        so.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), so)
    shutil.rmtree(stage, ignore_errors=True)
    STAMP.write_text("".join(f"{m} {d}\n" for m, d in sources.items()))
    if log:
        print(f"compiled: {', '.join(MODULES)} in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


#: The build script (what the ``mypyc`` command writes, plus the group name): modules from argv.
_SETUP = """
import os, sys
from mypyc.build import mypycify
from setuptools import setup
modules = sys.argv[1:]
setup(
    name="vdpa_compiled",
    ext_modules=mypycify(modules, opt_level="3", group_name=os.environ["VDPA_MYPYC_GROUP"]),
    script_args=["build_ext", "--inplace"],
)
"""


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
