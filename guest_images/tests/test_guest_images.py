"""Unit tests of the guest builder's parts (no apt, no QEMU): `.venv/bin/pytest guest_images`."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from guest_images import apt, debversion, kmod, udpseq
from guest_images.apt import DebPackage
from guest_images.builder import image_key
from guest_images.cpio import CpioWriter


def read_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """(name, mode, data, rdevmajor, rdevminor) of every entry, trailer included."""
    out, off = [], 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        out.append((name, f[1], data[off : off + filesize], f[9], f[10]))
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert off == len(data)
            return out


def test_cpio_roundtrip_and_alignment() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("bin")
    w.file("/init", b"#!/bin/sh\n", 0o755)
    w.file("odd", b"x" * 5)
    w.symlink("bin/sh", "busybox")
    w.char_device("dev/console", 5, 1)
    w.close()
    entries = read_newc(buf.getvalue())
    assert [e[0] for e in entries] == ["bin", "init", "odd", "bin/sh", "dev/console", "TRAILER!!!"]
    assert entries[1][1] == 0o100755 and entries[1][2] == b"#!/bin/sh\n"
    assert entries[2][2] == b"xxxxx"
    assert entries[3][2] == b"busybox" and entries[3][1] & 0o170000 == 0o120000
    assert entries[4][3:] == (5, 1)


def test_cpio_rejects_duplicates() -> None:
    w = CpioWriter(io.BytesIO())
    w.file("a", b"")
    with pytest.raises(ValueError):
        w.file("/a", b"")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("6.12.95-1~bpo12+1", "6.12.9-1", 1),
        ("6.12.95-1~bpo12+1", "6.12.95-1", -1),
        ("1.0~rc1", "1.0", -1),
        ("1.0", "1.0a", -1),
        ("1:0.1", "2.0", 1),
        ("1.0-1", "1.0-1", 0),
        ("1.0+", "1.0", 1),
    ],
)
def test_debversion(a: str, b: str, expected: int) -> None:
    assert debversion.compare(a, b) == expected
    assert debversion.compare(b, a) == -expected


def fake_module(modinfo: bytes) -> bytes:
    """A minimal ELF64 object: sections null, .modinfo, .shstrtab."""
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off, shstr_off = body_off, body_off + len(modinfo)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, 3, 2)
    sh = struct.Struct("<IIQQQQIIQQ")
    sections = sh.pack(*([0] * 10)) + sh.pack(1, 1, 0, 0, modinfo_off, len(modinfo), 0, 0, 1, 0)
    sections += sh.pack(10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    data = bytes(ehdr) + modinfo + shstr
    return data + b"\0" * (shoff - len(data)) + sections


def test_modinfo_depends_and_vermagic() -> None:
    info = kmod.parse_modinfo(
        fake_module(b"license=GPL\0depends=net_failover,foo-bar\0vermagic=6.12.1 SMP\0")
    )
    mod = kmod.KernelModule("x", Path("x.ko"), b"", info)
    assert mod.depends == ["net_failover", "foo_bar"]
    assert mod.vermagic == "6.12.1 SMP"
    with pytest.raises(kmod.ModuleError):
        kmod.parse_modinfo(b"not an elf")


def test_udpseq_payload_check_and_stats() -> None:
    p = udpseq.payload(300, 100)
    assert len(p) == 100 and p[:8] == (300).to_bytes(8, "big")
    assert p[8] == (300 * 31 + 8) & 0xFF and p[99] == (300 * 31 + 99) & 0xFF
    assert udpseq.check(p) == 300
    assert udpseq.check(p[:50] + b"\0" + p[51:]) is None
    s = udpseq.SeqStats(3)
    for seq in (0, 2, 1, 2):
        s.add(udpseq.payload(seq, 64))
    s.add(b"short")
    s.add(udpseq.payload(7, 64))  # out of range
    assert (s.unique, s.dups, s.ooo, s.corrupt, s.lost, s.complete) == (3, 1, 1, 2, 0, True)
    assert not s.ended and s.as_dict()["end"] == 0
    s.add(udpseq.END)  # the sentinel ends the stream, counted as nothing else
    assert (s.ended, s.received, s.corrupt) == (True, 6, 2)
    assert udpseq.is_end(udpseq.END) and not udpseq.is_end(udpseq.payload(0, 8))
    assert udpseq.check(udpseq.END) is not None  # well-formed, but only ever seen as the end


def test_udpseq_report_parsing() -> None:
    text = (
        "udpseq recv: listening port=5 count=3\r\n"
        "udpseq recv: received=3 unique=3 dups=0 ooo=0 corrupt=0 lost=0 bytes=9 elapsed_us=1 "
        "end=1\n"
    )
    report = udpseq.parse_report(text, "recv")
    assert (report["unique"], report["end"]) == (3, 1)
    with pytest.raises(ValueError):
        udpseq.parse_report(text, "send")


def test_lists_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apt, "LISTS_DIR", tmp_path)
    assert "no Release" in (apt.lists_problem(["bookworm-backports"]) or "")
    rel = tmp_path / "x_dists_bookworm-backports_InRelease"
    rel.write_text("Origin: Debian\nValid-Until: Thu, 26 Nov 2026 02:12:54 UTC\n\nsig\n")
    (tmp_path / "x_dists_bookworm-backports_main_binary-amd64_Packages.lz4").write_bytes(b"")
    assert apt.lists_problem(["bookworm-backports"], now=0) is None
    assert "expired" in (apt.lists_problem(["bookworm-backports"], now=2e9) or "")


def test_image_key_follows_package_hashes() -> None:
    a = DebPackage("k", "1", "aa", 1, "f", "s")
    b = DebPackage("busybox-static", "1", "bb", 1, "f", "s")
    key = image_key([a, b], "recipe")
    assert key == image_key([b, a], "recipe")
    assert key != image_key([a, DebPackage("busybox-static", "1", "bc", 1, "f", "s")], "recipe")
    assert key != image_key([a, b], "recipe2")
