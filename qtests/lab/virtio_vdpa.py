"""The kernel's other vDPA consumer: a VDUSE device bound to ``virtio_vdpa`` becomes a netdev
driven by the running kernel's own virtio-net driver (no QEMU at all).

* :func:`rebind`: move a vDPA device from its driver (vhost_vdpa binds first) to another,
  through the bus's sysfs ``unbind`` / ``bind`` files, and wait until sysfs shows it.
* :func:`netdev_of`: the network interface virtio_net created for the device.
* :class:`EchoPeer`: the avocado tests' wire peer (:class:`qtests.guest.peer.UdpPeer`), able
  to ping too: it sends ICMP echo requests and keeps the replies (byte-exact check by caller).
* :func:`ping_from`: ICMP echo from the local kernel out of one interface (a raw socket bound
  to it), returning each reply's payload, so the caller compares bytes, not just counts.
* :func:`udpseq_tool`: the guest image's numbered-UDP tool (``guest_images/udpseq.c``): the
  lab's copy on PATH, or compiled on the spot where the lane runs directly on a host.

All waits are bounded and name what they waited for.
"""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

from qtests.guest import frames
from qtests.guest.peer import UdpPeer
from qtests.qos.waiting import WaitTimeout, poll_until

VDPA_BUS = Path("/sys/bus/vdpa")
#: sysfs changes after a bind are synchronous, but the netdev appears from virtio_net's probe;
#: generous for TCG on a loaded machine.
SYSFS_TIMEOUT = 60.0
UDPSEQ_SOURCE = Path(__file__).resolve().parents[2] / "guest_images" / "udpseq.c"


def driver_of(name: str) -> str | None:
    link = VDPA_BUS / "devices" / name / "driver"
    return link.resolve().name if link.exists() else None


def rebind(name: str, driver: str, timeout: float = SYSFS_TIMEOUT) -> None:
    """Bind vDPA device ``name`` to ``driver`` (unbinding it from its current driver)."""
    current = driver_of(name)
    if current == driver:
        return
    if current is not None:
        (VDPA_BUS / "drivers" / current / "unbind").write_text(name)
    target = VDPA_BUS / "drivers" / driver
    if not target.is_dir():
        raise FileNotFoundError(f"vdpa bus driver {driver} not registered (module not loaded?)")
    (target / "bind").write_text(name)
    poll_until(
        lambda: driver_of(name) == driver,
        timeout,
        f"vDPA device {name} bound to {driver}",
        detail=lambda: f"driver now {driver_of(name)}",
        max_interval=0.05,
    )


def netdev_of(name: str, timeout: float = SYSFS_TIMEOUT) -> str:
    """The interface virtio_net made of vDPA device ``name`` (bound to virtio_vdpa)."""
    device = VDPA_BUS / "devices" / name

    def find() -> str:
        found = sorted(device.glob("virtio*/net/*"))
        return found[0].name if found else ""

    return poll_until(
        find,
        timeout,
        f"a network interface under {device}/virtio*/net/",
        detail=lambda: f"driver {driver_of(name)}, {sorted(p.name for p in device.iterdir())}",
        max_interval=0.05,
    )


def _iproute2(tool: str, args: tuple[str, ...]) -> str:
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def ip(*args: str) -> str:
    return _iproute2("ip", args)


def tc(*args: str) -> str:
    return _iproute2("tc", args)


def wait_carrier(ifname: str, timeout: float = SYSFS_TIMEOUT) -> None:
    carrier = Path(f"/sys/class/net/{ifname}/carrier")

    def up() -> bool:
        try:
            return carrier.read_text().strip() == "1"
        except OSError:  # EINVAL while the interface is down
            return False

    poll_until(up, timeout, f"carrier on {ifname}", max_interval=0.05)


def ping_from(
    ifname: str, dst: str, count: int, size: int, timeout: float, ident: int = 0x5644
) -> list[bytes]:
    """Send ``count`` ICMP echo requests of ``size`` data bytes out of ``ifname`` to ``dst``,
    one at a time; returns each reply's data. Raises WaitTimeout naming the missing reply."""
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        for seq in range(count):
            data = bytes((seq * 7 + i) & 0xFF for i in range(size))
            sock.sendto(frames.icmp_echo(frames.ICMP_ECHO_REQUEST, ident, seq, data), (dst, 0))
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                    raise WaitTimeout(f"ICMP echo reply {seq} from {dst} on {ifname}", timeout)
                packet = sock.recv(65535)
                ipv4 = frames.parse_ipv4(packet)
                echo = frames.parse_icmp_echo(ipv4.payload) if ipv4 else None
                if (
                    echo is not None
                    and echo.type == frames.ICMP_ECHO_REPLY
                    and echo.ident == ident
                    and echo.seq == seq
                ):
                    replies.append(bytes(echo.data))
                    break
    return replies


class EchoPeer(UdpPeer):
    """A :class:`UdpPeer` that also pings: echo replies addressed to it are kept by seq."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.echo_replies: dict[int, bytes] = {}

    def _handle_ipv4(self, eth: frames.Ether) -> None:
        ipv4 = frames.parse_ipv4(eth.payload)
        if ipv4 is not None and ipv4.header_ok and ipv4.proto == frames.IPPROTO_ICMP:
            echo = frames.parse_icmp_echo(ipv4.payload)
            if echo is not None and echo.type == frames.ICMP_ECHO_REPLY and echo.checksum_ok:
                self.echo_replies[echo.seq] = bytes(echo.data)
                self.counters["icmp_echo_replies"] += 1
                return
        super()._handle_ipv4(eth)

    def ping(
        self, dst_ip: str, seq: int, data: bytes, timeout: float, ident: int = 0x5045
    ) -> bytes:
        """One echo request to ``dst_ip``; returns the reply's data."""
        dst_mac = self.resolve(dst_ip, timeout)
        body = frames.icmp_echo(frames.ICMP_ECHO_REQUEST, ident, seq, data)
        dst = frames.ip_bytes(dst_ip)
        packet = frames.ipv4(self._ip, dst, frames.IPPROTO_ICMP, body, self._next_ident())
        self.send_frame(frames.ether(dst_mac, self.mac, frames.ETH_P_IP, packet))
        with self._cond:
            if not self._cond.wait_for(lambda: seq in self.echo_replies, timeout):
                raise WaitTimeout(
                    f"ICMP echo reply {seq} from {dst_ip}", timeout, f"{dict(self.counters)}"
                )
            return self.echo_replies[seq]


def udpseq_tool(workdir: Path) -> str:
    """Path of the udpseq binary: on PATH (the lab puts it there), else built from the guest
    image's source with the host's gcc into ``workdir``."""
    found = shutil.which("udpseq")
    if found:
        return found
    out = workdir / "udpseq"
    proc = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(UDPSEQ_SOURCE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building udpseq failed (install gcc libc6-dev): {proc.stderr}")
    return str(out)
