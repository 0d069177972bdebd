"""The Python vDPA backend: device model, virtio-net personality, vhost-user transport."""
