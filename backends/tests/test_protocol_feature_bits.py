"""vhost-user protocol feature bit numbers are QEMU's (include/hw/virtio/vhost-user.h).

Bit 17 is XEN_MMAP; SHARED_OBJECT is 18 and DEVICE_STATE 19. A wrong number would make the
backend offer, or the monitor name, a feature QEMU reads as another one.
"""

from __future__ import annotations

from backends.monitor.names import protocol_feature_names
from backends.vhost_user.messages import ProtocolFeature as PF


def test_protocol_feature_numbers_match_qemu() -> None:
    assert (PF.CONFIGURE_MEM_SLOTS, PF.STATUS) == (15, 16)
    assert (PF.XEN_MMAP, PF.SHARED_OBJECT, PF.DEVICE_STATE) == (17, 18, 19)
    assert len({int(f) for f in PF}) == len(PF)  # no aliases


def test_monitor_names_bits_18_and_19() -> None:
    assert protocol_feature_names(1 << 18 | 1 << 19) == ["SHARED_OBJECT", "DEVICE_STATE"]
