"""The SIGBUS guard (backends/vdpa/sigbus_guard.py): an unsealable file shrinks under a mapped
region and the region is read and written through the backend's memory accessors anyway,
without dying; zeros come back and the fault is recorded. A SIGBUS anywhere else still kills.

The faulting part runs in a child python: pytest's faulthandler also handles SIGBUS, and a
mistake here must not take the test process down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends.vdpa import sigbus_guard

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sigbus_guard.available(), reason="no C compiler")

SHRINK = """
import mmap, os, sys
from backends.vdpa import sigbus_guard
from backends.vdpa.memory import HostRegion

kind = sys.argv[1]
size = 1 << 20
if kind == "memfd":
    fd = os.memfd_create("unsealable", 0)  # no MFD_ALLOW_SEALING: it can never be sealed
else:
    path = f"/dev/shm/sigbus-guard-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
os.ftruncate(fd, 2 * size)
r = HostRegion.from_fd(fd, 0x100000, size, 0x7000_0000, size)  # mmap_offset: the 2nd MiB
assert not r.sealed and r.guard_slot >= 0, r.to_dict()
r.write_gpa(0x100000, b"head")
r.write_gpa(0x100000 + 0x80000, b"tail")
os.ftruncate(fd, size + 0x1000)  # only the region's first page is left in the file
assert r.read_gpa(0x100000, 4) == b"head"
assert not r.faulted
assert r.read_gpa(0x100000 + 0x80000, 4) == bytes(4)  # past the end: zeros, not SIGBUS
assert r.faulted and not r.backing_ok(fstat=False)
piece = r.piece(0x90000, 8)
assert piece.write(b"12345678") == 8  # a write into the throw-away pages completes
assert piece.read() == b"12345678"
assert r.read_gpa(0x100000, 4) == b"head"  # the page still in the file is still shared
zero = sigbus_guard.zero_from(r.guard_slot) - sigbus_guard.mapping_address(r.buf)
os.ftruncate(fd, 0)
assert r.read_gpa(0x100000, 4) == bytes(4)  # shrinks again: the rest goes as well
print("OK", sigbus_guard.faults(r.guard_slot), hex(zero), sigbus_guard.total(), flush=True)
r.close()
"""

FOREIGN = """
import mmap, os, sys
from backends.vdpa import sigbus_guard
from backends.vdpa.memory import HostRegion

fd = os.memfd_create("registered", 0)
os.ftruncate(fd, 1 << 16)
r = HostRegion.from_fd(fd, 0, 1 << 16, 0, 0)  # the guard is installed and holds a mapping
assert sigbus_guard.installed()
other = os.memfd_create("not-registered", 0)
os.ftruncate(other, 1 << 16)
mm = mmap.mmap(other, 1 << 16)
os.ftruncate(other, 0)
print("TOUCH", flush=True)
if sys.argv[1] == "fault":
    mm[0]  # a real SIGBUS outside every registered mapping
else:
    os.kill(os.getpid(), 7)  # SIGBUS sent, not a memory fault
print("SURVIVED", flush=True)
"""


def child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONFAULTHANDLER", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize("kind", ["memfd", "dev-shm"])
def test_a_shrink_during_an_access_reads_zeros_and_is_recorded(kind: str) -> None:
    r = child(SHRINK, kind)
    assert r.returncode == 0, f"child exited {r.returncode}: {r.stdout}{r.stderr}"
    ok, faults, zero, total = r.stdout.split()
    assert ok == "OK"
    assert int(faults) == 2 and int(total) == 2, r.stdout
    assert int(zero, 16) == 0x1000, "zero pages start at the file's new end, page-aligned"


@pytest.mark.parametrize("how", ["fault", "kill"])
def test_a_sigbus_outside_guest_memory_still_kills(how: str) -> None:
    r = child(FOREIGN, how)
    assert "TOUCH" in r.stdout, r.stderr
    assert "SURVIVED" not in r.stdout
    assert r.returncode == -signal.SIGBUS, f"exited {r.returncode}: {r.stderr}"


def test_faulthandler_still_reports_a_foreign_sigbus() -> None:
    """Installed after faulthandler, the guard hands it every SIGBUS that is not its own."""
    script = "import faulthandler; faulthandler.enable()\n" + FOREIGN
    r = child(script, "fault")
    assert r.returncode == -signal.SIGBUS, r.stderr
    assert "Fatal Python error: Bus error" in r.stderr, r.stderr


LOG = """
import os
from backends.vhost_user.log_area import LogArea

fd = os.memfd_create("unsealable-log", 0)
os.ftruncate(fd, 1 << 16)
area = LogArea(fd, 1 << 16, 0)
assert area.backing_ok()
os.ftruncate(fd, 0)
area.view[0x8000] |= 1  # a dirty-page bit written after the shrink: zero page, survived
assert area.view[0x8000] == 1
assert not area.backing_ok()
area.close()
print("OK", flush=True)
"""


def test_the_dirty_log_survives_a_shrink_during_a_write() -> None:
    r = child(LOG)
    assert r.returncode == 0 and r.stdout.strip() == "OK", f"{r.returncode}: {r.stderr}"
