"""Run the real-guest avocado suite: ``.venv/bin/python -m avocado_tests.run [--ci] ...``.

Builds (or finds cached) the guest image first, so the build never counts against a test's
timeout, then runs plain ``avocado run`` (one test at a time: TCG is CPU bound) and prints where
results.json / results.xml / results.tap are. Finding no tests is an error (exit 2), as is a
job without results. Otherwise the exit status is avocado's (non-zero if any test failed).

Tags as avocado means them: ``-t a,b`` both, ``-t a -t b`` either; ``--ci`` is one more tag
every test must have (``--ci -t A`` runs the tests tagged both ci and A). ``--qemu PATH`` (else
``$QTEST_QEMU_BINARY``, else qemu-system-x86_64 on PATH) is the QEMU every test boots.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from guest_images import BuildError, build
from qtests.qos.machine import QemuError, use_qemu

SUITE_DIR = Path(__file__).resolve().parent
#: relative to the current directory (the checkout under ``make avocado``), never the install
DEFAULT_RESULTS = Path("build") / "avocado-results"
JOB_LOG = re.compile(r"^JOB LOG\s*:\s*(\S+)", re.MULTILINE)


def avocado_command() -> list[str]:
    beside = Path(sys.executable).with_name("avocado")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "avocado"]


def tag_filters(tags: list[str], ci: bool) -> list[str]:
    """avocado ``--filter-by-tags`` values: each ``-t`` value is one filter (its comma-separated
    tags all required; several filters: any one suffices); ``ci`` is added to every filter."""
    if not ci:
        return list(tags)
    return [",".join(["ci", *filter(None, t.split(","))]) for t in tags] or ["ci"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m avocado_tests.run", description=__doc__)
    p.add_argument("refs", nargs="*", help="test references (default: the avocado_tests dir)")
    p.add_argument("--ci", action="store_true",
                   help="only tests tagged ci (and every -t filter given)")  # fmt: skip
    p.add_argument("-t", "--tags", action="append", default=[], metavar="TAGS",
                   help="avocado tag filter: a,b = both; repeated = either")  # fmt: skip
    p.add_argument("--qemu", metavar="PATH",
                   help="QEMU binary (default: $QTEST_QEMU_BINARY, else qemu-system-x86_64)")  # fmt: skip
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
        print(f"QEMU: {use_qemu(args.qemu)}", flush=True)
    except QemuError as exc:
        print(f"run: {exc}", file=sys.stderr)
        return 2
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
    tags = tag_filters(args.tags, args.ci)
    args.results = args.results.absolute()
    args.results.mkdir(parents=True, exist_ok=True)
    cmd = [*avocado_command(), "run", "--disable-sysinfo",
           "--job-results-dir", str(args.results),
           "--max-parallel-tasks", str(args.parallel)]  # fmt: skip
    for tag in tags:
        cmd += ["--filter-by-tags", tag]
    for param in params:
        cmd += ["-p", param]
    cmd += args.refs or [str(SUITE_DIR)]
    print("run:", " ".join(cmd), flush=True)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
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
