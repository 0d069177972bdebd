"""The backend's QMP-compatible monitor, one module a concept:

* :mod:`.server` - :class:`Monitor`: the QMP protocol server on a unix socket
* :mod:`.json_stream` - the QMP wire codec (streaming JSON splitter, encoder)
* :mod:`.commands` - :class:`MonitorCommands`: what each command does
* :mod:`.schema` - commands, arguments and their checks (QAPI wording)
* :mod:`.events` - which journal entries become which QMP events
* :mod:`.names` - readable names of feature / status / protocol bits
"""

from .commands import MonitorCommands
from .events import EVENTS, journal_event
from .json_stream import JsonParseError, JsonStreamSplitter
from .schema import CommandError
from .server import Monitor

__all__ = [
    "EVENTS",
    "CommandError",
    "JsonParseError",
    "JsonStreamSplitter",
    "Monitor",
    "MonitorCommands",
    "journal_event",
]
