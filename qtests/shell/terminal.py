"""Attach the user's terminal to a socket (the guest console) until Ctrl-].

The terminal is put in raw mode (keys such as Ctrl-C go to the guest, not to the shell) and
restored on the way out, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import termios
import tty

ESCAPE = b"\x1d"  # Ctrl-]


def attach(sock: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1, prelude: bytes = b"") -> str:
    """Copy ``sock`` to ``stdout_fd`` and ``stdin_fd`` to ``sock`` until Ctrl-] is typed, stdin
    ends or the socket closes; returns which of those happened. ``prelude`` is written first."""
    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
    if prelude:
        os.write(stdout_fd, prelude)
    try:
        if saved is not None:
            tty.setraw(stdin_fd)
        with selectors.DefaultSelector() as sel:
            sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
            sel.register(sock, selectors.EVENT_READ, "sock")
            while True:
                for key, _ in sel.select():
                    if key.data == "stdin":
                        data = os.read(stdin_fd, 4096)
                        if not data:
                            return "end of input"
                        if ESCAPE in data:
                            head = data.split(ESCAPE, 1)[0]
                            if head:
                                sock.sendall(head)
                            return "Ctrl-]"
                        sock.sendall(data)
                    else:
                        try:
                            data = sock.recv(65536)
                        except OSError:
                            data = b""
                        if not data:
                            return "console closed"
                        os.write(stdout_fd, data)
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
