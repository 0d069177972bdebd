"""Surviving a peer that shrinks shared memory *during* an access: a native SIGBUS handler.

A shared mapping whose file the peer truncates raises SIGBUS on the next touch of a page past
the file's end. For files that can be sealed the backend seals them (no window at all); for the
others (QEMU's ``memory-backend-file`` on /dev/shm or hugetlbfs, a memfd created without
``MFD_ALLOW_SEALING``) the event loop ``fstat``s them before every callback, which leaves one
window: a shrink that lands inside a callback, after that check. This module closes it the way
libwayland-server does for ``wl_shm`` pools (``wl_shm_buffer_begin_access`` and its SIGBUS
handler): every such mapping is registered; a SIGBUS inside one maps anonymous zero pages
(``MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS``) over the part past the file's end (at least from
the faulting page on), records it for the mapping and returns, so the access completes on
throw-away memory. The caller (``MemoryTable.check_backing`` after the callback) then drops the
region with ``error.mem`` ``region-shrunk`` and NEEDS_RESET. A SIGBUS anywhere else restores
the action that was there before ours (the default, or Python's faulthandler) and re-raises it:
it kills the process exactly as before.

Why C (``sigbus_guard.c``) and not a ctypes callback: a Python-level ``signal.signal`` handler
cannot work at all (the faulting instruction re-executes before Python code runs, forever), and
a ``ctypes.CFUNCTYPE`` callback installed with libc ``sigaction`` would run Python bytecode
*inside* the signal handler, in the middle of whatever C code faulted (a ``memcpy`` inside an
mmap slice, ``struct.unpack_from``): it re-enters the interpreter (GIL state, object allocation,
possibly the allocator that was interrupted), which is not async-signal-safe and cannot be made
robust. The C handler does only async-signal-safe things (``fstat``, ``mmap``, ``sigaction``,
``raise``, loads and stores on a static table).

The C file is compiled at first use (or by ``python -m backends.compiled``) with the system C
compiler into ``build/compiled/sigbus_guard-<sha256 of the source>.so`` (the name is the stamp:
an edited source builds a new one; written to a temporary name and renamed, so concurrent
processes never load a half-written file). Without a compiler, or with ``VDPA_NO_SIGBUS_GUARD=1``,
:func:`available` is False and everything works as before: only the pre-callback ``fstat``
protects unsealable memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "compiled"

_lib: ctypes.CDLL | None = None
_tried = False


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return OUT / f"sigbus_guard-{digest}.so"


def build() -> Path | None:
    """Compile the handler unless the current source is built already; its path, or None when
    there is no C compiler or the build fails (then the guard is unavailable)."""
    target = library_path()
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("sigbus_guard: no C compiler; unsealable memory is only fstat-checked")
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sigbus_guard-", suffix=".so", dir=OUT)
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            log.warning("sigbus_guard: %s failed: %s", cc, r.stderr.strip())
            return None
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("VDPA_NO_SIGBUS_GUARD"):
        return None
    try:
        path = build()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("sigbus_guard: cannot load the handler: %s", e)
        return None
    u64, uptr = ctypes.c_uint64, ctypes.c_size_t
    lib.sigbus_guard_register.argtypes = [uptr, uptr, ctypes.c_int, u64, uptr]
    lib.sigbus_guard_register.restype = ctypes.c_int
    lib.sigbus_guard_unregister.argtypes = [ctypes.c_int]
    lib.sigbus_guard_unregister.restype = None
    lib.sigbus_guard_faults.argtypes = [ctypes.c_int]
    lib.sigbus_guard_faults.restype = u64
    lib.sigbus_guard_zero_from.argtypes = [ctypes.c_int]
    lib.sigbus_guard_zero_from.restype = uptr
    lib.sigbus_guard_total.argtypes = []
    lib.sigbus_guard_total.restype = u64
    _lib = lib
    return lib


def available() -> bool:
    """The native handler is built and loadable here."""
    return _load() is not None


def installed() -> bool:
    lib = _load()
    return lib is not None and bool(lib.sigbus_guard_installed())


def install() -> bool:
    """Make the handler the SIGBUS action (a no-op if it is already); the action it replaces
    receives every SIGBUS outside registered mappings. True if the handler is in place."""
    lib = _load()
    return lib is not None and lib.sigbus_guard_install() == 0


def uninstall() -> None:
    lib = _load()
    if lib is not None:
        lib.sigbus_guard_uninstall()


def mapping_address(mm: mmap.mmap) -> int:
    """The address of an mmap object's memory (the ctypes view is released at once, so the
    mmap can still be closed)."""
    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def register(mm: mmap.mmap, fd: int, file_offset: int) -> int:
    """Protect the shared mapping ``mm`` of ``fd`` (mapped from ``file_offset``): a SIGBUS in it
    is survived and counted. Installs the handler if needed (again, if someone replaced it).
    Returns the slot to ask :func:`faults` about and to :func:`unregister`, or -1 when the
    guard is unavailable or full (then the mapping is as unprotected as before)."""
    lib = _load()
    if lib is None or len(mm) == 0 or not install():
        return -1
    st = os.fstat(fd)
    gran = max(mmap.PAGESIZE, st.st_blksize if _hugetlbfs(fd) else mmap.PAGESIZE)
    length = -(-len(mm) // mmap.PAGESIZE) * mmap.PAGESIZE
    slot: int = lib.sigbus_guard_register(mapping_address(mm), length, fd, file_offset, gran)
    if slot < 0:
        log.warning("sigbus_guard: registry full; a mapping is left unprotected")
    return slot


def unregister(slot: int) -> None:
    """Forget a slot (before its mapping or its fd goes away)."""
    lib = _lib
    if lib is not None and slot >= 0:
        lib.sigbus_guard_unregister(slot)


def faults(slot: int) -> int:
    """SIGBUS caught in the mapping of ``slot`` so far."""
    lib = _lib
    return 0 if lib is None or slot < 0 else int(lib.sigbus_guard_faults(slot))


def zero_from(slot: int) -> int:
    """The lowest address of the mapping now backed by zero pages (0: none)."""
    lib = _lib
    return 0 if lib is None or slot < 0 else int(lib.sigbus_guard_zero_from(slot))


def total() -> int:
    """SIGBUS caught in any registered mapping since the process started (cheap: callers
    compare it with the value they saw last before looking at their slots)."""
    lib = _lib
    return 0 if lib is None else int(lib.sigbus_guard_total())


HUGETLBFS_MAGIC = 0x958458F6


def _hugetlbfs(fd: int) -> bool:
    """A file on hugetlbfs (its pages, and so the zero pages over them, are huge pages)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
    if libc.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == HUGETLBFS_MAGIC
