"""A real Linux guest as L2 over ``-netdev vhost-vdpa`` on our VDUSE device, run inside L1.

Topology, all inside L1 (the lab VM, :mod:`qtests.lab.vm`)::

    L2 eth0 (10.0.0.2) -- virtio-net-pci -- vhost-vdpa -- VDUSE -- backend
        --UDP wire on 127.0.0.1-- UdpPeer (10.0.0.1)

:func:`run_l2_guest` (the inner side, ``python -m qtests.guest.vdpa_l2`` in L1) starts the
backend with ``--transport vduse``, boots the guest image as L2, pings, runs a numbered UDP
stream each way and writes every finding to ``result.json`` in its output directory; QEMU,
the backend and the peer are always stopped. Each check is recorded, not asserted, so that a
faulty device (``--fault drop-tx``) yields a complete report of what it broke.

The end of each stream is proven by a sentinel behind it on the same FIFO path, never by a
silence window: guest -> wire, the guest pings the peer after ``udpseq send`` (the echo
request leaves through the same TX queue, after the datagrams); wire -> guest, the peer pings
the guest after the stream (the echo request enters through the same RX queue). Once the
sentinel is through, the counts are final: a duplicate arriving after ``udpseq recv`` closed
shows in the guest's UDP counters (``/proc/net/snmp``), which must have grown by exactly the
stream's length.

:func:`run_in_lab_l2` (the host side) boots L1 with :func:`qtests.lab.vm.run_in_lab`, runs
the inner side there and reads its ``result.json`` back.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest_images import GuestImage, udpseq
from qtests.guest.peer import UdpPeer
from qtests.guest.ports import free_udp_port
from qtests.guest.vm import DEFAULT_MAC, GuestVM, VhostVdpaNic, VmConfig
from qtests.lab.vm import LabResult, run_in_lab
from qtests.qos.backend_process import REPO_ROOT, BackendProcess, backend_python

_log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
GUEST_IP = "10.0.0.2"
PEER_IP = "10.0.0.1"
PEER_MAC = "52:54:00:00:00:01"
GUEST_MAC = DEFAULT_MAC  # the backend's config-space MAC: what the guest driver reads
PINGS = 3
COUNT = 200  # datagrams per direction
SIZE = 1000  # one Ethernet frame, no IP fragments
RATE = 50  # datagrams/s: nested TCG, a lossless stream, not a throughput test
GUEST_TO_WIRE_PORT = 5001
WIRE_TO_GUEST_PORT = 5002
#: Wall seconds for the L2 kernel to reach its shell inside L1 (measured ~90-100 s idle).
BOOT_TIMEOUT = 420.0
#: Wall seconds for one sentinel (ARP + echo) under nested TCG on a loaded machine.
SENTINEL_TIMEOUT = 60.0


@dataclass
class Step:
    """One check of the run: its facts, and an error text if it did not hold."""

    name: str
    ok: bool = False
    error: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "seconds": round(self.seconds, 2)}


def _udp_counters(vm: GuestVM) -> dict[str, int]:
    """The guest's ``Udp:`` line of /proc/net/snmp as {field: value}."""
    lines = [ln.split() for ln in vm.run("grep '^Udp:' /proc/net/snmp").splitlines()]
    header, values = lines[0][1:], lines[1][1:]
    return {k: int(v) for k, v in zip(header, values, strict=True)}


def _udp_arrived(before: dict[str, int], after: dict[str, int]) -> int:
    """Datagrams the guest's UDP layer saw between two snapshots (delivered or not)."""
    keys = ("InDatagrams", "NoPorts", "InErrors")
    return sum(after.get(k, 0) - before.get(k, 0) for k in keys)


def run_l2_guest(
    image: GuestImage,
    out: Path,
    *,
    faults: Iterable[str] = (),
    count: int = COUNT,
    boot_timeout: float = BOOT_TIMEOUT,
    qemu: str | None = None,
    log: logging.Logger = _log,
) -> dict[str, Any]:
    """Inside L1: backend on VDUSE, L2 guest, ping, both streams; the findings (also written
    to ``out/result.json``). Every process started here is stopped before it returns."""
    out.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="vdpa-l2-", dir="/tmp"))
    result: dict[str, Any] = {"faults": list(faults), "count": count, "size": SIZE}
    steps: dict[str, Step] = {}
    t0 = time.monotonic()
    peer: UdpPeer | None = None
    backend: BackendProcess | None = None
    vm: GuestVM | None = None

    def step(name: str, body: Callable[[Step], None]) -> bool:
        s = steps[name] = Step(name)
        started = time.monotonic()
        try:
            body(s)
            s.ok = not s.error
        except Exception as exc:  # recorded: the report names every check that failed
            log.exception("step %s failed", name)
            s.error = f"{type(exc).__name__}: {exc}"
        s.seconds = time.monotonic() - started
        log.info("step %s: %s %s", name, "ok" if s.ok else "FAILED", s.error)
        return s.ok

    try:
        wire_port = free_udp_port()
        peer = UdpPeer(
            PEER_IP, PEER_MAC, remote=("127.0.0.1", wire_port), pcap=out / "peer.pcap", log=log
        ).start()
        backend = BackendProcess(
            out,
            run_dir=rundir,
            wire=f"udp:127.0.0.1:{wire_port}:{peer.port}",
            faults=list(faults),
            mac=GUEST_MAC,
            transport="vduse",
            log=log,
        )

        def start_backend(s: Step) -> None:
            assert backend is not None
            backend.start(timeout=120.0)
            result["vhost_vdpa"] = backend.vhost_vdpa

        if not step("backend", start_backend):
            return result
        assert backend.vhost_vdpa is not None
        cfg = VmConfig(
            nics=[VhostVdpaNic(backend.vhost_vdpa, GUEST_MAC)],
            accel="tcg",
            kernel_args=[f"vdpa.ip={GUEST_IP}/24", f"vdpa.peer={PEER_IP}"],
            qemu=qemu,
        )
        vm = GuestVM(image, cfg, rundir, out, log=log)

        def boot(s: Step) -> None:
            assert vm is not None
            vm.launch(timeout=120.0)
            info = vm.wait_ready(boot_timeout)
            result["boot"] = {
                "seconds": round(info.seconds, 2),
                "guest_uptime": info.guest_uptime,
                "interfaces": info.interfaces,
                "errors": info.errors,
            }
            if info.errors:
                s.error = f"the guest's init reported errors: {info.errors}"

        if not step("boot", boot):
            return result
        assert vm is not None and vm.console is not None
        console = vm.console

        def ping(s: Step) -> None:
            assert vm is not None and peer is not None
            text = vm.console.run(f"ping -c {PINGS} -i 0.5 -W 10 {PEER_IP}", 60 + 10 * PINGS)  # type: ignore[union-attr]
            result["ping"] = {"output": text.output, "rc": text.rc}
            if f"{PINGS} packets transmitted, {PINGS} packets received" not in text.output:
                s.error = f"guest ping: {text.output.splitlines()[-2:]}"
            seqs = [q for ip, _, q in peer.echo_requests if ip == GUEST_IP]
            if seqs[:PINGS] != list(range(PINGS)):
                s.error += f" peer saw echo requests {seqs}, not 0..{PINGS - 1}"

        step("ping", ping)

        def guest_to_wire(s: Step) -> None:
            assert vm is not None and peer is not None
            stats = peer.expect_stream(GUEST_TO_WIRE_PORT, count)
            requests = len(peer.echo_requests)
            sent = vm.console.run(  # type: ignore[union-attr]
                f"udpseq send {PEER_IP} {GUEST_TO_WIRE_PORT} {count} {SIZE} {RATE}",
                120 + count / RATE,
            )
            report = udpseq.parse_report(sent.output, "send")
            # the sentinel: one echo request behind the datagrams on the same TX queue
            sentinel = vm.console.run(f"ping -c 1 -W 20 {PEER_IP}", 60)  # type: ignore[union-attr]
            result["guest_to_wire"] = {"sender": report, "sentinel_rc": sentinel.rc}
            try:
                peer.wait_counter("icmp_echo_requests", requests + 1, SENTINEL_TIMEOUT)
            finally:  # what arrived, final or not, is in the report
                got = peer.snapshot()
                result["guest_to_wire"].update(
                    receiver=stats.as_dict(), peer_counters=got["counters"]
                )
            if report.get("sent") != count or report.get("errors"):
                s.error = f"udpseq send: {report}"
            if (stats.unique, stats.dups, stats.corrupt, stats.received) != (count, 0, 0, count):
                s.error += f" peer received {stats.as_dict()}"
            counters = got["counters"]
            bad = counters.get("udp_bad_checksum", 0) if isinstance(counters, dict) else 0
            if bad:
                s.error += f" {bad} datagrams with a bad UDP checksum"

        step("guest_to_wire", guest_to_wire)

        def wire_to_guest(s: Step) -> None:
            assert vm is not None and peer is not None
            before = _udp_counters(vm)
            pending = console.start(f"udpseq recv {WIRE_TO_GUEST_PORT} {count} 120")
            console.read_until(r"udpseq recv: listening[^\n]*\n", 60, "udpseq recv to listen")
            sent = peer.send_stream(GUEST_IP, WIRE_TO_GUEST_PORT, count, SIZE, RATE)
            done = console.finish(pending, timeout=180 + count / RATE)
            report = udpseq.parse_report(done.output, "recv")
            # the sentinel: one echo request behind the datagrams on the same RX queue
            peer.ping(GUEST_IP, 0x5D, 1, SENTINEL_TIMEOUT)
            after = _udp_counters(vm)
            arrived = _udp_arrived(before, after)
            result["wire_to_guest"] = {
                "sent": sent,
                "receiver": report,
                "recv_rc": done.rc,
                "udp_arrived": arrived,
                "udp_before": before,
                "udp_after": after,
            }
            if sent != count:
                s.error = f"peer sent {sent} of {count}"
            if (report["unique"], report["dups"], report["corrupt"], report.get("end")) != (
                count,
                0,
                0,
                1,
            ):
                s.error += f" guest received {report}"
            if arrived != count + 1:  # the stream and its end-of-stream datagram
                s.error += (
                    f" the guest's UDP layer saw {arrived} datagrams, not {count} + the "
                    "end-of-stream one"
                )
            if done.rc != 0:
                s.error += f" udpseq recv exited {done.rc}"

        step("wire_to_guest", wire_to_guest)
        return result
    finally:
        if vm is not None:
            result["qemu_rc"] = vm.shutdown()
        if backend is not None:
            result["backend_rc"] = backend.stop()
            result["backend_errors"] = _journal_errors(backend)
        if peer is not None:
            (out / "peer.json").write_text(json.dumps(peer.snapshot(), indent=1, default=str))
            peer.close()
        shutil.rmtree(rundir, ignore_errors=True)
        result["steps"] = {name: s.as_dict() for name, s in steps.items()}
        wanted = ("backend", "boot", "ping", "guest_to_wire", "wire_to_guest")
        result["ok"] = all(steps.get(n, Step(n)).ok for n in wanted)
        result["seconds"] = round(time.monotonic() - t0, 2)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str))


def _journal_errors(backend: BackendProcess) -> list[dict[str, Any]] | str:
    try:
        return [
            e for e in backend.read_journal_file() if str(e.get("kind", "")).startswith("error.")
        ]
    except Exception as exc:  # the report must still be written
        return f"journal unreadable: {exc}"


# -- the host side -------------------------------------------------------------------------------
#: L1 memory: the L2's 512 MiB of guest RAM plus the L2 QEMU, python and /tmp.
L1_MEMORY_MB = 2048
#: Wall seconds the inner run may take (boot of L2 under nested TCG dominates).
INNER_TIMEOUT = 900.0


@dataclass
class L2Run:
    lab: LabResult
    result: dict[str, Any]  # the inner result.json ({} if the inner side wrote none)
    inner: Path  # where the inner logs are (console.log of L2, qemu.log, backend logs)


def inner_command(
    image_dir: Path, faults: Iterable[str], count: int, qemu: str | None = None
) -> str:
    args = [backend_python(), "-m", "qtests.guest.vdpa_l2", "--image", str(image_dir),
            "--count", str(count)]  # fmt: skip
    for f in faults:
        args += ["--fault", f]
    if qemu:
        args += ["--qemu", qemu]
    return (
        "set -u\n"
        f"cd {shlex.quote(str(REPO_ROOT))}\n"
        "export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1\n"
        f'exec {" ".join(shlex.quote(a) for a in args)} --out "$VDPA_LAB_SHARE/l2"\n'
    )


def run_in_lab_l2(
    image: GuestImage,
    workdir: Path,
    *,
    faults: Iterable[str] = (),
    count: int = COUNT,
    qemu: str | None = None,
    timeout: float = INNER_TIMEOUT,
) -> L2Run:
    """From the host: boot L1, run :func:`run_l2_guest` there, return its findings."""
    faults = list(faults)
    lab = run_in_lab(
        inner_command(image.directory, faults, count, qemu),
        workdir,
        timeout=timeout,
        memory_mb=L1_MEMORY_MB,
        qemu=qemu,
    )
    inner = lab.share / "l2"
    try:
        result = json.loads((inner / RESULT_FILE).read_text())
    except (OSError, ValueError):
        result = {}
    return L2Run(lab, result, inner)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qtests.guest.vdpa_l2", description=__doc__)
    p.add_argument("--image", type=Path, required=True, help="guest image directory")
    p.add_argument("--out", type=Path, required=True, help="logs and result.json")
    p.add_argument("--fault", action="append", default=[], help="backend fault to inject")
    p.add_argument("--count", type=int, default=COUNT, help="datagrams per direction")
    p.add_argument("--qemu", default=None, help="QEMU binary for L2")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        handlers=[logging.FileHandler(args.out / "inner.log"), logging.StreamHandler(sys.stderr)],
    )
    image = GuestImage(args.image, json.loads((args.image / "manifest.json").read_text()), True)
    try:
        result = run_l2_guest(image, args.out, faults=args.fault, count=args.count, qemu=args.qemu)
    except Exception:
        traceback.print_exc()
        return 2
    print(json.dumps({k: result.get(k) for k in ("ok", "seconds", "steps")}))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
