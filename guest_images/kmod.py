"""Kernel modules from an extracted Debian kernel package: find, decompress, read .modinfo.

The Debian .deb ships no modules.dep, so dependencies come from each module's own `.modinfo`
ELF section (`depends=a,b`), read here with a minimal ELF64 section-table parser.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

# ELF64 little-endian header fields we need: e_shoff @0x28 (Q), e_shentsize @0x3a (H),
# e_shnum @0x3c (H), e_shstrndx @0x3e (H). Section header: name u32, type u32, flags Q,
# addr Q, offset Q, size Q, link u32, info u32, addralign Q, entsize Q (64 bytes).
_SHDR = struct.Struct("<IIQQQQIIQQ")


class ModuleError(Exception):
    """A module is missing, unreadable or inconsistent with the kernel."""


def canonical(name: str) -> str:
    """Module names treat '-' and '_' as the same character."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class KernelModule:
    name: str
    path: Path  # inside the extracted package
    data: bytes  # decompressed ELF object
    info: dict[str, list[str]]  # .modinfo key -> values (keys can repeat)

    @property
    def depends(self) -> list[str]:
        values = self.info.get("depends", [""])
        return [canonical(d) for d in values[0].split(",") if d]

    @property
    def vermagic(self) -> str:
        return self.info.get("vermagic", [""])[0]


def _section(data: bytes, wanted: str) -> bytes:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ModuleError("not a little-endian ELF64 object")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != _SHDR.size or shoff + shnum * shentsize > len(data):
        raise ModuleError("bad ELF section table")
    headers = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    for h in headers:
        end = names.find(b"\0", h[0])
        if names[h[0] : end].decode(errors="replace") == wanted:
            return data[h[4] : h[4] + h[5]]
    raise ModuleError(f"no {wanted} section")


def parse_modinfo(data: bytes) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for item in _section(data, ".modinfo").split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


class ModuleTree:
    """Index of `lib/modules/<kver>/kernel/**.ko[.xz]` in an extracted kernel package."""

    def __init__(self, root: Path) -> None:
        kdirs = sorted((root / "lib" / "modules").glob("*/kernel"))
        if len(kdirs) != 1:
            raise ModuleError(f"expected one lib/modules/<kver>/kernel under {root}, got {kdirs}")
        self.kernel_version = kdirs[0].parent.name
        self._paths: dict[str, Path] = {}
        for p in kdirs[0].rglob("*.ko*"):
            base = p.name.split(".ko")[0]
            self._paths[canonical(base)] = p

    def load(self, name: str) -> KernelModule:
        path = self._paths.get(canonical(name))
        if path is None:
            raise ModuleError(f"module {name} not found for kernel {self.kernel_version}")
        raw = path.read_bytes()
        data = lzma.decompress(raw) if path.name.endswith(".xz") else raw
        mod = KernelModule(canonical(name), path, data, parse_modinfo(data))
        if not mod.vermagic.startswith(self.kernel_version + " "):
            raise ModuleError(f"{name}: vermagic {mod.vermagic!r} != {self.kernel_version}")
        return mod

    def resolve(self, wanted: list[str]) -> list[KernelModule]:
        """The wanted modules and their dependencies, dependencies first (load order)."""
        order: list[KernelModule] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ModuleError("module dependency cycle: " + " -> ".join((*chain, name)))
            state[name] = "visiting"
            mod = self.load(name)
            for dep in mod.depends:
                visit(dep, (*chain, name))
            state[name] = "done"
            order.append(mod)

        for name in wanted:
            visit(canonical(name), ())
        return order
