"""`die_with_parent` arms PR_SET_PDEATHSIG only for children of the runner's main thread.

The kernel signals the child when the *thread* that forked it exits; avocado runs each test
method in a short-lived worker thread, so a child forked there must outlive that thread.
"""

from __future__ import annotations

import subprocess
import threading

import pytest

from qtests.qos.processes import die_with_parent, stop_process


def test_child_of_a_worker_thread_outlives_the_thread() -> None:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> None:
        procs.append(subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent))

    worker = threading.Thread(target=spawn, name="short-lived-worker")
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and procs, "the worker thread did not spawn and end"
    try:
        # PDEATHSIG would have been delivered as the worker thread exited: the child is dead
        # well within this wait if it was armed
        with pytest.raises(subprocess.TimeoutExpired):
            procs[0].wait(timeout=1.0)
    finally:
        stop_process(procs[0], "sleep", 5)
