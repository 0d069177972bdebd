"""``python -m qtests.shell`` / ``vdpa-shell`` / ``make shell``: start, print, prompt, clean up.

Starts the backend and QEMU (a real guest by default, the qtest machine with ``--qtest``),
prints how to reach QEMU's QMP, the backend monitor and the guest console from another
terminal, then reads commands: from the terminal (readline), from ``--batch FILE``, or from
stdin when it is not a terminal. Whatever ends the session (quit, Ctrl-D, end of the batch,
SIGTERM, SIGHUP, an exception) stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from qtests.qos.machine import QemuError, use_qemu
from qtests.shell.prompt import SessionShell
from qtests.shell.session import Session

#: relative to the current directory (the checkout under ``make shell``), never the install tree
LOG_ROOT = Path("test-logs") / "shell"


class Terminated(SystemExit):
    """SIGTERM / SIGHUP: leave through the normal clean-up."""


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def terminating_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vdpa-shell", description=__doc__.split("\n\n")[0])
    p.add_argument("--qtest", action="store_true",
                   help="the qtest machine (qos driver at DRIVER_OK) instead of a real guest")  # fmt: skip
    p.add_argument("--queues", type=int, default=1, help="virtio-net queue pairs")
    p.add_argument("--fault", action="append", default=[], metavar="NAME",
                   help="start the backend with this fault active (repeatable)")  # fmt: skip
    p.add_argument("--batch", type=Path, metavar="FILE", help="run the commands in FILE, then quit")
    p.add_argument("--log-dir", type=Path, help=f"where logs go (default {LOG_ROOT}/<time>)")
    p.add_argument("--qemu", metavar="PATH",
                   help="the QEMU binary (default: $QTEST_QEMU_BINARY, else "
                   "qemu-system-x86_64 on PATH)")  # fmt: skip
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="real guest: accel")
    p.add_argument("--boot-timeout", type=float, default=120.0, help="real guest: seconds")
    p.add_argument("--guest-cache", type=Path, help="real guest: guest image cache directory")
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    return p.parse_args(argv)


def make_session(args: argparse.Namespace, log_dir: Path, log: logging.Logger) -> Session:
    if args.qtest:
        from qtests.shell.qtest_session import QtestSession

        return QtestSession(log_dir, queues=args.queues, faults=args.fault, log=log)
    from qtests.shell.guest_session import GuestSession

    return GuestSession(log_dir, queues=args.queues, faults=args.fault, log=log,
                        accel=args.accel, boot_timeout=args.boot_timeout,
                        guest_cache=args.guest_cache)  # fmt: skip


def set_up_logging(log_dir: Path, verbose: bool) -> logging.Logger:
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "shell.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    if verbose:
        root.addHandler(logging.StreamHandler(sys.stderr))
    return logging.getLogger("vdpa-shell")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        qemu = use_qemu(args.qemu)
    except QemuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or LOG_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir = log_dir.absolute()
    log = set_up_logging(log_dir, args.verbose)
    print(f"QEMU: {qemu}\nlogs: {log_dir}", flush=True)
    batch = args.batch.open() if args.batch else None
    shell: SessionShell | None = None
    session = make_session(args, log_dir, log)
    rc = 0
    with terminating_signals():
        try:
            what = "qtest machine" if args.qtest else "real guest"
            print(f"starting the backend and QEMU ({what}) ...", flush=True)
            t0 = time.monotonic()
            session.start()
            shell = SessionShell(session, stdin=batch)
            print(f"ready in {time.monotonic() - t0:.1f}s. From another terminal:", flush=True)
            shell.do_endpoints("")
            if shell.interactive:
                print("type help for the commands, quit or Ctrl-D to stop everything")
            run_prompt(shell)
            rc = 1 if shell.failures and not shell.interactive else 0
        except Terminated as exc:
            print(f"\nterminated by signal {int(exc.code or 128) - 128}: stopping", flush=True)
            rc = int(exc.code or 1)
        except Exception as exc:
            log.exception("session failed")
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            rc = 2
        finally:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)  # let the clean-up finish
            for line in session.close():
                print(line, flush=True)
            if batch is not None:
                batch.close()
    return rc


def run_prompt(shell: SessionShell) -> None:
    """The command loop; Ctrl-C abandons the line (or the running command), not the session."""
    while True:
        try:
            shell.cmdloop(intro="")
            return
        except KeyboardInterrupt:
            shell.say("^C (quit or Ctrl-D leaves)")
            if not shell.interactive:
                raise
