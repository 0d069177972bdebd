"""Guest memory requests: the memory table (SET_MEM_TABLE, ADD/REM_MEM_REG) and the
dirty log (SET_LOG_BASE, SET_LOG_FD).

Each handler takes the :class:`~backends.vhost_user.connection.Connection` it serves."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from backends.vdpa.dirty_log import DirtyLog
from backends.vhost_user import messages as m
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message
from backends.vhost_user.log_area import LogArea
from backends.vhost_user.messages import Request as R

if TYPE_CHECKING:
    from backends.vhost_user.connection import Connection

Handler = Callable[["Connection", Message], bytes | None]


# -- memory --------------------------------------------------------------------------------
def set_mem_table(c: Connection, msg: Message) -> None:
    payload = msg.payload
    if len(payload) < m.MEMORY_HEADER.size:
        raise ProtocolError("bad-size", f"SET_MEM_TABLE payload is {len(payload)} bytes")
    n = m.unpack_mem_table_count(payload)
    if n > m.MEM_TABLE_MAX_REGIONS:
        raise ProtocolError("bad-mem-table", f"{n} regions (at most {m.MEM_TABLE_MAX_REGIONS})")
    if len(payload) < m.mem_table_size(n) or len(payload) > m.mem_table_size(
        m.MEM_TABLE_MAX_REGIONS
    ):
        raise ProtocolError(
            "bad-size", f"SET_MEM_TABLE with {n} regions has a {len(payload)}-byte payload"
        )
    table = [
        m.MemRegion.unpack(payload, m.MEMORY_HEADER.size + k * m.MEM_REGION.size) for k in range(n)
    ]
    fds, msg.fds = msg.fds, []
    c.mem.set_table(table, fds, "SET_MEM_TABLE")


def add_mem_reg(c: Connection, msg: Message) -> None:
    c.mem.add(m.unpack_mem_reg(msg.payload), msg.take_fd(), "ADD_MEM_REG")


def rem_mem_reg(c: Connection, msg: Message) -> None:
    msg.close_fds()  # the spec tolerates a stray fd here: closed unused
    c.mem.remove(m.unpack_mem_reg(msg.payload), "REM_MEM_REG")


# -- dirty log -----------------------------------------------------------------------------
def set_log_base(c: Connection, msg: Message) -> None:
    desc = m.LogDesc.unpack(msg.payload)
    if not msg.fds:
        raise ProtocolError("fd-count", "SET_LOG_BASE without a log fd (LOG_SHMFD)")
    fd = msg.take_fd()
    try:
        area = LogArea(fd, desc.mmap_size, desc.mmap_offset)
    except Exception as e:
        # QEMU frees its old log whatever we answer (it checks only the reply's request
        # code): marking the old one would lose dirty pages silently. Stop logging and
        # drop the connection, the only failure QEMU acts on.
        c.stop_log()
        raise ProtocolError("log-base", f"cannot map the dirty log: {e}", fatal=True) from e
    finally:
        os.close(fd)
    old, c.log_area = c.log_area, area
    c.device.set_dirty_log(DirtyLog(area.view))
    if old is not None:
        old.close()
    c.journal.record("log.base", size=desc.mmap_size, offset=desc.mmap_offset)


def set_log_fd(c: Connection, msg: Message) -> None:
    if c.log_fd >= 0:
        os.close(c.log_fd)
        c.log_fd = -1
    if msg.fds:
        c.log_fd = msg.take_fd()


#: The requests this module serves.
HANDLERS: dict[R, Handler] = {
    R.SET_MEM_TABLE: set_mem_table,
    R.SET_LOG_BASE: set_log_base,
    R.SET_LOG_FD: set_log_fd,
    R.ADD_MEM_REG: add_mem_reg,
    R.REM_MEM_REG: rem_mem_reg,
}
