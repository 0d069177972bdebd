"""Our VDUSE device under the kernel's other vDPA consumer: bound to ``virtio_vdpa`` it is a
netdev driven by the kernel's own virtio-net driver, no QEMU. Frames cross between that netdev
and the device's wire byte-exact: ping and a numbered UDP stream, both ways.

The wire is ``udp:`` to the avocado tests' peer (an ARP/ICMP/udpseq-speaking fake host on the
far side); the netdev gets 10.213.7.2/24, the peer is 10.213.7.1. One device serves the module
(creating it and booting virtio_net on it is most of the time under TCG); its logs are in
``test-logs/qtests_test_virtio_vdpa.py/``. A lane test: it runs where the kernel has vduse and
virtio_vdpa, i.e. in the lab (L1) on our machines.

virtio_vdpa sends no UPDATE_IOTLB: the device learns the kernel's DMA mappings (its bounce
buffer and the coherent rings) only by asking VDUSE_IOTLB_GET_FD for an IOVA it misses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest_images import udpseq
from qtests.guest.peer import PeerTimeout
from qtests.guest.ports import free_udp_port
from qtests.lab import virtio_vdpa as vv
from qtests.qos.backend_process import BackendProcess
from qtests.qos.waiting import poll_until

pytestmark = pytest.mark.vdpa_lane

NETDEV_IP, PEER_IP, PREFIX = "10.213.7.2", "10.213.7.1", 24
PEER_MAC = "52:54:00:d7:00:01"
TIMEOUT = 60.0
COUNT, SIZE, RATE = 500, 1000, 500  # datagrams, payload bytes, per second
PING_SIZES = [0, 56, 1472]  # 1472 data bytes: a full 1514-byte frame
TXQ = 1  # transmitq1


@dataclass
class Netdev:
    ifname: str
    peer: vv.EchoPeer
    backend: BackendProcess
    udpseq: str


def _module_log_dir(request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("QOS_LOG_DIR") or request.config.rootpath / "test-logs")
    path: Path = root / request.node.nodeid.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def netdev(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Netdev]:
    """The device bound to virtio_vdpa, its netdev up with an address, and the wire's peer."""
    if not vv.VDPA_BUS.joinpath("drivers", "virtio_vdpa").is_dir():
        pytest.fail("the virtio_vdpa module is not loaded (the lab loads it; modprobe it here)")
    log_dir = _module_log_dir(request)
    run_dir = tmp_path_factory.mktemp("virtio-vdpa")  # the monitor socket: a short path
    peer = vv.EchoPeer(PEER_IP, PEER_MAC, pcap=log_dir / "wire.pcap")
    with peer:  # started, and always closed
        peer_port = peer.port  # bound, so the wire's port below cannot be the same one
        wire_port = free_udp_port()
        peer.remote = ("127.0.0.1", wire_port)
        backend = BackendProcess(
            log_dir,
            run_dir=run_dir,
            transport="vduse",
            wire=f"udp:127.0.0.1:{wire_port}:{peer_port}",
        )
        with backend:  # started, and always stopped
            name = backend.vduse_name
            vv.rebind(name, "virtio_vdpa")
            ifname = vv.netdev_of(name)
            vv.ip("link", "set", "dev", ifname, "up")
            vv.ip("addr", "add", f"{NETDEV_IP}/{PREFIX}", "dev", ifname)
            # a plain FIFO: fq_codel would drop what waits for our (slow, TCG) device by design
            vv.tc("qdisc", "replace", "dev", ifname, "root", "pfifo", "limit", "10000")
            vv.wait_carrier(ifname)
            try:
                # first exchange, once for the module: a device that cannot move frames
                # fails here with its own errors instead of in every test
                peer.resolve(NETDEV_IP, TIMEOUT)
            except PeerTimeout as e:
                errors = backend.journal(["error.vduse", "error.device"])[-5:]
                pytest.fail(f"no ARP reply from {ifname} through the device: {e}; its errors: "
                            f"{errors}")  # fmt: skip
            try:
                yield Netdev(ifname, peer, backend, vv.udpseq_tool(run_dir))
            finally:
                (log_dir / "ip-link.txt").write_text(vv.ip("-s", "link", "show", "dev", ifname))


def _wire_tx(backend: BackendProcess) -> int:
    return int(backend.cmd("query-wire")["wire"]["tx_frames"])


def stream_netdev_to_wire(nd: Netdev, port: int, count: int) -> None:
    """Scenario: ``udpseq send`` through the netdev; every datagram reaches the peer intact.

    The device must complete the stream's TX chains and put as many frames on its wire; only
    then does the peer's side count, so a device that swallows frames fails on the counters,
    without waiting for what will never come."""
    chains, wired = nd.backend.vring(TXQ)["packets"], _wire_tx(nd.backend)
    stats = nd.peer.expect_stream(port, count)
    proc = subprocess.run(
        [nd.udpseq, "send", PEER_IP, str(port), str(count), str(SIZE), str(RATE)],
        capture_output=True, text=True, timeout=TIMEOUT * 2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sent = udpseq.parse_report(proc.stdout, "send")
    assert sent["sent"] == count and sent["errors"] == 0, sent
    done = poll_until(
        lambda: nd.backend.vring(TXQ)["packets"] - chains >= count,
        TIMEOUT,
        f"the device to complete {count} TX chains of the stream",
        max_interval=0.1,
    )
    assert done
    on_wire = _wire_tx(nd.backend) - wired
    assert on_wire >= count, (
        f"the device completed {nd.backend.vring(TXQ)['packets'] - chains} TX chains but put "
        f"only {on_wire} frames on its wire"
    )
    nd.peer.wait_stream(port, TIMEOUT)
    assert (stats.unique, stats.corrupt, stats.dups) == (count, 0, 0), stats.as_dict()
    assert stats.bytes == count * SIZE


def test_ping_netdev_to_wire_byte_exact(netdev: Netdev) -> None:
    before = netdev.peer.counters["icmp_echo_requests"]
    for size in PING_SIZES:
        replies = vv.ping_from(netdev.ifname, PEER_IP, 3, size, TIMEOUT, ident=size)
        for seq, data in enumerate(replies):
            assert data == bytes((seq * 7 + i) & 0xFF for i in range(size)), (size, seq)
    assert netdev.peer.counters["icmp_echo_requests"] - before == 3 * len(PING_SIZES)


def test_ping_wire_to_netdev_byte_exact(netdev: Netdev) -> None:
    for seq, size in enumerate(PING_SIZES):
        data = bytes((seq * 13 + i) & 0xFF for i in range(size))
        assert netdev.peer.ping(NETDEV_IP, seq, data, TIMEOUT) == data, f"echo {seq} ({size} B)"


def test_udp_stream_netdev_to_wire(netdev: Netdev) -> None:
    stream_netdev_to_wire(netdev, 5001, COUNT)


def test_udp_stream_wire_to_netdev(netdev: Netdev) -> None:
    port = 5002
    with subprocess.Popen(
        [netdev.udpseq, "recv", str(port), str(COUNT), str(int(TIMEOUT))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as recv:  # fmt: skip
        assert recv.stdout is not None
        try:
            line = recv.stdout.readline()  # bounded: udpseq exits at its own TIMEOUT
            assert "udpseq recv: listening" in line, line
            assert netdev.peer.send_stream(NETDEV_IP, port, COUNT, SIZE, RATE) == COUNT
            out, _err = recv.communicate(timeout=TIMEOUT * 2)
        finally:
            if recv.poll() is None:
                recv.kill()
    report = udpseq.parse_report(out, "recv")
    assert report["unique"] == COUNT, report
    assert (report["corrupt"], report["dups"], report["end"]) == (0, 0, 1), report


def test_meta_stream_catches_drop_tx(netdev: Netdev) -> None:
    """The stream scenario fails against a device that completes TX chains without sending."""
    netdev.backend.cmd("set-fault", name="drop-tx")
    try:
        with pytest.raises(AssertionError, match="frames on its wire"):
            stream_netdev_to_wire(netdev, 5003, 50)
    finally:
        netdev.backend.cmd("clear-fault", name="drop-tx")
