"""``python -m backends`` / ``vdpa-backend``: run one vDPA backend process.

Prints ``READY socket=PATH`` (flushed) once the vhost-user socket listens, or, with
``--transport vduse --name NAME``, ``READY vhost-vdpa=/dev/vhost-vdpa-N`` once the VDUSE device
is on the vDPA bus (SIGTERM then detaches and destroys it); exits 0 on SIGTERM
or SIGINT (delivered to the event loop through ``signal.set_wakeup_fd``, so a signal arriving
at any moment stops the loop), writing the journal file if asked.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from backends.net.config import parse_mac
from backends.net.wire import WIRE_SPECS
from backends.process import Backend, BackendOptions
from backends.vdpa.faults import FAULTS
from backends.virtio.features import TRANSPORT_FEATURE_NAMES

log = logging.getLogger("backends")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _fault(name: str) -> str:
    if name not in FAULTS:
        raise argparse.ArgumentTypeError(
            f"unknown fault {name!r}; known faults: {', '.join(sorted(FAULTS))}"
        )
    return name


def _transport_feature(name: str) -> int:
    bits = {v: k for k, v in TRANSPORT_FEATURE_NAMES.items()}
    if name not in bits:
        raise argparse.ArgumentTypeError(
            f"unknown feature {name!r}; known: {', '.join(sorted(bits))}"
        )
    return bits[name]


def _mac(text: str) -> str:
    try:
        parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vdpa-backend",
        description="A Python vDPA virtio-net backend reached by QEMU through vhost-user or, as a "
        "VDUSE device on the kernel's vDPA bus, through vhost-vdpa.",
    )
    p.add_argument(
        "--transport",
        choices=("vhost-user", "vduse"),
        default="vhost-user",
        help="how QEMU reaches the device: a vhost-user socket (default) or a VDUSE device on "
        "the kernel's vDPA bus (QEMU: -netdev vhost-vdpa; needs the vduse and vhost_vdpa "
        "modules and CAP_NET_ADMIN)",
    )
    p.add_argument("--socket", metavar="PATH", help="vhost-user socket to listen on")
    p.add_argument("--name", metavar="NAME", help="VDUSE device name (--transport vduse)")
    p.add_argument(
        "--vduse-reattach",
        action="store_true",
        help="take over the existing VDUSE device NAME left by a backend that died (its rings "
        "resume at the used index in guest memory) instead of creating one; fails when there is "
        "no such device or another process holds it",
    )
    p.add_argument("--monitor", metavar="PATH", help="QMP-compatible monitor socket")
    p.add_argument("--queues", type=_positive, default=1, metavar="N", help="queue pairs")
    p.add_argument(
        "--wire", default="loopback", metavar="SPEC", help=f"where frames go: {WIRE_SPECS}"
    )
    p.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="NAME",
        help=f"deliberately wrong behaviour (repeatable): {', '.join(sorted(FAULTS))}",
    )
    p.add_argument("--no-mem-slots", action="store_true", help="withhold CONFIGURE_MEM_SLOTS")
    p.add_argument("--no-iommu", action="store_true", help="withhold ACCESS_PLATFORM")
    p.add_argument("--no-log", action="store_true", help="withhold LOG_SHMFD and LOG_ALL")
    p.add_argument(
        "--withhold-feature",
        type=_transport_feature,
        action="append",
        default=[],
        metavar="NAME",
        help="do not offer this virtio transport feature (repeatable), e.g. INDIRECT_DESC, "
        "RING_PACKED: what QEMU's shadow virtqueues (x-svq=on) refuse",
    )
    p.add_argument("--log", metavar="FILE", help="log file (default: stderr)")
    p.add_argument("--journal-file", metavar="FILE", help="write the journal (JSON lines) at exit")
    p.add_argument("--mac", type=_mac, metavar="MAC", help="MAC address (52:54:00:12:34:56)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.transport == "vhost-user" and not args.socket:
        p.error("--socket is required with --transport vhost-user")
    if args.transport == "vduse" and not args.name:
        p.error("--name is required with --transport vduse")
    if args.vduse_reattach and args.transport != "vduse":
        p.error("--vduse-reattach needs --transport vduse")
    return args


def _setup_logging(path: str | None, verbose: bool) -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _install_signal_pipe(backend: Backend) -> tuple[int, int]:
    """SIGTERM/SIGINT -> a byte on a pipe the loop watches -> loop.stop()."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stop_numbers = {int(s) for s in STOP_SIGNALS}

    def on_wakeup() -> None:
        try:
            data = os.read(r, 512)
        except BlockingIOError:
            return
        if stop_numbers & set(data):
            log.info("stop signal received")
            backend.loop.stop()

    backend.loop.add_reader(r, on_wakeup)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)  # the C handler writes the wakeup byte
    return r, w


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log, args.verbose)
    options = BackendOptions(
        socket=args.socket or "",
        monitor=args.monitor,
        queues=args.queues,
        wire=args.wire,
        faults=args.fault,
        offer_mem_slots=not args.no_mem_slots,
        offer_iommu=not args.no_iommu,
        offer_log=not args.no_log,
        withhold_features=sum(1 << b for b in set(args.withhold_feature)),
        mac=args.mac,
        journal_file=args.journal_file,
        transport=args.transport,
        name=args.name,
        reattach=args.vduse_reattach,
    )
    try:
        backend = Backend(options)
    except (ValueError, OSError) as e:
        print(f"vdpa-backend: {e}", file=sys.stderr)
        return 1
    r, w = _install_signal_pipe(backend)
    try:
        try:
            ready = backend.start()
        except OSError as e:
            print(f"vdpa-backend: {e}", file=sys.stderr)
            return 1
        print(f"READY {ready}", flush=True)
        log.info("backend ready: %s monitor=%s", ready, args.monitor)
        backend.run()
        return 0
    finally:
        signal.set_wakeup_fd(-1)
        backend.close()
        os.close(r)
        os.close(w)


if __name__ == "__main__":
    sys.exit(main())
