"""pytest plugin: the ``vdpa_lane`` marker, and lane tests run in the lab where the host can't.

A lane test is an ordinary pytest test marked ``@pytest.mark.vdpa_lane``: it needs
``/dev/vduse/control`` and vhost_vdpa on the kernel it runs on. Where this host has them
(:func:`qtests.lab.host.lane_mode`), lane tests run here like any other. Where it does not,
each selected lane test is replaced by a :class:`LaneProxy` with the same node id; the first
proxy to run boots L1 once and runs all of them in one inner pytest
(:func:`qtests.lab.lane.run_lane`), and each proxy then passes, fails (with the inner failure
text and captured output) or skips as its inner test did. When neither the host nor the lab
can run the lane, the proxies skip and say what to install.

Under pytest-xdist (``make check``) the lane is cut into :func:`lane_shards` shards, each run
whole by one worker in its own L1 (:func:`lane_shard`: the same cut on the controller, whose
scheduler sends each shard to one worker, and on every worker). An L1 runs on one CPU under
TCG, so one lane of 64 tests was the long pole of ``make check`` on a 2-CPU machine.

Loaded for every session through ``-p qtests.lab.plugin`` in pyproject's addopts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from qtests.lab import host
from qtests.lab.lane import INNER_TIMEOUT, LaneRun, run_lane
from qtests.lab.vm import BOOT_TIMEOUT

MARKER = "vdpa_lane"
#: Tests of the lab runner itself: they boot L1 on the host (a few seconds of TCG each).
LAB_MARKER = "lab"
_LANE = pytest.StashKey["_Lane"]()
#: At most this many L1s at once (each takes one CPU and ``vm.MEMORY_MB`` of RAM).
MAX_LANE_SHARDS = 4
_GIB = 1 << 30


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def lane_shards(workers: int | None = None) -> int:
    """How many L1s share the lane under xdist: ``VDPA_LANE_SHARDS``, else one per usable CPU,
    at most :data:`MAX_LANE_SHARDS` and one per 4 GiB of RAM; never more than the xdist
    ``workers``. Stable within a session (the controller and every worker must agree)."""
    env = os.environ.get("VDPA_LANE_SHARDS")
    if env:
        shards = max(1, int(env))
    else:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = 0
        by_ram = max(1, ram // (4 * _GIB)) if ram else 1
        shards = max(1, min(MAX_LANE_SHARDS, usable_cpus(), by_ram))
    return min(shards, workers) if workers else shards


def lane_shard(nodeid: str, nodeids: list[str], shards: int) -> int:
    """The shard of lane test ``nodeid``: its rank among the lane tests (by the naming rule,
    :func:`is_lane_nodeid`) of the collected ``nodeids``, modulo ``shards`` - neighbours, which
    are alike in cost, go to different L1s."""
    if shards <= 1:
        return 0
    lane = [n for n in nodeids if is_lane_nodeid(n)]
    try:
        return lane.index(nodeid) % shards
    except ValueError:
        return 0


def is_lane_nodeid(nodeid: str) -> bool:
    """Whether a node id names a lane test, by the lane's naming rule (xdist's scheduler sees
    only node ids, not markers): lane modules are ``test_*vdpa*.py`` and a suite parametrized
    over the transport names the lane case ``vhost-vdpa`` (qtests/qos/transports.py). A lane
    test that breaks the rule still runs correctly, at the cost of a second L1 boot."""
    module, _, rest = nodeid.partition("::")
    name = module.rsplit("/", 1)[-1]
    return (
        (name.startswith("test_") and "vdpa" in name)
        or "[vhost-vdpa" in rest
        or ("-vhost-vdpa" in rest)
    )


class LaneTestFailed(Exception):
    """The inner test failed in L1 (or could not run there): the text says how."""


class _Lane:
    """The session's lane: which tests are proxied and, once run, the inner results."""

    def __init__(self, config: pytest.Config, mode: str, why: str) -> None:
        self.config = config
        self.mode = mode
        self.why = why
        self.nodeids: list[str] = []
        self.shard_of: dict[str, int] = {}  # lane test -> the L1 run it belongs to
        self.runs: dict[int, LaneRun] = {}
        self.broken: dict[int, str] = {}  # an interrupted lab run (a timeout): never run twice

    @property
    def log_root(self) -> Path:
        return Path(os.environ.get("QOS_LOG_DIR") or self.config.rootpath / "test-logs")

    def results(self, nodeid: str) -> LaneRun:
        """The L1 run that holds ``nodeid``'s result: run now (with the rest of its shard)
        when this is the first of its shard's tests here."""
        shard = self.shard_of.get(nodeid, 0)
        if shard in self.broken:
            raise LaneTestFailed(
                f"the lab run was interrupted in an earlier test: {self.broken[shard]}"
            )
        if shard not in self.runs:
            nodeids = [n for n in self.nodeids if self.shard_of.get(n, 0) == shard]
            shards = len(set(self.shard_of.values()) or {0})
            part = f" (shard {shard + 1} of {shards})" if shards > 1 else ""
            capture = self.config.pluginmanager.getplugin("capturemanager")
            assert capture is not None
            with capture.global_and_fixture_disabled():
                tw = self.config.get_terminal_writer()
                tw.line()
                tw.line(
                    f"vdpa lane: {self.why}; booting the lab (L1) once for "
                    f"{len(nodeids)} lane test(s){part}, logs in {self.log_root}/vdpa-lab*"
                )
            try:
                self.runs[shard] = run_lane(
                    nodeids, self.config.rootpath, self.log_root, INNER_TIMEOUT
                )
            except BaseException as exc:
                self.broken[shard] = f"{type(exc).__name__}: {exc}"
                raise
        return self.runs[shard]


class LaneProxy(pytest.Item):
    """Stands on the host for one lane test that runs in L1; same node id, same markers."""

    def __init__(self, *, original: pytest.Item, lane: _Lane, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.lane = lane
        self.own_markers.extend(original.own_markers)
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        if self.lane.mode == "none":
            pytest.skip(self.lane.why)
        run = self.lane.results(self.nodeid)
        inner = run.result(self.nodeid)
        console = run.workdir / "console.log"
        self.user_properties.append(("lab_console_log", str(console)))
        where = ""
        if inner.log_dir_name:
            log_dir = self.lane.log_root / inner.log_dir_name
            self.user_properties.append(("log_dir", str(log_dir)))
            where = f"logs: {log_dir}; "
        for name, text in inner.sections:  # "Captured <key> <when>" in the inner report
            key, _, when = name.removeprefix("Captured ").rpartition(" ")
            self.add_report_section(when or "call", f"{key or name} in L1", text)
        if inner.outcome == "passed":
            return
        if inner.outcome == "skipped":
            pytest.skip(f"skipped in L1: {inner.text}")
        if inner.outcome == "failed":
            raise LaneTestFailed(
                f"{_headline(inner.text)}\n{inner.text}\n\n(ran in the lab L1; {where}"
                f"L1 console log: {console})"
            )
        raise LaneTestFailed(f"no result from L1: {run.error}\n(console log: {console})")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, LaneTestFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()


def _headline(text: str) -> str:
    """The first ``E   `` line of a pytest failure text (what the short summary shows)."""
    for line in text.splitlines():
        if line.startswith("E   "):
            return "failed in L1: " + line[1:].strip()
    return "failed in L1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: a vhost-vdpa lane test (needs /dev/vduse/control and vhost_vdpa); runs in "
        "the lab L1 where the host has neither",
    )
    config.addinivalue_line(
        "markers",
        f"{LAB_MARKER}: a test of the lab runner that boots L1 on the host (not a vhost-user "
        "test: bench's check_vhost_user_s leaves it out with the lane)",
    )


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: proxy exactly what will run
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    lane_items = [i for i in items if i.get_closest_marker(MARKER) is not None]
    if not lane_items:
        return
    misnamed = [i.nodeid for i in lane_items if not is_lane_nodeid(i.nodeid)]
    if misnamed:
        raise pytest.UsageError(
            "vdpa_lane tests must be named by the lane's rule (a test_*vdpa*.py module, or a "
            f"'vhost-vdpa' parameter id; see is_lane_nodeid): {', '.join(misnamed)}"
        )
    mode, why = host.lane_mode()
    if mode == "direct":
        return
    lane = _Lane(config, mode, why)
    config.stash[_LANE] = lane
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller's scheduler cuts the same way
        every = [i.nodeid for i in items]
        shards = lane_shards(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) or None)
        lane.shard_of = {i.nodeid: lane_shard(i.nodeid, every, shards) for i in lane_items}
    timeout = BOOT_TIMEOUT + INNER_TIMEOUT + 120
    for index, item in enumerate(items):
        if item.get_closest_marker(MARKER) is None:
            continue
        assert item.parent is not None
        proxy = LaneProxy.from_parent(item.parent, name=item.name, original=item, lane=lane)
        if config.pluginmanager.hasplugin("timeout"):
            proxy.add_marker(pytest.mark.timeout(timeout))  # the whole lane runs in the first
        lane.nodeids.append(proxy.nodeid)
        items[index] = proxy


def _summary_lines(lane: _Lane) -> list[str]:
    if not lane.runs:
        return [f"vdpa lane skipped: {lane.why}"] if lane.mode == "none" else []
    lines = []
    for run in lane.runs.values():
        lab = run.lab
        figures = (
            f"L1 boot {lab.boot_seconds:.1f} s, inner pytest {lab.run_seconds:.1f} s, "
            if lab is not None
            else ""
        )
        lines.append(
            f"vdpa lane in the lab: {len(run.results)} test(s), {figures}lane "
            f"{run.seconds:.1f} s (logs: {run.workdir})"
        )
    return lines


_WORKER_LINES = pytest.StashKey[list[str]]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker: hand the lane's summary to the controller, which prints it."""
    output = getattr(session.config, "workeroutput", None)
    lane = session.config.stash.get(_LANE, None)
    if output is not None and lane is not None:
        output["vdpa_lane_summary"] = _summary_lines(lane)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """On the xdist controller: keep what a worker's lane runs reported."""
    lines = getattr(node, "workeroutput", {}).get("vdpa_lane_summary") or []
    config = node.config
    config.stash.setdefault(_WORKER_LINES, []).extend(
        line for line in lines if line not in config.stash.get(_WORKER_LINES, [])
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lane = config.stash.get(_LANE, None)
    lines = _summary_lines(lane) if lane is not None else []
    for line in [*lines, *config.stash.get(_WORKER_LINES, [])]:
        terminalreporter.write_line(line)
