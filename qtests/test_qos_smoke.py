"""Smoke tests of the qtest driver library (qtests.qos) against real QEMU.

QEMU's own virtio-net (no vhost) with the built-in ``-netdev dgram`` backend: frames the
driver transmits arrive on a datagram socket of the test, and datagrams the test sends arrive
in the driver's RX ring.  Also unit tests of the pieces that need no QEMU.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.virtio.features import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    bit,
)
from backends.virtio.net import VIRTIO_NET_F_MRG_RXBUF
from qtests.qos import (
    AllocError,
    GuestAllocator,
    PciBus,
    QemuLaunchError,
    QemuMachine,
    QemuNotFound,
    QemuTooOld,
    QmpError,
    QmpTimeout,
    QTest,
    QTestClosed,
    QTestError,
    QTestTimeout,
    VirtioNetDriver,
    VirtqueueError,
    qemu_version,
    require_qemu,
    write_halt_bios,
)
from qtests.qos.machine import MIN_QEMU_VERSION, MemoryLayout, qemu_opts
from qtests.qos.pci.config import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR
from qtests.qos.virtio_net import NET_HDR_SIZE, VirtioNetHdr
from qtests.qos.virtio_pci import (
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VirtioPciDevice,
)
from qtests.qos.virtqueue import VRING_DESC_F_NEXT, SplitVirtqueue, vring_need_event

MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("5254009abcde")


def eth_frame(payload: bytes, dst: bytes = MAC, src: bytes = PEER_MAC) -> bytes:
    return dst + src + b"\x88\xb5" + payload  # local experimental ethertype


# ---------------------------------------------------------------------------- helpers
class FramePeer:
    """Far end of QEMU's dgram netdev: a datagram socket drained by a reader thread."""

    def __init__(self, family: int, bind_to: str | tuple[str, int]) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.address = self.sock.getsockname()
        self.frames: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-peer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                try:
                    self.frames.put(self.sock.recv(65536))
                except OSError:
                    return

    def send(self, frame: bytes, to: str | tuple[str, int]) -> None:
        self.sock.sendto(frame, to)

    def expect(self, timeout: float = 5.0) -> bytes:
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame reached the test socket within {timeout}s") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if self.sock.family == socket.AF_UNIX and isinstance(self.address, str):
            Path(self.address).unlink(missing_ok=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NetVm:
    machine: QemuMachine
    peer: FramePeer
    qemu_addr: str | tuple[str, int]
    alloc: GuestAllocator
    bus: PciBus
    drivers: list[VirtioNetDriver]

    def driver(self, **init: object) -> VirtioNetDriver:
        net = VirtioNetDriver.find(self.bus, self.alloc)
        self.drivers.append(net)
        net.init(**init)  # type: ignore[arg-type]
        return net

    def inject(self, frame: bytes) -> None:
        self.peer.send(frame, self.qemu_addr)


@pytest.fixture
def net_vm(log_dir: Path) -> Iterator[Callable[..., NetVm]]:
    """Factory: QEMU with virtio-net-pci on a dgram netdev, plus the test's peer socket."""
    made: list[NetVm] = []
    cleanups: list[Callable[[], None]] = []

    def start(transport: str = "unix", **virtio: object) -> NetVm:
        m = QemuMachine(log_dir, name=f"qemu{len(made)}")
        cleanups.append(m.shutdown)
        if transport == "unix":
            peer = FramePeer(socket.AF_UNIX, m.sock_path("peer.dg"))
            qemu_addr: str | tuple[str, int] = m.sock_path("qemu.dg")
            m.add_dgram_netdev(qemu_addr, str(peer.address))
        else:
            peer = FramePeer(socket.AF_INET, ("127.0.0.1", 0))
            qemu_addr = ("127.0.0.1", free_udp_port())
            m.add_udp_netdev(qemu_addr[1], peer.address[1])
        cleanups.append(peer.close)
        m.add_virtio_net("n0", mac=":".join(f"{b:02x}" for b in MAC), **virtio)  # type: ignore[arg-type]
        m.launch()
        vm = NetVm(m, peer, qemu_addr, m.make_allocator(), PciBus.for_machine(m), [])
        made.append(vm)
        return vm

    yield start
    errors = []
    for vm in made:
        for net in vm.drivers:
            try:
                net.close()
                vm.alloc.assert_no_leaks()
            except Exception as e:  # report after everything is down
                errors.append(e)
    for fn in reversed(cleanups):
        fn()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- no QEMU needed
def test_halt_bios_image(tmp_path: Path) -> None:
    data = write_halt_bios(tmp_path / "halt.bin").read_bytes()
    assert len(data) == 65536
    assert data[0xFFF0:0xFFF4] == bytes([0xFA, 0xF4, 0xEB, 0xFD])
    assert data[:0xFFF0] == b"\xff" * 0xFFF0


def test_qemu_opts_escaping() -> None:
    assert qemu_opts("socket", id="c0", path="/a,b", server=True, x=None) == (
        "socket,id=c0,path=/a,,b,server=on"
    )


def test_memory_layout_q35_rule() -> None:
    small = MemoryLayout.computed(512 << 20)
    assert (small.below_4g, small.above_4g) == (512 << 20, 0)
    big = MemoryLayout.computed(4 << 30)
    assert (big.below_4g, big.above_4g) == (0x80000000, (4 << 30) - 0x80000000)


def test_allocator() -> None:
    a = GuestAllocator.for_ram(below_4g=16 << 20, above_4g=8 << 20)
    assert [r.name for r in a.ranges()] == ["low", "high"]
    p = a.alloc(100, tag="p")
    assert p == 1 << 20 and p % 4096 == 0  # page-aligned by default, legacy MiB skipped
    q = a.alloc(16, 16, tag="q")
    assert q % 16 == 0 and q != p
    a.free(p)
    with pytest.raises(AllocError, match="double free"):
        a.free(p)
    with pytest.raises(AllocError, match="never allocated"):
        a.free(0x1234)
    h = a.alloc_in("high", 8192)
    assert h >= 4 << 30
    dimm = a.add_range(8 << 30, 1 << 20, "dimm0")
    d = a.alloc_in(dimm, 4096)
    with pytest.raises(AllocError, match="still has 1"):
        a.remove_range("dimm0")
    a.free(d)
    a.remove_range("dimm0")
    with pytest.raises(AllocError, match="overlaps"):
        a.add_range(0x100000, 4096)
    with pytest.raises(AllocError, match="leaked"):
        a.assert_no_leaks()
    a.free(q)
    a.free(h)
    a.assert_no_leaks()
    # freed holes merge back: the whole low range is one allocation again
    assert a.alloc((16 << 20) - (1 << 20)) == 1 << 20
    with pytest.raises(AllocError, match="out of guest memory"):
        a.alloc(64 << 20)


def test_vring_need_event_wraps() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the u16 wrap
    assert not vring_need_event(0xFFFF, 0xFFFF, 0xFFFE)


def _fake_qtest() -> tuple[QTest, socket.socket]:
    a, b = socket.socketpair()
    return QTest(a, timeout=0.3), b


def test_qtest_client_skips_irq_lines_and_reports_failures() -> None:
    qt, peer = _fake_qtest()
    with qt, peer:
        peer.sendall(b"IRQ raise 3\nIRQ lower 4\nOK 0x12\n")
        assert qt.readb(0x1000) == 0x12
        assert peer.recv(100) == b"readb 0x1000\n"
        assert qt.irq_levels == {3: True, 4: False}
        assert [e.num for e in qt.irq_events] == [3, 4]
        peer.sendall(b"FAIL Unknown command 'bogus'\n")
        with pytest.raises(QTestError, match="bogus"):
            qt.command("bogus")
        with pytest.raises(QTestTimeout, match="readl 0x2000"):  # error names the command
            qt.readl(0x2000)
        peer.close()
        with pytest.raises(QTestClosed, match="inb 0x80"):
            qt.inb(0x80)


# ---------------------------------------------------------------------------- QEMU basics
@pytest.mark.qemu
def test_qemu_version_check() -> None:
    version = require_qemu()
    assert version[:2] >= MIN_QEMU_VERSION
    assert qemu_version() == version
    with pytest.raises(QemuTooOld, match="need QEMU >= 99.0"):
        require_qemu((99, 0))
    with pytest.raises(QemuNotFound, match="not found"):
        require_qemu(binary="/nonexistent/qemu-system-x86_64")


@pytest.mark.qemu
def test_qtest_memory_and_io(log_dir: Path) -> None:
    with QemuMachine(log_dir) as m:
        qt, base = m.qtest, 0x200000
        data = os.urandom(300)
        qt.memwrite(base, data)
        assert qt.memread(base, len(data)) == data
        big = os.urandom((1 << 20) + 4097)  # more than one b64 chunk
        qt.b64write(base, big)
        assert qt.b64read(base, len(big)) == big
        qt.memset(base, 64, 0xA5)
        assert qt.memread(base, 64) == b"\xa5" * 64
        qt.writeb(base, 0x11)
        qt.writew(base + 2, 0x2233)
        qt.writel(base + 4, 0x44556677)
        qt.writeq(base + 8, 0x8899AABBCCDDEEFF)
        assert qt.readq(base) == 0x4455667722330011 | 0xA5 << 8
        assert (qt.readb(base), qt.readw(base + 2), qt.readl(base + 4)) == (
            0x11,
            0x2233,
            0x44556677,
        )
        assert qt.readq(base + 8) == 0x8899AABBCCDDEEFF
        assert qt.memread(base, 0) == b""
        qt.outl(0xCF8, 0x80000000)  # config address register reads back
        assert qt.inl(0xCF8) == 0x80000000
        assert qt.inw(0xCFC) == 0x8086  # q35 host bridge vendor
        with pytest.raises(QTestError, match="FAIL"):
            qt.command("no_such_command")
        assert qt.endianness() == "little"  # the stream is still in step
        qt.irq_intercept_in("ioapic")  # accepted once, refused again (levels: the INTx test)
        with pytest.raises(QTestError, match="already enabled"):
            qt.irq_intercept_in("/machine/q35")
        assert m.qmp.command("query-status")["status"] == "running"
    assert not m.is_running()
    assert m.exit_code == 0
    assert not m.sock_dir.exists()
    assert m.qtest_log_path.read_text().startswith("[I ")
    assert m.shutdown() == 0  # idempotent


@pytest.mark.qemu
def test_qmp_events_and_errors(log_dir: Path) -> None:
    with QemuMachine(log_dir) as m:
        m.qmp.command("stop")
        assert m.qmp.wait_event("STOP", timeout=5)["event"] == "STOP"
        m.wait_for_status("paused")
        m.qmp.command("cont")
        m.qmp.wait_event("RESUME", timeout=5)
        with pytest.raises(QmpTimeout, match="DEVICE_DELETED"):
            m.qmp.wait_event("DEVICE_DELETED", timeout=0.2)
        with pytest.raises(QmpError, match="CommandNotFound"):
            m.qmp.command("no-such-command")


@pytest.mark.qemu
def test_shutdown_kills_a_hung_qemu(log_dir: Path) -> None:
    m = QemuMachine(log_dir).launch()
    try:
        os.kill(m.pid, signal.SIGSTOP)  # QMP quit and SIGTERM cannot work now
        start = time.monotonic()
        assert m.shutdown(quit_timeout=0.3, term_timeout=0.3) == -signal.SIGKILL
        assert time.monotonic() - start < 5
    finally:
        m.shutdown()
    assert not m.is_running()


@pytest.mark.qemu
def test_qemu_crash_is_reported_by_name(log_dir: Path) -> None:
    with QemuMachine(log_dir) as m:
        os.kill(m.pid, signal.SIGKILL)
        with pytest.raises(QTestClosed, match="readl 0x1000"):
            m.qtest.readl(0x1000)
        with pytest.raises(QmpError):
            m.qmp.command("query-status", timeout=2)
    assert m.exit_code == -signal.SIGKILL


@pytest.mark.qemu
def test_launch_failure_reports_stderr(log_dir: Path) -> None:
    m = QemuMachine(log_dir).add_device("no-such-device-type")
    with pytest.raises(QemuLaunchError, match="no-such-device-type"):
        m.launch()
    assert not m.is_running()


@pytest.mark.qemu
def test_incoming_defer_keeps_machine_usable(log_dir: Path) -> None:
    with QemuMachine(log_dir).set_incoming("defer") as m:
        m.wait_for_status("inmigrate")
        m.qtest.writel(0x300000, 0xDEADBEEF)
        assert m.qtest.readl(0x300000) == 0xDEADBEEF


# ---------------------------------------------------------------------------- PCI / virtio-pci
@pytest.mark.qemu
def test_pci_enumeration_bars_and_msix(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm(vectors=6)
    pci = vm.bus.find(0x1AF4, 0x1041)
    assert pci.class_code >> 8 == 0x0200  # ethernet
    assert vm.bus.find_all(0x8086, 0x29C0)  # q35 host bridge
    bars = pci.assign_bars()
    lay = vm.machine.layout
    assert bars[1].size == 0x1000 and not bars[1].is_64
    assert 0xE0000000 <= bars[1].addr < 0xFEC00000
    assert bars[4].is_64 and bars[4].prefetchable and bars[4].size >= 0x4000
    assert lay.pci_hole64_start <= bars[4].addr < lay.pci_hole64_end
    assert pci.size_bars()[4].addr == bars[4].addr  # re-sizing keeps assignments
    cap_ids = [cid for cid, _ in pci.capabilities()]
    assert PCI_CAP_ID_MSIX in cap_ids and cap_ids.count(PCI_CAP_ID_VNDR) >= 4
    vdev = VirtioPciDevice(pci, vm.alloc)
    types = {c.cfg_type for c in vdev.caps}
    assert {
        VIRTIO_PCI_CAP_COMMON_CFG,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        VIRTIO_PCI_CAP_ISR_CFG,
        VIRTIO_PCI_CAP_DEVICE_CFG,
    } <= types
    assert vdev.notify_off_multiplier > 0 and vdev.device_type == 1
    msix = pci.msix()
    assert msix.table_size == 6
    vectors = vdev.enable_msix()
    assert msix.enabled and len(vectors) == 6
    addr, data, ctrl = msix.read_entry(3)
    assert (addr, data, ctrl & 1) == (vectors[3].addr, vectors[3].data, 0)
    assert vm.alloc.range_of(addr) is not None  # the MSI-X address is guest RAM
    vdev.close()
    vm.alloc.assert_no_leaks()


@pytest.mark.qemu
def test_device_behind_pcie_root_port(log_dir: Path) -> None:
    m = QemuMachine(log_dir).add_pcie_root_port("rp0", chassis=1)
    peer = FramePeer(socket.AF_UNIX, m.sock_path("peer.dg"))
    try:
        m.add_dgram_netdev(m.sock_path("qemu.dg"), m.sock_path("peer.dg"))
        m.add_virtio_net("n0", bus="rp0", mac="52:54:00:12:34:56")
        with m:
            alloc, bus = m.make_allocator(), PciBus.for_machine(m)
            net = VirtioNetDriver.find(bus, alloc)
            assert net.dev.pci.bdf == (1, 0, 0)
            bridge = bus.device_at((0, 1, 0))
            assert bridge.is_bridge and bridge.secondary_bus == 1
            net.init()
            frame = eth_frame(b"via root port", dst=PEER_MAC, src=MAC)
            net.send(frame)
            assert peer.expect() == frame
            peer.send(frame, m.sock_path("qemu.dg"))
            assert net.recv().data == frame
            net.close()
            alloc.assert_no_leaks()
    finally:
        peer.close()


@pytest.mark.qemu
def test_feature_negotiation_and_status(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    net = vm.driver(mrg_rxbuf=True, event_idx=True)
    d = net.dev
    assert net.features & bit(VIRTIO_F_VERSION_1)
    assert net.features & bit(VIRTIO_NET_F_MRG_RXBUF) and net.features & bit(VIRTIO_F_EVENT_IDX)
    assert net.features & ~d.device_features() == 0
    assert d.driver_features() == net.features
    want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    assert d.status == want
    cfg = net.config()
    assert cfg.mac == MAC and cfg.link_up and cfg.max_virtqueue_pairs == 1
    assert d.num_queues() >= 2 and d.queue_enabled(0) and d.queue_enabled(1)


# ---------------------------------------------------------------------------- datapath
@pytest.mark.qemu
@pytest.mark.parametrize("transport", ["unix", "udp"])
@pytest.mark.parametrize("mrg_rxbuf", [True, False])
def test_tx_and_rx_byte_exact(
    net_vm: Callable[..., NetVm], transport: str, mrg_rxbuf: bool
) -> None:
    vm = net_vm(transport)
    net = vm.driver(mrg_rxbuf=mrg_rxbuf)
    out = eth_frame(os.urandom(200), dst=PEER_MAC, src=MAC)
    net.send(out)
    assert vm.peer.expect() == out
    net.send(out[:60], hdr_separate=False)
    assert vm.peer.expect() == out[:60]
    inbound = eth_frame(os.urandom(1400))
    vm.inject(inbound)
    rx = net.recv()
    assert rx.data == inbound
    assert rx.hdr.flags == 0 and rx.hdr.gso_type == 0
    assert rx.lengths == (len(inbound) + NET_HDR_SIZE,)
    if mrg_rxbuf:
        assert rx.num_buffers == rx.hdr.num_buffers == 1


@pytest.mark.qemu
def test_rx_mergeable_spans_buffers(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    net = VirtioNetDriver.find(vm.bus, vm.alloc, rx_buf_size=256)
    vm.drivers.append(net)
    net.init(mrg_rxbuf=True)
    inbound = eth_frame(os.urandom(1000))
    vm.inject(inbound)
    rx = net.recv()
    assert rx.data == inbound
    assert rx.num_buffers == 5 and rx.lengths == (256, 256, 256, 256, 14 + 1000 + 12 - 1024)
    vm.inject(inbound[:100])  # the ring was refilled: a small frame fits one buffer
    assert net.recv().data == inbound[:100]


@pytest.mark.qemu
def test_rx_separate_header_descriptor_without_mrg(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    net = vm.driver(mrg_rxbuf=False, rx_hdr_separate=True)
    inbound = eth_frame(b"x" * 64)
    vm.inject(inbound)
    assert net.recv().data == inbound


@pytest.mark.qemu
def test_indirect_and_event_idx_with_msix(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    net = vm.driver(indirect=True, event_idx=True)
    tx, rx = net.txq[0], net.rxq[0]
    assert tx.event_idx and tx.indirect
    tx.interrupt.clear()
    frame = eth_frame(b"indirect", dst=PEER_MAC, src=MAC)
    net.send(frame, indirect=True)
    assert vm.peer.expect() == frame
    tx.wait_interrupt(2)  # used_event 0: the first completion interrupts
    assert tx.avail_event() == tx.avail_idx  # the device wants a kick at the next chain
    rx.enable_interrupts()
    vm.inject(frame)
    assert net.recv().data == frame
    rx.wait_interrupt(2)
    assert rx.interrupt.describe().startswith("MSI-X vector")


@pytest.mark.qemu
def test_intx_isr_fallback(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    qt = vm.machine.qtest
    qt.irq_intercept_in("ioapic")
    net = vm.driver(msix=False)
    assert not net.dev.pci.msix().enabled
    net.dev.isr()  # clear
    frame = eth_frame(b"isr", dst=PEER_MAC, src=MAC)
    net.send(frame)
    assert vm.peer.expect() == frame
    net.txq[0].wait_interrupt(2)
    assert net.txq[0].interrupt.describe().startswith("ISR")
    qt.sync()  # the INTx line went up on an IOAPIC pin (q35: PIRQ -> GSI 16..23)
    raised = {e.num for e in qt.irq_events if e.level and e.num >= 16}  # IRQ0: the PIT ticks
    assert len(raised) == 1 and raised <= set(range(16, 24))
    gsi = raised.pop()
    assert qt.get_irq(gsi) is False  # wait_interrupt read the ISR, which deasserts INTx
    net.send(frame)
    assert vm.peer.expect() == frame
    qt.wait_irq(gsi, level=True, timeout=2)
    assert net.dev.isr() & 1
    qt.wait_irq(gsi, level=False, timeout=2)


@pytest.mark.qemu
def test_ctrl_vq_and_mq_single_pair(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm(mq=True)
    net = vm.driver(mq=True)
    assert net.ctrlq is not None and net.ctrlq.index == 2 * net.max_queue_pairs
    assert net.set_promisc(True) == 0
    net.set_queue_pairs(1)  # the dgram backend has one queue pair
    with pytest.raises(Exception, match="refused VQ_PAIRS_SET 2"):
        net.set_queue_pairs(2)


@pytest.mark.qemu
def test_tx_burst_reuses_ring(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    net = vm.driver(queue_size=64)  # the driver may shrink the ring (virtio 1.x)
    frames = [eth_frame(struct.pack("<I", i) * 8, dst=PEER_MAC, src=MAC) for i in range(300)]
    net.send_burst(frames, timeout=20)
    got = [vm.peer.expect() for _ in frames]
    assert got == frames
    assert net.txq[0].avail_idx == 300 and net.txq[0].in_flight == 0


@pytest.mark.qemu
def test_avail_and_used_index_wrap_past_65535(net_vm: Callable[..., NetVm]) -> None:
    """> 65536 chains through one TX ring: free-running u16 indices wrap (device and driver)."""
    vm = net_vm()
    net = vm.driver(indirect=True)
    tx: SplitVirtqueue = net.txq[0]
    frame = eth_frame(b"wrap", dst=PEER_MAC, src=MAC)
    buf = vm.alloc.alloc(4096, tag="wrap frame")
    vm.machine.qtest.write(buf, VirtioNetHdr().pack() + frame)
    total, done = 65536 + 700, 0
    while done < total:
        batch = min(256, total - done)
        for _ in range(batch):
            tx.add([(buf, NET_HDR_SIZE), (buf + NET_HDR_SIZE, len(frame))], (), indirect=True)
        tx.kick()
        done += len(tx.wait_used(batch, timeout=10))
    vm.alloc.free(buf)
    assert tx.avail_idx == tx.last_used_idx == total & 0xFFFF
    assert tx.device_used_idx() == total & 0xFFFF
    seen = 0
    while seen < total:
        assert vm.peer.expect(5) == frame
        seen += 1


@pytest.mark.qemu
def test_virtqueue_rejects_bogus_used_id(net_vm: Callable[..., NetVm]) -> None:
    vm = net_vm()
    qt = vm.machine.qtest
    vq = SplitVirtqueue(qt, vm.alloc, 0, 8, name="scratch")
    try:
        vq.add([(0x400000, 16)], [(0x401000, 16)], "t")
        vq.publish()
        raw = qt.read(vq.desc, 32)
        assert struct.unpack_from("<QIHH", raw)[2] & VRING_DESC_F_NEXT
        # play the device: used elem with an id that is not a head in flight
        qt.write(vq.used + 4, struct.pack("<II", 5, 0))
        qt.writew(vq.used + 2, 1)
        with pytest.raises(VirtqueueError, match="used id 5"):
            vq.get_used()
    finally:
        vq.destroy()
