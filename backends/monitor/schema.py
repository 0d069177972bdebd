"""The monitor's command schema: what a command is, its arguments and their types, checked the
way QEMU's QAPI input visitor does (same error wording: "Parameter 'x' is missing", "Invalid
parameter type for 'x', expected: integer", "Parameter 'x' is unexpected")."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CAPABILITIES_COMMAND = "qmp_capabilities"
U64_MAX = (1 << 64) - 1


class CommandError(Exception):
    """A command failed; ``error_class`` / ``desc`` go into the QMP error reply."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# -- argument schema ----------------------------------------------------------------------------
class ArgType(enum.Enum):
    STR = "string"
    BOOL = "boolean"
    UINT = "integer"  # 0 .. 2**64-1
    STR_LIST = "array"


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: ArgType
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    handler: Callable[[dict[str, Any]], object]
    args: tuple[Arg, ...] = ()
    help: str = ""


def _check_value(name: str, kind: ArgType, value: object) -> None:
    def bad(expected: str) -> CommandError:
        return CommandError(f"Invalid parameter type for '{name}', expected: {expected}")

    if kind is ArgType.STR:
        if not isinstance(value, str):
            raise bad("string")
    elif kind is ArgType.BOOL:
        if not isinstance(value, bool):
            raise bad("boolean")
    elif kind is ArgType.UINT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("integer")
        if not 0 <= value <= U64_MAX:
            raise CommandError(f"Parameter '{name}' expects uint64")
    elif kind is ArgType.STR_LIST:
        if not isinstance(value, list):
            raise bad("array")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise CommandError(f"Invalid parameter type for '{name}[{i}]', expected: string")


def check_arguments(args: tuple[Arg, ...], arguments: dict[str, Any]) -> None:
    """Raise CommandError as QAPI would for missing, mistyped or unexpected arguments."""
    for arg in args:
        if arg.name in arguments:
            _check_value(arg.name, arg.type, arguments[arg.name])
        elif not arg.optional:
            raise CommandError(f"Parameter '{arg.name}' is missing")
    known = {a.name for a in args}
    for key in arguments:
        if key not in known:
            raise CommandError(f"Parameter '{key}' is unexpected")
