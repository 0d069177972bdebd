"""Errors of the vhost-user transport."""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the backend refuses: bad payload, bad fds, bad state.

    ``kind`` is a short machine-readable tag (journalled); the message says what was wrong.
    ``fatal`` means the connection cannot continue (the stream is out of sync).
    """

    def __init__(self, kind: str, detail: str, *, fatal: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.fatal = fatal


class PeerClosed(Exception):
    """The peer closed the socket at a message boundary (a clean disconnect)."""
