"""vIOMMU requests: IOTLB_MSG (UPDATE / INVALIDATE from the front-end) and
SET_BACKEND_REQ_FD (the channel MISS requests go out on).

Each handler takes the :class:`~backends.vhost_user.connection.Connection` it serves."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.vdpa.access import TranslationError
from backends.vdpa.iotlb import Perm
from backends.vhost_user import messages as m
from backends.vhost_user.backend_channel import BackendChannel
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.vhost_user.messages import Request as R
from backends.vhost_user.offer import U64_LIMIT

if TYPE_CHECKING:
    from backends.vhost_user.connection import Connection

Handler = Callable[["Connection", Message], bytes | None]


# -- IOTLB ---------------------------------------------------------------------------------
def iotlb_msg(c: Connection, msg: Message) -> None:
    t = m.IotlbMsg.unpack(msg.payload)
    if not c.iommu:
        raise ProtocolError("no-iommu", "IOTLB_MSG without ACCESS_PLATFORM negotiated")
    if t.size == 0:
        raise ProtocolError("bad-iotlb", f"IOTLB message type {t.type} with size 0")
    if t.iova + t.size > U64_LIMIT:
        raise ProtocolError("bad-iotlb", f"iova {t.iova:#x} + size {t.size:#x} overflows 64 bits")
    dev = c.device
    if t.type == m.IotlbType.UPDATE:
        if t.uaddr + t.size > U64_LIMIT:
            raise ProtocolError("bad-iotlb", f"uaddr {t.uaddr:#x} + size overflows 64 bits")
        if not 1 <= t.perm <= 3:
            raise ProtocolError("bad-iotlb", f"UPDATE with permission {t.perm}")
        try:
            dev.host.lookup(t.uaddr, t.size)
        except TranslationError as e:
            raise ProtocolError(
                "unmapped", f"UPDATE uaddr {t.uaddr:#x}+{t.size:#x} outside host memory: {e}"
            ) from None
        dev.dma_map(t.iova, t.size, t.uaddr, Perm(t.perm))
        c.journal.record("iotlb.update", iova=t.iova, size=t.size, uaddr=t.uaddr, perm=t.perm)
    elif t.type == m.IotlbType.INVALIDATE:
        dev.dma_unmap(t.iova, t.size)
        c.journal.record("iotlb.invalidate", iova=t.iova, size=t.size)
    else:
        raise ProtocolError("bad-iotlb", f"IOTLB message type {t.type} from the front-end")
    dev.iotlb_updated()


def set_backend_req_fd(c: Connection, msg: Message) -> None:
    fd = msg.take_fd()
    if not c.has(PF.BACKEND_REQ):
        os.close(fd)
        raise ProtocolError("not-negotiated", "SET_BACKEND_REQ_FD without BACKEND_REQ")
    channel = BackendChannel(
        fd,
        c.loop,
        c.journal,
        reply_ack=c.has(PF.REPLY_ACK),
        on_closed=functools.partial(backend_closed, c),
        on_refused=c.device.iotlb_miss_refused,
    )
    old, c.backend = c.backend, channel
    if old is not None:
        old.close()


def backend_closed(c: Connection, channel: BackendChannel) -> None:
    if c.backend is channel:
        c.backend = None


#: The requests this module serves.
HANDLERS: dict[R, Handler] = {
    R.SET_BACKEND_REQ_FD: set_backend_req_fd,
    R.IOTLB_MSG: iotlb_msg,
}
