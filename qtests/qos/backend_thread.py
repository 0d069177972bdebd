"""The backend wired in-process by :mod:`backends.process`, its event loop in a thread: for
unit tests and benchmarks that need a real vhost-user socket and a look inside the device.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.vhost_user.framing import close_fds

from .vhost_user_frontend import TIMEOUT, Frontend
from .waiting import poll_until

if TYPE_CHECKING:
    from backends.vdpa.journal import Journal

__all__ = ["BackendThread"]


class BackendThread:
    """The backend wired by :mod:`backends.process`, its event loop in a daemon thread.

    The device model is single-threaded: inspect it only through :meth:`call`, which runs a
    function on the loop thread and returns its result.
    """

    def __init__(self, socket_path: str, **options: Any) -> None:
        from backends.process import Backend, BackendOptions

        self.backend = Backend(BackendOptions(socket=socket_path, **options))
        self.socket_path = socket_path
        self._calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]] = (
            queue.Queue()
        )
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.backend.loop.add_reader(self._wake_r, self._run_calls)
        self._thread = threading.Thread(target=self.backend.loop.run_forever, daemon=True)
        self._thread.start()

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                fn, reply = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put((True, fn()))
            except BaseException as e:
                reply.put((False, e))

    def call(self, fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._calls.put((fn, reply))
        os.write(self._wake_w, b"x")
        try:
            ok, value = reply.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"timed out after {timeout}s waiting for the backend loop") from None
        if not ok:
            raise value
        return value

    @property
    def journal(self) -> Journal:
        return self.backend.journal

    def query(
        self, kinds: list[str] | None = None, since: int | None = None
    ) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.call(lambda: self.backend.journal.query(kinds, since))
        return entries

    def mark(self) -> int:
        return int(self.call(self.backend.journal.mark))

    def wait_journal(
        self, kind: str, since: int, timeout: float = TIMEOUT, count: int = 1
    ) -> list[dict[str, Any]]:
        return poll_until(
            lambda: (e := self.query([kind], since)) and len(e) >= count and e,
            timeout,
            f"{count} journal entr{'y' if count == 1 else 'ies'} of kind {kind!r}",
        )

    def frontend(self, timeout: float = TIMEOUT) -> Frontend:
        return Frontend(self.socket_path, timeout=timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                self.call(self.backend.loop.stop)
            self._thread.join(TIMEOUT)
        self.backend.loop.remove_reader(self._wake_r)
        self.backend.close()
        close_fds([self._wake_r, self._wake_w])
