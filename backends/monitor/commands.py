"""The backend monitor's QMP schema: its commands, their arguments, and its events.

:class:`MonitorCommands` validates arguments the way QEMU's QAPI input visitor does (same error
wording: "Parameter 'x' is missing", "Invalid parameter type for 'x', expected: integer",
"Parameter 'x' is unexpected") and runs the command against the device model. Every reply is
built from plain ints, strings, lists and dicts, so it always serialises.

:func:`journal_event` turns a journal entry into a QMP event (or ``None``): the monitor learns
about state changes only by subscribing to the device's :class:`~backends.vdpa.journal.Journal`.

The protocol itself (greeting, negotiation, framing, ids) is :mod:`.server`; the argument
checks :mod:`.schema`, the events :mod:`.events`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.vdpa.faults import FAULTS
from backends.vdpa.iotlb import Perm
from backends.vdpa.journal import json_safe
from backends.virtio.features import VHOST_LEVEL_FEATURES, Status

from .names import describe_features, protocol_feature_names, status_names
from .schema import (
    CAPABILITIES_COMMAND,
    Arg,
    ArgType,
    Command,
    CommandError,
    check_arguments,
)

if TYPE_CHECKING:
    from backends.net.datapath import NetDevice
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)


def _attr(obj: object, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``obj`` has (called if it is a method), else ``default``."""
    for name in names:
        value = getattr(obj, name, None)
        if value is None:
            continue
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        return value
    return default


# -- the commands -------------------------------------------------------------------------------
class MonitorCommands:
    """Every monitor command but ``qmp_capabilities`` (which is per connection: the protocol's)."""

    def __init__(
        self,
        device: VdpaDevice,
        net: NetDevice | None = None,
        server: object | None = None,
        request_quit: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.net = net
        self.server = server
        self._request_quit = request_quit
        table = [
            Command("query-commands", self.query_commands, help="list the commands"),
            Command("query-status", self.query_status, help="device status and connection"),
            Command("query-features", self.query_features, help="device/driver features"),
            Command("query-mem-table", self.query_mem_table, help="host memory regions"),
            Command(
                "query-iotlb",
                self.query_iotlb,
                (Arg("iova", ArgType.UINT, True), Arg("size", ArgType.UINT, True)),
                help="IOTLB mappings, optionally only those overlapping [iova, iova+size)",
            ),
            Command("query-vrings", self.query_vrings, help="per-virtqueue state and counters"),
            Command(
                "query-journal",
                self.query_journal,
                (
                    Arg("kinds", ArgType.STR_LIST, True),
                    Arg("since", ArgType.UINT, True),
                    Arg("limit", ArgType.UINT, True),
                ),
                help="journal entries after seq 'since' (oldest first, at most 'limit')",
            ),
            Command("journal-mark", self.journal_mark, help="the newest journal seq"),
            Command("query-faults", self.query_faults, help="active and known faults"),
            Command("set-fault", self.set_fault, (Arg("name", ArgType.STR),), "activate a fault"),
            Command("clear-fault", self.clear_fault, (Arg("name", ArgType.STR),), "clear a fault"),
            Command(
                "inject-packet",
                self.inject_packet,
                (Arg("data", ArgType.STR), Arg("queue", ArgType.UINT, True)),
                help="deliver a frame (hex) to the guest on RX of queue pair 'queue'",
            ),
            Command("query-wire", self.query_wire, help="wire and per-queue packet counters"),
            Command(
                "hold-tx",
                self.hold_tx,
                (Arg("enable", ArgType.BOOL),),
                help="hold TX completions (chains stay popped, frames unsent) or release them",
            ),
            Command(
                "hold-rx",
                self.hold_rx,
                (Arg("count", ArgType.UINT),),
                help="take 'count' RX buffers of receiveq 0 and keep them unfilled; 0 releases",
            ),
            Command(
                "iotlb-request",
                self.iotlb_request,
                (
                    Arg("iova", ArgType.UINT),
                    Arg("perm", ArgType.UINT, True),
                    Arg("type", ArgType.STR, True),
                ),
                help="send an IOTLB MISS (type 'miss', default) or ACCESS_FAIL ('access-fail') "
                "for 'iova' with vhost perm 'perm' (default 1 = RO) on the backend channel",
            ),
            Command("suspend", self.suspend, help="stop processing queues (kicks are kept)"),
            Command("resume", self.resume, help="resume processing, replaying kicks"),
            Command("quit", self.quit, help="stop the backend"),
        ]
        self.table: dict[str, Command] = {c.name: c for c in table}
        self._capabilities_args = (Arg("enable", ArgType.STR_LIST, True),)

    def names(self) -> list[str]:
        return [CAPABILITIES_COMMAND, *self.table]

    def check_arguments(self, name: str, arguments: dict[str, Any]) -> None:
        if name == CAPABILITIES_COMMAND:
            check_arguments(self._capabilities_args, arguments)
        else:
            check_arguments(self.table[name].args, arguments)

    def execute(self, name: str, arguments: dict[str, Any]) -> object:
        """Run ``name``; raises CommandError (class CommandNotFound for an unknown name)."""
        cmd = self.table.get(name)
        if cmd is None:
            raise CommandError(f"The command {name} has not been found", "CommandNotFound")
        check_arguments(cmd.args, arguments)
        try:
            return cmd.handler(arguments)
        except CommandError:
            raise
        except Exception as exc:  # a command must never take the backend down
            log.exception("monitor command %s failed", name)
            raise CommandError(f"{name} failed: {type(exc).__name__}: {exc}") from exc

    # -- helpers ---------------------------------------------------------------------------
    def _need_net(self) -> NetDevice:
        if self.net is None:
            raise CommandError("this backend has no network device")
        return self.net

    # -- commands --------------------------------------------------------------------------
    def query_commands(self, _: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in self.names()]

    def query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        dev = self.device
        status = int(dev.get_status())
        suspended = bool(getattr(dev, "suspended", False))
        running = status & (Status.DRIVER_OK | Status.NEEDS_RESET | Status.FAILED) == int(
            Status.DRIVER_OK
        )
        info: dict[str, Any] = {
            "status": status,
            "status_names": status_names(status),
            "running": bool(running and not suspended),
            "suspended": suspended,
            "features": describe_features(int(dev.get_driver_features())),
        }
        extra = _attr(dev, "describe", default={})
        if isinstance(extra, dict):
            for key in ("device_id", "iommu", "parked", "errors", "kicks", "num_queues"):
                if key in extra:
                    info[key] = json_safe(extra[key])
        info["connection"] = self._connection()
        return info

    def _connection(self) -> dict[str, Any] | None:
        """The vhost-user side: null without a server, else whether QEMU is connected and
        what it negotiated."""
        server = self.server
        if server is None:
            return None
        conn = self._transport_connection()
        connected = getattr(server, "connected", conn is not None)
        info: dict[str, Any] = {
            "connected": bool(connected),
            "path": str(getattr(server, "path", "")),
            "connections": _int_or_none(getattr(server, "connections", None)),
            "protocol_features": None,
            "acked_features": None,
        }
        if conn is None:
            return info
        proto = getattr(conn, "protocol_features", None)
        if isinstance(proto, int):
            info["protocol_features"] = {"bits": proto, "names": protocol_feature_names(proto)}
        acked = getattr(conn, "features", None)
        if isinstance(acked, int):
            info["acked_features"] = describe_features(acked)
        for key in ("name", "messages", "errors", "iommu"):
            value = getattr(conn, key, None)
            if isinstance(value, int | str):
                info[key] = value
        info["backend_channel"] = getattr(conn, "backend", None) is not None
        return info

    def query_features(self, _: dict[str, Any]) -> dict[str, Any]:
        device = int(self.device.get_device_features())
        driver = int(self.device.get_driver_features())
        info = {
            "device": describe_features(device),
            "driver": describe_features(driver),
            # what the driver acked is what was negotiated; vhost-level bits (LOG_ALL,
            # PROTOCOL_FEATURES) are offered by the transport, not the device
            "negotiated": describe_features(driver & (device | VHOST_LEVEL_FEATURES)),
        }
        conn = self._transport_connection()
        offered = _attr(conn, "offered_features") if conn is not None else None
        if isinstance(offered, int):
            info["offered"] = describe_features(offered)
        return info

    def query_mem_table(self, _: dict[str, Any]) -> dict[str, Any]:
        regions = sorted(self.device.host.regions(), key=lambda r: (r.gpa, r.uaddr))
        return {
            "regions": [
                {
                    "id": r.id,
                    "gpa": r.gpa,
                    "size": r.size,
                    "uaddr": r.uaddr,
                    "mmap_offset": r.mmap_offset,
                    "written": r.written,
                }
                for r in regions
            ]
        }

    def query_iotlb(self, args: dict[str, Any]) -> dict[str, Any]:
        iotlb = self.device.iotlb
        entries = sorted(iotlb.entries(), key=lambda m: m.iova)
        if "iova" in args or "size" in args:
            if "iova" not in args:
                raise CommandError("Parameter 'size' needs parameter 'iova'")
            start = args["iova"]
            size = args.get("size", 1)
            if size == 0:
                raise CommandError("Parameter 'size' expects a non-zero size")
            end = start + size
            entries = [m for m in entries if m.iova < end and start < m.iova + m.size]
        return {
            "generation": int(_attr(iotlb, "generation", default=0)),
            "mappings": [
                {
                    "id": m.id,
                    "iova": m.iova,
                    "size": m.size,
                    "uaddr": m.uaddr,
                    "perm": _perm_name(m.perm),
                }
                for m in entries
            ],
        }

    def query_vrings(self, _: dict[str, Any]) -> dict[str, Any]:
        rings = self._transport_rings()
        return {"vrings": [self._vring(vq, rings) for vq in self.device.vqs]}

    def _vring(self, vq: Any, rings: list[Any] | None) -> dict[str, Any]:
        index = int(vq.index)
        info: dict[str, Any] = json_safe(_attr(vq, "to_dict", default={}))
        state = vq.state
        info.update(
            index=index,
            ready=bool(vq.ready),
            started=bool(vq.started),
            # vhost-user SET_VRING_ENABLE is the vDPA set_vq_ready: one flag
            enabled=bool(_attr(vq, "enabled", default=vq.ready)),
            num=int(vq.num),
            desc=int(vq.desc),
            avail=int(vq.avail),
            used=int(vq.used),
            last_avail_idx=int(state.last_avail_idx),
            used_idx=int(state.used_idx),
            inflight=int(vq.inflight),
        )
        stats = self._queue_stats(index)
        info.update(
            packets=stats.get("packets", 0),
            bytes=stats.get("bytes", 0),
            drops=stats.get("drops", 0),
        )
        # kick / call eventfds are the transport's: counted there, null without a connection
        ring = rings[index] if rings is not None and index < len(rings) else None
        info["kicks"] = _int_or_none(getattr(ring, "kicks", None))
        info["calls"] = _int_or_none(getattr(ring, "calls", None))
        return info

    def _queue_stats(self, vq_index: int) -> dict[str, int]:
        stats = getattr(self.net, "stats", None) if self.net is not None else None
        if not isinstance(stats, list) or not 0 <= vq_index < len(stats):
            return {}
        s = stats[vq_index]
        return {k: int(getattr(s, k)) for k in ("packets", "bytes", "drops") if hasattr(s, k)}

    def _transport_connection(self) -> Any:
        """The vhost-user server's current connection, if any."""
        if self.server is None:
            return None
        return _attr(self.server, "connection", "conn", "current")

    def _transport_rings(self) -> list[Any] | None:
        conn = self._transport_connection()
        vrings = getattr(conn, "vrings", None) if conn is not None else None
        rings = getattr(vrings, "rings", None)
        return rings if isinstance(rings, list) else None

    def query_journal(self, args: dict[str, Any]) -> dict[str, Any]:
        journal = self.device.journal
        kinds = args.get("kinds") or None
        entries = journal.query(kinds, args.get("since"))
        limit = args.get("limit")
        if limit is not None:
            entries = entries[:limit]
        return {"entries": [json_safe(e) for e in entries], "last": journal.mark()}

    def journal_mark(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"seq": self.device.journal.mark()}

    def query_faults(self, _: dict[str, Any]) -> dict[str, Any]:
        faults = self.device.faults
        known = _known_faults(faults)
        active = sorted(n for n in known if faults.active(n))
        return {
            "active": active,
            "known": [
                {"name": name, "description": desc, "active": name in active}
                for name, desc in sorted(known.items())
            ],
        }

    def _fault_op(self, op: str, name: str) -> dict[str, Any]:
        try:
            getattr(self.device.faults, op)(name)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        return {}

    def set_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._fault_op("set", args["name"])

    def clear_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._fault_op("clear", args["name"])

    def inject_packet(self, args: dict[str, Any]) -> dict[str, Any]:
        net = self._need_net()
        text = "".join(args["data"].split()).replace(":", "").replace("-", "")
        try:
            frame = bytes.fromhex(text)
        except ValueError as exc:
            raise CommandError(f"Parameter 'data' expects hex bytes: {exc}") from exc
        if not frame:
            raise CommandError("Parameter 'data' expects at least one byte")
        qp = args.get("queue", 0)
        pairs = int(getattr(net, "queue_pairs", 1))
        if qp >= pairs:
            raise CommandError(f"Parameter 'queue' expects a queue pair below {pairs}")
        try:
            queued = net.inject(frame, qp)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        # False: the RX backlog was full and the frame was dropped (counted)
        return {"length": len(frame), "queue": qp, "queued": bool(queued)}

    def query_wire(self, _: dict[str, Any]) -> dict[str, Any]:
        net = self._need_net()
        counters: dict[str, Any] = json_safe(net.counters())
        wire = net.wire
        kind = _attr(wire, "describe", "kind", default=type(wire).__name__)
        return {
            "wire": {"kind": str(kind), **counters.get("wire", {})},
            "queues": counters.get("queues", []),
            "backlog": counters.get("backlog", []),
            "tx_held": int(getattr(net, "tx_held", 0)),
            "rx_held": int(getattr(net, "rx_held", 0)),
        }

    def hold_rx(self, args: dict[str, Any]) -> dict[str, Any]:
        """Returns how many RX chains are held after the command."""
        net = self._need_net()
        return {"held": int(net.hold_rx(int(args["count"])))}

    def hold_tx(self, args: dict[str, Any]) -> dict[str, Any]:
        """Returns how many TX chains were held when the command ran."""
        net = self._need_net()
        return {"held": int(net.hold_tx(args["enable"])), "enabled": args["enable"]}

    def iotlb_request(self, args: dict[str, Any]) -> dict[str, Any]:
        """A backend-initiated IOTLB request, e.g. a MISS while QEMU has the device stopped.
        Its ack lands in the journal (iotlb.miss_ack / iotlb.access_fail_ack)."""
        kind = args.get("type", "miss")
        perm = args.get("perm", int(Perm.RO))
        if kind not in ("miss", "access-fail"):
            raise CommandError("Parameter 'type' expects 'miss' or 'access-fail'")
        if not 1 <= perm <= 3:
            raise CommandError("Parameter 'perm' expects 1 (RO), 2 (WO) or 3 (RW)")
        channel = getattr(self._transport_connection(), "backend", None)
        if channel is None:
            raise CommandError("no backend channel (no vhost-user connection with BACKEND_REQ)")
        send = channel.send_miss if kind == "miss" else channel.send_access_fail
        return {"sent": bool(send(args["iova"], perm))}

    def suspend(self, _: dict[str, Any]) -> dict[str, Any]:
        self.device.suspend()
        return {}

    def resume(self, _: dict[str, Any]) -> dict[str, Any]:
        self.device.resume()
        return {}

    def quit(self, _: dict[str, Any]) -> dict[str, Any]:
        if self._request_quit is None:
            raise CommandError("quit is not available on this monitor")
        self._request_quit()
        return {}


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None


def _perm_name(perm: object) -> str:
    try:
        return str(Perm(perm).name) if isinstance(perm, int) else str(perm)
    except ValueError:
        return str(perm)


def _known_faults(faults: Any) -> dict[str, str]:
    known = _attr(faults, "known", default=None)
    if isinstance(known, dict):
        return {str(k): str(v) for k, v in known.items()}
    return dict(FAULTS)
