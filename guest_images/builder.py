"""Build (or find in the cache) a Debian kernel + busybox initramfs image.

Two images share this machinery, each described by an :class:`ImageSpec`: :data:`GUEST`, the
minimal test guest the avocado tests boot, and :data:`LAB` (``guest_images.lab``), the L1 VM
that runs the vhost-vdpa lane.

Cache layout: ``<cache>/<key>/{vmlinuz,initrd.gz,manifest.json}``, where the key hashes the
SHA256 of the chosen .deb files and the recipe (the files that shape the output, the recipe
version and the compiler). ``<cache>/debs/`` keeps the verified .deb files. An entry is
published by renaming a finished staging directory, so a half-built image is never used.
Each image has its own cache directory (old .deb files are pruned per cache).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from guest_images import apt
from guest_images.apt import AptError, DebPackage, Log
from guest_images.cpio import CpioWriter
from guest_images.kmod import ModuleTree

RECIPE_VERSION = 1
HERE = Path(__file__).resolve().parent
# The files whose content shapes the image: any change makes a new cache key.
RECIPE_FILES = ("builder.py", "cpio.py", "kmod.py", "udpseq.c")  # + the spec's init

KERNEL_PREFIX = "linux-image-6.12."
KERNEL_REGEX = r"linux-image-6\.12\.\d+\+deb12(\.\d+)?-cloud-amd64"
KERNEL_SUITE = "bookworm-backports"
BUSYBOX = "busybox-static"
LIST_SUITES = ["bookworm", KERNEL_SUITE]
#: Loaded in this order by init (dependencies, resolved from .modinfo, first). virtio_iommu
#: (=m in the Debian kernel) before virtio_net: a NIC behind a virtio-iommu defers its probe
#: until the IOMMU driver is registered. Harmless without a virtio-iommu device.
MODULES = ("virtio_iommu", "virtio_net")
CC = "gcc"
CFLAGS = ["-static", "-O2", "-s", "-Wall", "-Wextra"]


@dataclass(frozen=True)
class ImageSpec:
    """What distinguishes one image from another: its kernel package, modules and /init."""

    name: str  # also the cache directory name under ~/.cache/vdpa-qtest/
    kernel_regex: str  # wholly matches the kernel package name (prefix KERNEL_PREFIX)
    modules: tuple[str, ...]  # loaded by /init in this order, dependencies first
    init: str  # file in guest_images/ that becomes /init
    cache_env: str  # environment variable that overrides the cache directory
    release: str  # /etc/<release> in the initramfs records key, kernel, modules


GUEST = ImageSpec(
    "guest", KERNEL_REGEX, MODULES, "init.sh", "VDPA_GUEST_CACHE", "vdpa-guest-release"
)


class BuildError(Exception):
    """The guest could not be built; the message says what failed."""


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    manifest: dict[str, object]
    cached: bool

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.gz"

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def has_udpseq(self) -> bool:
        udpseq = self.manifest.get("udpseq")
        return isinstance(udpseq, dict) and bool(udpseq.get("built"))


def default_cache_dir(spec: ImageSpec = GUEST) -> Path:
    env = os.environ.get(spec.cache_env)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vdpa-qtest" / spec.name


def _compiler_id() -> str:
    try:
        out = subprocess.run([CC, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "none"
    except OSError:
        return "none"


def recipe_hash(spec: ImageSpec = GUEST) -> str:
    h = hashlib.sha256(
        f"recipe {RECIPE_VERSION}\n{_compiler_id()}\n{CFLAGS}\n{spec.modules}\n".encode()
    )
    h.update(f"{spec.name}\0{spec.kernel_regex}\0{spec.release}\0".encode())
    for name in (*RECIPE_FILES, spec.init):
        h.update(f"\0{name}\0".encode())
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def image_key(packages: list[DebPackage], recipe: str) -> str:
    h = hashlib.sha256(recipe.encode())
    for pkg in sorted(packages, key=lambda p: p.name):
        h.update(f"\0{pkg.name}\0{pkg.sha256}".encode())
    return h.hexdigest()[:24]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _complete(entry: Path) -> bool:
    return all((entry / n).is_file() for n in ("vmlinuz", "initrd.gz", "manifest.json"))


def _load(entry: Path, cached: bool) -> GuestImage:
    return GuestImage(entry, json.loads((entry / "manifest.json").read_text()), cached)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise builders sharing a cache (e.g. parallel test processes)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- package selection -------------------------------------------------------------------------
class _Apt:
    """Selection and download with at most one `apt-get update` per build."""

    def __init__(self, spec: ImageSpec, log: Log, memo: Path) -> None:
        self.spec = spec
        self.log = log
        self.memo = memo
        self.updated = False

    def _update(self, why: str) -> None:
        self.log(f"apt lists need refreshing: {why}")
        apt.update(self.log)
        self.updated = True

    def resolve(self) -> list[DebPackage]:
        if apt.ensure_backports_source(self.log):
            self._update("bookworm-backports source was just added")
        elif problem := apt.lists_problem(LIST_SUITES):
            self._update(problem)
        try:
            return self._select()
        except AptError as exc:
            if self.updated:
                raise
            self._update(str(exc))
            return self._select()

    def _select(self) -> list[DebPackage]:
        """Selection depends only on the apt sources + lists: memoised on their fingerprint,
        so a warm-cache run does not pay for apt-cache (slow when its own cache is disabled)."""
        criteria = [KERNEL_PREFIX, self.spec.kernel_regex, KERNEL_SUITE, BUSYBOX]
        fingerprint = apt.lists_fingerprint()
        try:
            memo = json.loads(self.memo.read_text())
            if memo["fingerprint"] == fingerprint and memo["criteria"] == criteria:
                return [DebPackage(**p) for p in memo["packages"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        packages = apt.select(KERNEL_PREFIX, self.spec.kernel_regex, KERNEL_SUITE, [BUSYBOX])
        memo = {"fingerprint": fingerprint, "criteria": criteria,
                "packages": [p.as_dict() for p in packages]}  # fmt: skip
        self.memo.write_text(json.dumps(memo, indent=1) + "\n")
        return packages

    def download(
        self, packages: list[DebPackage], debs: Path
    ) -> tuple[list[DebPackage], list[Path]]:
        try:
            return packages, [apt.download(p, debs, self.log) for p in packages]
        except AptError as exc:
            if self.updated:
                raise
            self._update(f"download failed: {exc}")  # lists pointed at a vanished file
            packages = self._select()
            return packages, [apt.download(p, debs, self.log) for p in packages]


# -- assembly ----------------------------------------------------------------------------------
def _compile_udpseq(out: Path, log: Log) -> dict[str, object]:
    src = HERE / "udpseq.c"
    try:
        proc = subprocess.run(
            [CC, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"{CC} not usable: {exc}"
    else:
        if proc.returncode == 0:
            return {"built": True, "sha256": _sha256(out.read_bytes()), "compiler": _compiler_id()}
        reason = f"{CC} {' '.join(CFLAGS)} failed: {proc.stderr.strip()[-1000:]}"
    # Without it every stream scenario would be cancelled, and a cancelled test is not a pass:
    # refuse to build (and cache) a guest that cannot run the suite.
    raise BuildError(
        f"udpseq (the guest's traffic tool) not built: {reason}; install gcc libc6-dev"
    )


def _initramfs(
    spec: ImageSpec,
    busybox: bytes,
    modules: list[tuple[str, bytes]],
    udpseq: bytes | None,
    release: str,
) -> bytes:
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "run", "sbin", "sys",
              "tmp", "usr", "usr/bin", "usr/sbin"):  # fmt: skip
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    cpio.char_device("dev/console", 5, 1)  # the kernel opens it for init before devtmpfs
    cpio.file("init", (HERE / spec.init).read_bytes(), 0o755)
    cpio.file("bin/busybox", busybox, 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("lib/modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode())
    if udpseq is not None:
        cpio.file("usr/bin/udpseq", udpseq, 0o755)
    cpio.file(f"etc/{spec.release}", release.encode())
    cpio.close()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _assemble(
    spec: ImageSpec,
    packages: list[DebPackage],
    debs: list[Path],
    key: str,
    recipe: str,
    work: Path,
    log: Log,
) -> dict[str, object]:
    """Build vmlinuz + initrd.gz + manifest.json into ``work/stage``; returns the manifest."""
    t0 = time.monotonic()
    stage = work / "stage"
    stage.mkdir()
    by_name = dict(zip((p.name for p in packages), debs, strict=True))
    kernel_pkg = next(p for p in packages if p.name != BUSYBOX)

    kroot, broot = work / "kernel", work / "busybox"
    apt.extract(by_name[kernel_pkg.name], kroot)
    apt.extract(by_name[BUSYBOX], broot)

    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise BuildError(f"expected one boot/vmlinuz-* in {kernel_pkg.name}, found {vmlinuz}")
    shutil.copyfile(vmlinuz[0], stage / "vmlinuz")
    tree = ModuleTree(kroot)
    mods = tree.resolve(list(spec.modules))
    busybox = (broot / "bin" / "busybox").read_bytes()

    udpseq_info = _compile_udpseq(work / "udpseq", log)
    udpseq = (work / "udpseq").read_bytes() if udpseq_info["built"] else None
    release = f"key={key}\nkernel={tree.kernel_version}\nmodules={','.join(m.name for m in mods)}\n"
    initrd = _initramfs(spec, busybox, [(m.name, m.data) for m in mods], udpseq, release)
    (stage / "initrd.gz").write_bytes(initrd)

    manifest: dict[str, object] = {
        "key": key,
        "image": spec.name,
        "recipe": recipe,
        "recipe_version": RECIPE_VERSION,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build_seconds": 0.0,
        "packages": [p.as_dict() for p in packages],
        "kernel_version": tree.kernel_version,
        "modules": [
            {"name": m.name, "depends": m.depends, "sha256": _sha256(m.data), "size": len(m.data)}
            for m in mods
        ],
        "udpseq": udpseq_info,
        "files": {
            "vmlinuz": {"sha256": _sha256((stage / "vmlinuz").read_bytes())},
            "initrd.gz": {"sha256": _sha256(initrd), "size": len(initrd)},
        },
    }
    manifest["build_seconds"] = round(time.monotonic() - t0, 2)
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _newest_entry(cache: Path, recipe: str) -> Path | None:
    best: tuple[str, Path] | None = None
    for entry in cache.iterdir() if cache.is_dir() else ():
        if entry.name.startswith(".") or not _complete(entry):
            continue
        try:
            m = json.loads((entry / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if m.get("recipe") == recipe and (best is None or str(m.get("built_at")) > best[0]):
            best = (str(m.get("built_at")), entry)
    return best[1] if best else None


def build(
    cache_dir: Path | None = None,
    force: bool = False,
    log: Log = print,
    spec: ImageSpec = GUEST,
) -> GuestImage:
    """The image for ``spec``'s current recipe and newest packages, built only if not cached.

    If apt cannot be asked (offline, no apt), an existing entry for the same recipe is used.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir(spec)
    recipe = recipe_hash(spec)
    with _locked(cache):
        helper = _Apt(spec, log, cache / "selection.json")
        try:
            packages = helper.resolve()
        except AptError as exc:
            fallback = None if force else _newest_entry(cache, recipe)
            if fallback is None:
                raise BuildError(f"cannot select packages: {exc}") from exc
            log(f"WARNING: apt unavailable ({exc}); using cached guest {fallback.name}")
            return _load(fallback, cached=True)
        key = image_key(packages, recipe)
        entry = cache / key
        if not force and _complete(entry):
            return _load(entry, cached=True)

        packages, debs = helper.download(packages, cache / "debs")
        key = image_key(packages, recipe)
        entry = cache / key
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".build-{key}-") as tmp:
            manifest = _assemble(spec, packages, debs, key, recipe, Path(tmp), log)
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(Path(tmp) / "stage", entry)
        keep = {d.name for d in debs}
        for old in (cache / "debs").glob("*.deb"):
            if old.name not in keep:  # superseded packages: do not let the cache grow forever
                old.unlink()
        log(f"built {spec.name} {key} in {manifest['build_seconds']} s")
        return _load(entry, cached=False)
