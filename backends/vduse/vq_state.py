"""The one place that converts between VDUSE's virtqueue state forms and the device model's.

VDUSE carries a queue's state as ``struct vduse_vq_state`` (GET_VQ_STATE replies) and inside
``struct vduse_vq_info`` (VQ_GET_INFO: what the front-end set with SET_VRING_BASE): a split
``avail_index``, or the packed ``last_avail_counter, last_avail_idx, last_used_counter,
last_used_idx``. The device model speaks :class:`~backends.vdpa.virtqueue.VqState`, which has
both views (``VqState.split`` / ``VqState.packed_state`` and the same-named properties); this
module maps them to and from the VDUSE structs.
"""

from __future__ import annotations

from backends.vdpa.virtqueue import VqState

from . import uapi
from .uapi import VqInfo

__all__ = ["state_from_info", "state_to_wire"]


def state_from_info(info: VqInfo, packed: bool) -> VqState:
    """The state the front-end set (SET_VRING_BASE), as the model's VqState. Split: only the
    avail index (the model then takes used = avail: nothing in flight, as vdpa_sim does)."""
    if packed:
        avail_wrap, last_avail, used_wrap, last_used = info.packed
        return VqState.packed_state(
            last_avail_counter=avail_wrap & 1,
            last_avail_idx=last_avail & 0x7FFF,
            last_used_counter=used_wrap & 1,
            last_used_idx=last_used & 0x7FFF,
        )
    return VqState.split(info.split_avail & 0xFFFF)


def state_to_wire(index: int, state: VqState, packed: bool) -> bytes:
    """A GET_VQ_STATE reply's ``struct vduse_vq_state`` for the model's state."""
    return uapi.pack_vq_state(
        index,
        packed=packed,
        last_avail_idx=state.last_avail_idx,
        used_idx=state.used_idx,
        avail_wrap=state.avail_wrap,
        used_wrap=state.used_wrap,
    )
