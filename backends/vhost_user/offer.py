"""What the backend offers a front-end: virtio / vhost feature bits and protocol features."""

from __future__ import annotations

from dataclasses import dataclass

from backends.vhost_user import messages as m
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM, Status, bit

U64_LIMIT = 1 << 64  # a 64-bit range must end below it
LOG_ALL = bit(m.VHOST_F_LOG_ALL)
PROTOCOL_FEATURES = bit(m.VHOST_USER_F_PROTOCOL_FEATURES)
ACCESS_PLATFORM = bit(VIRTIO_F_ACCESS_PLATFORM)
DRIVER_READY = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


@dataclass(frozen=True)
class Offer:
    """What the backend offers a front-end."""

    mem_slots: bool = True
    iommu: bool = True
    log: bool = True
    max_queues: int = 1

    def protocol_features(self) -> int:
        f = m.protocol_mask(
            PF.MQ,
            PF.RARP,
            PF.REPLY_ACK,
            PF.MTU,
            PF.BACKEND_REQ,
            PF.STATUS,
            PF.RESET_DEVICE,
            PF.CONFIG,
        )
        if self.log:
            f |= bit(PF.LOG_SHMFD)
        if self.mem_slots:
            f |= bit(PF.CONFIGURE_MEM_SLOTS)
        return f
