"""A real Linux guest over vhost-vdpa: boot, ping, a numbered UDP stream each way.

The host kernel here has no vduse, so the whole scenario runs in the lab VM (L1, TCG):
our backend on the kernel's vDPA bus through VDUSE, the guest image booted as L2 with
``-netdev vhost-vdpa``, the UDP wire and its peer on L1's loopback
(:mod:`qtests.guest.vdpa_l2`). The findings come back through the lab's share as JSON and are
asserted here. Logs in the job's logdir: ``lab/console.log`` (L1), ``lab/qemu.log`` (L1's
QEMU) and ``lab/share/l2/`` (L2's console.log and qemu.log, the backend's logs and journal,
peer.pcap, peer.json, inner.log, result.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avocado_tests.base import VdpaGuestTest
from qtests.guest.vdpa_l2 import COUNT, L2Run, run_in_lab_l2
from qtests.lab.vm import LabError


class _VdpaGuestRun(VdpaGuestTest):
    """Runs the L2 scenario in the lab (no test of its own: avocado merges a base class's
    tags into its subclasses, and only the clean run belongs to the CI subset)."""

    timeout = 1200
    FAULTS: tuple[str, ...] = ()

    def run_l2(self) -> L2Run:
        self.require_udpseq()
        extra = str(self.params.get("backend_faults", default="") or "")
        faults = [*self.FAULTS, *(f for f in extra.split(",") if f)]
        self.facts["backend_faults"] = faults
        self.facts["netdev"] = "vhost-vdpa (VDUSE, in the lab VM)"
        try:
            run = run_in_lab_l2(
                self.image, Path(self.logdir) / "lab", faults=faults, qemu=self.qemu_binary
            )
        except LabError as exc:
            self.fail(f"the lab run failed: {exc}")
        self.facts["lab"] = {
            "boot_s": run.lab.boot_seconds,
            "run_s": run.lab.run_seconds,
            "total_s": run.lab.total_seconds,
        }
        self.facts["l2"] = {k: run.result.get(k) for k in ("ok", "seconds", "steps", "boot")}
        self.log.info("lab: %s; L2 run: %s", self.facts["lab"], self.facts["l2"])
        self.assertTrue(
            run.result, f"no result.json from L1; its stderr:\n{run.lab.stderr[-3000:]}"
        )
        self.assertEqual(run.result.get("qemu_rc"), 0, "L2 QEMU did not exit 0 on quit")
        self.assertEqual(run.result.get("backend_rc"), 0, "backend did not exit 0 on SIGTERM")
        return run


class VdpaGuest(_VdpaGuestRun):
    """:avocado: tags=ci,vdpa,net,udp"""

    def test_boot_ping_streams(self) -> None:
        run = self.run_l2()
        r = run.result
        steps: dict[str, Any] = r["steps"]
        failed = {n: s["error"] for n, s in steps.items() if not s["ok"]}
        self.assertEqual(failed, {}, f"steps failed (logs: {run.inner})")
        self.assertTrue(r["ok"], r)
        g2w, w2g = r["guest_to_wire"], r["wire_to_guest"]
        self.assertEqual(
            (g2w["receiver"]["unique"], g2w["receiver"]["dups"], g2w["receiver"]["corrupt"]),
            (COUNT, 0, 0),
        )
        self.assertEqual(
            (
                w2g["receiver"]["unique"],
                w2g["receiver"]["dups"],
                w2g["receiver"]["corrupt"],
                w2g["receiver"]["end"],
            ),
            (COUNT, 0, 0, 1),
        )
        self.assertEqual(g2w["receiver"]["end"], 1, "guest -> wire: no end-of-stream datagram")
        # the stream and its end-of-stream datagram, nothing after it
        self.assertEqual(w2g["udp_arrived"], COUNT + 1)
        self.assertEqual(r["backend_errors"], [])


class VdpaGuestDropTx(_VdpaGuestRun):
    """Meta-test: a device that drops TX frames (``drop-tx``) must fail the checks.

    :avocado: tags=vdpa,meta
    """

    FAULTS = ("drop-tx",)

    def test_boot_ping_streams(self) -> None:
        run = self.run_l2()
        steps: dict[str, Any] = run.result["steps"]
        self.assertTrue(steps["boot"]["ok"], steps)  # the fault is in the datapath only
        self.assertFalse(run.result["ok"], "drop-tx went unnoticed")
        self.assertFalse(steps["ping"]["ok"], steps)
        self.assertFalse(steps["guest_to_wire"]["ok"], steps)
        lost = run.result.get("guest_to_wire", {}).get("receiver", {}).get("unique", 0)
        self.assertLess(lost, COUNT)
