"""``python -m qtests.fuzz``: run the fuzzers with a budget, print the figures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


def _parallel_descriptors(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """``--jobs N``: N descriptor fuzzers (own QEMU + backend each, layouts alternating),
    their RESULT lines summed into one."""
    procs = []
    started = time.monotonic()
    for k in range(args.jobs):
        layout = ("split", "packed")[k % 2] if args.layout == "both" else args.layout
        cmd = [
            sys.executable,
            "-m",
            "qtests.fuzz",
            "descriptors",
            "--jobs",
            "1",
            "--tables",
            str(args.tables // args.jobs),
            "--duration",
            str(args.duration),
            "--layout",
            layout,
            "--log-dir",
            f"{args.log_dir}/job{k}",
        ]
        if args.ci:
            cmd.append("--ci")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    total: dict[str, Any] = {"fuzzer": "descriptors", "jobs": args.jobs}
    failures: list[str] = []
    for k, proc in enumerate(procs):
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                for key in ("cases", "messages", "crashes", "hangs", "fd_leaks"):
                    total[key] = total.get(key, 0) + r[key]
                total.setdefault("per_job", []).append(r)
            elif line.startswith("  "):
                failures.append(f"job{k}: {line.strip()}")
            else:
                print(f"job{k} {line}", end="", flush=True)
        if proc.wait() not in (0, 1):
            failures.append(f"job{k} exited {proc.returncode}")
            total["crashes"] = total.get("crashes", 0) + 1
    total["wall_s"] = round(time.monotonic() - started, 1)
    return total, failures


FUZZERS = ("vhost-user", "descriptors", "vduse")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qtests.fuzz", description=__doc__)
    # Checked in main, not with ``choices``: Python 3.11's argparse checks an empty nargs="*"
    # positional (or its default list) against ``choices`` as one value and refuses it.
    p.add_argument("which", nargs="*", help=f"fuzzers to run: {', '.join(FUZZERS)} (default: all)")
    p.add_argument("--messages", type=int, default=1_000_000, help="vhost-user messages to send")
    p.add_argument("--tables", type=int, default=100_000, help="descriptor tables to try")
    p.add_argument(
        "--vduse-cases",
        type=int,
        default=100_000,
        help="VDUSE cases (misbehaving-kernel sequences, in-process) to try",
    )
    p.add_argument("--duration", type=float, default=3600.0, help="seconds per fuzzer at most")
    p.add_argument(
        "--ci",
        action="store_true",
        default=bool(os.environ.get("CI")),
        help="deterministic (derandomized) generation",
    )
    p.add_argument(
        "--layout",
        choices=["split", "packed", "both"],
        default="both",
        help="descriptor tables for which ring layout (both: half each)",
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="descriptor fuzzers in parallel (one QEMU each)"
    )
    p.add_argument("--log-dir", default="test-logs/fuzz", help="QEMU/backend logs (descriptors)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    unknown = [w for w in args.which if w not in FUZZERS]
    if unknown:
        p.error(f"unknown fuzzer {', '.join(unknown)} (choose from {', '.join(FUZZERS)})")
    args.which = args.which or list(FUZZERS)
    results = []
    bad = False
    for which in args.which:
        if which == "vhost-user":
            from qtests.fuzz import vhost_user

            stats = vhost_user.run(
                args.messages,
                args.duration,
                ci=args.ci,
                progress=lambda line: print(line, flush=True),
            )
        elif which == "vduse":
            from qtests.fuzz import vduse

            stats = vduse.run(
                args.vduse_cases,
                args.duration,
                ci=args.ci,
                progress=lambda line: print(line, flush=True),
            )
        elif args.jobs > 1:
            total, failures = _parallel_descriptors(args)
            print("RESULT " + json.dumps(total), flush=True)
            for f in failures:
                print(f"  {f}", flush=True)
            bad |= bool(total.get("crashes") or total.get("hangs") or total.get("fd_leaks"))
            bad |= bool(failures)
            continue
        else:
            from pathlib import Path

            from qtests.fuzz import descriptors

            stats = descriptors.run(
                args.tables,
                args.duration,
                log_dir=Path(args.log_dir),
                layouts=("split", "packed") if args.layout == "both" else (args.layout,),
                ci=args.ci,
                progress=lambda line: print(line, flush=True),
            )
        print("RESULT " + json.dumps(stats.as_dict()), flush=True)
        for f in stats.failures:
            print(f"  {f}", flush=True)
        results.append(stats)
        bad |= bool(stats.crashes or stats.hangs or stats.fd_leaks)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
