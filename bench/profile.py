"""``--profile``: where our backend spends its time under testpmd load (py-spy, sampling).

py-spy is not a dependency: install it ad hoc (``.venv/bin/pip install py-spy``). The backend
process is started *under* py-spy (attaching to a running process may be refused in a
container), driven by the same testpmd frontend as :mod:`bench.datapath`, and the raw
collapsed stacks are summarised as self and inclusive time per function (line numbers
dropped), written to ``results/profile_<direction>_<size>.txt``.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.datapath import REPO, DatapathBench
from bench.procs import Proc

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _func(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m['fn']} ({m['file'].removeprefix(str(REPO) + '/')})"


def summarise(raw: str, top: int = 25) -> tuple[str, dict[str, float]]:
    """Text summary of py-spy's raw (collapsed) output; also {function: self %}."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_func(f) for f in stack.split(";")]
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n", {}
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in self_t.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n", {f: 100 * c / total for f, c in self_t.most_common(top)}


class SpyProc(Proc):
    """py-spy and its child in one session: SIGINT to the group makes the child exit cleanly
    and py-spy write its output; SIGTERM/SIGKILL only if that does not work."""

    def stop(self, grace: float = 5.0) -> int:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        return super().stop(grace)


class ProfiledBench(DatapathBench):
    """:class:`DatapathBench` whose backend runs under ``py-spy record``."""

    def __init__(self, *args: object, spy: str, raw_path: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.spy = spy
        self.raw_path = raw_path

    def _ours(self, tag: str, direction: str, size: int) -> Proc:
        wire = "null" if direction == "tx" else f"gen:{size}"
        argv = [self.spy, "record", "--nonblocking", "-r", "250", "-f", "raw"]
        argv += ["-o", str(self.raw_path), "--", sys.executable, "-m", "bench.backend"]
        argv += ["--socket", self.sock, "--wire", wire, "--cpu", str(self.place.backend_cpu)]
        proc = SpyProc(
            "our backend (py-spy)",
            argv,
            self.logs / f"profile-backend-{tag}.log",
            cpus=[self.place.backend_cpu],
            cwd=REPO,
        )
        return proc.wait_ready(30)
