"""Vring requests: SET_VRING_NUM / ADDR / BASE / KICK / CALL / ERR / ENABLE / ENDIAN and
GET_VRING_BASE (the ring's state, encoded by the queue's own layout).

Each handler takes the :class:`~backends.vhost_user.connection.Connection` it serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.vhost_user import messages as m
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message
from backends.vhost_user.messages import Request as R
from backends.vhost_user.vrings import check_eventfd

if TYPE_CHECKING:
    from backends.vhost_user.connection import Connection

Handler = Callable[["Connection", Message], bytes | None]


# -- vrings --------------------------------------------------------------------------------
def set_vring_num(c: Connection, msg: Message) -> None:
    st = m.VringState.unpack(msg.payload)
    i = c.vring_index(st.index)
    num, limit = st.num, c.device.get_vq_num_max()
    if num == 0 or num & (num - 1) or num > limit:
        raise ProtocolError("bad-num", f"vring {i}: size {num} is not a power of 2 in 1..{limit}")
    c.device.set_vq_num(i, num)


def set_vring_addr(c: Connection, msg: Message) -> None:
    addr = m.VringAddr.unpack(msg.payload)
    i = c.vring_index(addr.index)
    if c.iommu:
        desc, avail, used = addr.desc, addr.avail, addr.used
    else:  # QEMU user addresses: turn them into guest-physical ones via the mem table
        conv = []
        for what, uaddr in (("desc", addr.desc), ("avail", addr.avail), ("used", addr.used)):
            gpa = c.mem.uaddr_to_gpa(uaddr)
            if gpa is None:
                raise ProtocolError(
                    "unmapped", f"vring {i}: {what} address {uaddr:#x} is in no memory region"
                )
            conv.append(gpa)
        desc, avail, used = conv
    c.device.set_vq_address(i, desc, avail, used)
    ring = c.vrings.get(i)
    ring.log = addr.log
    ring.log_guest_addr = addr.log_guest_addr
    if addr.log:
        c.journal.record("vq.log", vq=i, log_guest_addr=addr.log_guest_addr)


def set_vring_base(c: Connection, msg: Message) -> None:
    st = m.VringState.unpack(msg.payload)
    i = c.vring_index(st.index)
    try:
        state = c.device.vqs[i].state_from_base(st.num)
    except ValueError as e:
        raise ProtocolError("bad-base", f"vring {i}: {e}") from None
    c.device.set_vq_state(i, state)


def get_vring_base(c: Connection, msg: Message) -> bytes:
    st = m.VringState.unpack(msg.payload)
    i = c.vring_index(st.index)
    if not c.device.vqs[i].configured:
        raise ProtocolError("not-configured", f"GET_VRING_BASE of vring {i}, never set up")
    return m.VringState(i, c.vrings.stop(i).to_vhost_base()).pack()


def set_vring_file(c: Connection, msg: Message) -> None:
    request = R(msg.header.request)
    value = m.unpack_u64(msg.payload)
    vf = m.VringFile.from_u64(value)
    i = c.vring_index(vf.index)
    if value & ~(m.VRING_IDX_MASK | m.VRING_NOFD_MASK):
        raise ProtocolError("bad-payload", f"{request.name} payload {value:#x}")
    if vf.nofd and msg.fds:
        raise ProtocolError("fd-count", f"{request.name} has the no-fd bit and an fd")
    if not vf.nofd and not msg.fds:
        raise ProtocolError("fd-count", f"{request.name} for vring {i} without an fd")
    fd: int | None = None
    if not vf.nofd:
        check_eventfd(msg.fds[0], request.name)
        fd = msg.take_fd()
    if request is R.SET_VRING_KICK:
        c.vrings.set_kick(i, fd)
    elif request is R.SET_VRING_CALL:
        c.vrings.set_call(i, fd)
    else:
        c.vrings.set_err(i, fd)


def set_vring_enable(c: Connection, msg: Message) -> None:
    st = m.VringState.unpack(msg.payload)
    i = c.vring_index(st.index)
    if st.num > 1:
        raise ProtocolError("bad-payload", f"SET_VRING_ENABLE vring {i} with {st.num}")
    c.device.set_vq_ready(i, bool(st.num))


def set_vring_endian(c: Connection, msg: Message) -> None:
    raise ProtocolError("unsupported", "cross-endian rings are not supported (no CROSS_ENDIAN)")


#: The requests this module serves.
HANDLERS: dict[R, Handler] = {
    R.SET_VRING_NUM: set_vring_num,
    R.SET_VRING_ADDR: set_vring_addr,
    R.SET_VRING_BASE: set_vring_base,
    R.GET_VRING_BASE: get_vring_base,
    R.SET_VRING_KICK: set_vring_file,
    R.SET_VRING_CALL: set_vring_file,
    R.SET_VRING_ERR: set_vring_file,
    R.SET_VRING_ENABLE: set_vring_enable,
    R.SET_VRING_ENDIAN: set_vring_endian,
}
