"""What the driver polls for "an interrupt happened": an MSI-X word
(:class:`~qtests.qos.pci.MsiVector`), an ISR bit, a vhost-user call eventfd."""

from __future__ import annotations

from typing import Protocol

__all__ = ["InterruptSource"]


class InterruptSource(Protocol):
    """Something the driver can poll for "an interrupt happened" (MSI-X word, ISR bit)."""

    def fired(self) -> bool: ...

    def clear(self) -> None: ...

    def describe(self) -> str: ...
