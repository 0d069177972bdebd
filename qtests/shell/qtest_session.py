"""A session on the qtest machine: no guest OS, the qos driver is the guest (``--qtest``).

A `Testbed` (backend process, QEMU with a halted vCPU, the virtio-net driver at DRIVER_OK with
RX buffers posted, the wire peer), plus a second QMP monitor for the user. The test acts as the
ACPI OSPM for DIMM hotplug (`AcpiMemoryHotplug`); an injected frame is received by the driver.
Migration goes through `qtests.qos.migration.MigrationPair` and rebinds the driver.
"""

from __future__ import annotations

from typing import Any

from qtests.qos.acpi_memhp import AcpiMemoryHotplug
from qtests.qos.backend_process import BackendProcess
from qtests.qos.frames import parse_frame
from qtests.qos.machine import QemuMachine
from qtests.qos.memory_devices import DimmHotplug
from qtests.qos.migration import MigrationPair
from qtests.qos.qmp import QmpClient
from qtests.qos.testbed import Testbed
from qtests.shell.session import (
    Endpoint,
    Session,
    dimm_args,
    qmp_endpoint,
    stopped_line,
    try_quietly,
    user_monitor_args,
)

USER_QMP = "qmp-user.sock"


class QtestSession(Session):
    mode = "qtest"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tb = Testbed(self.log_dir, queues=self.queues, faults=self.faults)

    @property
    def machine(self) -> QemuMachine:
        assert self.tb.machine is not None, "start() first"
        return self.tb.machine

    @property
    def qmp(self) -> QmpClient:
        return self.machine.qmp

    @property
    def backend(self) -> BackendProcess:
        assert self.tb.backend is not None, "start() first"
        return self.tb.backend

    def _with_user_monitor(self, m: QemuMachine) -> None:
        m.add_args(*user_monitor_args(m.sock_path(USER_QMP)))

    def _set_up_hotplug(self, plugged: dict[str, Any]) -> None:
        m = self.machine
        self.hotplug = DimmHotplug(m.qmp, AcpiMemoryHotplug(m.qtest, m.slots))
        self.hotplug.plugged.update(plugged)

    def start(self) -> None:
        tb = self.tb
        tb.start_backend()
        m = tb.build_machine()
        self._with_user_monitor(m)
        tb.start_qemu(m)
        tb.init_net()
        self._set_up_hotplug({})

    def endpoints(self) -> list[Endpoint]:
        qmp = self.machine.sock_path(USER_QMP)
        return [qmp_endpoint("QEMU QMP", qmp), *self.common_endpoints()]

    def processes(self) -> dict[str, int | None]:
        return {"QEMU": self.machine.pid, "backend": self.backend.pid}

    def after_inject(self, queue: int, timeout: float) -> str | None:
        frame = self.tb.net.recv(queue, timeout)
        seq = parse_frame(frame.data)
        what = f"test frame stream {seq[0]} seq {seq[1]}, intact" if seq else "not a test frame"
        return f"driver received {len(frame.data)} bytes on rx{queue} ({what})"

    def _migrate(self, tag: str) -> dict[str, Any]:
        src = self.tb
        plugged = dict(self.hotplug.plugged) if self.hotplug else {}

        def testbeds(name: str, **kw: Any) -> Testbed:
            return src if name == "src" else Testbed(self.log_dir, name=tag, **kw)

        pair = MigrationPair(testbeds, dst_faults=self.faults, queues=self.queues)
        dst = pair.dst

        def customize(m: QemuMachine) -> None:
            m.add_args(*dimm_args(plugged))
            self._with_user_monitor(m)

        try:
            pair.start_destination(customize)
            pair.begin()
            info = pair.wait_status("completed", 60.0)
            assert dst.machine is not None
            dst.machine.wait_for_status("running", 30.0)
        except BaseException:
            dst.close()
            raise
        self.tb.net.rebind(dst.machine.qtest)
        old_machine, old_backend, old_peer = src.machine, src.backend, src.peer
        src.machine, src.backend, src.peer = dst.machine, dst.backend, dst.peer
        self._set_up_hotplug(plugged)
        if old_machine is not None:
            try_quietly("source QEMU", old_machine.shutdown, self.log)
        if old_backend is not None:
            try_quietly("source backend", old_backend.stop, self.log)
        old_peer.close()
        return info

    def _stop_all(self) -> list[str]:
        lines = []
        m, b = self.tb.machine, self.tb.backend
        if m is not None:
            rc = try_quietly("QEMU", m.shutdown, self.log)
            lines.append(stopped_line("QEMU", m.pid, rc))
        if b is not None:
            rc = try_quietly("backend", b.stop, self.log)
            lines.append(stopped_line("backend", b.pid, rc))
        self.tb.close()  # the rest (the wire peer); machine and backend stop idempotently
        return lines
