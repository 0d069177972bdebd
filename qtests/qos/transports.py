"""pytest parameters for suites whose behaviour is the same on both transports.

Parametrize the ``transport`` fixture (qtests/conftest.py) indirectly::

    @pytest.mark.parametrize("transport", BOTH, indirect=True)
    def test_something(testbed: Testbed) -> None: ...

The vhost-vdpa case carries the ``vdpa_lane`` marker: it runs where the kernel has vduse and
vhost_vdpa (directly, or inside the lab L1; qtests/lab/plugin.py).
"""

from __future__ import annotations

import pytest

VHOST_USER = pytest.param("vhost-user", id="vhost-user")
VHOST_VDPA = pytest.param("vhost-vdpa", id="vhost-vdpa", marks=pytest.mark.vdpa_lane)
BOTH = [VHOST_USER, VHOST_VDPA]
