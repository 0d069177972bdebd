"""Base class of the real-guest avocado tests: guest image, backend, peer, QEMU, clean-up.

Network topology of every scenario::

    guest eth0 (10.0.0.2) -- virtio-net-pci -- vhost-user -- backend --UDP wire-- UdpPeer (10.0.0.1)

With ``NETDEV = "dgram"`` (or ``-p netdev=dgram``) QEMU's built-in dgram netdev replaces the
backend: the same scenarios then check the harness itself. Test parameters (``-p NAME=VALUE``):
``netdev`` (vhost-user | dgram), ``accel`` (tcg | kvm; kvm only if /dev/kvm is usable),
``qemu`` (binary; default ``$QTEST_QEMU_BINARY``, else qemu-system-x86_64 on PATH), ``guest_cache`` (directory), ``boot_timeout`` (seconds), ``backend_faults``
(comma-separated fault names given to every backend: does the scenario catch them?).

Every process, socket and thread a test starts is registered here and stopped in tearDown in
reverse order, also when setUp or the test failed. Per-test artifacts in ``self.logdir``:
console.log, qemu.log, backend.log/.stderr/.stdout, backend-journal.jsonl, peer.pcap,
peer.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from avocado import Test

import guest_images
from backends.vdpa.faults import FAULTS
from guest_images import udpseq
from qtests.guest.peer import UdpPeer
from qtests.guest.ports import free_udp_port
from qtests.guest.slot import GuestSlot
from qtests.guest.vm import (
    DEFAULT_MAC,
    DgramNic,
    GuestVM,
    Nic,
    VhostUserNic,
    VmConfig,
    kvm_usable,
)
from qtests.qos.backend_process import BackendProcess
from qtests.qos.machine import QemuError, find_qemu, require_qemu
from qtests.qos.waiting import WaitTimeout

DRIVER_OK = 0x4
#: longest wait for the guest test before this one (at most one runs per checkout)
GUEST_SLOT_TIMEOUT = 180.0


def tx_queue(pair: int) -> int:
    """virtio-net: rx of pair k is queue 2k, tx is 2k+1."""
    return 2 * pair + 1


def rx_queue(pair: int) -> int:
    return 2 * pair


class VdpaGuestTest(Test):
    timeout = 300
    NETDEV = "vhost-user"
    GUEST_IP = "10.0.0.2"
    PEER_IP = "10.0.0.1"
    PREFIX = 24
    GUEST_MAC = DEFAULT_MAC
    PEER_MAC = "52:54:00:00:00:01"

    # -- set-up / tear-down ------------------------------------------------------------------
    def setUp(self) -> None:
        self._cleanups_lifo: list[tuple[str, Callable[[], Any]]] = []
        # one guest at a time per checkout (plain avocado runs tests in parallel); first
        # registered, so released last
        slot = GuestSlot(Path(__file__).parent)
        waited = slot.acquire(timeout=GUEST_SLOT_TIMEOUT)
        self.register_cleanup("release the guest slot", slot.release)
        # unix socket paths must stay under 108 bytes: not in avocado's deep workdir
        self.rundir = Path(tempfile.mkdtemp(prefix="vdpa-", dir="/tmp"))
        self.register_cleanup("remove run dir", lambda: shutil.rmtree(self.rundir, True))
        self.artifacts = Path(self.logdir)
        self.netdev = str(self.params.get("netdev", default=self.NETDEV))
        if self.netdev not in ("vhost-user", "dgram"):
            self.error(f"netdev parameter must be vhost-user or dgram, not {self.netdev!r}")
        self.accel = self._pick_accel()
        try:  # the project's one choice of QEMU: -p qemu=PATH, else $QTEST_QEMU_BINARY
            self.qemu_binary = find_qemu(self.params.get("qemu", default=None))
            require_qemu(binary=self.qemu_binary)
        except QemuError as exc:
            self.error(str(exc))
        self.log.info("QEMU: %s", self.qemu_binary)
        self.boot_timeout = float(self.params.get("boot_timeout", default=120))
        cache = self.params.get("guest_cache", default=None)
        self.image = guest_images.build(Path(cache) if cache else None, log=self.log.info)
        self.log.info("guest image %s (%s): %s %s", self.image.key,
                      "cached" if self.image.cached else "built",
                      self.image.kernel, self.image.initrd)  # fmt: skip
        self.backend: BackendProcess | None = None
        self.peer: UdpPeer | None = None
        self.vm: GuestVM | None = None
        self.facts: dict[str, Any] = {"netdev": self.netdev, "accel": self.accel}
        self.facts["waited_for_guest_slot_s"] = round(waited, 1)
        #: faults every backend this test starts gets (set by expect_caught)
        self.injected_faults: list[str] = []

    def _pick_accel(self) -> str:
        want = str(self.params.get("accel", default="tcg"))
        if want == "kvm" and not kvm_usable():
            self.log.warning("accel=kvm asked for but /dev/kvm is not usable: using tcg")
            return "tcg"
        if want not in ("tcg", "kvm"):
            self.error(f"accel parameter must be tcg or kvm, not {want!r}")
        return want

    def register_cleanup(self, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in tearDown (last registered first), whatever happened before."""
        self._cleanups_lifo.append((name, fn))

    def tearDown(self) -> None:
        errors = []
        for name, fn in reversed(getattr(self, "_cleanups_lifo", [])):
            try:
                fn()
            except Exception as exc:  # keep cleaning up; report everything at the end
                self.log.exception("clean-up %r failed", name)
                errors.append(f"{name}: {exc}")
        self.whiteboard = json.dumps(getattr(self, "facts", {}), default=str)
        if errors:
            raise AssertionError("clean-up failed: " + "; ".join(errors))

    # -- building blocks ---------------------------------------------------------------------
    def require_udpseq(self) -> None:
        if not self.image.has_udpseq:
            self.cancel(f"guest has no udpseq tool: {self.image.manifest.get('udpseq')}")

    def backend_faults(self) -> list[str]:
        """Faults for every backend: the ``backend_faults`` parameter + ``expect_caught``'s."""
        extra = str(self.params.get("backend_faults", default="") or "")
        return [*(f for f in extra.split(",") if f), *self.injected_faults]

    def expect_caught(self, fault: str, scenario: Callable[[], object]) -> None:
        """Run ``scenario`` (the very checks of a normal test) with every backend started with
        ``--fault fault``: the scenario must fail its own checks (an AssertionError, which the
        harness's bounded waits -- PeerTimeout, ConsoleError -- also are, or a WaitTimeout),
        and the backend must really have run with the fault."""
        if fault not in FAULTS:
            self.error(f"unknown fault {fault!r}")
        if self.netdev != "vhost-user":
            self.cancel("faults are injected into the vhost-user backend")
        self.injected_faults = [fault]
        try:
            scenario()
        except (AssertionError, WaitTimeout) as exc:
            verdict = f"{type(exc).__name__}: {exc}"
        else:
            self.fail(f"the scenario passed with --fault {fault}: it does not catch it")
        self.log.info("--fault %s caught: %s", fault, verdict)
        self.facts["fault_caught"] = {"fault": fault, "verdict": verdict[:2000]}
        self.assertIsNotNone(self.backend, f"no backend ran with --fault {fault}")
        assert self.backend is not None
        active = [e["name"] for e in self.backend.journal(["fault.set"])]
        self.assertIn(fault, active, f"the backend did not journal fault.set {fault}")

    def start_backend(
        self, queues: int = 1, wire: str = "null", faults: Iterable[str] = (), **kw: Any
    ) -> BackendProcess:
        faults = [*faults, *self.backend_faults()]
        self.facts["backend_faults"] = faults
        backend = BackendProcess(self.artifacts, run_dir=self.rundir, queues=queues, wire=wire,
                                 faults=faults, mac=self.GUEST_MAC, log=self.log, **kw)  # fmt: skip

        def stop() -> None:
            rc = backend.stop()
            if rc not in (0, None):
                raise AssertionError(f"backend exited with {rc}, not 0, on SIGTERM")

        self.register_cleanup("stop backend", stop)
        backend.start()
        self.backend = backend
        return backend

    def start_peer(self, remote_port: int) -> UdpPeer:
        peer = UdpPeer(self.PEER_IP, self.PEER_MAC, remote=("127.0.0.1", remote_port),
                       pcap=self.artifacts / "peer.pcap", log=self.log)  # fmt: skip

        def close() -> None:
            (self.artifacts / "peer.json").write_text(json.dumps(peer.snapshot(), indent=1))
            peer.close()

        self.register_cleanup("close peer", close)
        self.peer = peer.start()
        return peer

    def start_network(self, queues: int = 1, faults: Iterable[str] = ()) -> Nic:
        """The peer plus what connects the guest NIC to it: the backend or QEMU's dgram."""
        wire_port = free_udp_port()  # the backend's (or QEMU's) end of the UDP wire
        peer = self.start_peer(wire_port)
        if self.netdev == "dgram":
            if queues != 1 or faults:
                self.cancel("QEMU's dgram netdev has one queue pair and no faults")
            return DgramNic(wire_port, peer.port, mac=self.GUEST_MAC)
        wire = f"udp:127.0.0.1:{wire_port}:{peer.port}"
        backend = self.start_backend(queues, wire, faults)
        return VhostUserNic(backend.socket, queues, mac=self.GUEST_MAC)

    def boot_guest(
        self, nics: list[Nic], smp: int = 1, kernel_args: Iterable[str] = (), **vm: Any
    ) -> GuestVM:
        """``vm``: more VmConfig fields (e.g. slots/maxmem_mb for memory hotplug)."""
        args = [f"vdpa.ip={self.GUEST_IP}/{self.PREFIX}", f"vdpa.peer={self.PEER_IP}", *kernel_args]
        cfg = VmConfig(nics=nics, smp=smp, accel=self.accel, kernel_args=args,
                       qemu=self.qemu_binary, **vm)  # fmt: skip
        vm = GuestVM(self.image, cfg, self.rundir, self.artifacts, log=self.log)

        def shutdown() -> None:
            rc = vm.shutdown()
            self.log.info("QEMU exited with %s", rc)

        self.register_cleanup("shut down QEMU", shutdown)
        self.vm = vm
        vm.launch()
        boot = vm.wait_ready(self.boot_timeout)
        self.facts["boot_seconds"] = round(boot.seconds, 2)
        self.facts["guest_uptime_at_ready"] = boot.guest_uptime
        self.assertEqual(boot.errors, [], "the guest's init reported errors")
        return vm

    # -- guest traffic -----------------------------------------------------------------------
    def guest_ping(self, vm: GuestVM, count: int, target: str | None = None) -> str:
        out = vm.run(f"ping -c {count} -i 0.2 -W 5 {target or self.PEER_IP}", timeout=30 + count)
        self.assertIn(f"{count} packets transmitted, {count} packets received", out, out)
        return out

    def guest_udp_send(
        self, vm: GuestVM, port: int, count: int, size: int, rate: int, cpu: int | None = None
    ) -> dict[str, int]:
        cmd = f"udpseq send {self.PEER_IP} {port} {count} {size} {rate}"
        if cpu is not None:
            cmd += f" {cpu}"
        out = vm.run(cmd, timeout=60 + (count / rate if rate else 0))
        report = udpseq.parse_report(out, "send")
        self.assertEqual((report["sent"], report["errors"]), (count, 0), out)
        return report

    # -- backend observations ----------------------------------------------------------------
    def backend_journal(self, kinds: list[str] | None = None) -> list[dict[str, Any]]:
        assert self.backend is not None
        return self.backend.journal(kinds)

    def assert_no_backend_errors(self) -> None:
        errors = self.backend_journal(["error."])
        self.assertEqual(errors, [], f"backend journal has errors: {errors[:5]}")

    def vring_packets(self) -> dict[int, int]:
        """Per-queue packet counters from the backend monitor's query-vrings."""
        assert self.backend is not None
        return vring_packet_counts(self.backend.cmd("query-vrings"))


def entry_queue(entry: dict[str, Any]) -> int | None:
    """The queue index a journal entry is about ("index", "vq" or "queue" field)."""
    for key in ("index", "vq", "queue"):
        if isinstance(entry.get(key), int):
            return int(entry[key])
    return None


def entry_status(entry: dict[str, Any]) -> int | None:
    """The device status a status.set journal entry sets ("new", "status" or "value" field)."""
    for key in ("new", "status", "value"):
        if isinstance(entry.get(key), int):
            return int(entry[key])
    return None


def vring_packet_counts(result: Any) -> dict[int, int]:
    """{queue index: packets} from query-vrings.

    Accepts a list of per-queue objects (or one under "vrings"/"queues"), each with its index
    in "index"/"queue"/"vq" and the count in "packets" or "counters": {"packets": N}.
    """
    queues = result
    if isinstance(result, dict):
        queues = result.get("vrings", result.get("queues", []))
    counts: dict[int, int] = {}
    for i, q in enumerate(queues):
        if not isinstance(q, dict):
            continue
        index = next((q[k] for k in ("index", "queue", "vq") if k in q), i)
        packets = q.get("packets")
        if packets is None and isinstance(q.get("counters"), dict):
            packets = q["counters"].get("packets")
        counts[int(index)] = int(packets or 0)
    return counts
