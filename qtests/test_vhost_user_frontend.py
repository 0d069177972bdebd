"""The qtest driver's vhost-user front-end (qtests/qos/vhost_user_frontend.py): requests the
backend sends on its channel in one burst are all delivered, also to a caller that polls."""

from __future__ import annotations

import socket
from pathlib import Path

from backends.vhost_user import messages as m
from backends.vhost_user.framing import MessageReader
from qtests.qos.vhost_user_frontend import Frontend


def test_poll_backend_delivers_requests_that_arrived_together(tmp_path: Path) -> None:
    """Two IOTLB MISSes read by one recv: the second waits in the front-end's queue, where a
    select() on the socket cannot see it (bench's MISS warm-up hung on that under load)."""
    path = str(tmp_path / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server, theirs, Frontend(path, timeout=5) as fe:
        ours.setblocking(False)
        fe.backend_sock = ours
        fe._backend_reader = MessageReader(ours)
        assert fe.poll_backend(0) is None
        misses = [m.IotlbMsg(iova, 0, 0, 1, m.IotlbType.MISS) for iova in (0x1000, 0x2000)]
        theirs.sendall(b"".join(m.encode(m.BackendRequest.IOTLB_MSG, x.pack()) for x in misses))
        got = [fe.poll_backend(5.0), fe.poll_backend(0)]
        assert [m.IotlbMsg.unpack(x.payload).iova for x in got if x is not None] == [
            0x1000,
            0x2000,
        ]
        assert fe.poll_backend(0) is None
