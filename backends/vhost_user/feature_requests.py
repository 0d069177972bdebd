"""Feature and ownership requests: GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
SET_OWNER, RESET_OWNER / RESET_DEVICE, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS.

Each handler takes the :class:`~backends.vhost_user.connection.Connection` it serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.vdpa.dirty_log import DirtyLog
from backends.vhost_user import messages as m
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.vhost_user.messages import Request as R
from backends.vhost_user.offer import ACCESS_PLATFORM, LOG_ALL, PROTOCOL_FEATURES

if TYPE_CHECKING:
    from backends.vhost_user.connection import Connection

Handler = Callable[["Connection", Message], bytes | None]


# -- features / ownership ------------------------------------------------------------------
def get_features(c: Connection, msg: Message) -> bytes:
    return m.pack_u64(c.offered_features())


def set_features(c: Connection, msg: Message) -> None:
    features = m.unpack_u64(msg.payload)
    extra = features & ~c.offered_features()
    if extra:
        raise ProtocolError("bad-features", f"features {extra:#x} were not offered")
    if features & ACCESS_PLATFORM and not (c.has(PF.REPLY_ACK) and c.has(PF.BACKEND_REQ)):
        raise ProtocolError(
            "bad-features",
            "ACCESS_PLATFORM needs the REPLY_ACK and BACKEND_REQ protocol features",
        )
    old = c.features or 0
    c.features = features
    c.device.set_driver_features(features)
    c.mem.set_iommu(bool(features & ACCESS_PLATFORM))
    if not features & PROTOCOL_FEATURES:
        for i in range(len(c.vrings)):  # no SET_VRING_ENABLE: every ring is enabled
            c.device.set_vq_ready(i, True)
    if old & LOG_ALL and not features & LOG_ALL:
        c.stop_log()
    elif features & LOG_ALL and c.log_area is not None and c.device.dma.dirty_log is None:
        c.device.set_dirty_log(DirtyLog(c.log_area.view))
    return None


def set_owner(c: Connection, msg: Message) -> None:
    c.owner = True


def reset(c: Connection, msg: Message) -> None:
    """RESET_OWNER (deprecated) / RESET_DEVICE: stop every ring, reset the device.
    The memory table stays (the front-end does not resend it)."""
    c.vrings.stop_kicks()
    c.stop_log()
    c.features = None
    c.device.reset()
    c.mem.resync()


def get_protocol_features(c: Connection, msg: Message) -> bytes:
    return m.pack_u64(c.offer.protocol_features())


def set_protocol_features(c: Connection, msg: Message) -> None:
    features = m.unpack_u64(msg.payload)
    extra = features & ~c.offer.protocol_features()
    if extra:
        raise ProtocolError("bad-features", f"protocol features {extra:#x} were not offered")
    c.protocol_features = features
    if c.backend is not None:
        c.backend.reply_ack = c.has(PF.REPLY_ACK)


def get_queue_num(c: Connection, msg: Message) -> bytes:
    return m.pack_u64(c.offer.max_queues)


def get_max_mem_slots(c: Connection, msg: Message) -> bytes:
    slots = c.mem.max_slots if c.offer.mem_slots else m.MEM_TABLE_MAX_REGIONS
    return m.pack_u64(slots)


#: The requests this module serves.
HANDLERS: dict[R, Handler] = {
    R.GET_FEATURES: get_features,
    R.SET_FEATURES: set_features,
    R.SET_OWNER: set_owner,
    R.RESET_OWNER: reset,
    R.RESET_DEVICE: reset,
    R.GET_PROTOCOL_FEATURES: get_protocol_features,
    R.SET_PROTOCOL_FEATURES: set_protocol_features,
    R.GET_QUEUE_NUM: get_queue_num,
    R.GET_MAX_MEM_SLOTS: get_max_mem_slots,
}
