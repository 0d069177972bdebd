"""DPDK's ``dpdk-testpmd``: installing it (Debian package, bench only) and running it.

Debian 12 ships ``dpdk-testpmd`` in ``dpdk-dev``; the virtio-user and vhost PMDs it loads are
``librte-net-virtio23`` / ``librte-net-vhost23`` (recommended by ``dpdk``, so named
explicitly). It runs here without hugepages: ``--no-huge -m 256 --no-shconf --no-pci`` (EAL
then backs its memory with a memfd, which is what lets it share memory over vhost-user).

Roles (one ``testpmd`` each, the forwarding lcore pinned):

* frontend - ``--vdev net_virtio_user0,path=SOCK``: the driver, connects to a vhost-user
  backend (ours, or DPDK's below) exactly as QEMU would, but with no VM;
* backend - ``--vdev net_vhost0,iface=SOCK``: DPDK's own vhost-user backend, the C reference.

Throughput is read from testpmd's ``--stats-period 1`` block ("Rx-pps"/"Tx-pps", computed by
testpmd from the TSC), the median of the samples after a warm-up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc
from bench.timing import median

PACKAGES = ["dpdk-dev", "librte-net-virtio23", "librte-net-vhost23", "librte-mempool-ring23"]
TESTPMD = "dpdk-testpmd"
EAL_COMMON = ["--no-huge", "-m", "256", "--no-shconf", "--no-pci", "--log-level=lib.eal:error"]
APP_COMMON = ["--no-numa", "--total-num-mbufs=8192", "--stats-period", "1"]

_THROUGHPUT = re.compile(
    r"Rx-pps:\s+(\d+)\s+Rx-bps:\s+(\d+)\s+Tx-pps:\s+(\d+)\s+Tx-bps:\s+(\d+)", re.MULTILINE
)


def find_testpmd() -> str | None:
    return shutil.which(TESTPMD)


def ensure_testpmd(install: bool, log: Callable[[str], None]) -> tuple[str | None, str]:
    """(path, "") when testpmd is usable, else (None, why not). Installs the Debian packages
    when ``install`` and we are root on Debian; never called by ``make check``."""
    path = find_testpmd()
    if path:
        return path, ""
    if not install:
        return None, f"{TESTPMD} not installed (bench run with --no-dpdk-install)"
    if os.geteuid() != 0:
        return None, f"{TESTPMD} not installed and not root: apt-get install {' '.join(PACKAGES)}"
    if not Path("/etc/debian_version").exists():
        return None, f"{TESTPMD} not installed and this is not Debian: install DPDK >= 22.11"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    for attempt in (cmd, None):
        if attempt is None:  # package lists may be stale: update once, then retry
            log("apt-get update (package lists)")
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            attempt = cmd
        log("installing DPDK: " + " ".join(attempt))
        try:
            r = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, "apt-get install of DPDK timed out (900 s)"
        if r.returncode == 0 and find_testpmd():
            return find_testpmd(), ""
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
    return None, f"apt-get install {' '.join(PACKAGES)} failed: {last[0]}"


@dataclass
class Throughput:
    rx_pps: list[int] = field(default_factory=list)
    tx_pps: list[int] = field(default_factory=list)
    #: CPU seconds (user + system) the watched process used during the window, and the window
    cpu_s: float | None = None
    window_s: float = 0.0

    @property
    def rx(self) -> float | None:
        return median([float(x) for x in self.rx_pps])

    @property
    def tx(self) -> float | None:
        return median([float(x) for x in self.tx_pps])


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_throughput(text: str) -> Throughput:
    t = Throughput()
    for m in _THROUGHPUT.finditer(text):
        t.rx_pps.append(int(m.group(1)))
        t.tx_pps.append(int(m.group(3)))
    return t


class TestPmd:
    """One ``dpdk-testpmd`` process in a role; the forwarding lcore is ``fwd_cpu``."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        binary: str,
        name: str,
        vdev: str,
        mode: str,
        log_path: Path,
        *,
        fwd_cpu: int,
        main_cpu: int,
        txpkts: int | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        cpus = sorted({fwd_cpu, main_cpu})
        lcores = ["-l", ",".join(map(str, cpus)), "--main-lcore", str(main_cpu)]
        if fwd_cpu == main_cpu:
            raise ValueError("testpmd needs a forwarding lcore besides the main one")
        app = [*APP_COMMON, f"--forward-mode={mode}", *extra]
        if txpkts is not None:
            app.append(f"--txpkts={txpkts}")
        argv = [binary, *lcores, *EAL_COMMON, "--file-prefix", name, "--vdev", vdev, "--", *app]
        self.name = name
        self.proc = Proc(name, argv, log_path, cpus=cpus)
        self._mark = 0

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Backend role: the vhost-user socket is bound."""
        self.proc.wait_for(r"binding succeeded|socket created", timeout, "its vhost-user socket")

    def wait_forwarding(self, timeout: float = 30.0) -> None:
        """Both roles: the port started and forwarding began."""
        m = self.proc.wait_for(
            r"start packet forwarding|Fail to start port|No probed ethernet devices|"
            r"Error - exiting|Cause:",
            timeout,
            "packet forwarding to start",
        )
        if "forwarding" not in m.group(0):
            raise RuntimeError(f"{self.name} failed to start: {self.proc.tail()!r}")

    def measure(self, warmup_s: float, window_s: float, cpu_pid: int | None = None) -> Throughput:
        """Drain output for ``warmup_s``, then collect the stats printed during
        ``window_s`` (and the CPU time process ``cpu_pid`` used meanwhile). Raises
        RuntimeError if testpmd died (e.g. a crash)."""
        self.proc.pump_until(time.monotonic() + warmup_s)
        start = len(self.proc.output)
        cpu0 = process_cpu_s(cpu_pid) if cpu_pid is not None else None
        t0 = time.monotonic()
        self.proc.pump_until(t0 + window_s)
        cpu1 = process_cpu_s(cpu_pid) if cpu_pid is not None else None
        took = time.monotonic() - t0
        if not self.proc.alive():
            raise RuntimeError(
                f"{self.name} exited with {self.proc.proc.returncode} while measuring: "
                f"{self.proc.tail(300)!r}"
            )
        t = parse_throughput(self.proc.output[start:])
        t.window_s = took
        if cpu0 is not None and cpu1 is not None:
            t.cpu_s = cpu1 - cpu0
        return t

    def stop(self) -> int:
        return self.proc.stop()
