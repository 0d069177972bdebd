"""The apt side of a guest build: sources, list freshness, version selection, downloads.

Only the ordinary apt clients are used (`apt-cache`, `apt-get download`, `apt-get update`),
and `apt-get update` only when the lists are missing or stale.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guest_images import debversion

LISTS_DIR = Path("/var/lib/apt/lists")
SOURCES = [Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]
BACKPORTS_SOURCE = Path("/etc/apt/sources.list.d/bookworm-backports.sources")
BACKPORTS_STANZA = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

Log = Callable[[str], None]


class AptError(Exception):
    """An apt operation failed; the message says which and why."""


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str
    size: int
    filename: str  # archive path, e.g. pool/main/b/busybox/busybox-static_..._amd64.deb
    suite: str

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "filename": self.filename,
            "suite": self.suite,
        }


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}


def _run(args: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AptError(f"{' '.join(args)}: {exc}") from exc
    if proc.returncode != 0:
        raise AptError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


# -- sources and lists -----------------------------------------------------------------------
def _source_files() -> list[Path]:
    files: list[Path] = []
    for p in SOURCES:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.glob("*.list")) + sorted(p.glob("*.sources")))
    return files


def has_suite_source(suite: str) -> bool:
    pattern = re.compile(rf"(^|\s){re.escape(suite)}(\s|$)")
    for path in _source_files():
        for line in path.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0]
            if pattern.search(line):
                return True
    return False


def ensure_backports_source(log: Log) -> bool:
    """Add the bookworm-backports source if no apt source names it. True if it was added."""
    if has_suite_source("bookworm-backports"):
        return False
    if os.geteuid() != 0:
        raise AptError(
            f"no bookworm-backports apt source; as root create {BACKPORTS_SOURCE} with:\n"
            + BACKPORTS_STANZA
        )
    BACKPORTS_SOURCE.write_text(BACKPORTS_STANZA)
    log(f"added apt source {BACKPORTS_SOURCE}")
    return True


def lists_problem(suites: list[str], now: float | None = None) -> str | None:
    """Why the package lists for ``suites`` cannot be trusted, or None if they are fresh.

    Missing Release or Packages files, or a Release whose Valid-Until has passed, count as stale.
    """
    now = time.time() if now is None else now
    for suite in suites:
        releases = sorted(LISTS_DIR.glob(f"*_dists_{suite}_InRelease")) or sorted(
            LISTS_DIR.glob(f"*_dists_{suite}_Release")
        )
        if not releases:
            return f"no Release file for {suite} in {LISTS_DIR}"
        if not list(LISTS_DIR.glob(f"*_dists_{suite}_*_Packages*")):
            return f"no Packages list for {suite} in {LISTS_DIR}"
        for rel in releases:
            for line in rel.read_text(errors="replace").splitlines():
                if line.startswith("Valid-Until:"):
                    stamp = email.utils.parsedate_to_datetime(line.split(":", 1)[1].strip())
                    if stamp.timestamp() < now:
                        return f"{rel.name} expired (Valid-Until {stamp.isoformat()})"
                elif not line.strip():
                    break  # end of the Release header stanza
    return None


def update(log: Log) -> None:
    if os.geteuid() != 0:
        raise AptError(
            "apt package lists are missing or stale and we are not root: run apt-get update"
        )
    log("running apt-get update")
    _run(["apt-get", "update", "-q"])


# -- selection -------------------------------------------------------------------------------
def lists_fingerprint() -> str:
    """Changes whenever the apt sources or package lists change (selection depends on nothing else)."""
    h = hashlib.sha256()
    for path in [*_source_files(), *sorted(LISTS_DIR.glob("*"))]:
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _madison(names: list[str]) -> list[tuple[str, str, str]]:
    """(package, version, suite) for every available version of ``names``."""
    found = []
    for line in _run(["apt-cache", "madison", *names]).splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and len(parts[2].split()) >= 2:
            found.append((parts[0], parts[1], parts[2].split()[1].split("/")[0]))
    return found


def _show(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    """`apt-cache show name=version ...` parsed into one field dict per (name, version)."""
    out = _run(["apt-cache", "show", *(f"{n}={v}" for n, v in pairs)])
    records: dict[tuple[str, str], dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            records.setdefault((fields["Package"], fields["Version"]), fields)
    return records


def _newest(found: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    return max(found, key=lambda f: debversion.sort_key(f[1]))


def select(
    kernel_prefix: str, kernel_regex: str, kernel_suite: str, userland: list[str]
) -> list[DebPackage]:
    """The kernel: newest version, from ``kernel_suite``, of the packages whose names start with
    ``kernel_prefix`` and wholly match ``kernel_regex``. Each ``userland`` package: its newest
    version outside any *-backports suite (what `apt-get install` picks with default pins).
    """
    regex = re.compile(kernel_regex)
    kernels = [
        n for n in _run(["apt-cache", "pkgnames", kernel_prefix]).split() if regex.fullmatch(n)
    ]
    if not kernels:
        raise AptError(f"no package matches {kernel_regex!r}")
    found = _madison(sorted(kernels) + userland)
    chosen = []
    in_suite = [f for f in found if f[0] in kernels and f[2] == kernel_suite]
    if not in_suite:
        raise AptError(f"no package matching {kernel_regex!r} in suite {kernel_suite}")
    chosen.append(_newest(in_suite))
    for name in userland:
        versions = [f for f in found if f[0] == name and not f[2].endswith("-backports")]
        if not versions:
            raise AptError(f"no version of {name} available")
        chosen.append(_newest(versions))
    records = _show([(n, v) for n, v, _ in chosen])
    packages = []
    for name, version, suite in chosen:
        f = records.get((name, version), {})
        try:
            packages.append(
                DebPackage(name, version, f["SHA256"], int(f["Size"]), f["Filename"], suite)
            )
        except (KeyError, ValueError) as exc:
            raise AptError(f"apt-cache show {name}={version}: missing field {exc}") from exc
    return packages


# -- download --------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(pkg: DebPackage, dest_dir: Path, log: Log) -> Path:
    """The verified .deb in ``dest_dir`` (downloaded only if not already there)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{pkg.name}_{pkg.sha256[:16]}.deb"
    if dest.is_file() and sha256_file(dest) == pkg.sha256:
        return dest
    log(f"downloading {pkg.name}={pkg.version} ({pkg.size / 1e6:.1f} MB) from {pkg.suite}")
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".dl-") as tmp:
        os.chmod(tmp, 0o755)
        args = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            args += ["-o", "APT::Sandbox::User=root"]  # we download into our own directory
        _run([*args, f"{pkg.name}={pkg.version}"], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise AptError(f"apt-get download {pkg.name} produced {debs}")
        got = sha256_file(debs[0])
        if got != pkg.sha256:
            raise AptError(f"{pkg.name}: sha256 {got} != expected {pkg.sha256}")
        shutil.move(debs[0], dest)
    return dest


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
