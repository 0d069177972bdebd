"""QMP's wire codec: the streaming JSON splitter (QEMU's json-streamer: objects back to back
with no delimiter, single-quoted strings, lexical-error recovery) and the encoder of replies
and events (ASCII JSON + CRLF)."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_MESSAGE_BYTES = 16 << 20  # one incoming JSON value (QEMU allows 64 MiB)
MAX_NESTING = 256  # brackets + braces open at once (QEMU: 1024)

# bytes that are a lexical error anywhere: ASCII controls except \t \n \r, and 0xFE / 0xFF
_BAD = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
_TOP_LEVEL = re.compile(rb"[^ \t\r\n]")  # depth 0: the next token starts here
_NESTED = re.compile(rb"[{}\[\]\"'" + _BAD + rb"]")  # depth > 0: what changes state
_BARE_END = re.compile(rb"[ \t\r\n{}\[\]:,\"'" + _BAD + rb"]")  # end of a top-level bare token
_STRING_STOP = {
    ord('"'): re.compile(rb'["\\\x00-\x1f\xfe\xff]'),
    ord("'"): re.compile(rb"['\\\x00-\x1f\xfe\xff]"),
}
_RECOVERED = re.compile(rb"[{}\[\]:,\x00-\x08\x0a-\x1f\xfe\xff]")  # resync points after an error
_BAD_BYTE = re.compile(b"[" + _BAD + b"]")
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
_QUOTES = frozenset(b"\"'")
_STRAY = frozenset(b"}],:")
_BACKSLASH = ord("\\")
# a JSON string in either quoting style (QEMU's extension), for the single-quote rewrite
_ANY_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""", re.DOTALL)
_ESCAPE_OR_DQUOTE = re.compile(r"""\\(.)|\"""", re.DOTALL)
_WORD = re.compile(r"[A-Za-z]+")  # where a value was expected: a bad keyword


class JsonParseError(Exception):
    """One unusable input message; its text is the QMP error description."""


class JsonStreamSplitter:
    """Cuts a byte stream into JSON values the way QEMU's json-streamer does.

    A value ends when its outermost bracket closes (or, for a top-level scalar, at the next
    delimiter), not at a newline. :meth:`feed` returns the values decoded so far, each either
    a Python object or a :class:`JsonParseError` to be reported to the client.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._quote: int | None = None  # inside a string delimited by this byte
        self._escape = False  # the previous byte was a backslash inside a string
        self._bare = False  # inside a top-level token that is not a string or container
        self._recovering = False  # skipping input after a lexical error

    @property
    def pending(self) -> int:
        """Bytes of an incomplete value held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[object]:
        out: list[object] = []
        pos, n = 0, len(data)
        while pos < n:
            if self._recovering:
                m = _RECOVERED.search(data, pos)
                if m is None:
                    break
                pos = m.start()
                self._recovering = False
                if data[pos] in (0x0A, 0x0D):  # a line end: just whitespace now
                    pos += 1
                continue
            if self._escape:
                byte = data[pos]
                if byte < 0x20 or byte >= 0xFE:
                    pos = self._lexical_error(out, data, pos)
                    continue
                self._buf.append(byte)
                self._escape = False
                pos += 1
            elif self._quote is not None:
                m = _STRING_STOP[self._quote].search(data, pos)
                end = n if m is None else m.start()
                self._buf += data[pos:end]
                pos = end
                if m is None:
                    break
                byte = data[pos]
                if byte == _BACKSLASH:
                    self._buf.append(byte)
                    self._escape = True
                    pos += 1
                elif byte == self._quote:
                    self._buf.append(byte)
                    self._quote = None
                    pos += 1
                    if self._depth == 0:
                        self._emit(out)
                else:
                    pos = self._lexical_error(out, data, pos)
            elif self._bare:
                m = _BARE_END.search(data, pos)
                end = n if m is None else m.start()
                self._buf += data[pos:end]
                pos = end
                if m is None:
                    break
                self._bare = False
                self._emit(out)  # the delimiter is looked at again at depth 0
            elif self._depth == 0:
                m = _TOP_LEVEL.search(data, pos)
                if m is None:
                    break
                pos = m.start()
                byte = data[pos]
                if byte in _OPEN:
                    self._depth = 1
                    self._buf.append(byte)
                    pos += 1
                elif byte in _QUOTES:
                    self._quote = byte
                    self._buf.append(byte)
                    pos += 1
                elif byte in _STRAY:
                    self._buf.append(byte)
                    self._emit(out)
                    pos += 1
                elif byte < 0x20 or byte >= 0xFE:
                    pos = self._lexical_error(out, data, pos)
                else:
                    self._bare = True
            else:
                m = _NESTED.search(data, pos)
                end = n if m is None else m.start()
                self._buf += data[pos:end]
                pos = end
                if m is None:
                    break
                byte = data[pos]
                if byte in _QUOTES:
                    self._quote = byte
                elif byte in _OPEN:
                    self._depth += 1
                    if self._depth > MAX_NESTING:
                        out.append(JsonParseError("JSON nesting depth limit exceeded"))
                        self._reset()
                        self._recovering = True
                        pos += 1
                        continue
                elif byte in _CLOSE:
                    self._depth -= 1
                else:
                    pos = self._lexical_error(out, data, pos)
                    continue
                self._buf.append(byte)
                pos += 1
                if self._depth == 0:
                    self._emit(out)
            if len(self._buf) > MAX_MESSAGE_BYTES:
                out.append(JsonParseError(f"JSON message exceeds {MAX_MESSAGE_BYTES} bytes"))
                self._reset()
                self._recovering = True
        return out

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._quote = None
        self._escape = False
        self._bare = False

    def _lexical_error(self, out: list[object], data: bytes, pos: int) -> int:
        byte = data[pos]
        char = chr(byte) if byte < 0x80 else "\ufffd"  # as QEMU reports it
        out.append(JsonParseError(f"JSON parse error, stray '{char}'"))
        self._reset()
        self._recovering = True
        return pos + 1

    def _emit(self, out: list[object]) -> None:
        raw = bytes(self._buf)
        self._buf.clear()
        out.append(decode_json(raw))


def _reject_constant(name: str) -> object:
    raise JsonParseError(f"JSON parse error, invalid keyword '{name}'")


def _requote(match: re.Match[str]) -> str:
    """Rewrite one (possibly single-quoted) JSON string as standard double-quoted JSON."""
    text = match.group(0)
    single = text[0] == "'"

    def fix(m: re.Match[str]) -> str:
        if m.group(0) == '"':
            return '\\"'  # only reached inside single-quoted strings
        return "'" if m.group(1) == "'" else m.group(0)

    inner = _ESCAPE_OR_DQUOTE.sub(fix, text[1:-1]) if single or "\\'" in text else text[1:-1]
    return '"' + inner + '"'


def decode_json(raw: bytes) -> object:
    """Decode one complete JSON value as QEMU does; a JsonParseError object if it is bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return JsonParseError("JSON parse error, invalid UTF-8 sequence")
    if "'" in text:
        text = _ANY_STRING.sub(_requote, text)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except JsonParseError as exc:
        return exc
    except json.JSONDecodeError as exc:
        word = _WORD.match(text, exc.pos) if exc.msg == "Expecting value" else None
        if word is not None:
            return JsonParseError(f"JSON parse error, invalid keyword '{word.group(0)}'")
        return JsonParseError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}")
    except (ValueError, RecursionError) as exc:
        return JsonParseError(f"JSON parse error, {exc}")


def _json_default(obj: object) -> object:
    """Last-resort serialisation so a reply can never fail to encode."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def encode_message(msg: dict[str, Any]) -> bytes:
    """One server message: ASCII JSON + CRLF, as QEMU's monitor writes it."""
    return json.dumps(msg, default=_json_default, allow_nan=False).encode("ascii") + b"\r\n"
