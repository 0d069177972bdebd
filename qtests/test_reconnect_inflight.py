"""The backend killed with TX chains in flight and restarted (issue 15, item 4).

Scenario: `qtests.qos.inflight_reconnect` (QEMU's guarantee in `qtests.qos.reconnect`); this
module starts the testbeds and runs the meta-tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qtests.qos.inflight_reconnect import packed_reconnect_base, reconnect_mid_stream
from qtests.qos.testbed import Testbed

pytestmark = pytest.mark.qemu

RECONNECT_MS = 50


def test_reconnect_with_chains_in_flight(make_testbed: Callable[..., Testbed]) -> None:
    fate = reconnect_mid_stream(make_testbed(reconnect_ms=RECONNECT_MS).start())
    print(f"held TX chains: {fate}")


def test_packed_reconnect_restores_no_position(make_testbed: Callable[..., Testbed]) -> None:
    """QEMU 10 cannot restore a packed ring's position after a backend crash (module doc of
    qtests.qos.inflight_reconnect): the replacement gets the previous start's base."""
    tb = make_testbed(reconnect_ms=RECONNECT_MS, net_props={"packed": True}).start(packed=True)
    packed_reconnect_base(tb)


@pytest.mark.parametrize(
    ("fault", "symptom"),
    [
        # the replacement starts its TX ring at 0: it transmits the completed frames again
        ("ignore-set-vring-base", r"TX chains in flight at the crash: [1-9]\d* frames before"),
    ],
)
def test_meta_reconnect_in_flight_catches(
    make_testbed: Callable[..., Testbed], fault: str, symptom: str
) -> None:
    tb = make_testbed(reconnect_ms=RECONNECT_MS).start()
    with pytest.raises(AssertionError, match=symptom) as caught:
        reconnect_mid_stream(tb, faults_after=[fault])
    print(f"{fault}: {caught.value}")
