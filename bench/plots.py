"""PNG plots of the report (matplotlib, Agg backend; the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.datapath import DIRECTIONS, SIZES
from bench.mapdiff import COUNTS


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _num(data: dict[str, Any], key: str) -> float | None:
    v = data.get(key)
    return float(v) if isinstance(v, int | float) else None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def datapath(data: dict[str, Any], out: Path) -> Path | None:
    """Packets/s, ours vs DPDK's vhost PMD, per direction and frame size (log scale)."""
    rows = [(d, s) for d in DIRECTIONS for s in SIZES]
    ours = [_num(data, f"pps_{s}_{d}") for d, s in rows]
    ref = [_num(data, f"pps_{s}_{d}_dpdk") for d, s in rows]
    if not any(v is not None for v in ours + ref):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [v or 0 for v in ours], w, label="ours (Python)")
    ax.bar([i + w / 2 for i in x], [v or 0 for v in ref], w, label="DPDK vhost PMD (C)")
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a and b:
            ax.annotate(f"{a / b:.1%}", (i - w / 2, a), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [f"{d.upper()} {s} B" for d, s in rows])
    ax.set_yscale("log")
    ax.set_ylabel("packets/s (testpmd virtio-user frontend)")
    ax.set_title("Datapath throughput, one queue pair, 1 core each")
    ax.legend()
    fig.tight_layout()
    path = out / "datapath_pps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mapdiff(data: dict[str, Any], out: Path) -> Path | None:
    """Time to apply one memory-table change against the number of regions present."""
    series = {
        "ADD_MEM_REG (socket round trip)": "memreg_add_us_{}",
        "REM_MEM_REG (socket round trip)": "memreg_rem_us_{}",
        "add region (device model)": "memreg_add_us_{}_model",
        "remove region (device model)": "memreg_rem_us_{}_model",
        "set_map, N+1 entries, 1 new (device model)": "set_map_one_change_us_{}",
        "rebuild N+1 from scratch (device model)": "set_mem_table_full_us_{}",
    }
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    drawn = False
    for label, fmt in series.items():
        pts = [(n, _num(data, fmt.format(n))) for n in COUNTS]
        pts = [(n, v) for n, v in pts if v is not None]
        if pts:
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("regions already present (N)")
    ax.set_ylabel("microseconds")
    ax.set_title("Memory-table diff vs full table")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "mapdiff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hot_path(data: dict[str, Any], out: Path) -> Path | None:
    """CPU microseconds per packet in-process, per direction and size."""
    rows = [(d, s) for d in DIRECTIONS for s in (64, 1500)]
    vals = [_num(data, f"cpu_us_per_pkt_{d}_{s}_inproc") for d, s in rows]
    if not any(v is not None for v in vals):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(range(len(rows)), [v or 0 for v in vals], color="tab:green")
    for i, v in enumerate(vals):
        if v:
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{d.upper()} {s} B" for d, s in rows])
    ax.set_ylabel("CPU us / packet")
    ax.set_title("Our datapath in-process (no peer, no syscalls)")
    fig.tight_layout()
    path = out / "hot_path.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(data: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (datapath(data, out), mapdiff(data, out), hot_path(data, out)) if p]
