"""Virtio wire formats: the one place for them, used by the device model (``backends/``) and
the qtest driver (``qtests/qos/``) alike.

* :mod:`.features` - transport feature bits, device status bits, device IDs
* :mod:`.ring` - split and packed ring layouts: descriptors, flags, ring areas and sizes,
  event suppression, ``vring_need_event``
* :mod:`.net` - virtio-net feature bits, config space layout, control commands
* :mod:`.net_header` - ``virtio_net_hdr_v1``
"""
