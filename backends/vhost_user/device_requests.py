"""Device requests: GET/SET_CONFIG, GET/SET_STATUS, and the virtio-net ones (SEND_RARP,
NET_SET_MTU).

Each handler takes the :class:`~backends.vhost_user.connection.Connection` it serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.vhost_user import messages as m
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message
from backends.vhost_user.messages import Request as R

if TYPE_CHECKING:
    from backends.vhost_user.connection import Connection

Handler = Callable[["Connection", Message], bytes | None]


# -- net -----------------------------------------------------------------------------------
def send_rarp(c: Connection, msg: Message) -> None:
    mac = msg.payload[:6]
    c.journal.record("net.rarp", mac=":".join(f"{b:02x}" for b in mac))
    if c.on_rarp is not None:
        c.on_rarp(bytes(mac))


def net_set_mtu(c: Connection, msg: Message) -> None:
    mtu = m.unpack_u64(msg.payload)
    if not 68 <= mtu <= 0xFFFF:
        raise ProtocolError("bad-mtu", f"MTU {mtu} outside 68..65535")
    c.mtu = mtu
    c.journal.record("net.mtu", mtu=mtu)
    if c.on_mtu is not None:
        c.on_mtu(mtu)


# -- config / status -----------------------------------------------------------------------
def config_msg(c: Connection, msg: Message) -> m.ConfigMsg:
    if len(msg.payload) < m.CONFIG_HEADER.size:
        raise ProtocolError("bad-size", f"config message of {len(msg.payload)} bytes")
    cfg = m.ConfigMsg.unpack(msg.payload)
    if cfg.size > m.CONFIG_MAX_SIZE or cfg.offset + cfg.size > m.CONFIG_MAX_SIZE:
        raise ProtocolError(
            "bad-config", f"config access {cfg.offset}+{cfg.size} beyond {m.CONFIG_MAX_SIZE}"
        )
    if len(msg.payload) != m.CONFIG_HEADER.size + cfg.size:
        raise ProtocolError(
            "bad-size", f"config message of {len(msg.payload)} bytes for {cfg.size} bytes"
        )
    return cfg


def get_config(c: Connection, msg: Message) -> bytes:
    cfg = config_msg(c, msg)
    data = c.device.get_config(cfg.offset, cfg.size)
    return m.ConfigMsg(cfg.offset, cfg.size, cfg.flags, data).pack()


def set_config(c: Connection, msg: Message) -> None:
    cfg = config_msg(c, msg)
    c.device.set_config(cfg.offset, cfg.data)


def get_status(c: Connection, msg: Message) -> bytes:
    return m.pack_u64(c.device.get_status())


def set_status(c: Connection, msg: Message) -> None:
    status = m.unpack_u64(msg.payload)
    if status > 0xFF:
        raise ProtocolError("bad-status", f"status {status:#x} does not fit a byte")
    c.device.set_status(status)


#: The requests this module serves.
HANDLERS: dict[R, Handler] = {
    R.SEND_RARP: send_rarp,
    R.NET_SET_MTU: net_set_mtu,
    R.GET_CONFIG: get_config,
    R.SET_CONFIG: set_config,
    R.SET_STATUS: set_status,
    R.GET_STATUS: get_status,
}
