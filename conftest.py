"""Shared by every pytest suite of the checkout (``make check`` runs them in one session).

Each test's log directory goes into the junit XML report (``make check`` and CI write
``test-logs/junit.xml``) as a ``<property>`` of its ``<testcase>``: ``log_dir`` (the qtest
suites' per-test ``test-logs/<test id>/``) and ``tmp_path`` (where unit tests keep a backend
process's log, journal, stdout and stderr).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

# pytest caches each test module's assertion-rewritten code under __pycache__ unless
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines): then every pytest-xdist
# worker parses and rewrites all ~80 test modules again, 2 s of CPU per worker. `make check`
# byte-compiles the checkout anyway (make bytecode), so the cache is written here too.
# (Where the checkout is read-only, as in the lab's L1, pytest just fails to write it.)
sys.dont_write_bytecode = False

#: fixtures whose value is a test's log directory, recorded under the fixture's name
LOG_DIR_FIXTURES = ("log_dir", "tmp_path")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Before the fixtures go: the teardown report carries ``item.user_properties`` into the
    junit report, also when the test or its set-up failed."""
    funcargs = getattr(item, "funcargs", None) or {}
    for name in LOG_DIR_FIXTURES:
        value = funcargs.get(name)
        if value is not None and (name, str(value)) not in item.user_properties:
            item.user_properties.append((name, str(value)))


#: Test modules run whole on one pytest-xdist worker: the malformed-input suite must (a
#: module-scoped backend whose teardown checks what every case left in its journal, a last test
#: comparing descriptors); the packaging tests share one pip-installed venv (built once).
ONE_WORKER_MODULES = frozenset(
    {"backends/tests/test_vhost_user_malformed.py", "qtests/test_packaging.py"}
)

#: The scope of the vhost-vdpa lane tests of one shard: one worker, which boots one L1 for them.
LANE_SCOPE = "vdpa-lane"


def xdist_scope(
    nodeid: str, collection: list[str] | None = None, workers: int | None = None
) -> str:
    """The unit of work one xdist worker takes whole: a module of :data:`ONE_WORKER_MODULES`,
    the lane tests (:func:`qtests.lab.plugin.is_lane_nodeid`) of one shard of the lane
    (:func:`qtests.lab.plugin.lane_shard` over the whole ``collection``, at most one shard per
    of the ``workers``), else the test."""
    from qtests.lab.plugin import is_lane_nodeid, lane_shard, lane_shards

    if is_lane_nodeid(nodeid):
        shards = lane_shards(workers)
        if shards > 1 and collection:
            return f"{LANE_SCOPE}-{lane_shard(nodeid, collection, shards)}"
        return LANE_SCOPE
    module = nodeid.split("::", 1)[0]
    return module if module in ONE_WORKER_MODULES else nodeid


#: ``-n auto`` workers per CPU. A qtest mostly waits (for QEMU, the backend, a migration or a
#: frame on a socket): on 2 CPUs two workers leave the CPUs idle a third of the time.
WORKERS_PER_CPU = 2
MAX_AUTO_WORKERS = 8


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What ``-n auto`` (``make check``) means: :data:`WORKERS_PER_CPU` per usable CPU, at most
    :data:`MAX_AUTO_WORKERS`; ``PYTEST_XDIST_AUTO_NUM_WORKERS=N`` overrides it, as in xdist."""
    import os

    from qtests.lab.plugin import usable_cpus

    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if env:
        return int(env)
    return max(1, min(MAX_AUTO_WORKERS, WORKERS_PER_CPU * usable_cpus()))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make check`` (``-n auto --dist loadgroup``): tests are spread one by one, except the
    scopes of :func:`xdist_scope`. Scopes go out largest first (xdist's loadscope reorder), so
    the lane's shards, the longest units, start at once on workers of their own. (xdist's own
    loadgroup no longer groups ``xdist_group`` marks under pytest 9.2: pytest-xdist#1386.)"""
    if config.getoption("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ScopedScheduling(LoadScopeScheduling):  # type: ignore[misc]
        _scopes: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._scopes is None:
                if not self.collection:
                    return xdist_scope(nodeid)
                workers = self.numnodes
                self._scopes = {
                    n: xdist_scope(n, self.collection, workers) for n in self.collection
                }
            return self._scopes.get(nodeid) or xdist_scope(nodeid, self.collection, self.numnodes)

    return ScopedScheduling(config, log)
