"""The benchmark report: a flat JSON object, one key per figure.

Figures are numbers (or ``null`` when they could not be taken; ``notes[key]`` then says why).
Besides the figures the object holds ``notes`` (key -> reason or remark), ``units`` (key ->
unit) and ``meta`` (when, where, how loaded the machine was). A run restricted to some groups
(``--only``) merges into the existing report, so figures from earlier runs are kept.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESERVED = ("notes", "units", "meta", "targets")

UNITS_BY_PREFIX = {
    "pps_": "packets/s",
    "gbps_": "Gbit/s",
    "ratio_": "ours / DPDK",
    "memreg_": "us",
    "set_map_": "us",
    "set_mem_table_": "us",
    "cpu_us_per_pkt_": "CPU us/packet",
    "iotlb_lookups_per_s": "lookups/s",
    "dma_translate_per_s": "translations/s",
    "iotlb_miss": "us",
    "migration_": "ms",
    "get_vring_base_": "us",
    "qtest_suite_s": "s",
    "check_vhost_user_s": "s",
    "check_vhost_user_cpu_s": "CPU s",
    "avocado_ci_s": "s",
    "lab_": "s",
}


#: Issue #17's targets: key -> (">=" or "<=", value). ``make bench`` prints each figure beside
#: its target and the report carries them (``targets``) so the README table can show them.
TARGETS: dict[str, tuple[str, float]] = {
    "pps_64_tx": (">=", 1_000_000),
    "pps_64_rx": (">=", 1_000_000),
    "iotlb_lookups_per_s_100k": (">=", 1_000_000),
    "check_vhost_user_s": ("<=", 60),
}


def meets(key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets ``key``'s target (None: no target or no value)."""
    if key not in TARGETS or value is None:
        return None
    op, want = TARGETS[key]
    return value >= want if op == ">=" else value <= want


def target_text(key: str) -> str:
    if key not in TARGETS:
        return ""
    op, want = TARGETS[key]
    return f"{op} {want:,.0f}"


def unit_for(key: str) -> str | None:
    for prefix, unit in UNITS_BY_PREFIX.items():
        if key.startswith(prefix):
            return unit
    return None


def busy_processes() -> list[str]:
    """Names of other CPU-heavy programs running now (QEMU, pytest, testpmd)."""
    names: list[str] = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(("qemu-system", "dpdk-testpmd")) or comm in ("pytest", "avocado"):
            names.append(comm)
    return sorted(names)


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        self.notes: dict[str, str] = {}
        self.meta: dict[str, Any] = {}

    @classmethod
    def load_or_new(cls, path: Path) -> Report:
        r = cls(path)
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return r
        if isinstance(old, dict):
            r.notes = dict(old.get("notes") or {})
            r.data = {k: v for k, v in old.items() if k not in RESERVED}
        return r

    def put(self, key: str, value: float | int | None, note: str | None = None) -> None:
        if key in RESERVED:
            raise ValueError(f"{key!r} is reserved")
        self.data[key] = value
        if note:
            self.notes[key] = note
        else:
            self.notes.pop(key, None)

    def fail(self, key: str, reason: str) -> None:
        self.put(key, None, reason)

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def start(self, args: list[str]) -> None:
        self.meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": args,
            "host": platform.node(),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "busy_processes_start": busy_processes(),
        }

    def sample_load(self, group: str) -> None:
        """Before a group starts (none of our processes running): who else is busy."""
        others = busy_processes()
        load1 = round(os.getloadavg()[0], 2)
        self.meta.setdefault("load_by_group", {})[group] = {"loadavg1": load1, "busy": others}

    def finish(self) -> None:
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        # loaded: the machine was busy before we started, or someone else's QEMU / pytest /
        # testpmd ran when a group started (our own groups raise the load average, so only
        # the first one says something about others)
        cpus = self.meta.get("cpus", 1)
        before = self.meta.get("loadavg_start", [0])[0] > 0.5 * cpus
        others = any(s["busy"] for s in self.meta.get("load_by_group", {}).values())
        self.meta["loaded"] = bool(before or others or self.meta.get("busy_processes_start"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(sorted(self.data.items()))
        out["units"] = {k: u for k in out if (u := unit_for(k))}
        out["targets"] = {k: [op, v] for k, (op, v) in TARGETS.items()}
        out["notes"] = dict(sorted(self.notes.items()))
        out["meta"] = self.meta
        return out

    def summary(self) -> list[str]:
        """One line per targeted figure: value, target, and whether it is met."""
        lines = []
        for key in TARGETS:
            v = self.data.get(key)
            ok = meets(key, v)
            shown = "null" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"
            verdict = {True: "met", False: "NOT met", None: "not measured"}[ok]
            lines.append(f"{key:28} {shown:>14}  target {target_text(key):>12}  {verdict}")
        return lines

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(self.path)
