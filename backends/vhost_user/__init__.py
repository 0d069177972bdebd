"""The vhost-user transport: QEMU's vhost-user protocol onto the vDPA bus ops.

* ``messages.py``       - every struct layout, request number and feature bit (the one place)
* ``framing.py``        - whole messages on a stream socket, SCM_RIGHTS descriptors
* ``connection.py``     - one front-end: validation, dispatch, replies (REPLY_ACK)
* ``memory_table.py``   - SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG onto host regions + IOTLB
* ``vrings.py``         - kick / call / err eventfds, ring start and stop
* ``backend_channel.py``- SET_BACKEND_REQ_FD: IOTLB MISS without blocking
* ``log_area.py``       - the SET_LOG_BASE dirty-log mapping
* ``rarp.py``           - the RARP frame of SEND_RARP
* ``server.py``         - the listening socket, one front-end at a time, reconnects
"""

from backends.vhost_user.connection import Connection
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.offer import Offer
from backends.vhost_user.server import VhostUserServer

__all__ = ["Connection", "Offer", "ProtocolError", "VhostUserServer"]
