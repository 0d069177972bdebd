"""An ordered, bounded, queryable record of control-plane events.

Every entry is a plain dict ``{'seq', 'ts_ns', 'mono_ns', 'kind', **fields}`` whose values are JSON-safe
(enums become ints, bytes become hex strings, tuples become lists). Kinds are dotted strings
(``dma.map``, ``vq.start``, ``error.vq`` ...); :meth:`Journal.query` matches a kind exactly or
by a prefix ending in ``.`` (``'dma.'``) or ``.*`` (``'dma.*'``).

``ts_ns`` is wall-clock time (CLOCK_REALTIME, for humans and logs); ``mono_ns`` is
CLOCK_MONOTONIC, which never steps and is shared by every process on the host, so entries of
two backends (migration source and destination) can be ordered by it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000
_RESERVED = frozenset({"seq", "ts_ns", "mono_ns"})


def json_safe(value: Any) -> Any:
    """Turn ``value`` into something ``json.dumps`` accepts without a custom encoder."""
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, enum.Enum):
        return int(value) if isinstance(value, int) else str(value.name)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return str(value)


def _matcher(kinds: Iterable[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    prefixes: list[str] = []
    for k in kinds:
        if k.endswith(".*"):
            prefixes.append(k[:-1])
        elif k.endswith("."):
            prefixes.append(k)
        else:
            exact.add(k)
    pre = tuple(prefixes)
    return lambda kind: kind in exact or (bool(pre) and kind.startswith(pre))


class Journal:
    """Bounded journal; the oldest entries fall off once ``capacity`` is reached."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = 0
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self.capacity = capacity

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        entry: dict[str, Any] = {
            "seq": self._seq,
            "ts_ns": time.time_ns(),
            "mono_ns": time.monotonic_ns(),
            "kind": kind,
        }
        for k, v in fields.items():
            entry[k + "_" if k in _RESERVED else k] = json_safe(v)
        self._entries.append(entry)
        for cb in tuple(self._subscribers):
            try:
                cb(entry)
            except Exception:  # a subscriber must never break the recorder
                log.exception("journal subscriber %r failed", cb)
        return entry

    def query(
        self, kinds: list[str] | None = None, since: int | None = None
    ) -> list[dict[str, Any]]:
        """Entries (oldest first) whose kind matches ``kinds`` and whose seq is > ``since``."""
        match = _matcher(kinds) if kinds else None
        out: list[dict[str, Any]] = []
        entries: Iterable[dict[str, Any]] = self._entries
        if since is not None and self._entries:
            first = self._entries[0]["seq"]
            skip = since - first + 1
            if skip > 0:
                entries = list(self._entries)[skip:]
        for e in entries:
            if match is None or match(e["kind"]):
                out.append(e)
        return out

    def subscribe(self, cb: Callable[[dict[str, Any]], None]) -> None:
        self._subscribers.append(cb)

    def unsubscribe(self, cb: Callable[[dict[str, Any]], None]) -> None:
        if cb in self._subscribers:
            self._subscribers.remove(cb)

    def mark(self) -> int:
        """The seq of the newest entry (0 when empty): pass it as ``since`` later."""
        return self._seq

    def count(self, kind: str) -> int:
        return len(self.query([kind]))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dropped(self) -> int:
        """How many entries fell off the front because of the bound."""
        return self._seq - len(self._entries)
