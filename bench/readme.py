"""README.md's benchmark table, rendered from ``bench/results/report.json``.

``python -m bench --readme`` (or ``python -m bench.readme [REPORT]``) rewrites what lies between
the ``bench-table`` markers in README.md; the text around them is left alone. Every number in
the block comes from one report, so the DPDK ratios are from the same run as our figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.report import TARGETS, meets, target_text

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- bench-table:begin (python -m bench --readme writes this block) -->"
END = "<!-- bench-table:end -->"


def _num(data: dict[str, Any], key: str) -> float | None:
    v = data.get(key)
    return float(v) if isinstance(v, int | float) else None


def _pps(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.0f} k"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def _cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _value(key: str, v: float | None) -> str:
    if v is None:
        return "not measured"
    if key.endswith("_s"):
        return f"{v:.1f} s"
    return f"{v:,.0f}"


def render(data: dict[str, Any]) -> str:
    meta = data.get("meta") or {}
    lines = [
        BEGIN,
        "",
        f"Last run {meta.get('started', '?')} ({' '.join(meta.get('argv') or []) or 'all groups'})"
        f" on {meta.get('cpus', '?')} CPUs"
        + (
            f" (loaded: other test runs shared the machine, load average "
            f"{(meta.get('loadavg_start') or ['?'])[0]} at the start)"
            if meta.get("loaded")
            else ""
        )
        + "; figures of groups it did not re-run are kept from earlier runs, and each DPDK ratio"
        " comes from one datapath run. Packets/s seen by testpmd's virtio-user frontend; CPU = "
        "our backend's CPU microseconds per packet in the same window.",
        "",
        "| frame | TX ours | TX DPDK | ours/DPDK | TX CPU us | RX ours | RX DPDK | ours/DPDK"
        " | RX CPU us |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, q, label in ((64, "", "64 B"), (512, "", "512 B"), (1500, "", "1500 B"),
                           (64, "_2q", "64 B, 2 queue pairs")):  # fmt: skip
        row = [label]
        for d in ("tx", "rx"):
            row += [
                _pps(_num(data, f"pps_{size}_{d}{q}")),
                _pps(_num(data, f"pps_{size}_{d}{q}_dpdk")),
                _ratio(_num(data, f"ratio_{size}_{d}{q}")),
                _cpu(_num(data, f"cpu_us_per_pkt_{d}_{size}{q}")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| issue #17 target | value | target | |", "| --- | ---: | ---: | --- |"]
    for key in TARGETS:
        v = _num(data, key)
        ok = {True: "met", False: "**not met**", None: ""}[meets(key, v)]
        lines.append(f"| `{key}` | {_value(key, v)} | {target_text(key)} | {ok} |")
    cpu = _num(data, "check_vhost_user_cpu_s")
    if cpu is not None:
        lines.append(f"| `check_vhost_user_cpu_s` (CPU time of that run) | {cpu:.1f} s | | |")
    lines += ["", "| other figure | value |", "| --- | --- |"]
    others = (
        ("in-process CPU us/packet, TX / RX 64 B", "cpu_us_per_pkt_tx_64_inproc",
         "cpu_us_per_pkt_rx_64_inproc", "{:.2f} / {:.2f} us"),
        ("IOTLB lookups/s, 1 k / 100 k entries", "iotlb_lookups_per_s_1k",
         "iotlb_lookups_per_s_100k", "{:,.0f} / {:,.0f}"),
        ("IOTLB MISS round trip, QEMU 10 + virtio-iommu / Python peer", "iotlb_miss_rtt_us",
         "iotlb_miss_rtt_us_frontend", "{:.0f} / {:.0f} us"),
        ("`pytest qtests` / `python -m avocado_tests.run --ci`", "qtest_suite_s",
         "avocado_ci_s", "{:.0f} s / {:.0f} s"),
    )  # fmt: skip
    for label, a, b, fmt in others:
        va, vb = _num(data, a), _num(data, b)
        if va is None or vb is None:
            continue
        lines.append(f"| {label} | {fmt.format(va, vb)} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def update(readme: Path, table: str) -> None:
    """Replace the marked block of ``readme`` with ``table`` (which carries the markers)."""
    text = readme.read_text()
    try:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"{readme}: no {BEGIN!r} ... {END!r} block") from None
    readme.write_text(head + table.rstrip("\n") + tail)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else REPO / "bench" / "results" / "report.json"
    update(REPO / "README.md", render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
