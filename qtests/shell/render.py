"""Text renderings of monitor answers: tables for the memory table, IOTLB and vrings, one
line per journal entry."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns of numbers right-aligned, of anything else left-aligned."""
    body = [list(row) for row in rows]
    cells = [[str(h) for h in headers], *([_cell(v) for v in row] for row in body)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], int) and not isinstance(row[i], bool) for row in body)
        for i in range(len(headers))
    ]
    lines = [
        "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        )
        for r in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def hex_or_dash(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) else "-"


def size_text(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def mem_table(regions: list[dict[str, Any]]) -> str:
    if not regions:
        return "(no memory regions: QEMU has not sent a memory table)"
    rows = [(r["id"], hex_or_dash(r["gpa"]), size_text(r["size"]), hex_or_dash(r["uaddr"]),
             hex_or_dash(r["mmap_offset"])) for r in regions]  # fmt: skip
    return table(("id", "gpa", "size", "uaddr", "mmap_offset"), rows)


def iotlb(answer: dict[str, Any]) -> str:
    maps = answer.get("mappings", [])
    head = f"generation {answer.get('generation')}, {len(maps)} mapping(s)"
    if not maps:
        return head + " (no IOMMU in use: the device addresses guest memory by GPA)"
    rows = [(m["id"], hex_or_dash(m["iova"]), size_text(m["size"]), hex_or_dash(m["uaddr"]),
             m["perm"]) for m in maps]  # fmt: skip
    return head + "\n" + table(("id", "iova", "size", "uaddr", "perm"), rows)


VRING_COLUMNS = ("index", "ready", "started", "num", "last_avail_idx", "used_idx", "inflight",
                 "packets", "bytes", "drops", "kicks", "calls")  # fmt: skip


def vrings(answer: dict[str, Any]) -> str:
    rings = answer.get("vrings", [])
    if not rings:
        return "(no virtqueues)"
    return table(VRING_COLUMNS, ([v.get(c) for c in VRING_COLUMNS] for v in rings))


def fields(
    data: dict[str, Any], skip: tuple[str, ...] = ("seq", "ts_ns", "mono_ns", "kind")
) -> str:
    """``key=value ...`` (nested values as compact JSON; timestamps and bookkeeping left out)."""
    return " ".join(
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict | list) else v}"
        for k, v in data.items()
        if k not in skip
    )


def journal_line(entry: dict[str, Any]) -> str:
    return f"{entry.get('seq', '?'):>6} {entry.get('kind', '?'):<18} {fields(entry)}".rstrip()


def event_line(source: str, event: dict[str, Any]) -> str:
    data = event.get("data", {})
    kind = f" ({data['kind']} #{data['seq']})" if "kind" in data and "seq" in data else ""
    return f"{source:<7} {event.get('event')}{kind} {fields(data)}".rstrip()


def journal(entries: list[dict[str, Any]], limit: int) -> str:
    if not entries:
        return "(no journal entries)"
    lines = [journal_line(e) for e in entries[-limit:]]
    if len(entries) > limit:
        lines.insert(0, f"({len(entries) - limit} older entries not shown)")
    return "\n".join(lines)


def faults(answer: dict[str, Any]) -> str:
    rows = [
        ("*" if f["active"] else "", f["name"], f["description"].split(". ")[0])
        for f in answer["known"]
    ]
    return table(("on", "fault", "what it breaks"), rows)


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)
