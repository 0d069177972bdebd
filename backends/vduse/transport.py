"""The VDUSE transport: the device model on the kernel's vDPA bus.

:meth:`VduseTransport.start` creates the device on ``/dev/vduse/control`` (features and config
space from the model), sets up every queue, opens the message fd, attaches the device to the
vDPA bus (``vdpa dev add``) and finds the ``/dev/vhost-vdpa-N`` QEMU opens. From then on the
kernel's messages become bus ops on the model:

* SET_STATUS -> ``set_status`` (with FEATURES_OK: the driver features from
  ``VDUSE_DEV_GET_FEATURES``; with DRIVER_OK: every queue's number, addresses and the state
  the front-end set, from ``VDUSE_VQ_GET_INFO``). Status 0 resets the model.
* GET_VQ_STATE -> ``get_vq_state`` (split and packed forms: :mod:`.vq_state`).
* UPDATE_IOTLB -> :class:`~.iotlb_mirror.IotlbMirror`: fetch the range again and apply the
  table as a ``set_map`` diff.
* anything else: journalled, logged, answered ``VDUSE_REQ_RESULT_FAILED``.

Queue enable is not reported by VDUSE: at DRIVER_OK the kernel still says ready=0 (QEMU
enables rings after DRIVER_OK). The transport reads ``VQ_GET_INFO`` again on a queue's kicks
and, while some configured queue is not ready, on a backing-off timer. Kicks arrive on one
eventfd per queue (``VDUSE_VQ_SETUP_KICKFD``; the kernel forgets them at every reset, so they
are installed again at the first status after one); interrupts go out through
``VDUSE_VQ_INJECT_IRQ``.

The message fd is non-blocking and read from the event loop; ``vdpa`` commands run as child
processes while the loop keeps answering the kernel (it may send messages meanwhile).
Re-attach (``reattach=True``, ``--vduse-reattach``): a backend that died (SIGKILL) leaves its
device to the kernel: ``/dev/vduse/NAME`` stays, the vhost-vdpa front-end (QEMU) keeps it open
and notices nothing, and ``vduse_dev_release`` moves the messages the dead process read but
never answered back to the send list "so they can be processed after reconnection". A new
process opens the same ``/dev/vduse/NAME`` (EBUSY while another holds it; it never creates a
device) and recovers the device state from the kernel (:meth:`VduseTransport._reattach`): the
driver features (``VDUSE_DEV_GET_FEATURES``), the IOTLB (``VDUSE_IOTLB_GET_FD`` over the whole
range), every queue (``VDUSE_VQ_GET_INFO``: size, addresses, enable) and the status (VDUSE has
no way to read it: DRIVER_OK is inferred from an enabled queue, which QEMU enables only after
DRIVER_OK; features set without one means FEATURES_OK). A split ring resumes at the used index
in guest memory, not at VQ_GET_INFO's avail index, which is only the base the front-end set at
the last start: virtio-net completes in order, so every chain before the used index is done and
every chain after it is either unread or was in flight in the dead process and is processed
again (QEMU does the same for a reconnecting vhost-user back-end:
``virtio_queue_restore_last_avail_idx`` sets last_avail_idx = used_idx). A packed ring has no
such index in shared memory: re-attach refuses it. Kicks the driver sent meanwhile went to the
dead process's eventfd, so every enabled queue is run once after re-attaching.

Journal kinds: ``vduse.create``, ``vduse.reattach``, ``vduse.attach``, ``vduse.detach``, ``vduse.destroy``,
``vduse.msg`` (every message: type, id, result), ``vduse.vq_info``, ``vduse.vq_ready``,
``vduse.iotlb`` and ``error.vduse`` (op + detail) for everything that went wrong.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backends.loop import EventLoop
from backends.vdpa.device import VdpaDevice
from backends.vdpa.virtqueue import VqState
from backends.virtio.features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    Status,
    feature_names,
    has,
)

from . import uapi
from .iotlb_mirror import IotlbFetchError, IotlbMirror
from .kernel import VdpaCommand, VduseKernel
from .uapi import Request, RequestType, VqInfo
from .vq_state import state_from_info, state_to_wire

__all__ = ["VduseError", "VduseQueue", "VduseTransport", "vduse_features"]

log = logging.getLogger(__name__)

DRIVER_OK = int(Status.DRIVER_OK)
FEATURES_OK = int(Status.FEATURES_OK)
VQ_ALIGN = 4096
#: Messages handled per wake-up of the message fd before the loop runs other work.
MESSAGES_PER_WAKEUP = 64
#: Wake-ups in a row with nothing to read: the kernel marked the device broken (poll
#: reports EPOLLERR forever); stop watching instead of spinning.
SPURIOUS_WAKEUPS_MAX = 1000
READY_POLL_FIRST_S = 0.002
READY_POLL_MAX_S = 0.2
VDPA_COMMAND_TIMEOUT_S = 30.0
VHOST_VDPA_TIMEOUT_S = 10.0

# virtio-net bits that need the control virtqueue, which VDUSE refuses for net devices
_NET_CTRL_VQ = 17
_NET_NEEDS_CTRL_VQ = (2, 18, 19, 20, 21, 23)  # CTRL_GUEST_OFFLOADS, CTRL_RX/VLAN/RX_EXTRA,
# GUEST_ANNOUNCE, CTRL_MAC_ADDR
_NET_MQ = 22


class VduseError(OSError):
    """Setting the device up failed (the message says which step)."""


def vduse_features(device_id: int, features: int, queue_pairs: int = 1) -> int:
    """What a VDUSE device may offer of the model's ``features``: VERSION_1 and
    ACCESS_PLATFORM are required (ValueError without them); for net, CTRL_VQ is refused by
    VDUSE, so it goes with every bit that needs it (MQ stays only with more than one pair)."""
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM):
        if not has(features, bit):
            raise ValueError(f"a VDUSE device must offer {feature_names(1 << bit)[0]}")
    if device_id == uapi.VIRTIO_ID_NET:
        for bit in (_NET_CTRL_VQ, *_NET_NEEDS_CTRL_VQ):
            features &= ~(1 << bit)
        if queue_pairs <= 1:
            features &= ~(1 << _NET_MQ)
    return features


@dataclass
class VduseQueue:
    """The transport side of one virtqueue (what query-vrings shows as kicks / calls)."""

    index: int
    kickfd: int = -1
    kicks: int = 0
    calls: int = 0
    irq_errors: int = 0
    ignored_kicks: int = 0
    warned_not_ready: bool = False
    info: VqInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        info = self.info
        return {
            "index": self.index,
            "kick": self.kickfd >= 0,
            "kicks": self.kicks,
            "calls": self.calls,
            "irq_errors": self.irq_errors,
            "ignored_kicks": self.ignored_kicks,
            "kernel": None
            if info is None
            else {
                "num": info.num,
                "desc": info.desc_addr,
                "driver": info.driver_addr,
                "device": info.device_addr,
                "ready": info.ready,
                "split_avail": info.split_avail,
                "packed": list(info.packed),
            },
        }


class VduseTransport:
    """One VDUSE device for ``device`` (module doc). Also what the monitor sees as the
    transport's "connection": ``connected``, ``path`` (the vhost-vdpa device), ``features``,
    ``messages``, ``errors`` and ``vrings.rings``."""

    def __init__(
        self,
        device: VdpaDevice,
        loop: EventLoop,
        kernel: VduseKernel,
        name: str,
        *,
        queue_pairs: int = 1,
        max_queue_size: int = 256,
        vdpa_timeout: float = VDPA_COMMAND_TIMEOUT_S,
        reattach: bool = False,
    ) -> None:
        uapi.pack_name(name)  # validates
        self.reattach = reattach
        self.device = device
        self.loop = loop
        self.kernel = kernel
        self.name = name
        self.queue_pairs = queue_pairs
        self.max_queue_size = max_queue_size
        self.vdpa_timeout = vdpa_timeout
        self.journal = device.journal
        self.mirror = IotlbMirror(kernel, device)
        device.dma.gpa_lookup = self.mirror.lookup_offset  # fault 'translate-by-gpa'
        self.rings = [VduseQueue(i) for i in range(len(device.vqs))]
        self.path = ""  # /dev/vhost-vdpa-N once attached
        self.offered_features = 0
        self.messages = 0
        self.errors = 0
        self.created = False
        self.attached = False
        self._msg_fd = -1
        self._kickfds_installed = False
        self._ready_timer: int | None = None
        self._ready_delay = READY_POLL_FIRST_S
        self._spurious = 0
        self._closed = False
        device.on_config_change = self._config_changed
        device.on_iotlb_miss = self._iotlb_miss
        for q in self.rings:
            device.set_vq_cb(q.index, self._irq)

    # -- what the monitor reads ----------------------------------------------------------------
    @property
    def connection(self) -> VduseTransport | None:
        return self if self.attached else None

    @property
    def connected(self) -> bool:
        return self.attached

    @property
    def connections(self) -> int:
        return 1 if self.attached else 0

    @property
    def vrings(self) -> VduseTransport:
        return self

    @property
    def features(self) -> int:
        return self.device.get_driver_features()

    @property
    def iommu(self) -> int:
        return int(self.device.dma.iommu)

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "vduse",
            "name": self.name,
            "vhost_vdpa": self.path,
            "created": self.created,
            "attached": self.attached,
            "offered_features": self.offered_features,
            "messages": self.messages,
            "errors": self.errors,
            "iotlb": self.mirror.to_list(),
            "rings": [q.to_dict() for q in self.rings],
        }

    # -- helpers -------------------------------------------------------------------------------
    def _rec(self, kind: str, **fields: Any) -> None:
        self.journal.record(kind, **fields)

    def _error(self, op: str, detail: str, level: int = logging.WARNING, **fields: Any) -> None:
        self.errors += 1
        log.log(level, "VDUSE %s: %s: %s", self.name, op, detail)
        self._rec("error.vduse", op=op, detail=detail, **fields)

    def _wait(self, cmd: VdpaCommand, what: str) -> tuple[int, str]:
        """Run the loop (answering the kernel) until ``cmd`` exits; its status and output."""
        try:
            self.loop.run_until(lambda: cmd.poll() is not None, self.vdpa_timeout, what)
        except TimeoutError as e:
            cmd.kill()
            return -1, str(e)
        rc = cmd.poll()
        return (rc if rc is not None else -1), cmd.output()

    # -- bring-up ------------------------------------------------------------------------------
    def start(self) -> str:
        """Create, set up and attach the device; returns its /dev/vhost-vdpa-N. VduseError
        (journalled) names the step that failed; whatever was done is undone."""
        try:
            if self.reattach:
                self._reattach()
            else:
                self._create()
                self._open()
                self._attach()
        except VduseError:
            self.close()
            raise
        return self.path

    def _create(self) -> None:
        dev = self.device
        try:
            self.offered_features = vduse_features(
                dev.device_id, dev.get_device_features(), self.queue_pairs
            )
        except ValueError as e:
            self._error("create", str(e), level=logging.ERROR)
            raise VduseError(str(e)) from e
        cfg_len = len(dev.personality.config_space())
        config = uapi.pack_dev_config(
            self.name,
            device_id=dev.device_id,
            features=self.offered_features,
            vq_num=len(dev.vqs),
            vq_align=VQ_ALIGN,
            config=dev.get_config(0, cfg_len),
        )
        try:
            version = self.kernel.get_api_version()
            self.kernel.set_api_version(min(version, uapi.VDUSE_API_VERSION))
            self.kernel.create_dev(config)
        except OSError as e:
            if e.errno == errno.EEXIST:
                detail = f"a VDUSE device named {self.name!r} already exists (name taken)"
            elif e.errno == errno.ENOENT:
                detail = f"{uapi.CONTROL_PATH} is missing (load the vduse module): {e}"
            else:
                detail = f"VDUSE_CREATE_DEV {self.name!r} failed: {e}"
            self._error("create", detail, level=logging.ERROR, errno=e.errno)
            raise VduseError(detail) from e
        self.created = True
        self._rec(
            "vduse.create",
            name=self.name,
            device_id=dev.device_id,
            features=self.offered_features,
            names=feature_names(self.offered_features),
            vq_num=len(dev.vqs),
            config=dev.get_config(0, cfg_len),
        )

    def _open(self, setup: bool = True) -> None:
        try:
            if self._msg_fd < 0:
                self._msg_fd = self.kernel.open_dev(self.name)
            for q in self.rings:
                if setup:
                    self.kernel.vq_setup(q.index, self.max_queue_size)
                q.kickfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.loop.add_reader(q.kickfd, functools.partial(self._on_kick, q))
        except OSError as e:
            detail = f"setting up /dev/vduse/{self.name} failed: {e}"
            self._error("setup", detail, level=logging.ERROR, errno=e.errno)
            raise VduseError(detail) from e
        self.loop.add_reader(self._msg_fd, self._on_messages)
        self._install_kickfds()

    def _attach(self) -> None:
        rc, out = self._wait(self.kernel.vdpa_dev_add(self.name), f"vdpa dev add {self.name}")
        if rc != 0:
            detail = f"vdpa dev add name {self.name} mgmtdev vduse failed ({rc}): {out}"
            self._error("attach", detail, level=logging.ERROR, status=rc)
            raise VduseError(detail)
        self.attached = True
        try:
            self.loop.run_until(
                lambda: self.kernel.vhost_vdpa_path(self.name) is not None,
                VHOST_VDPA_TIMEOUT_S,
                f"/sys/bus/vdpa/devices/{self.name}/vhost-vdpa-* (is vhost_vdpa loaded?)",
            )
        except TimeoutError as e:
            self._error("attach", str(e), level=logging.ERROR)
            raise VduseError(str(e)) from e
        self.path = self.kernel.vhost_vdpa_path(self.name) or ""
        self._rec("vduse.attach", name=self.name, path=self.path)
        log.info("VDUSE device %s attached as %s", self.name, self.path)

    # -- re-attach (module doc) -------------------------------------------------------------------
    def _reattach(self) -> None:
        """Take over the existing device ``name`` from a backend that died and resume it."""
        try:
            self._msg_fd = self.kernel.open_dev(self.name)
        except OSError as e:
            if e.errno == errno.ENOENT or e.errno == errno.ENODEV:
                detail = f"no VDUSE device named {self.name!r} to re-attach to ({e})"
            elif e.errno == errno.EBUSY:
                detail = (
                    f"/dev/vduse/{self.name} is held by another process (EBUSY): a device is "
                    "served by one process at a time; stop that one first"
                )
            else:
                detail = f"opening /dev/vduse/{self.name} to re-attach failed: {e}"
            self._error("reattach", detail, level=logging.ERROR, errno=e.errno)
            raise VduseError(detail) from e
        self.offered_features = vduse_features(
            self.device.device_id, self.device.get_device_features(), self.queue_pairs
        )
        self._open(setup=False)  # kick fds; num_max stays what the creator set up
        path = self.kernel.vhost_vdpa_path(self.name)
        if path is None:
            self._attach()
        else:
            self.path = path  # attached by the process that died; ours once recovered
        try:
            fields = self._recover()
        except VduseError:
            raise
        except OSError as e:
            detail = f"recovering the state of {self.name!r} failed: {e}"
            self._error("reattach", detail, level=logging.ERROR, errno=e.errno)
            raise VduseError(detail) from e
        # ours now: close() detaches and destroys it (a failed re-attach leaves it as it was)
        self.created = self.attached = True
        self._rec("vduse.reattach", name=self.name, path=self.path, **fields)
        log.info("VDUSE device %s re-attached (%s): %s", self.name, self.path, fields)

    def _recover(self) -> dict[str, Any]:
        dev = self.device
        features = self.kernel.get_features()
        infos = [self._read_info(q.index) for q in self.rings]
        if any(i is None for i in infos):
            raise VduseError(f"VDUSE_VQ_GET_INFO failed while re-attaching {self.name!r}")
        ready = [i for i in infos if i is not None and i.ready and i.num]
        fields: dict[str, Any] = {"features": features, "queues": []}
        if not features:
            fields["status"] = 0  # nothing negotiated: wait for the driver's next status
            return fields
        packed = has(features, VIRTIO_F_RING_PACKED)
        if packed and ready:
            detail = (
                f"{self.name!r} runs packed rings: a packed ring's position is not in guest "
                "memory (no used index to resume from), re-attach cannot resume it"
            )
            self._error("reattach", detail, level=logging.ERROR)
            raise VduseError(detail)
        status = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        dev.set_driver_features(features)
        dev.set_status(status)
        if not ready:
            fields["status"] = status
            return fields
        try:
            self.mirror.update(0, (1 << 64) - 1)
        except IotlbFetchError as e:
            detail = f"the IOTLB of {self.name!r} could not be fetched: {e}"
            self._error("reattach", detail, level=logging.ERROR)
            raise VduseError(detail) from e
        for q, info in zip(self.rings, infos, strict=True):
            assert info is not None
            if not info.num:
                continue
            used = self._used_idx(info)
            resume = used
            if dev.faults.active("reattach-from-vq-info-base"):
                resume = info.split_avail & 0xFFFF  # the fault: the stale base of the last start
            dev.set_vq_num(q.index, info.num)
            dev.set_vq_address(q.index, info.desc_addr, info.driver_addr, info.device_addr)
            dev.set_vq_state(q.index, VqState.split(resume))
            fields["queues"].append(
                {
                    "vq": q.index,
                    "ready": info.ready,
                    "info_base": info.split_avail,
                    "used_idx": used,
                    "resumed_at": resume,
                }  # fmt: skip
            )
        status |= DRIVER_OK
        fields["status"] = status
        dev.set_status(status)  # starts the configured queues
        self._kickfds_installed = True
        for info in ready:
            dev.set_vq_ready(info.index, True)  # and runs them: kicks went to the dead process
        self._schedule_ready_poll(first=True)
        return fields

    def _used_idx(self, info: VqInfo) -> int:
        """The split ring's used index in guest memory (``device area + 2``)."""
        try:
            raw = self.device.dma.read(info.device_addr + 2, 2)
        except Exception as e:
            detail = (
                f"vq {info.index}: the used ring at IOVA {info.device_addr:#x} cannot be read "
                f"through the IOTLB: {type(e).__name__}: {e}"
            )
            self._error("reattach", detail, level=logging.ERROR, vq=info.index)
            raise VduseError(detail) from e
        return int.from_bytes(raw, "little")

    # -- tear-down -----------------------------------------------------------------------------
    def close(self) -> None:
        """Detach (``vdpa dev del``), close the message fd, destroy the device. Idempotent;
        failures are journalled and logged, never raised."""
        if self._closed:
            return
        self._closed = True
        self._cancel_ready_poll()
        if self.attached:
            rc, out = self._wait(self.kernel.vdpa_dev_del(self.name), f"vdpa dev del {self.name}")
            if rc == 0:
                self._rec("vduse.detach", name=self.name)
            else:
                self._error("detach", f"vdpa dev del {self.name} failed ({rc}): {out}")
            self.attached = False
        for q in self.rings:
            if q.kickfd >= 0:
                self.loop.remove_reader(q.kickfd)
                os.close(q.kickfd)
                q.kickfd = -1
        if self._msg_fd >= 0:
            self.loop.remove_reader(self._msg_fd)
            self._msg_fd = -1
            try:
                self.kernel.close_dev()
            except OSError as e:
                self._error("close", f"closing /dev/vduse/{self.name}: {e}")
        self.mirror.clear()
        if self.created:
            try:
                self.kernel.destroy_dev(self.name)
                self._rec("vduse.destroy", name=self.name)
            except OSError as e:
                self._error("destroy", f"VDUSE_DESTROY_DEV {self.name} failed: {e}")
            self.created = False
        self.kernel.close()

    # -- messages ------------------------------------------------------------------------------
    def _on_messages(self) -> None:
        for n in range(MESSAGES_PER_WAKEUP):
            try:
                data = self.kernel.read_request()
            except OSError as e:
                self._error("read", f"reading /dev/vduse/{self.name} failed: {e}; no longer read")
                self.loop.remove_reader(self._msg_fd)
                return
            if data is None:
                if n == 0:
                    self._spurious += 1
                    if self._spurious >= SPURIOUS_WAKEUPS_MAX:
                        self._error(
                            "read",
                            f"/dev/vduse/{self.name} stays readable with no message (the kernel "
                            "marked the device broken?); no longer read",
                        )
                        self.loop.remove_reader(self._msg_fd)
                return
            self._spurious = 0
            self.handle_request(data)

    def handle_request(self, data: bytes) -> None:
        """Answer one request (a whole struct vduse_dev_request)."""
        self.messages += 1
        try:
            req = Request.unpack(data)
        except ValueError as e:
            self._error("message", f"malformed request ({len(data)} bytes): {e}; not answered")
            return
        handlers: dict[int, Callable[[Request], tuple[bytes, dict[str, Any]]]] = {
            RequestType.GET_VQ_STATE: self._get_vq_state,
            RequestType.SET_STATUS: self._set_status,
            RequestType.UPDATE_IOTLB: self._update_iotlb,
        }
        handler = handlers.get(req.type)
        union = b""
        fields: dict[str, Any] = {}
        result = uapi.VDUSE_REQ_RESULT_OK
        if handler is None:
            result = uapi.VDUSE_REQ_RESULT_FAILED
            self._error(
                "message",
                f"unknown VDUSE request type {req.type} (id {req.request_id}): "
                "answered VDUSE_REQ_RESULT_FAILED",
                type=req.type,
                request_id=req.request_id,
            )
        else:
            try:
                union, fields = handler(req)
            except _Failed as e:
                result = uapi.VDUSE_REQ_RESULT_FAILED
                fields = e.fields
            except Exception as e:  # a message must never take the backend down
                log.exception("VDUSE %s request failed", req.type_name)
                result = uapi.VDUSE_REQ_RESULT_FAILED
                self._error(req.type_name.lower(), f"{type(e).__name__}: {e}")
        self._rec(
            "vduse.msg",
            type=req.type_name,
            request_id=req.request_id,
            result="ok" if result == uapi.VDUSE_REQ_RESULT_OK else "failed",
            **fields,
        )
        try:
            self.kernel.write_response(uapi.pack_response(req.request_id, result, union))
        except OSError as e:
            # ENOENT: the kernel gave up waiting (msg_timeout) before the reply came
            self._error(
                "reply", f"reply to {req.type_name} id {req.request_id} refused: {e}", errno=e.errno
            )

    def _fail(self, op: str, detail: str, **fields: Any) -> _Failed:
        self._error(op, detail, **fields)
        return _Failed(fields)

    # GET_VQ_STATE ---------------------------------------------------------------------------------
    def _get_vq_state(self, req: Request) -> tuple[bytes, dict[str, Any]]:
        i = req.vq_index
        if not 0 <= i < len(self.device.vqs):
            raise self._fail(
                "get_vq_state",
                f"GET_VQ_STATE for vq {i}: the device has {len(self.device.vqs)}",
                vq=i,
            )
        packed = has(self.device.get_driver_features(), VIRTIO_F_RING_PACKED)
        fields: dict[str, Any] = {"vq": i, "packed": packed}
        if not self.device.vqs[i].started:
            # a ring that is not running: its state is what the front-end last set
            # (SET_VRING_BASE, kept by the kernel), not the model's stale copy
            info = self._read_info(i)
            if info is not None:
                try:
                    self.device.set_vq_state(i, state_from_info(info, packed))
                    fields["from_kernel"] = True
                except ValueError as e:
                    self._error("get_vq_state", f"vq {i}: {e}", vq=i)
        st = self.device.get_vq_state(i)
        fields["last_avail_idx"] = st.last_avail_idx
        if packed:
            fields.update(used_idx=st.used_idx, avail_wrap=st.avail_wrap, used_wrap=st.used_wrap)
        return state_to_wire(i, st, packed), fields

    # SET_STATUS -------------------------------------------------------------------------------
    def _set_status(self, req: Request) -> tuple[bytes, dict[str, Any]]:
        status = req.status
        dev = self.device
        fields: dict[str, Any] = {"status": status, "names": [s.name for s in Status if status & s]}
        if status == 0:
            dev.set_status(0)
            self._cancel_ready_poll()
            # the kernel drops the kick eventfds right after this reply (vduse_dev_reset)
            self._kickfds_installed = False
            for q in self.rings:
                q.warned_not_ready = False
            return b"", fields
        if not self._kickfds_installed:
            self._install_kickfds()
        old = dev.get_status()
        if status & FEATURES_OK and not old & FEATURES_OK:
            try:
                features = self.kernel.get_features()
            except OSError as e:
                raise self._fail("set_status", f"VDUSE_DEV_GET_FEATURES failed: {e}") from e
            dev.set_driver_features(features)
            fields["features"] = features
        if status & DRIVER_OK and not old & DRIVER_OK:
            self._load_vqs()
        dev.set_status(status)
        if status & FEATURES_OK and not dev.get_status() & FEATURES_OK:
            raise self._fail(
                "set_status", "FEATURES_OK refused by the device (features not offered)", **fields
            )
        if dev.get_status() & DRIVER_OK:
            self._schedule_ready_poll(first=not old & DRIVER_OK)
        return b"", fields

    def _install_kickfds(self) -> None:
        for q in self.rings:
            if q.kickfd < 0:
                continue
            try:
                self.kernel.vq_setup_kickfd(q.index, q.kickfd)
            except OSError as e:
                self._error("kickfd", f"VDUSE_VQ_SETUP_KICKFD vq {q.index} failed: {e}", vq=q.index)
        self._kickfds_installed = True

    def _read_info(self, i: int) -> VqInfo | None:
        try:
            info = self.kernel.vq_get_info(i)
        except OSError as e:
            self._error("vq_info", f"VDUSE_VQ_GET_INFO vq {i} failed: {e}", vq=i)
            return None
        self.rings[i].info = info
        return info

    def _load_vqs(self) -> None:
        """DRIVER_OK: every queue's size, addresses and front-end state into the model."""
        dev = self.device
        packed = has(dev.get_driver_features(), VIRTIO_F_RING_PACKED)
        for q in self.rings:
            info = self._read_info(q.index)
            if info is None:
                continue
            self._rec(
                "vduse.vq_info",
                vq=q.index,
                num=info.num,
                desc=info.desc_addr,
                driver=info.driver_addr,
                device=info.device_addr,
                ready=info.ready,
                split_avail=info.split_avail,
                packed_state=list(info.packed),
            )
            if not info.num:
                continue  # the front-end never set this queue up
            try:
                dev.set_vq_num(q.index, info.num)
                dev.set_vq_address(q.index, info.desc_addr, info.driver_addr, info.device_addr)
                state = state_from_info(info, packed)
                if dev.faults.active("ignore-restored-base"):
                    state = VqState()  # the fault: start over, whatever the front-end set
                dev.set_vq_state(q.index, state)
            except ValueError as e:
                self._error("vq_info", f"vq {q.index}: {e}", vq=q.index)
                continue
            if info.ready:
                dev.set_vq_ready(q.index, True)

    def _enable_if_ready(self, i: int, source: str) -> bool:
        """Ask the kernel whether queue ``i`` was enabled; if so, tell the model."""
        dev = self.device
        vq = dev.vqs[i]
        if vq.ready or not dev.get_status() & DRIVER_OK or not vq.num:
            return vq.ready
        info = self._read_info(i)
        if info is None or not info.ready:
            return False
        self._rec("vduse.vq_ready", vq=i, source=source)
        dev.set_vq_ready(i, True)
        return True

    def _schedule_ready_poll(self, first: bool) -> None:
        if first:
            self._ready_delay = READY_POLL_FIRST_S
        if self._ready_timer is None and self._waiting_for_ready():
            self._ready_timer = self.loop.call_later(self._ready_delay, self._poll_ready)

    def _waiting_for_ready(self) -> bool:
        return any(vq.num and not vq.ready for vq in self.device.vqs)

    def _poll_ready(self) -> None:
        self._ready_timer = None
        if not self.device.get_status() & DRIVER_OK:
            return
        for q in self.rings:
            self._enable_if_ready(q.index, "poll")
        self._ready_delay = min(self._ready_delay * 2, READY_POLL_MAX_S)
        self._schedule_ready_poll(first=False)

    def _cancel_ready_poll(self) -> None:
        if self._ready_timer is not None:
            self.loop.cancel(self._ready_timer)
            self._ready_timer = None

    # UPDATE_IOTLB -----------------------------------------------------------------------------
    def _update_iotlb(self, req: Request) -> tuple[bytes, dict[str, Any]]:
        start, last = req.iova_range
        fields: dict[str, Any] = {"start": start, "last": last}
        if self.device.faults.active("keep-stale-map") and self.device.get_status() & DRIVER_OK:
            fields["fault"] = "keep-stale-map"  # the fault: OK, but nothing fetched
            return b"", fields
        t0 = time.monotonic_ns()
        try:
            diff = self.mirror.update(start, last)
        except IotlbFetchError as e:
            raise self._fail(
                "update_iotlb",
                f"UPDATE_IOTLB [{start:#x}, {last:#x}] could not be fetched: {e}; "
                "the previous mappings are kept",
                **fields,
            ) from e
        fields.update(
            added=len(diff.added),
            removed=len(diff.removed),
            kept=len(diff.kept),
            entries=len(self.mirror.entries),
            us=(time.monotonic_ns() - t0) // 1000,
        )
        self._rec("vduse.iotlb", **fields)
        return b"", fields

    # -- kicks, interrupts, config -------------------------------------------------------------
    def _on_kick(self, q: VduseQueue) -> None:
        try:
            os.eventfd_read(q.kickfd)
        except BlockingIOError:
            return
        except OSError as e:
            self._error("kick", f"vq {q.index}: kick eventfd failed: {e}; no longer watched")
            self.loop.remove_reader(q.kickfd)
            return
        q.kicks += 1
        dev = self.device
        vq = dev.vqs[q.index]
        if not vq.ready:
            if self._enable_if_ready(q.index, "kick"):
                return  # set_vq_ready ran the queue
            q.ignored_kicks += 1
            if not q.warned_not_ready:
                q.warned_not_ready = True
                self._error(
                    "kick",
                    f"kick on vq {q.index}, which was never enabled (kernel ready=0, "
                    f"status {dev.get_status():#x}): ignored",
                    vq=q.index,
                )
        dev.kick_vq(q.index)

    def _irq(self, i: int) -> None:
        q = self.rings[i]
        try:
            self.kernel.vq_inject_irq(i)
            q.calls += 1
        except OSError as e:  # EINVAL before DRIVER_OK
            q.irq_errors += 1
            if q.irq_errors == 1:
                self._error("irq", f"VDUSE_VQ_INJECT_IRQ vq {i} failed: {e}", vq=i)

    def _config_changed(self) -> None:
        dev = self.device
        try:
            self.kernel.set_config(0, dev.get_config(0, len(dev.personality.config_space())))
            self.kernel.inject_config_irq()
        except OSError as e:
            self._error("config", f"config update / config interrupt failed: {e}")

    def _iotlb_miss(self, iova: int, perm: int) -> None:
        # VDUSE sends UPDATE_IOTLB only for changes made through vhost-vdpa's set_map. Bound to
        # virtio_vdpa the kernel maps DMA in its own bounce domain and never announces it: the
        # device asks for the entry itself (VDUSE_IOTLB_GET_FD), outside the device callback.
        self.loop.call_soon(lambda: self._fetch_missing(iova, perm))

    def _fetch_missing(self, iova: int, perm: int) -> None:
        fields: dict[str, Any] = {"iova": iova, "perm": perm}
        try:
            diff = self.mirror.update(iova, iova)
        except IotlbFetchError as e:
            self._error(
                "iotlb_miss",
                f"IOVA {iova:#x} (perm {perm}) is not in the VDUSE IOTLB and could not be "
                f"fetched: {e}; the queue waits for the next UPDATE_IOTLB",
                **fields,
            )
            return
        fields.update(added=len(diff.added), entries=len(self.mirror.entries))
        self._rec("vduse.iotlb_fetch", **fields)
        if diff.added:
            self.device.iotlb_updated()  # retry the parked queues with the new entry
        else:
            self._error(
                "iotlb_miss",
                f"IOVA {iova:#x} (perm {perm}) is not in the VDUSE IOTLB; the queue waits for "
                "the next UPDATE_IOTLB",
                **fields,
            )


class _Failed(Exception):
    """A handler's failure, already journalled: answer FAILED."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields
