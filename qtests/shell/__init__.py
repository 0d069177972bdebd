"""Interactive QMP debugging session: QEMU + the backend (+ a real guest), every monitor at hand.

``make shell`` / ``vdpa-shell`` / ``python -m qtests.shell [--qtest] [--batch FILE]``.

Modules: `cli` (arguments, start, clean-up), `prompt` (the commands), `session` (what both
kinds share), `guest_session` (real guest), `qtest_session` (qtest machine), `console_relay`
(the guest console shared between the shell and other terminals), `terminal` (attaching the
user's terminal), `render` (tables).
"""

from qtests.shell.cli import main

__all__ = ["main"]
