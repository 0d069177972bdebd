"""Debian version ordering (deb-version(7)), so "newest" means what dpkg means.

`[epoch:]upstream[-revision]`; each part compared by alternating non-digit runs (where '~'
sorts before everything, even the end of the string, and letters before other characters)
and numeric runs.
"""

from __future__ import annotations

import functools
import re

_PARTS = re.compile(r"(\D*)(\d*)")


def _char_order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    pa = [m for m in _PARTS.findall(a) if m != ("", "")]
    pb = [m for m in _PARTS.findall(b) if m != ("", "")]
    for i in range(max(len(pa), len(pb))):
        sa, na = pa[i] if i < len(pa) else ("", "")
        sb, nb = pb[i] if i < len(pb) else ("", "")
        for j in range(max(len(sa), len(sb))):
            ca = _char_order(sa[j]) if j < len(sa) else 0
            cb = _char_order(sb[j]) if j < len(sb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        ia, ib = int(na or 0), int(nb or 0)
        if ia != ib:
            return -1 if ia < ib else 1
    return 0


def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as `dpkg --compare-versions a lt|eq|gt b`."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


sort_key = functools.cmp_to_key(compare)
