"""The process under fuzzing: ``python -m backends`` started, probed, sampled, restarted.

After every case the fuzzer asks :meth:`BackendTarget.check`: is the process alive (else a
crash), does a *fresh* connection get an answer to GET_FEATURES within ``probe_timeout``
(else a hang), and what are its open-fd count and RSS now. :class:`FuzzStats` keeps the
figures a run reports.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings

from qtests.qos.backend_process import BackendProcess
from qtests.qos.vhost_user_frontend import Frontend

PROBE_TIMEOUT_S = 10.0


def rss_kib(pid: int) -> int:
    """The process's *private* resident memory (RssAnon, KiB): its heap, where a leak shows.
    VmRSS would also count the guest RAM it maps (shared memory the guest touches), which grows
    with every page a hostile descriptor makes the device read and says nothing about leaks."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


@dataclass
class FuzzStats:
    """What a fuzz run reports."""

    name: str
    cases: int = 0
    messages: int = 0
    crashes: int = 0
    hangs: int = 0
    fd_leaks: int = 0
    fd_min: int | None = None
    fd_max: int | None = None
    fd_baseline: int | None = None
    #: RSS is "start" once this many messages went by: the backend's bounded journal
    #: (100,000 entries, ~3 per message) is full by then, so growth after it is a leak.
    warmup_messages: int = 150_000
    rss_first_kib: int | None = None
    rss_start_kib: int | None = None
    rss_end_kib: int | None = None
    rss_max_kib: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: list[str] = field(default_factory=list)

    def sample(self, fds: int, rss: int) -> None:
        self.fd_min = fds if self.fd_min is None else min(self.fd_min, fds)
        self.fd_max = fds if self.fd_max is None else max(self.fd_max, fds)
        self.rss_end_kib = rss
        self.rss_max_kib = max(self.rss_max_kib, rss)

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "fuzzer": self.name,
            "cases": self.cases,
            "messages": self.messages,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "fd_leaks": self.fd_leaks,
            "fd_min": self.fd_min,
            "fd_max": self.fd_max,
            "rss_first_kib": self.rss_first_kib,
            "rss_start_kib": self.rss_start_kib,
            "rss_end_kib": self.rss_end_kib,
            "rss_max_kib": self.rss_max_kib,
            "wall_s": round(self.wall_s, 1),
        }

    def report(self) -> str:
        d = self.as_dict()
        return " ".join(f"{k}={v}" for k, v in d.items())


class BackendTarget:
    """One ``python -m backends`` (null wire, monitor) in a scratch directory."""

    def __init__(
        self, stats: FuzzStats, workdir: Path | None = None, probe_timeout: float = PROBE_TIMEOUT_S
    ) -> None:
        self.stats = stats
        self.probe_timeout = probe_timeout
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vu-fuzz-")) if workdir is None else workdir
        self.bp: BackendProcess | None = None
        self.restarts = 0
        self.start()

    @property
    def socket_path(self) -> str:
        assert self.bp is not None
        return self.bp.socket

    def start(self) -> None:
        run = self.workdir / f"run{self.restarts}"
        run.mkdir(parents=True, exist_ok=True)
        self.bp = BackendProcess.launch(run, "--wire", "null")
        fds, rss = self._probe_sample()
        if fds is None:
            raise RuntimeError("a freshly started backend does not answer")
        self.stats.fd_baseline = fds

    def _probe_sample(self) -> tuple[int | None, int]:
        """GET_FEATURES on a fresh connection; (fd count, RSS) sampled while it is open."""
        assert self.bp is not None
        try:
            with Frontend(self.bp.socket, timeout=self.probe_timeout) as fe:
                fe.get_features()
                return self.bp.fd_count(), rss_kib(self.bp.pid)
        except (TimeoutError, ConnectionError, OSError):
            return None, 0

    def check(self, case: str) -> str | None:
        """After a case: None if the backend is fine, else 'crash' / 'hang' / 'fd-leak'."""
        assert self.bp is not None
        st = self.stats
        if self.bp.proc.poll() is not None:
            st.crashes += 1
            st.failures.append(f"crash (exit {self.bp.proc.returncode}) after {case}")
            self.restart()
            return "crash"
        fds, rss = self._probe_sample()
        if fds is None:
            if self.bp.proc.poll() is not None:
                st.crashes += 1
                st.failures.append(f"crash (exit {self.bp.proc.returncode}) after {case}")
            else:
                st.hangs += 1
                st.failures.append(f"hang (no answer in {self.probe_timeout}s) after {case}")
            self.restart()
            return "hang"
        st.sample(fds, rss)
        if st.rss_first_kib is None:
            st.rss_first_kib = rss
        if st.rss_start_kib is None and st.messages >= st.warmup_messages:
            st.rss_start_kib = rss  # after warm-up (journal full, allocator settled)
        if st.fd_baseline is not None and fds > st.fd_baseline:
            st.fd_leaks += 1
            st.failures.append(f"fd leak ({fds} open, baseline {st.fd_baseline}) after {case}")
            st.fd_baseline = fds
            return "fd-leak"
        return None

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.bp is not None:
            try:
                self.bp.stop(grace=10)
            except TimeoutError:
                self.bp.kill()
            self.bp = None

    def close(self, keep: bool = False) -> None:
        self.stop()
        if self._own_dir and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def fuzz_settings(examples: int, *, ci: bool, steps: int = 40) -> settings:
    """What every fuzzer runs hypothesis with: no deadline (real processes), derandomized
    under CI, no example database, explicit (corpus) then generated cases; ``steps`` is the
    stateful fuzzer's rule count per case."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=ci,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
