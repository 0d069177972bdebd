"""A VDUSE transport wired to the fake kernel, in-process: the unit tests' rig.

:func:`make_rig` builds loop + virtio-net + device model + :class:`VduseTransport` over a
:class:`FakeVduse` and starts it (create, queue setup, attach). :meth:`Rig.bring_up` then plays
what vhost_vdpa + QEMU do through the kernel (reset, ACK, DRIVER, set_map, FEATURES_OK, ring
setup, DRIVER_OK, ring enable), with real memfd guest memory and driver-side split rings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.loop import EventLoop
from backends.net.datapath import NetDevice
from backends.tests.capture_wire import CaptureWire
from backends.tests.conftest import DriverRing
from backends.vdpa.device import VdpaDevice
from backends.vdpa.memory import HostRegion
from backends.vduse import uapi
from backends.vduse.fake_kernel import FakeMemory, FakeVduse
from backends.vduse.transport import VduseTransport
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, Status, mask
from backends.virtio.net_header import HDR_LEN

TIMEOUT = 5.0
MEM_SIZE = 4 << 20
RING_SPACING = 1 << 20
NUM = 64
NAME = "vduse-unit"
ACK = int(Status.ACKNOWLEDGE)
DRIVER = int(Status.DRIVER)
FEATURES_OK = int(Status.FEATURES_OK)
DRIVER_OK = int(Status.DRIVER_OK)
#: What QEMU 10 acked in the lab: VERSION_1 | ACCESS_PLATFORM | STATUS
DRIVER_FEATURES = mask(VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, 16)


@dataclass
class Rig:
    kernel: FakeVduse
    loop: EventLoop
    net: NetDevice
    device: VdpaDevice
    wire: CaptureWire
    transport: VduseTransport
    mem: FakeMemory | None = None
    region: HostRegion | None = None  # the driver's view of guest memory (GPA = IOVA)
    rings: list[DriverRing] = field(default_factory=list)

    # -- waiting -------------------------------------------------------------------------------
    def reply(self, request_id: int) -> tuple[int, bytes]:
        """Run the loop until the device answered ``request_id``; (result, union)."""
        self.loop.run_until(
            lambda: self.kernel.response(request_id) is not None,
            TIMEOUT,
            f"the device's reply to VDUSE request {request_id}",
        )
        got = self.kernel.response(request_id)
        assert got is not None
        return got

    def ok(self, request_id: int) -> bytes:
        result, union = self.reply(request_id)
        assert result == uapi.VDUSE_REQ_RESULT_OK, f"request {request_id} failed"
        return union

    def set_status(self, status: int) -> int:
        """Send SET_STATUS, wait for the answer; returns the result. Status 0 also resets the
        fake's queues afterwards, as vduse_vdpa_reset does."""
        result, _ = self.reply(self.kernel.set_status(status))
        if status == 0:
            self.kernel.reset()
        return result

    def journal(self, *kinds: str) -> list[dict[str, Any]]:
        return self.device.journal.query(list(kinds) or None)

    # -- QEMU + vhost_vdpa, played through the kernel ------------------------------------------
    def map_memory(self) -> None:
        if self.mem is None:
            self.mem = self.kernel.add_memory(MEM_SIZE)
            self.region = HostRegion(0, MEM_SIZE, 0, 0, self.mem.buf)
        self.ok(self.kernel.set_map([(0, MEM_SIZE, self.mem, 0, uapi.VDUSE_ACCESS_RW)]))

    def bring_up(self, features: int = DRIVER_FEATURES, enable: bool = True) -> None:
        assert self.set_status(0) == uapi.VDUSE_REQ_RESULT_OK
        assert self.set_status(ACK) == uapi.VDUSE_REQ_RESULT_OK
        assert self.set_status(ACK | DRIVER) == uapi.VDUSE_REQ_RESULT_OK
        self.map_memory()
        self.kernel.driver_features = features
        assert self.set_status(ACK | DRIVER | FEATURES_OK) == uapi.VDUSE_REQ_RESULT_OK
        assert self.region is not None
        self.rings = []
        for i in range(len(self.kernel.vqs)):
            ring = DriverRing(self.region, NUM, i * RING_SPACING)
            self.rings.append(ring)
            self.kernel.setup_vq(i, NUM, ring.desc_iova, ring.avail_iova, ring.used_iova)
        assert self.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK) == 0
        if enable:
            for i in range(len(self.kernel.vqs)):
                self.kernel.set_ready(i)

    def wait(self, predicate: Any, what: str) -> None:
        self.loop.run_until(predicate, TIMEOUT, what)

    def close(self) -> None:
        self.transport.close()
        self.loop.close()
        self.kernel.release()


def make_rig(queue_pairs: int = 1, start: bool = True, **kernel_kw: Any) -> Rig:
    kernel = FakeVduse(**kernel_kw)
    loop = EventLoop()
    wire = CaptureWire()
    net = NetDevice(wire, queue_pairs=queue_pairs, loop=loop)
    device = VdpaDevice(net)
    transport = VduseTransport(
        device, loop, kernel, NAME, queue_pairs=queue_pairs, max_queue_size=256
    )
    rig = Rig(kernel, loop, net, device, wire, transport)
    if start:
        transport.start()
    return rig


def tx_chain(ring: DriverRing, frame: bytes) -> int:
    """Post one TX chain (net header + frame in one buffer); returns the head."""
    head, _ = ring.add_chain(out=[bytes(HDR_LEN) + frame])
    return head
