"""Boot the vhost-vdpa lab (L1) under QEMU, run one command in it, get its results back.

L1 is the kernel + initramfs of :mod:`guest_images.lab`. QEMU shares the host's root read-only
(9p tag ``host``) and one writable directory (tag ``out``, the *share*); L1's /init chroots
into the host root, so the command runs with the host's python, the project's venv, QEMU and
iproute2, and paths mean the same file on both sides. One boot runs one command
(``share/command.sh``); its stdout, stderr and exit code come back through the share, and the
serial console is copied line by line to ``console.log`` beside the share.

Nothing here sleeps: the console is read by a thread, and the caller waits on what that
thread saw (the /init markers, a kernel panic line, QEMU's end of output), each wait bounded
by a timeout whose message names the marker it waited for. QEMU is always stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from guest_images import lab as image
from guest_images.apt import AptError
from guest_images.builder import BuildError, GuestImage
from qtests.qos.backend_process import REPO_ROOT
from qtests.qos.machine import find_qemu
from qtests.qos.processes import die_with_parent, stop_process

#: Default L1 memory: an L2 QEMU (its own guest RAM), python and a tmpfs /tmp run inside.
MEMORY_MB = 2048
#: Wall seconds from QEMU start to VDPA-LAB-READY (about 7 s on an idle 2-core machine).
BOOT_TIMEOUT = 180.0
#: Wall seconds from VDPA-LAB-DONE to QEMU's exit (power-off).
POWEROFF_TIMEOUT = 60.0
#: Kernel command line besides lab.share= (panic=-1: a panicking L1 resets, and -no-reboot
#: turns that reset into QEMU's exit, so a panic ends the run at once).
KERNEL_ARGS = ("console=ttyS0", "panic=-1", "loglevel=5")

_DONE = re.compile(rf"{image.DONE_MARKER} rc=(-?\d+)")
_PANIC = re.compile(r"Kernel panic - not syncing.*")
_UPTIME = re.compile(r"uptime=([\d.]+)")


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why (and where the logs are)."""


class LabUnavailable(LabError):
    """This host cannot run the lab at all (no QEMU, no TCG, no image); says how to get it."""


class LabBootError(LabError):
    """L1 did not reach VDPA-LAB-READY: the message names the reason, the console log is kept."""

    def __init__(self, reason: str, console_log: Path) -> None:
        self.reason = reason
        self.console_log = console_log
        super().__init__(f"L1 did not boot: {reason} (console log: {console_log})")


class LabRunError(LabError):
    """L1 booted but the command did not finish (timeout, panic, QEMU died)."""

    def __init__(self, reason: str, console_log: Path) -> None:
        self.reason = reason
        self.console_log = console_log
        super().__init__(f"L1 command did not finish: {reason} (console log: {console_log})")


@dataclass
class LabResult:
    rc: int
    stdout: str
    stderr: str
    share: Path  # the writable share: files the command wrote are here
    console_log: Path
    boot_seconds: float  # wall: QEMU start to VDPA-LAB-READY
    run_seconds: float  # wall: VDPA-LAB-READY to VDPA-LAB-DONE
    total_seconds: float  # wall: QEMU start to QEMU exit
    guest_uptime: dict[str, float] = field(default_factory=dict)  # marker -> L1 uptime (s)


class _Console:
    """Reads L1's serial console (QEMU's stdout) into a log file and remembers the markers."""

    def __init__(self, stream: IO[bytes], log_path: Path) -> None:
        self._stream = stream
        self._log = log_path.open("wb")
        self._cond = threading.Condition()
        self.lines: list[str] = []
        self.marker_time: dict[str, float] = {}  # marker -> time.monotonic() when seen
        self.uptime: dict[str, float] = {}
        self.errors: list[str] = []
        self.panic: str | None = None
        self.rc: int | None = None
        self.ended = False
        self._thread = threading.Thread(target=self._run, name="lab-console", daemon=True)
        self._thread.start()

    def _line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r\n")
        with self._cond:
            self.lines.append(line)
            for marker in (image.INIT_MARKER, image.READY_MARKER, image.DONE_MARKER,
                           image.FAILED_MARKER):  # fmt: skip
                if line.startswith(marker) and marker not in self.marker_time:
                    self.marker_time[marker] = time.monotonic()
                    if m := _UPTIME.search(line):
                        self.uptime[marker] = float(m.group(1))
            if line.startswith(image.ERROR_MARKER):
                self.errors.append(line[len(image.ERROR_MARKER) :].lstrip(": "))
            if self.panic is None and (m := _PANIC.search(line)):
                self.panic = m.group(0)
            if m := _DONE.match(line):
                self.rc = int(m.group(1))
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            for raw in iter(self._stream.readline, b""):
                self._log.write(raw)
                self._log.flush()
                self._line(raw)
        finally:
            self._log.close()
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on the reader's notifications) until ``predicate`` or the console ends."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate() or self.ended, timeout) and predicate()

    def seen(self, marker: str) -> bool:
        return marker in self.marker_time

    def last_line(self) -> str:
        with self._cond:
            for line in reversed(self.lines):
                if line.strip():
                    return line.strip()
        return "(nothing on the console)"

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def accelerator() -> list[str]:
    """TCG, unless ``VDPA_LAB_ACCEL=kvm`` opts into KVM (only where KVM is real hardware
    virtualization: the /dev/kvm of our machines is a software virtualizer that cannot boot L1)."""
    if os.environ.get("VDPA_LAB_ACCEL", "tcg") == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]


#: The host directories L1 mounts its own tmpfs on: host paths below them are hidden in L1
#: unless named in ``lab.keep=`` (guest_images/lab_init.sh).
L1_TMPFS_DIRS = ("/tmp/", "/run/", "/var/tmp/")


def kept_host_paths(qemu: str, extra: tuple[Path, ...] = ()) -> list[str]:
    """The host directories L1 must still see through its own /tmp, /run and /var/tmp: the
    checkout, the Python running us and its venv, the QEMU binary's directory (a clone in
    /tmp, a QEMU built in /tmp/qemu/build, ...), and ``extra``."""
    candidates = [
        REPO_ROOT,
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.executable).resolve().parent,
        Path(qemu).resolve().parent,
        *extra,
    ]
    kept: list[str] = []
    for c in candidates:
        path = str(c.resolve())
        if not path.startswith(L1_TMPFS_DIRS) or any(
            path == k or path.startswith(k + "/") for k in kept
        ):
            continue
        if re.search(r"[\s,]", path):
            raise LabError(f"{path} contains white space or a comma (kernel command line)")
        kept = [k for k in kept if not k.startswith(path + "/")] + [path]
    return kept


def qemu_command(
    qemu: str, img: GuestImage, share: Path, memory_mb: int, kernel_args: list[str]
) -> list[str]:
    keep = kept_host_paths(qemu)
    append = " ".join(
        [*KERNEL_ARGS, f"lab.share={share}", *([f"lab.keep={','.join(keep)}"] if keep else []),
         *kernel_args]
    )  # fmt: skip
    return [
        qemu, *accelerator(), "-smp", os.environ.get("VDPA_LAB_SMP", "1"), "-m", str(memory_mb),
        "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on",
        "-virtfs", f"local,path={share},mount_tag=out,security_model=none",
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
    ]  # fmt: skip


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def run_in_lab(
    command: str,
    workdir: Path,
    *,
    img: GuestImage | None = None,
    timeout: float = 600.0,
    boot_timeout: float = BOOT_TIMEOUT,
    memory_mb: int = MEMORY_MB,
    kernel_args: list[str] | None = None,
    qemu: str | None = None,
) -> LabResult:
    """Boot L1, run ``command`` (a /bin/sh script) in it, power off; return its results.

    ``workdir`` receives ``share/`` (the writable share: command.sh, stdout, stderr, rc,
    dmesg.txt and whatever the command writes there, path ``$VDPA_LAB_SHARE`` inside L1),
    ``console.log`` (L1's serial console) and ``qemu.log`` (QEMU's stderr); all are kept.
    Raises :class:`LabBootError` if L1 does not reach /init's READY marker within
    ``boot_timeout`` s, :class:`LabRunError` if the command does not finish within
    ``timeout`` s. A non-zero exit code of the command is a result, not an error.
    """
    workdir = workdir.resolve()
    share = workdir / "share"
    if re.search(r"\s", str(share)):
        raise LabError(f"lab share path {share} contains white space (kernel command line)")
    if img is None:
        try:
            img = image.build_lab(log=lambda _msg: None)
        except (BuildError, AptError, OSError) as exc:
            raise LabUnavailable(
                f"the lab image could not be built: {exc} (try: make lab-image)"
            ) from exc
    qemu = qemu or find_qemu()
    share.mkdir(parents=True, exist_ok=True)
    for name in (image.STDOUT_FILE, image.STDERR_FILE, image.RC_FILE, image.DMESG_FILE):
        (share / name).unlink(missing_ok=True)
    (share / image.COMMAND_FILE).write_text(command if command.endswith("\n") else command + "\n")
    console_log, qemu_log = workdir / "console.log", workdir / "qemu.log"
    argv = qemu_command(qemu, img, share, memory_mb, kernel_args or [])
    (workdir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")

    t0 = time.monotonic()
    with qemu_log.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
    assert proc.stdout is not None
    console = _Console(proc.stdout, console_log)
    try:
        _wait_ready(console, proc, boot_timeout, console_log, qemu_log)
        t_ready = console.marker_time[image.READY_MARKER]
        if not console.wait(lambda: console.rc is not None, timeout):
            raise LabRunError(_run_failure(console, proc, timeout, qemu_log), console_log)
        t_done = console.marker_time[image.DONE_MARKER]
        if not console.wait(lambda: False, POWEROFF_TIMEOUT) and not console.ended:
            raise LabRunError(
                f"timed out after {POWEROFF_TIMEOUT:.0f} s waiting for L1 to power off "
                f"after {image.DONE_MARKER}",
                console_log,
            )
        proc.wait(timeout=POWEROFF_TIMEOUT)
        t_end = time.monotonic()
    finally:
        if proc.poll() is None:
            stop_process(proc, "lab QEMU (L1)", grace=5.0)
        console.join(10.0)
        if proc.stdout is not None:
            proc.stdout.close()
    assert console.rc is not None
    rc_file = share / image.RC_FILE
    try:
        rc = int(rc_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise LabRunError(
            f"{rc_file} unreadable after {image.DONE_MARKER}: {exc}", console_log
        ) from exc
    return LabResult(
        rc=rc,
        stdout=_read(share / image.STDOUT_FILE),
        stderr=_read(share / image.STDERR_FILE),
        share=share,
        console_log=console_log,
        boot_seconds=round(t_ready - t0, 2),
        run_seconds=round(t_done - t_ready, 2),
        total_seconds=round(t_end - t0, 2),
        guest_uptime=dict(console.uptime),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _wait_ready(
    console: _Console,
    proc: subprocess.Popen[bytes],
    timeout: float,
    console_log: Path,
    qemu_log: Path,
) -> None:
    ready = console.wait(
        lambda: (
            console.seen(image.READY_MARKER)
            or console.seen(image.FAILED_MARKER)
            or console.panic is not None
        ),
        timeout,
    )
    if ready and console.seen(image.READY_MARKER):
        return
    if console.errors:
        reason = f"L1's /init failed: {'; '.join(console.errors)}"
    elif console.panic is not None:
        reason = f"L1 kernel panic: {console.panic}"
    elif console.ended:
        rc = _exit_status(proc)
        reason = (
            f"QEMU exited ({rc}) before {image.READY_MARKER} appeared on L1's console; "
            f"QEMU said: {_tail(qemu_log, 600) or '(nothing)'}; last console line: "
            f"{console.last_line()}"
        )
    else:
        where = (
            "the kernel booted, /init started"
            if console.seen(image.INIT_MARKER)
            else (f"/init never started ({image.INIT_MARKER} not seen)")
        )
        reason = (
            f"timed out after {timeout:.0f} s waiting for {image.READY_MARKER} on L1's "
            f"console ({where}; last console line: {console.last_line()})"
        )
    raise LabBootError(reason, console_log)


def _run_failure(
    console: _Console, proc: subprocess.Popen[bytes], timeout: float, qemu_log: Path
) -> str:
    if console.panic is not None:
        return f"L1 kernel panic while the command ran: {console.panic}"
    if console.ended:
        return (
            f"QEMU exited ({_exit_status(proc)}) before {image.DONE_MARKER}; QEMU said: "
            f"{_tail(qemu_log, 600) or '(nothing)'}"
        )
    return (
        f"timed out after {timeout:.0f} s waiting for the command to finish "
        f"({image.DONE_MARKER} on L1's console)"
    )


def _exit_status(proc: subprocess.Popen[bytes]) -> str:
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"exit status {rc}"
