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


class UnixListener:
    """A non-blocking listening unix stream socket on a claimed path.

    ``close()`` unlinks the path only if it is still this socket (same device and inode): a
    newer process that took the path over keeps it.
    """

    def __init__(self, path: str, backlog: int, what: str = "socket") -> None:
        remove_stale_socket(path, what=what)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(backlog)
            sock.setblocking(False)
            st = os.stat(path)
        except OSError:
            sock.close()
            raise
        self.path = path
        self.sock = sock
        self._inode = (st.st_dev, st.st_ino)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
