"""Claiming a unix socket path: a socket left behind by a dead process is removed, a live one
(or anything that is not a socket) is never taken over."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


def remove_stale_socket(path: str, kind: int = socket.SOCK_STREAM, what: str = "socket") -> None:
    """Unlink ``path`` if it is a socket nobody listens on (or is bound to, for datagrams).

    Raises FileExistsError when ``path`` is not a socket, or when another process is there;
    ``what`` names the owner in the message ("monitor", "vhost-user socket", ...).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{what}: exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):  # nobody there: left over
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        pass  # e.g. a full backlog: somebody listens
    finally:
        probe.close()
    raise FileExistsError(
        errno.EADDRINUSE, f"{what}: in use, another process is listening there", path
    )
