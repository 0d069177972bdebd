"""A second QEMU binary for tests of the QEMU choice: a shell script that appends its command
line to a record file, then execs the real QEMU. A part that honours ``$QTEST_QEMU_BINARY`` (or
``--qemu``) leaves its QEMU runs in the record; one that picks QEMU another way leaves none.

Used by ``qtests/test_qemu_binary.py`` and ``avocado_tests/unit/test_plain_avocado.py``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

#: environment variables that choose QEMU (a test's child gets none of them unless it says so)
QEMU_ENV_VARS = ("QTEST_QEMU_BINARY", "QEMU_TEST_QEMU_BINARY", "QOS_QEMU_BINARY")


@dataclass(frozen=True)
class RecordingQemu:
    path: Path  # the wrapper script
    record: Path  # one line per run: its arguments
    real: str  # the QEMU it runs

    @classmethod
    def create(cls, directory: Path, real: str) -> RecordingQemu:
        directory.mkdir(parents=True, exist_ok=True)
        record = directory / "qemu-runs.txt"
        path = directory / "qemu-system-x86_64-recording"
        path.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" >> {shlex.quote(str(record))}\n'
            f'exec {shlex.quote(real)} "$@"\n'
        )
        path.chmod(0o755)
        return cls(path, record, real)

    def runs(self) -> list[str]:
        """Every run's arguments, probes (``--version``, ``-accel help``) included."""
        try:
            return self.record.read_text().splitlines()
        except FileNotFoundError:
            return []

    def machines(self) -> list[str]:
        """The runs that were machines: a qtest machine (``-qtest``) or a guest (``-kernel``)."""
        return [r for r in self.runs() if " -qtest " in f" {r} " or " -kernel " in f" {r} "]
