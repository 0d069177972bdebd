"""Local port allocation for UDP wires."""

from __future__ import annotations

import socket


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago (the kernel's pick for port 0).

    Someone else may take it before the process we hand it to binds it; tests accept that small
    race because the alternative (passing bound fds) is not part of the backend's CLI.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
