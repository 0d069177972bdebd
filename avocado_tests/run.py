"""Run the real-guest avocado suite: ``.venv/bin/python -m avocado_tests.run [--ci] ...``.

Builds (or finds cached) the guest image first, so the build never counts against a test's
timeout, then runs ``avocado run`` with the repository on PYTHONPATH (avocado's resolver needs
it to follow ``from avocado_tests.base import ...``), and prints where results.json /
results.xml / results.tap are. Finding no tests is an error (exit 2), as is a job without
results. Otherwise the exit status is avocado's (non-zero if any test failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from guest_images import BuildError, build

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = REPO_ROOT / "avocado_tests"
DEFAULT_RESULTS = REPO_ROOT / "build" / "avocado-results"
JOB_LOG = re.compile(r"^JOB LOG\s*:\s*(\S+)", re.MULTILINE)


def avocado_command() -> list[str]:
    beside = Path(sys.executable).with_name("avocado")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "avocado"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avocado_tests.run", description=__doc__)
    p.add_argument("refs", nargs="*", help="test references (default: the avocado_tests dir)")
    p.add_argument("--ci", action="store_true", help="only tests tagged ci (--filter-by-tags=ci)")
    p.add_argument("-t", "--tags", action="append", default=[], help="avocado tag filter")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="--job-results-dir")
    p.add_argument(
        "--parallel", type=int, default=1, help="--max-parallel-tasks (TCG is CPU bound)"
    )
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="test parameter: netdev, accel, qemu, guest_cache, boot_timeout, "
                   "backend_faults")  # fmt: skip
    p.add_argument("--guest-cache", type=Path, default=None, help="guest image cache directory")
    args = p.parse_args(argv)

    try:
        image = build(args.guest_cache, log=lambda m: print(f"guest_images: {m}", flush=True))
    except BuildError as exc:
        print(f"run: cannot build the guest image: {exc}", file=sys.stderr)
        return 2
    state = "cached" if image.cached else "built"
    print(f"guest image {image.key} ({state}): {image.kernel} {image.initrd}", flush=True)

    params = list(args.param)
    if args.guest_cache is not None:
        params.append(f"guest_cache={args.guest_cache}")
    tags = (["ci"] if args.ci else []) + args.tags
    args.results.mkdir(parents=True, exist_ok=True)
    cmd = [*avocado_command(), "run", "--disable-sysinfo",
           "--job-results-dir", str(args.results),
           "--max-parallel-tasks", str(args.parallel)]  # fmt: skip
    for tag in tags:
        cmd += ["--filter-by-tags", tag]
    for param in params:
        cmd += ["-p", param]
    cmd += args.refs or [str(SUITE_DIR)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    print("run:", " ".join(cmd), flush=True)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    output = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        output.append(line)
    rc = proc.wait()

    match = JOB_LOG.search("".join(output))
    if match is None:
        print(f"run: avocado found no tests (exit {rc}) for {args.refs or [str(SUITE_DIR)]}"
              f"{' with tags ' + ','.join(tags) if tags else ''}", file=sys.stderr)  # fmt: skip
        return 2
    job_dir = Path(match.group(1)).parent
    results = job_dir / "results.json"
    try:
        summary = json.loads(results.read_text())
        total = int(summary.get("total", 0))
        not_run = int(summary.get("cancel", 0)) + int(summary.get("skip", 0))
    except (OSError, ValueError) as exc:
        print(f"run: no readable {results}: {exc}", file=sys.stderr)
        return 2
    if total == 0:
        print("run: the job ran no tests", file=sys.stderr)
        return 2
    if args.ci and not_run:
        # avocado exits 0 when tests cancel or skip; in CI a scenario that did not run is a
        # scenario that proved nothing
        print(f"run: {not_run} of {total} CI tests were cancelled or skipped", file=sys.stderr)
        rc = rc or 1
    print(f"results.json: {results}")
    print(f"results.xml:  {job_dir / 'results.xml'}")
    print(f"results.tap:  {job_dir / 'results.tap'}")
    print(f"test logs:    {job_dir / 'test-results'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
