"""Live migration of a qtest-driven guest between two testbeds.

A `MigrationPair` is a source `Testbed` (backend A, QEMU, the qtest virtio-net driver) and a
destination `Testbed` (its own backend B and wire peer, QEMU started with the identical
device arguments plus ``-incoming defer``). Migration goes over a unix socket in the
destination's private socket directory: ``migrate-incoming`` on the destination, then
``migrate`` on the source. Both QEMUs emit ``MIGRATION`` events (capability ``events``).

The driver keeps its state (ring addresses and indexes, allocator, MSI-X words) across the
switchover: after ``completed`` it is rebound to the destination's qtest connection
(`VirtioNetDriver.rebind`) and carries on driving the same guest memory there.

`PrecopyHold` keeps a migration in precopy, after every page was sent once, for as long as a
test needs it (so that what the backend writes meanwhile reaches the destination only through
its dirty log): a 1 ms downtime limit, a scratch area the test keeps dirty, and after the first
pass a bandwidth so small that those dirty pages take a minute to send. `PrecopyHold.release`
restores QEMU's defaults and the migration converges.

Observed with QEMU 10.0 (vhost-user, idle qtest guest, 256 MiB): the source backend gets
SET_LOG_BASE (memfd), SET_FEATURES with LOG_ALL and SET_VRING_ADDR with the log flag
(log_guest_addr = the used ring address the driver programmed: an IOVA behind a vIOMMU) when
migration starts; at the switchover GET_VRING_BASE per ring, then SET_STATUS 0. The
destination backend gets its first SEND_RARP before its rings start, then the memory table,
SET_VRING_BASE = the source's replies, and DRIVER_OK. Reported downtime 3-10 ms; the gap
between the source's last ring stop and the destination's first ring start 7-25 ms.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .machine import QemuMachine
from .qmp import QmpClient
from .qtest import QTest
from .testbed import Testbed
from .virtio_net import VirtioNetDriver, VirtioNetError
from .virtqueue import VirtqueueError
from .waiting import WaitTimeout, poll_until
from .wire_peer import WirePeerTimeout

MIGRATION_END = frozenset({"completed", "failed", "cancelled"})
#: QEMU's defaults (migration/options.c): 128 MiB/s, 300 ms.
DEFAULT_MAX_BANDWIDTH = 128 << 20
DEFAULT_DOWNTIME_MS = 300


#: What the driver and the wire peer raise when a migration scenario's invariant breaks.
DriverErrors = (VirtqueueError, VirtioNetError, WaitTimeout, WirePeerTimeout)


@contextlib.contextmanager
def invariant(what: str) -> Iterator[None]:
    """Driver or wire trouble while checking ``what`` is a broken invariant, not an error."""
    try:
        yield
    except DriverErrors as e:
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e


class MigrationError(RuntimeError):
    """The migration did not do what the test needed (failed, ended early, stuck). Not an
    AssertionError: a scenario's invariant failures must stay distinguishable from this."""


@dataclass
class MigrationStats:
    """What the source's ``query-migrate`` reported at the end."""

    status: str
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    ram: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> MigrationStats:
        return cls(
            status=str(info.get("status")),
            total_time_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"),
            setup_time_ms=info.get("setup-time"),
            ram=dict(info.get("ram", {})),
            raw=dict(info),
        )


def enable_migration_events(qmp: QmpClient) -> None:
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])


def set_capabilities(qmp: QmpClient, **caps: bool) -> None:
    """``migrate-set-capabilities`` with python names (``pause_before_switchover=True``)."""
    qmp.command(
        "migrate-set-capabilities",
        capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
    )


def set_parameters(qmp: QmpClient, **params: Any) -> None:
    """``migrate-set-parameters`` with python names (``max_bandwidth=...``)."""
    qmp.command("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})


class MigrationPair:
    """Source and destination testbeds and the migration between them."""

    def __init__(
        self,
        make_testbed: Callable[..., Testbed],
        *,
        src_faults: tuple[str, ...] | list[str] = (),
        dst_faults: tuple[str, ...] | list[str] = (),
        **testbed_kw: Any,
    ) -> None:
        self.src = make_testbed(name="src", faults=src_faults, **testbed_kw)
        self.dst = make_testbed(name="dst", faults=dst_faults, **testbed_kw)
        self._net: VirtioNetDriver | None = None
        #: Other qtest users of the guest to move along with the driver at the switchover
        #: (e.g. a virtio-iommu driver's ``rebind``).
        self.also_rebind: list[Callable[[QTest], None]] = []
        self.uri: str | None = None
        self.stats: MigrationStats | None = None
        self.switched = False

    # -- set-up --------------------------------------------------------------------------
    def start_source(
        self, before_init: Callable[[Testbed], None] | None = None, **init_kw: Any
    ) -> VirtioNetDriver:
        """Backend A, the source QEMU and the driver at DRIVER_OK (RX buffers posted).

        ``before_init`` runs between QEMU's launch and the driver's init (hotplug a DIMM,
        swap the allocator)."""
        src = self.src
        src.start_backend()
        src.start_qemu()
        if before_init is not None:
            before_init(src)
        src.init_net(**init_kw)
        enable_migration_events(src.qmp)
        self._net = self.src.net
        return self._net

    def start_destination(self, customize: Callable[[QemuMachine], None] | None = None) -> None:
        """Backend B and the destination QEMU (same devices, ``-incoming defer``).

        ``customize`` adds what the source acquired at run time (a hotplugged DIMM) to the
        command line. The destination's RAM and devices are not touched before migration.
        """
        if self.dst.backend is None or not self.dst.backend.running:
            self.dst.start_backend()
        machine = self.dst.build_machine()
        if customize is not None:
            customize(machine)
        machine.set_incoming("defer")
        self.dst.machine = machine.launch()
        self.dst.machine.wait_for_status("inmigrate")
        enable_migration_events(self.dst.qmp)

    @property
    def net(self) -> VirtioNetDriver:
        """The driver (on the source before the switchover, on the destination after)."""
        if self._net is None:
            raise RuntimeError("start_source() first")
        return self._net

    @property
    def active(self) -> Testbed:
        """The testbed whose QEMU and backend run the guest now."""
        return self.dst if self.switched else self.src

    # -- migration -----------------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        return dict(self.src.qmp.command("query-migrate"))

    def status(self) -> str:
        return str(self.query().get("status", "none"))

    def begin(self) -> None:
        """``migrate-incoming`` on the destination, then ``migrate`` on the source."""
        assert self.dst.machine is not None, "start_destination() first"
        self.uri = f"unix:{self.dst.machine.sock_path('migration.sock')}"
        self.dst.qmp.command("migrate-incoming", uri=self.uri)
        self.src.qmp.command("migrate", uri=self.uri)

    def wait_status(
        self,
        statuses: set[str] | frozenset[str] | str,
        timeout: float = 30.0,
        *,
        while_waiting: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``statuses``; returns the info."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        seen: list[dict[str, Any]] = [{}]

        def check() -> dict[str, Any] | None:
            if while_waiting is not None:
                while_waiting()
            info = self.query()
            seen[0] = info
            status = info.get("status")
            if status in wanted:
                return info
            if status in MIGRATION_END:
                raise MigrationError(
                    f"migration ended with {status!r} while waiting for {sorted(wanted)}: "
                    f"{info.get('error-desc', '')}"
                )
            return None

        return poll_until(
            check,
            timeout,
            f"migration status in {sorted(wanted)}",
            detail=lambda: f"last query-migrate {seen[0]}",
            max_interval=0.01,
        )

    def finish(self, timeout: float = 60.0) -> MigrationStats:
        """Wait for ``completed`` on the source and ``RESUME`` on the destination, then
        rebind the driver to the destination. Raises `MigrationError` on failure."""
        src, dst = self.src, self.dst
        end = src.qmp.wait_event(
            "MIGRATION", timeout, match=lambda e: e["data"].get("status") in MIGRATION_END
        )
        info = self.query()
        self.stats = MigrationStats.from_query(info)
        status = end["data"]["status"]
        if status != "completed":
            raise MigrationError(
                f"migration {status}: {info.get('error-desc', '')}\n"
                f"destination stderr:\n{dst.machine.stderr_tail() if dst.machine else ''}"
            )
        dst.qmp.wait_event("RESUME", timeout)
        dst.machine.wait_for_status("running", timeout)  # type: ignore[union-attr]
        self.switch_driver()
        return self.stats

    def migrate(self, timeout: float = 60.0) -> MigrationStats:
        self.begin()
        return self.finish(timeout)

    def switch_driver(self) -> None:
        """Continue the driver on the destination's qtest connection."""
        assert self.dst.machine is not None and self.dst.machine.qtest is not None
        qtest = self.dst.machine.qtest
        self.net.rebind(qtest)
        for rebind in self.also_rebind:
            rebind(qtest)
        self.dst.alloc = self.src.alloc
        self.dst.bus = self.src.bus
        self.dst._net = self.net  # the destination's testbed runs the driver now
        self.switched = True

    def cancel(self, timeout: float = 30.0) -> dict[str, Any]:
        """``migrate_cancel`` and wait until the source reports ``cancelled``."""
        self.src.qmp.command("migrate_cancel")
        return self.wait_status("cancelled", timeout)


class PrecopyHold:
    """Keep a migration in precopy until `release` (see the module docstring).

    How QEMU decides (migration_iteration_run): when its estimate of what is left (the dirty
    pages already in its bitmap) drops below ``threshold = measured bandwidth x downtime-limit``
    it syncs the dirty bitmap (vhost logs included) and switches over if what it finds is below
    the threshold too. With downtime-limit 1 ms and a throttled bandwidth the threshold is a few
    bytes, so one dirty page keeps the migration in precopy. ``scratch`` is a guest buffer the
    test owns (``pages`` pages); `touch` memsets it through qtest so every sync finds it dirty.
    After the first pass the bandwidth drops to ``hold_bandwidth``: QEMU then sends about one
    page per 100 ms rate-limit window, so the ``pages`` dirty pages last ``pages / 10`` seconds
    without another sync - no switchover can happen while the test works.
    """

    def __init__(
        self,
        pair: MigrationPair,
        scratch: int,
        *,
        pages: int = 1024,
        pass_bandwidth: int = 8 << 20,
        hold_bandwidth: int = 2048,
        touch_interval: float = 0.05,
    ) -> None:
        self.pair = pair
        self.scratch = scratch
        self.pages = pages
        self.pass_bandwidth = pass_bandwidth
        self.hold_bandwidth = hold_bandwidth
        self.touch_interval = touch_interval
        self.touches = 0
        self._last = 0.0

    def arm(self) -> None:
        """Before ``migrate``: a 1 ms downtime limit and a moderate bandwidth."""
        set_parameters(self.pair.src.qmp, downtime_limit=1, max_bandwidth=self.pass_bandwidth)
        self.touch(force=True)

    def touch(self, *, force: bool = False) -> None:
        """Dirty every scratch page with a new non-zero byte (one qtest memset)."""
        now = time.monotonic()
        if not force and now - self._last < self.touch_interval:
            return
        self._last = now
        self.touches += 1
        self.pair.net.qt.memset(self.scratch, self.pages * 4096, 1 + self.touches % 255)

    def wait_first_pass(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every page was sent once (a second dirty-bitmap sync happened), then
        throttle so each iteration sends next to nothing."""
        self.pair.wait_status("active", timeout, while_waiting=self.touch)

        def first_pass_done() -> dict[str, Any] | None:
            self.touch()
            info = self.pair.query()
            if info.get("status") != "active":
                raise MigrationError(f"migration left precopy early: {info}")
            return info if info.get("ram", {}).get("dirty-sync-count", 0) >= 2 else None

        info = poll_until(
            first_pass_done,
            timeout,
            "the first precopy pass (dirty-sync-count >= 2)",
            max_interval=0.01,
        )
        set_parameters(self.pair.src.qmp, max_bandwidth=self.hold_bandwidth)
        self.touch(force=True)
        return info

    def still_active(self) -> dict[str, Any]:
        info = self.pair.query()
        if info.get("status") != "active":
            raise MigrationError(
                f"migration is no longer in precopy ({info.get('status')}): the hold failed"
            )
        return info

    def release(self) -> None:
        """Normal limits again: QEMU converges within a few iterations."""
        set_parameters(
            self.pair.src.qmp,
            max_bandwidth=DEFAULT_MAX_BANDWIDTH,
            downtime_limit=DEFAULT_DOWNTIME_MS,
        )
