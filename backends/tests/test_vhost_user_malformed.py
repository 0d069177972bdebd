"""Bad input on the vhost-user socket never crashes the backend.

One real backend process (``python -m backends``) serves every case over a real unix socket.
Each case must leave an ``error.protocol`` journal entry (read through the monitor) and get an
error reply or a closed connection; afterwards a new connection still works. The last test
checks the backend process holds exactly the descriptors it held before the suite.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends.vhost_user import messages as m
from backends.vhost_user.messages import Request as R
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM
from qtests.qos.backend_process import BackendProcess
from qtests.qos.guest_memory import UADDR_BASE, SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend, eventfd
from qtests.qos.waiting import poll_until

# One backend serves the whole module (module fixture, a count checked at its teardown, a last
# test comparing descriptors): under pytest-xdist (make check) one worker runs all of it.
pytestmark = pytest.mark.xdist_group("vhost_user_malformed")

NEED = m.VERSION | m.FLAG_NEED_REPLY


@dataclass
class Ctx:
    bp: BackendProcess
    baseline_fds: int
    mem: SharedGuestMemory


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    workdir: Path = tmp_path_factory.mktemp("malformed")
    bp = BackendProcess.launch(workdir)
    mem = SharedGuestMemory(1 << 20)
    try:
        # warm up: one well-behaved session, so lazily opened things are open
        mark = bp.mark()
        fe = Frontend(bp.socket)
        fe.init_like_qemu(2)
        fe.close_init_fds()
        fe.close()
        poll_until(lambda: bp.journal(["vhost.disconnect"], mark), 5, "the warm-up disconnect")
        yield Ctx(bp, bp.fd_count(), mem)
        assert bp.running, "the backend died during the malformed suite"
    finally:
        mem.close()
        rc = bp.stop(sig=signal.SIGTERM)
        assert rc == 0, f"backend exit status {rc}\n{bp.tails()}"
    entries = bp.read_journal_file()
    assert sum(e["kind"] == "error.protocol" for e in entries) >= 20


def owned(fe: Frontend) -> None:
    """GET_FEATURES .. SET_OWNER, like QEMU's init (no eventfds)."""
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    fe.set_owner()


def status(fe: Frontend, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
    """Send with NEED_REPLY and return the u64 status."""
    fe.send(request, payload, fds or [], need_reply=True)
    reply = fe.recv_reply(request)
    assert len(reply) == 8, f"status reply of {len(reply)} bytes"
    return m.unpack_u64(reply)


def refused(fe: Frontend, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
    assert status(fe, request, payload, fds) != 0


def closed(fe: Frontend) -> None:
    assert fe.is_closed(), "the backend kept a connection whose stream is out of sync"


def memfd(size: int) -> int:
    fd = os.memfd_create("bad", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# -- the cases ------------------------------------------------------------------------------------
def truncated_header(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(b"\x01\x00\x00\x00\x01\x00")  # 6 of 12 header bytes, then hang up


def size_larger_than_payload(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(m.HEADER.pack(R.SET_FEATURES, m.VERSION, 8) + b"\x00\x00\x00\x00")


def truncated_with_fds(fe: Frontend, ctx: Ctx) -> None:
    fd = memfd(4096)
    try:  # a SET_MEM_TABLE cut short, its fd in flight: the backend must close it
        fe.send_raw(m.HEADER.pack(R.SET_MEM_TABLE, m.VERSION, 40) + b"\x01" + bytes(10), [fd])
    finally:
        os.close(fd)


def oversized(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(m.HEADER.pack(R.SET_FEATURES, m.VERSION, 1 << 20))
    closed(fe)


def wrong_version(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(m.HEADER.pack(R.GET_FEATURES, 0x2, 0))
    closed(fe)


def version_zero(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(m.HEADER.pack(R.GET_FEATURES, 0x0 | m.FLAG_NEED_REPLY, 0))
    closed(fe)


def garbage(fe: Frontend, ctx: Ctx) -> None:
    fe.send_raw(b"\xde\xad\xbe\xef" * 25)
    closed(fe)


def unknown_request_need_reply(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, 99)


def unknown_request_ignored(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fe.send(77, b"12345678")
    assert fe.get_features()  # ignored; the stream goes on


def reply_flag_on_request(fe: Frontend, ctx: Ctx) -> None:
    fe.send(R.SET_OWNER, flags=m.REPLY_FLAGS)
    assert fe.get_features()


def bad_payload_size(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, R.SET_FEATURES, b"\x00" * 4)


def data_request_fails_with_empty_reply(fe: Frontend, ctx: Ctx) -> None:
    fe.send(R.GET_FEATURES, b"\x00" * 8)  # GET_FEATURES takes no payload
    assert fe.recv_reply(R.GET_FEATURES) == b""


def before_set_owner(fe: Frontend, ctx: Ctx) -> None:
    fe.get_features()
    refused(fe, R.SET_VRING_NUM, m.VringState(0, 256).pack())


def mem_table_too_many_regions(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    payload = m.MEMORY_HEADER.pack(9, 0) + bytes(9 * m.MEM_REGION.size)
    refused(fe, R.SET_MEM_TABLE, payload, [ctx.mem.slots[0].fd])


def mem_table_fd_count_mismatch(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    regions = [
        m.MemRegion(0, 4096, UADDR_BASE, 0),
        m.MemRegion(0x10000, 4096, UADDR_BASE + 0x10000, 0),
    ]
    refused(fe, R.SET_MEM_TABLE, m.pack_mem_table(regions), [ctx.mem.slots[0].fd])


def mem_table_too_many_fds(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fds = [memfd(4096) for _ in range(m.MAX_FDS + 2)]
    try:
        regions = [m.MemRegion(k << 20, 4096, UADDR_BASE + (k << 20), 0) for k in range(8)]
        refused(fe, R.SET_MEM_TABLE, m.pack_mem_table(regions), fds)
    finally:
        for fd in fds:
            os.close(fd)


def zero_size_region(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    regions = [m.MemRegion(0, 0, UADDR_BASE, 0)]
    refused(fe, R.SET_MEM_TABLE, m.pack_mem_table(regions), [ctx.mem.slots[0].fd])


def mmap_offset_beyond_fd(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    slot = ctx.mem.slots[0]
    regions = [m.MemRegion(0, slot.size, UADDR_BASE, 0x1000)]
    refused(fe, R.SET_MEM_TABLE, m.pack_mem_table(regions), [slot.fd])


def region_fd_not_memory(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    efd = eventfd()
    try:
        refused(fe, R.ADD_MEM_REG, m.pack_mem_reg(m.MemRegion(0, 4096, UADDR_BASE, 0)), [efd])
    finally:
        os.close(efd)


def overlapping_regions(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    a, b = memfd(1 << 20), memfd(1 << 20)
    try:
        regions = [
            m.MemRegion(0, 1 << 20, UADDR_BASE, 0),
            m.MemRegion(0x80000, 1 << 20, 0x9000_0000, 0),
        ]
        refused(fe, R.SET_MEM_TABLE, m.pack_mem_table(regions), [a, b])
        # and ADD_MEM_REG over an existing region (uaddr overlap)
        assert fe.set_mem_table(ctx.mem) == 0
        reg = m.MemRegion(0x4000_0000, 4096, UADDR_BASE + 0x1000, 0)
        refused(fe, R.ADD_MEM_REG, m.pack_mem_reg(reg), [a])
    finally:
        os.close(a)
        os.close(b)


def add_mem_reg_without_fd(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, R.ADD_MEM_REG, m.pack_mem_reg(m.MemRegion(0, 4096, UADDR_BASE, 0)))


def rem_mem_reg_unknown(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    assert fe.set_mem_table(ctx.mem) == 0
    refused(fe, R.REM_MEM_REG, m.pack_mem_reg(m.MemRegion(0x5000_0000, 4096, 0x1234_0000, 0)))


def vring_num_bad(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    for num in (0, 3, 1000, 2048, 1 << 20):
        refused(fe, R.SET_VRING_NUM, m.VringState(0, num).pack())


def vring_index_out_of_range(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, R.SET_VRING_NUM, m.VringState(2, 256).pack())
    refused(fe, R.SET_VRING_ENABLE, m.VringState(255, 1).pack())
    fe.send(R.GET_VRING_BASE, m.VringState(200, 0).pack())
    assert fe.recv_reply(R.GET_VRING_BASE) == b""


def vring_addr_unmapped(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    assert fe.set_mem_table(ctx.mem) == 0
    addr = m.VringAddr(0, 0, UADDR_BASE, 0xDEAD_0000, UADDR_BASE + 0x1000, 0)
    refused(fe, R.SET_VRING_ADDR, addr.pack())


def vring_kick_not_eventfd(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    r, w = os.pipe()
    try:
        refused(fe, R.SET_VRING_KICK, m.VringFile(0, False).pack(), [r])
        refused(fe, R.SET_VRING_CALL, m.VringFile(0, False).pack(), [ctx.mem.slots[0].fd])
    finally:
        os.close(r)
        os.close(w)
    refused(fe, R.SET_VRING_KICK, m.VringFile(0, False).pack())  # no fd, no no-fd bit
    efd = eventfd()
    try:
        refused(fe, R.SET_VRING_KICK, m.VringFile(0, True).pack(), [efd])  # both
    finally:
        os.close(efd)


def unexpected_fd_is_closed(fe: Frontend, ctx: Ctx) -> None:
    efd = eventfd()
    try:
        fe.send(R.GET_FEATURES, fds=[efd])
    finally:
        os.close(efd)
    assert len(fe.recv_reply(R.GET_FEATURES)) == 8  # served anyway, the fd closed


def iotlb_bad_messages(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    features = fe.get_features() & ~(1 << m.VHOST_F_LOG_ALL)
    assert features >> VIRTIO_F_ACCESS_PLATFORM & 1
    fe.set_features(features)
    assert fe.set_mem_table(ctx.mem) == 0
    for msg in (
        m.IotlbMsg(0, 4096, UADDR_BASE, 3, 9),  # unknown type
        m.IotlbMsg(0, 4096, UADDR_BASE, 3, m.IotlbType.MISS),  # a backend-only type
        m.IotlbMsg(0, 0, UADDR_BASE, 3, m.IotlbType.UPDATE),  # zero size
        m.IotlbMsg(0xFFFF_FFFF_FFFF_F000, 0x2000, UADDR_BASE, 3, m.IotlbType.UPDATE),  # wraps
        m.IotlbMsg(0xFFFF_FFFF_FFFF_F000, 0x2000, 0, 0, m.IotlbType.INVALIDATE),  # wraps
    ):
        assert fe.iotlb(msg, check=False) != 0


def iotlb_without_iommu(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    assert fe.iotlb(m.IotlbMsg(0, 4096, UADDR_BASE, 3, m.IotlbType.UPDATE), check=False) != 0


def set_log_base_without_fd(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fe.send(R.SET_LOG_BASE, m.LogDesc(4096, 0).pack())
    assert m.unpack_u64(fe.recv_reply(R.SET_LOG_BASE)) != 0


def get_vring_base_never_started(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fe.send(R.GET_VRING_BASE, m.VringState(1, 0).pack())
    assert fe.recv_reply(R.GET_VRING_BASE) == b""


def unoffered_features(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, R.SET_FEATURES, m.pack_u64(1 << 63))
    refused(fe, R.SET_PROTOCOL_FEATURES, m.pack_u64(1 << 40))


def bad_enable_and_status(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    refused(fe, R.SET_VRING_ENABLE, m.VringState(0, 2).pack())
    refused(fe, R.SET_STATUS, m.pack_u64(0x1FF))


def backend_req_fd_not_socket(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    efd = eventfd()
    try:
        refused(fe, R.SET_BACKEND_REQ_FD, b"", [efd])
    finally:
        os.close(efd)


def config_out_of_range(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fe.send(R.GET_CONFIG, m.ConfigMsg(250, 16, 0, bytes(16)).pack())
    assert fe.recv_reply(R.GET_CONFIG) == b""


def disconnect_mid_message(fe: Frontend, ctx: Ctx) -> None:
    owned(fe)
    fe.send_raw(m.HEADER.pack(R.SET_VRING_ADDR, m.VERSION, m.VRING_ADDR.size) + bytes(16))
    fe.sock.shutdown(socket.SHUT_RDWR)


CASES: list[Callable[[Frontend, Ctx], None]] = [
    truncated_header,
    size_larger_than_payload,
    truncated_with_fds,
    oversized,
    wrong_version,
    version_zero,
    garbage,
    unknown_request_need_reply,
    unknown_request_ignored,
    reply_flag_on_request,
    bad_payload_size,
    data_request_fails_with_empty_reply,
    before_set_owner,
    mem_table_too_many_regions,
    mem_table_fd_count_mismatch,
    mem_table_too_many_fds,
    zero_size_region,
    mmap_offset_beyond_fd,
    region_fd_not_memory,
    overlapping_regions,
    add_mem_reg_without_fd,
    rem_mem_reg_unknown,
    vring_num_bad,
    vring_index_out_of_range,
    vring_addr_unmapped,
    vring_kick_not_eventfd,
    unexpected_fd_is_closed,
    iotlb_bad_messages,
    iotlb_without_iommu,
    set_log_base_without_fd,
    get_vring_base_never_started,
    unoffered_features,
    bad_enable_and_status,
    backend_req_fd_not_socket,
    config_out_of_range,
    disconnect_mid_message,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(ctx: Ctx, case: Callable[[Frontend, Ctx], None]) -> None:
    mark = ctx.bp.mark()
    fe = Frontend(ctx.bp.socket)
    try:
        case(fe, ctx)
    finally:
        fe.close()
    errors = poll_until(
        lambda: ctx.bp.journal(["error.protocol"], mark),
        5,
        f"an error.protocol journal entry for {case.__name__}",
    )
    assert all(e.get("detail") for e in errors)
    # the connection is gone (closed by us or by the backend): the backend still serves
    with Frontend(ctx.bp.socket) as again:
        assert again.get_features() >> m.VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert ctx.bp.running


def test_no_descriptor_leak(ctx: Ctx) -> None:
    """After every case the backend holds exactly its idle set of descriptors."""
    try:
        poll_until(
            lambda: ctx.bp.fd_count() == ctx.baseline_fds,
            5,
            f"the backend's open fds to return to {ctx.baseline_fds}",
        )
    except TimeoutError as e:
        fds = {
            fd: os.readlink(f"/proc/{ctx.bp.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{ctx.bp.pid}/fd")
        }
        raise AssertionError(f"{e}; open now: {fds}") from None
    with Frontend(ctx.bp.socket) as fe:
        assert fe.get_features()
