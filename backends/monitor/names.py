"""Readable names of the bits the monitor shows: feature bits (virtio, virtio-net, vhost),
device status bits, vhost-user protocol feature bits."""

from __future__ import annotations

from functools import cache
from typing import Any

from backends.vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
)
from backends.virtio.features import Status, feature_names
from backends.virtio.net import NET_FEATURE_NAMES


# -- names of bits ------------------------------------------------------------------------------
@cache
def _device_feature_extra() -> dict[int, str]:
    """Names of the non-transport feature bits: virtio-net's, and vhost's LOG_ALL / PROTOCOL."""
    names = dict(NET_FEATURE_NAMES)
    names[VHOST_F_LOG_ALL] = "LOG_ALL"
    names[VHOST_USER_F_PROTOCOL_FEATURES] = "PROTOCOL_FEATURES"
    return names


def describe_features(bits: int) -> dict[str, Any]:
    return {"bits": bits, "names": feature_names(bits, _device_feature_extra())}


def status_names(status: int) -> list[str]:
    names = [s.name for s in Status if status & s.value and s.name]
    rest = status & ~sum(s.value for s in Status)
    names += [f"bit {n}" for n in range(8) if rest >> n & 1]
    return names


def protocol_feature_names(bits: int) -> list[str]:
    known = {int(f): f.name for f in ProtocolFeature}
    return [known.get(n, f"bit {n}") for n in range(64) if bits >> n & 1]
