"""virtio-net personality of the vDPA device model.

* ``config.py``   - the device's config values (:class:`NetConfig`); the wire layout, the
  VIRTIO_NET_F_* bits and the per-packet header are in :mod:`backends.virtio`
* ``wire.py``     - where frames leave/enter the device (loopback, udp, unix, null)
* ``datapath.py`` - :class:`NetDevice`: features, TX/RX queues, mergeable buffers, multiqueue
"""

# ruff: noqa: E402  (the compiled modules must be on __path__ before the imports below)
from __future__ import annotations

from backends.compiled import activate

activate(__path__, __name__)  # mypyc-built hot-path modules, when current (backends/compiled.py)

from typing import TYPE_CHECKING, Any

from backends.net.config import NetConfig
from backends.net.wire import LoopbackWire, NullWire, UdpWire, UnixWire, Wire, make_wire
from backends.virtio.net_header import VirtioNetHdr

if TYPE_CHECKING:
    from backends.net.datapath import NetDevice

__all__ = [
    "LoopbackWire",
    "NetConfig",
    "NetDevice",
    "NullWire",
    "UdpWire",
    "UnixWire",
    "VirtioNetHdr",
    "Wire",
    "make_wire",
]


def __getattr__(name: str) -> Any:
    # NetDevice pulls in the device model; import it only when asked for.
    if name == "NetDevice":
        from backends.net.datapath import NetDevice

        return NetDevice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
