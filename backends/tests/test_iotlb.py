"""IOTLB: interval map semantics, batches, set_map diffs, journal, faults, and a page-set
oracle under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backends.vdpa.faults import Faults
from backends.vdpa.iotlb import IOTLB, Perm, TranslationError
from backends.vdpa.journal import Journal
from backends.vdpa.memory import Access

R, W, RW = Access.READ, Access.WRITE, Access.READ | Access.WRITE


def make(*faults: str) -> tuple[IOTLB, Journal]:
    j = Journal()
    return IOTLB(j, Faults(faults, journal=j)), j


def test_translate_single_and_spanning_adjacent_mappings() -> None:
    t, _ = make()
    t.dma_map(0x1000, 0x1000, 0xA000, Perm.RW)
    t.dma_map(0x2000, 0x2000, 0x5000, Perm.RW)
    assert t.translate(0x1800, 0x10, R) == [(0xA800, 0x10)]
    assert t.translate(0x1800, 0x1000, W) == [(0xA800, 0x800), (0x5000, 0x800)]
    assert t.translate(0x1000, 0x3000, R) == [(0xA000, 0x1000), (0x5000, 0x2000)]
    assert t.translate(0x1000, 0, R) == []


@pytest.mark.parametrize(
    ("iova", "length", "access", "kind", "addr"),
    [
        (0x0, 0x10, R, "unmapped", 0x0),
        (0x0FF0, 0x20, R, "unmapped", 0x0FF0),  # starts unmapped, even if the rest is mapped
        (0x1FF0, 0x20, R, "partial", 0x2000),  # hole after the first mapping
        (0x1000, 0x3000, R, "partial", 0x2000),
        (0x3000, 0x10, W, "perm", 0x3000),  # RO mapping written
        (0x1FF0, 0x2020, W, "partial", 0x2000),  # hole comes before the RO part
        (0x4000, 0x10, R, "perm", 0x4000),  # WO mapping read
        (0x3FF8, 0x10, R, "perm", 0x4000),  # RO ok, then WO refuses a read
    ],
)
def test_translate_errors(iova: int, length: int, access: Access, kind: str, addr: int) -> None:
    t, _ = make()
    t.dma_map(0x1000, 0x1000, 0xA000, Perm.RW)
    t.dma_map(0x3000, 0x1000, 0xB000, Perm.RO)
    t.dma_map(0x4000, 0x1000, 0xC000, Perm.WO)
    with pytest.raises(TranslationError) as ei:
        t.translate(iova, length, access)
    assert ei.value.kind == kind
    assert ei.value.addr == addr
    assert ei.value.addr + ei.value.length == iova + length
    assert ei.value.access == access


def test_perm_none_refuses_everything() -> None:
    t, _ = make()
    t.dma_map(0, 0x1000, 0x1000, Perm.NONE)
    for a in (R, W):
        with pytest.raises(TranslationError, match="perm"):
            t.translate(0, 1, a)


def test_unmap_splits_into_new_mapping_objects() -> None:
    t, j = make()
    m = t.dma_map(0x1000, 0x4000, 0x10000, Perm.RO)
    mark = j.mark()
    removed = t.dma_unmap(0x2000, 0x1000)
    assert removed == [m]
    left, right = t.entries()
    assert left is not m and right is not m
    assert (left.iova, left.size, left.uaddr, left.perm) == (0x1000, 0x1000, 0x10000, Perm.RO)
    assert (right.iova, right.size, right.uaddr, right.perm) == (0x3000, 0x2000, 0x12000, Perm.RO)
    assert len({m.id, left.id, right.id}) == 3
    (e,) = j.query(["dma.unmap"], since=mark)
    assert e["ids"] == [m.id] and e["iova"] == 0x2000 and e["size"] == 0x1000
    assert sorted(e["split"]) == sorted([left.id, right.id])
    with pytest.raises(TranslationError):
        t.translate(0x2000, 1, R)


def test_unmap_across_several_and_nothing() -> None:
    t, _ = make()
    a = t.dma_map(0x0, 0x1000, 0x10000, Perm.RW)
    b = t.dma_map(0x1000, 0x1000, 0x20000, Perm.RW)
    c = t.dma_map(0x3000, 0x1000, 0x30000, Perm.RW)
    g = t.generation
    assert t.dma_unmap(0x8000, 0x1000) == []
    assert t.generation == g
    assert t.dma_unmap(0x800, 0x3000) == [a, b, c]
    assert [(m.iova, m.size, m.uaddr) for m in t.entries()] == [
        (0x0, 0x800, 0x10000),
        (0x3800, 0x800, 0x30800),
    ]
    assert t.generation == g + 1


def test_map_replaces_overlaps() -> None:
    t, j = make()
    a = t.dma_map(0x0, 0x3000, 0x10000, Perm.RW)
    b = t.dma_map(0x1000, 0x1000, 0x90000, Perm.RO)
    assert [m.iova for m in t.entries()] == [0x0, 0x1000, 0x2000]
    assert t.entries()[1] is b
    assert t.translate(0x0, 0x3000, R) == [(0x10000, 0x1000), (0x90000, 0x1000), (0x12000, 0x1000)]
    e = j.query(["dma.map"])[-1]
    assert e["id"] == b.id and e["replaced"] == [a.id] and e["perm"] == int(Perm.RO)
    assert e["uaddr"] == 0x90000 and e["size"] == 0x1000


def test_bad_ranges_raise_and_journal() -> None:
    t, j = make()
    for args in [(0, 0, 0, Perm.RW), (-1, 1, 0, Perm.RW), ((1 << 64) - 1, 2, 0, Perm.RW)]:
        with pytest.raises(ValueError):
            t.dma_map(*args)
    with pytest.raises(ValueError):
        t.dma_map(0, 1, 0, 7)
    with pytest.raises(ValueError):
        t.dma_unmap(0, 0)
    assert len(j.query(["error.dma"])) == 5
    assert t.entries() == []


def test_batch_is_invisible_until_commit() -> None:
    t, j = make()
    old = t.dma_map(0x0, 0x1000, 0x10000, Perm.RW)
    g = t.generation
    t.batch_begin()
    t.dma_unmap(0x0, 0x1000)
    t.dma_map(0x1000, 0x1000, 0x20000, Perm.RW)
    assert t.in_batch
    assert t.translate(0x0, 0x10, R) == [(0x10000, 0x10)]
    with pytest.raises(TranslationError):
        t.translate(0x1000, 0x10, R)
    assert t.entries() == [old]
    assert [m.iova for m in t.pending_entries() or []] == [0x1000]
    assert t.generation == g
    t.batch_commit()
    assert t.generation == g + 1
    assert t.translate(0x1000, 0x10, R) == [(0x20000, 0x10)]
    with pytest.raises(TranslationError):
        t.translate(0x0, 0x10, R)
    kinds = [e["kind"] for e in j.query(["dma."])]
    assert kinds[-4:] == ["dma.batch_begin", "dma.unmap", "dma.map", "dma.batch_commit"]
    assert j.query(["dma.batch_commit"])[-1]["changes"] == 2


def test_nested_batch_and_stray_commit_are_journalled_errors() -> None:
    t, j = make()
    t.batch_begin()
    t.dma_map(0x0, 0x1000, 0x10000, Perm.RW)
    t.batch_begin()  # nested: ignored, the batch goes on
    assert t.entries() == []
    t.batch_commit()
    assert len(t.entries()) == 1
    t.batch_commit()  # nothing open
    errs = j.query(["error.dma"])
    assert [e["op"] for e in errs] == ["batch_begin", "batch_commit"]


def test_empty_batch_does_not_bump_generation() -> None:
    t, _ = make()
    g = t.generation
    t.batch_begin()
    t.batch_commit()
    assert t.generation == g


def hundred() -> list[tuple[int, int, int, int]]:
    return [
        (i * 0x10000, 0x10000, 0x7F00_0000_0000 + i * 0x20000, int(Perm.RW)) for i in range(100)
    ]


def test_set_map_adding_one_region_applies_one_map_and_keeps_identity() -> None:
    t, j = make()
    first = t.set_map(hundred())
    assert len(first.added) == 100 and not first.removed and not first.kept
    before = t.entries()
    mark = j.mark()
    g = t.generation
    new_entry = (100 * 0x10000, 0x8000, 0x7F10_0000_0000, int(Perm.RW))
    diff = t.set_map([*hundred(), new_entry])
    assert len(diff.added) == 1 and diff.removed == [] and len(diff.kept) == 100
    assert diff.added[0].key() == new_entry
    after = t.entries()
    assert len(after) == 101
    for old, new in zip(before, after[:100], strict=True):
        assert old is new
    assert all(any(k is b for b in before) for k in diff.kept)
    maps = j.query(["dma.map"], since=mark)
    unmaps = j.query(["dma.unmap"], since=mark)
    assert len(maps) == 1 and maps[0]["id"] == diff.added[0].id
    assert unmaps == []
    (summary,) = j.query(["dma.set_map"], since=mark)
    assert (summary["added"], summary["removed"], summary["kept"]) == (1, 0, 100)
    assert t.generation == g + 1


def test_set_map_changed_entry_is_remove_plus_add_and_same_map_is_noop() -> None:
    t, j = make()
    t.set_map(hundred())
    before = t.entries()
    entries = hundred()
    entries[5] = (entries[5][0], entries[5][1], entries[5][2] + 0x1000, entries[5][3])
    entries[7] = (entries[7][0], entries[7][1], entries[7][2], int(Perm.RO))
    del entries[9]
    mark = j.mark()
    diff = t.set_map(entries)
    assert sorted(m.iova for m in diff.removed) == [5 * 0x10000, 7 * 0x10000, 9 * 0x10000]
    assert sorted(m.iova for m in diff.added) == [5 * 0x10000, 7 * 0x10000]
    assert len(diff.kept) == 97
    assert {id(m) for m in diff.removed} <= {id(m) for m in before}
    assert len(j.query(["dma.unmap"], since=mark)) == 3
    assert len(j.query(["dma.map"], since=mark)) == 2
    kinds = [e["kind"] for e in j.query(["dma."], since=mark)]
    assert kinds.index("dma.map") > max(i for i, k in enumerate(kinds) if k == "dma.unmap")
    g = t.generation
    again = t.set_map(entries)
    assert not again.added and not again.removed and len(again.kept) == 99
    assert t.generation == g


def test_set_map_rejects_overlaps_and_keeps_the_old_map() -> None:
    t, j = make()
    t.set_map(hundred())
    before = t.entries()
    with pytest.raises(ValueError, match="overlap"):
        t.set_map([(0, 0x2000, 0, 3), (0x1000, 0x1000, 0, 3)])
    assert t.entries() == before
    assert j.query(["error.dma"])[-1]["op"] == "set_map"


def test_set_map_inside_batch_is_deferred() -> None:
    t, _ = make()
    t.dma_map(0, 0x1000, 0x5000, Perm.RW)
    t.batch_begin()
    t.set_map([(0x1000, 0x1000, 0x6000, 3)])
    assert t.translate(0, 1, R) == [(0x5000, 1)]
    t.batch_commit()
    assert t.translate(0x1000, 1, R) == [(0x6000, 1)]


def test_fault_remap_all_recreates_every_mapping() -> None:
    t, j = make("remap-all")
    t.set_map(hundred())
    before = t.entries()
    mark = j.mark()
    t.set_map([*hundred(), (100 * 0x10000, 0x1000, 0x1000, 3)])
    after = t.entries()
    assert len(after) == 101
    assert not any(a is b for a, b in zip(before, after, strict=False))
    assert {m.id for m in before}.isdisjoint(m.id for m in after)
    assert len(j.query(["dma.unmap"], since=mark)) == 101  # every entry, the new one too
    assert [m.key() for m in after[:100]] == [m.key() for m in before]
    # translation itself is still right
    assert t.translate(0x10000, 4, R) == [(0x7F00_0000_0000 + 0x20000, 4)]
    # and plain map / unmap / commit remap too
    ids = {m.id for m in t.entries()}
    t.dma_unmap(100 * 0x10000, 0x1000)
    assert ids.isdisjoint(m.id for m in t.entries())


def test_fault_stale_iotlb_keeps_translating_after_unmap() -> None:
    t, j = make("stale-iotlb")
    m = t.dma_map(0x0, 0x2000, 0x10000, Perm.RW)
    g = t.generation
    removed = t.dma_unmap(0x0, 0x1000)
    assert removed == [m]
    (e,) = j.query(["dma.unmap"])
    assert e["ids"] == [m.id]
    assert t.translate(0x0, 0x10, R) == [(0x10000, 0x10)]  # stale!
    assert t.generation == g
    t.faults.clear("stale-iotlb")  # type: ignore[union-attr]
    t.dma_unmap(0x0, 0x1000)
    with pytest.raises(TranslationError):
        t.translate(0x0, 0x10, R)


def test_hundred_thousand_entries() -> None:
    t, j = make()
    n = 100_000
    entries = [(i * 0x1000, 0x1000, 0x10_0000_0000 + i * 0x1000, 3) for i in range(n)]
    t.set_map(entries)
    for i in range(0, n, 97):
        assert t.translate(i * 0x1000 + 8, 0x2000, R)[0] == (0x10_0000_0000 + i * 0x1000 + 8, 0xFF8)
    t.dma_map(5 * 0x1000, 0x1000, 0x1234000, Perm.RO)
    t.dma_unmap(50_000 * 0x1000, 0x800)
    diff = t.set_map([*entries[:99_999], (n * 0x1000, 0x1000, 0, 3)])
    assert len(diff.kept) >= 99_997
    assert len(j) <= j.capacity


# -- the oracle ----------------------------------------------------------------------------
PAGE = 0x1000
NPAGES = 24
perms = st.sampled_from([Perm.NONE, Perm.RO, Perm.WO, Perm.RW])


def oracle_translate(pages: dict[int, tuple[int, Perm]], iova: int, length: int, access: Access):
    """Page-walk reference: ('ok', merged runs) or ('err', kind, addr)."""
    end = iova + length
    pos = iova
    runs: list[list[int]] = []
    while pos < end:
        page = pos // PAGE
        if page not in pages:
            return ("err", "unmapped" if pos == iova else "partial", pos)
        upage, perm = pages[page]
        if int(access) & ~int(perm):
            return ("err", "perm", pos)
        take = min(end, (page + 1) * PAGE) - pos
        u = upage * PAGE + pos % PAGE
        if runs and runs[-1][0] + runs[-1][1] == u:
            runs[-1][1] += take
        else:
            runs.append([u, take])
        pos += take
    return ("ok", [tuple(r) for r in runs])


def merged(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for u, n in pieces:
        if runs and runs[-1][0] + runs[-1][1] == u:
            runs[-1][1] += n
        else:
            runs.append([u, n])
    return [tuple(r) for r in runs]  # type: ignore[misc]


class IotlbOracle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t, self.j = make()
        self.committed: dict[int, tuple[int, Perm]] = {}
        self.pending: dict[int, tuple[int, Perm]] | None = None

    def target(self) -> dict[int, tuple[int, Perm]]:
        return self.pending if self.pending is not None else self.committed

    @rule(start=st.integers(0, NPAGES - 1), n=st.integers(1, 6), u=st.integers(0, 200), p=perms)
    def dma_map(self, start: int, n: int, u: int, p: Perm) -> None:
        n = min(n, NPAGES - start)
        self.t.dma_map(start * PAGE, n * PAGE, u * PAGE, p)
        tgt = self.target()
        for k in range(n):
            tgt[start + k] = (u + k, p)

    @rule(start=st.integers(0, NPAGES - 1), n=st.integers(1, 8))
    def dma_unmap(self, start: int, n: int) -> None:
        self.t.dma_unmap(start * PAGE, n * PAGE)
        tgt = self.target()
        for k in range(n):
            tgt.pop(start + k, None)

    @precondition(lambda self: self.pending is None)
    @rule()
    def batch_begin(self) -> None:
        self.t.batch_begin()
        self.pending = dict(self.committed)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def batch_commit(self) -> None:
        self.t.batch_commit()
        assert self.pending is not None
        self.committed = self.pending
        self.pending = None

    @rule(
        cuts=st.lists(st.integers(1, NPAGES - 1), max_size=8, unique=True),
        keep=st.lists(st.booleans(), min_size=9, max_size=9),
        u=st.lists(st.integers(0, 200), min_size=9, max_size=9),
        p=st.lists(perms, min_size=9, max_size=9),
        reuse=st.booleans(),
    )
    def set_map(
        self, cuts: list[int], keep: list[bool], u: list[int], p: list[Perm], reuse: bool
    ) -> None:
        src = self.t.entries() if self.pending is None else (self.t.pending_entries() or [])
        entries: list[tuple[int, int, int, int]] = []
        pages: dict[int, tuple[int, Perm]] = {}
        if reuse:  # keep some current entries verbatim: they must keep their identity
            for k, m in enumerate(src):
                if keep[k % 9]:
                    entries.append(m.key())
                    for q in range(m.size // PAGE):
                        pages[m.iova // PAGE + q] = (m.uaddr // PAGE + q, m.perm)
        bounds = [0, *sorted(cuts), NPAGES]
        for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if not keep[i] or any(q in pages for q in range(a, b)):
                continue
            entries.append((a * PAGE, (b - a) * PAGE, u[i] * PAGE, int(p[i])))
            for q in range(b - a):
                pages[a + q] = (u[i] + q, p[i])
        before = {m.key(): m for m in src}
        diff = self.t.set_map(entries)
        for m in diff.kept:
            assert before[m.key()] is m
        assert not any(m.key() in before for m in diff.added)
        if self.pending is not None:
            self.pending = pages
        else:
            self.committed = pages

    @rule(
        off=st.integers(0, NPAGES * PAGE - 1),
        length=st.integers(1, 5 * PAGE),
        access=st.sampled_from([R, W, RW]),
    )
    def translate(self, off: int, length: int, access: Access) -> None:
        want = oracle_translate(self.committed, off, length, access)
        try:
            got = self.t.translate(off, length, access)
        except TranslationError as e:
            assert want == ("err", e.kind, e.addr), (want, e)
            return
        assert want[0] == "ok", want
        assert sum(n for _, n in got) == length
        assert merged(got) == want[1]

    @invariant()
    def entries_match_committed(self) -> None:
        ents = self.t.entries()
        for a, b in zip(ents, ents[1:], strict=False):
            assert a.iova + a.size <= b.iova
        pages = {}
        for m in ents:
            assert m.size > 0 and m.size % PAGE == 0
            for k in range(m.size // PAGE):
                pages[m.iova // PAGE + k] = (m.uaddr // PAGE + k, m.perm)
        assert pages == self.committed


IotlbOracle.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIotlbOracle = IotlbOracle.TestCase
