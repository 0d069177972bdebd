"""The command prompt of the session (``cmd.Cmd``, readline when interactive).

Every command reports failure as one ``error: ...`` line and the session carries on; the
number of failed commands is kept (``--batch`` exits 1 if any failed).
"""

from __future__ import annotations

import cmd
import json
import logging
import os
import shlex
import sys
from typing import IO, Any

from qtests.qos.frames import mac_bytes, make_frame
from qtests.qos.machine import parse_size
from qtests.qos.qmp import QmpError
from qtests.qos.waiting import WaitTimeout
from qtests.shell import render
from qtests.shell.session import GUEST_MAC, Session, SessionError
from qtests.shell.terminal import attach

log = logging.getLogger(__name__)
PROMPT = "(vdpa) "
JOURNAL_LIMIT = 200

#: name -> (arguments, one line of help), in the order `help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "qemu": ("COMMAND [JSON | key=value ...]", "raw QMP command to QEMU"),
    "hmp": ("COMMAND LINE", "human monitor command to QEMU (e.g. 'hmp info mtree')"),
    "backend": ("COMMAND [JSON | key=value ...]", "raw command to the backend monitor"),
    "mem-table": ("", "the backend's memory table (regions QEMU shared)"),
    "iotlb": ("", "the backend's IOTLB mappings"),
    "vrings": ("", "per-virtqueue state and counters in the backend"),
    "mark": ("", "remember the backend journal's position (journal shows what follows)"),
    "journal": ("[KIND ...]", "journal entries since the mark (KIND exact or prefix 'vq.')"),
    "inject": ("[SIZE | HEX] [queue=N]", "deliver a frame to the guest through the backend"),
    "faults": ("", "known faults, '*' = active"),
    "fault-set": ("NAME", "activate a backend fault"),
    "fault-clear": ("NAME", "clear a backend fault"),
    "dimm-add": ("[SIZE]", "hotplug a DIMM (memfd share=on + pc-dimm; default 128M)"),
    "dimm-del": ("ID", "unplug a DIMM (a real guest must release it)"),
    "dimms": ("", "memory devices QEMU reports"),
    "migrate": ("", "live-migrate to a new QEMU + backend and continue there"),
    "console": ("", "attach to the guest serial console (Ctrl-] leaves; real guest only)"),
    "guest": ("COMMAND", "run a shell command in the guest, show its output (real guest only)"),
    "events": ("", "QMP events QEMU and the backend monitor sent since the last look"),
    "endpoints": ("", "sockets to reach QEMU, the backend and the console from elsewhere"),
    "help": ("[COMMAND]", "this list"),
    "quit": ("", "stop QEMU and the backend and leave (also Ctrl-D)"),
}


def parse_arguments(words: list[str]) -> dict[str, Any]:
    """``{"a": 1}`` or ``a=1 b=x`` (values are JSON when they parse, else strings)."""
    text = " ".join(words).strip()
    if not text:
        return {}
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object")
        return value
    args: dict[str, Any] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep:
            raise ValueError(f"{word!r}: expected key=value or a JSON object")
        try:
            args[key] = json.loads(raw)
        except json.JSONDecodeError:
            args[key] = raw
    return args


class SessionShell(cmd.Cmd):
    prompt = PROMPT
    identchars = cmd.Cmd.identchars + "-"

    def __init__(
        self, session: Session, stdin: IO[str] | None = None, stdout: IO[str] | None = None
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.session = session
        self.interactive = stdin is None and sys.stdin.isatty()
        self.use_rawinput = stdin is None
        if not self.interactive:
            self.prompt = ""  # precmd writes the transcript line instead
        self.failures = 0
        self.mark_seq: int | None = None
        self.frames_sent = 0

    # -- plumbing --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def fail(self, text: str) -> None:
        self.failures += 1
        self.say(f"error: {text}")

    def parseline(self, line: str) -> tuple[str | None, str | None, str]:
        command, arg, line = super().parseline(line)
        return (command.replace("-", "_") if command else command), arg, line

    def precmd(self, line: str) -> str:
        if not self.interactive and line.strip() and line != "EOF":
            self.say(f"{PROMPT}{line.rstrip()}")  # a transcript of what ran
        return line

    def onecmd(self, line: str) -> bool:
        try:
            return bool(super().onecmd(line))
        except (SessionError, QmpError, WaitTimeout, ValueError) as exc:
            self.fail(str(exc) or type(exc).__name__)
        except Exception as exc:  # a failed command must not end the session: report it
            log.exception("command %r failed", line)
            self.fail(f"{type(exc).__name__}: {exc}")
        return False

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> None:
        self.fail(f"unknown command {line.split()[0]!r} (help lists them)")

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [name for name in COMMANDS if name.startswith(text)]

    # -- monitors --------------------------------------------------------------------------
    def _raw(self, target: str, arg: str) -> None:
        words = shlex.split(arg)
        if not words:
            raise ValueError(f"usage: {target} {COMMANDS[target][0]}")
        args = parse_arguments(words[1:])
        if target == "qemu":
            answer = self.session.qmp.command(words[0], args)
        else:
            answer = self.session.backend.cmd(words[0], **args)
        self.say(render.pretty(answer))

    def do_qemu(self, arg: str) -> None:
        self._raw("qemu", arg)

    def do_backend(self, arg: str) -> None:
        self._raw("backend", arg)

    def do_hmp(self, arg: str) -> None:
        self.say(self.session.qmp.hmp(arg).rstrip("\n"))

    def do_events(self, arg: str) -> None:
        for who, client in (("qemu", self.session.qmp), ("backend", self.session.backend.qmp)):
            for ev in client.get_events():
                self.say(render.event_line(who, ev))

    # -- backend state ---------------------------------------------------------------------
    def do_mem_table(self, arg: str) -> None:
        self.say(render.mem_table(self.session.mem_table()))

    def do_iotlb(self, arg: str) -> None:
        self.say(render.iotlb(self.session.backend.cmd("query-iotlb")))

    def do_vrings(self, arg: str) -> None:
        self.say(render.vrings(self.session.backend.cmd("query-vrings")))

    def do_mark(self, arg: str) -> None:
        self.mark_seq = self.session.backend.mark()
        self.say(f"mark: journal seq {self.mark_seq}")

    def do_journal(self, arg: str) -> None:
        kinds = shlex.split(arg) or None
        entries = self.session.backend.journal(kinds, self.mark_seq)
        since = "the start" if self.mark_seq is None else f"mark {self.mark_seq}"
        self.say(f"journal since {since}: {len(entries)} entries")
        self.say(render.journal(entries, JOURNAL_LIMIT))

    def do_faults(self, arg: str) -> None:
        self.say(render.faults(self.session.backend.cmd("query-faults")))

    def do_fault_set(self, arg: str) -> None:
        self.session.backend.cmd("set-fault", name=arg.strip())
        self.say(f"fault {arg.strip()} active")

    def do_fault_clear(self, arg: str) -> None:
        self.session.backend.cmd("clear-fault", name=arg.strip())
        self.say(f"fault {arg.strip()} cleared")

    # -- traffic ---------------------------------------------------------------------------
    def do_inject(self, arg: str) -> None:
        queue = 0
        data: bytes | None = None
        for word in shlex.split(arg):
            if word.startswith("queue="):
                queue = int(word.split("=", 1)[1])
            elif word.isdigit() and int(word) <= 65535:
                data = self._test_frame(int(word))
            else:
                data = bytes.fromhex(word.replace(":", ""))
        if data is None:
            data = self._test_frame(64)
        answer = self.session.inject(data, queue)
        queued = "queued" if answer.get("queued") else "DROPPED (RX backlog full)"
        self.say(f"injected {answer.get('length')} bytes on queue pair {queue}: {queued}")
        if answer.get("queued"):
            seen = self.session.after_inject(queue, 5.0)
            if seen:
                self.say(seen)

    def _test_frame(self, size: int) -> bytes:
        self.frames_sent += 1
        return make_frame(self.frames_sent, size, dst=mac_bytes(GUEST_MAC))

    # -- memory hotplug --------------------------------------------------------------------
    def do_dimm_add(self, arg: str) -> None:
        size = parse_size(arg.strip()) if arg.strip() else None
        dev = self.session.dimm_add(size) if size else self.session.dimm_add()
        self.say(f"plugged {dev.id}: {render.size_text(dev.size)} at gpa {dev.addr:#x} "
                 f"(slot {dev.slot}); the backend's memory table has it")  # fmt: skip

    def do_dimm_del(self, arg: str) -> None:
        ident = arg.strip()
        if not ident:
            raise ValueError("usage: dimm-del ID (see dimms)")
        dev = self.session.dimm_del(ident)
        self.say(f"unplugged {dev.id} (gpa {dev.addr:#x}, {render.size_text(dev.size)})")

    def do_dimms(self, arg: str) -> None:
        devices = self.session.qmp.command("query-memory-devices")
        rows = [(d["data"].get("id"), d["type"], d["data"].get("slot"),
                 render.hex_or_dash(d["data"].get("addr")),
                 render.size_text(int(d["data"].get("size", 0)))) for d in devices]  # fmt: skip
        self.say(render.table(("id", "type", "slot", "addr", "size"), rows) if rows else
                 "(no memory devices)")  # fmt: skip

    # -- migration -------------------------------------------------------------------------
    def do_migrate(self, arg: str) -> None:
        before = self.session.processes()
        self.say("migrating: destination QEMU (-incoming defer) + a new backend ...")
        info = self.session.migrate()
        self.say(f"migration completed in {info.get('total-time', '?')} ms "
                 f"(downtime {info.get('downtime', '?')} ms); the session now drives the "
                 f"destination")  # fmt: skip
        self.say(f"stopped the source: {before}; now: {self.session.processes()}")
        if self.mark_seq is not None:
            self.mark_seq = None
            self.say("the mark was in the source backend's journal: journal shows it all now")
        self.do_endpoints("")

    # -- the guest -------------------------------------------------------------------------
    def do_console(self, arg: str) -> None:
        sock = self.session.console_socket()
        try:
            if not os.isatty(0):
                raise SessionError("console needs a terminal (use 'guest COMMAND' in scripts)")
            self.say("attached to the guest console; Ctrl-] to come back")
            tail = self.session.console_history()[-400:]
            why = attach(sock, prelude=tail)
            self.say(f"\r\ndetached from the guest console ({why})")
        finally:
            sock.close()

    def do_guest(self, arg: str) -> None:
        if not arg.strip():
            raise ValueError("usage: guest COMMAND")
        rc, output = self.session.guest_run(arg, 60.0)
        if output:
            self.say(output)
        if rc:
            self.fail(f"guest command exited {rc}")

    # -- session ---------------------------------------------------------------------------
    def do_endpoints(self, arg: str) -> None:
        for e in self.session.endpoints():
            self.say(f"  {e.what}: {e.path}\n      {e.how}")
        pids = ", ".join(f"{name} pid {pid}" for name, pid in self.session.processes().items())
        self.say(f"  processes: {pids}\n  logs: {self.session.log_dir}")

    def do_help(self, arg: str) -> None:
        name = arg.strip()
        if name:
            if name not in COMMANDS:
                raise ValueError(f"no command {name!r}")
            usage, text = COMMANDS[name]
            self.say(f"{name} {usage}\n  {text}")
            return
        width = max(len(f"{n} {u}") for n, (u, _) in COMMANDS.items())
        for n, (usage, text) in COMMANDS.items():
            self.say(f"  {f'{n} {usage}'.strip():<{width}}  {text}")

    def do_quit(self, arg: str) -> bool:
        return True

    do_exit = do_quit

    def do_EOF(self, arg: str) -> bool:
        if self.interactive:
            self.say("")
        return True
