"""A minimal pcap (libpcap classic format) writer, so a test's frames open in Wireshark."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

GLOBAL_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, link
RECORD_HEADER = struct.Struct("<IIII")  # ts_sec, ts_usec, incl_len, orig_len
MAGIC_US = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


class PcapWriter:
    """Thread-safe; every record is flushed so the file is useful even after a crash."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("wb")
        self._lock = threading.Lock()
        self._f.write(GLOBAL_HEADER.pack(MAGIC_US, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))

    def write(self, frame: bytes | memoryview) -> None:
        now = time.time()
        sec = int(now)
        incl = min(len(frame), SNAPLEN)
        with self._lock:
            if self._f.closed:
                return
            self._f.write(RECORD_HEADER.pack(sec, int((now - sec) * 1e6), incl, len(frame)))
            self._f.write(bytes(frame[:incl]))
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()
