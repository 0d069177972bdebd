"""`GuestSlot`: one real guest test at a time per checkout (qtests/guest/slot.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtests.guest.slot import GuestSlot
from qtests.qos.waiting import WaitTimeout


def test_one_holder_per_key_until_released(tmp_path: Path) -> None:
    first, second = GuestSlot(tmp_path / "a", tmp_path), GuestSlot(tmp_path / "a", tmp_path)
    other = GuestSlot(tmp_path / "b", tmp_path)
    assert first.acquire(timeout=5) < 5
    with pytest.raises(WaitTimeout, match="guest slot .*another guest test"):
        second.acquire(timeout=0.3)
    other.acquire(timeout=5)  # another checkout is not held up
    first.release()
    first.release()  # idempotent
    second.acquire(timeout=5)
    second.release()
    other.release()
