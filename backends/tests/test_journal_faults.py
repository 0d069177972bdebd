"""Journal (ordering, queries, bound, JSON safety, subscribers) and the fault registry."""

from __future__ import annotations

import enum
import json

import pytest

from backends.vdpa.faults import FAULTS, Faults
from backends.vdpa.iotlb import Perm
from backends.vdpa.journal import Journal

REQUIRED = {
    "stale-iotlb",
    "remap-all",
    "vring-base-off-by-one",
    "skip-dirty-log",
    "drop-tx",
    "translate-by-gpa",
    "no-miss",
    "no-drain-before-base",
}


def test_record_and_query() -> None:
    j = Journal()
    assert j.mark() == 0
    a = j.record("dma.map", iova=1)
    j.record("dma.unmap", iova=1)
    j.record("dmaX.other")
    j.record("vq.start", vq=0)
    assert a["seq"] == 1 and a["kind"] == "dma.map" and a["iova"] == 1 and a["ts_ns"] > 0
    assert [e["kind"] for e in j.query(["dma."])] == ["dma.map", "dma.unmap"]
    assert [e["kind"] for e in j.query(["dma.*"])] == ["dma.map", "dma.unmap"]
    assert [e["kind"] for e in j.query(["dma.unmap", "vq.start"])] == ["dma.unmap", "vq.start"]
    assert [e["seq"] for e in j.query(since=2)] == [3, 4]
    assert [e["seq"] for e in j.query(["dma."], since=1)] == [2]
    assert j.query(since=4) == [] and j.mark() == 4
    assert len(j.query()) == 4 and j.count("dma.map") == 1
    assert j.query(["dma"]) == []  # no implicit prefix without the dot


def test_bounded_and_since_after_drop() -> None:
    j = Journal(capacity=10)
    for i in range(25):
        j.record("x", i=i)
    assert len(j) == 10 and j.dropped == 15
    assert [e["i"] for e in j.query(since=20)] == [20, 21, 22, 23, 24]
    assert [e["i"] for e in j.query(since=3)] == list(range(15, 25))


def test_fields_are_json_safe() -> None:
    class Color(enum.Enum):
        RED = "r"

    j = Journal()
    e = j.record(
        "t",
        perm=Perm.RW,
        data=b"\x01\x02",
        items=(1, {2}),
        nested={"k": Perm.RO},
        c=Color.RED,
        obj=object(),
        seq=99,
    )
    json.dumps(e)
    assert e["perm"] == 3 and type(e["perm"]) is int
    assert e["data"] == "0102" and e["items"] == [1, [2]] and e["nested"] == {"k": 1}
    assert e["c"] == "RED" and e["seq"] == 1 and e["seq_"] == 99


def test_subscribers_see_entries_and_cannot_break_recording() -> None:
    j = Journal()
    seen: list[str] = []

    def bad(_: dict) -> None:
        raise RuntimeError("subscriber bug")

    j.subscribe(bad)
    j.subscribe(lambda e: seen.append(e["kind"]))
    j.record("a")
    j.unsubscribe(bad)
    j.record("b")
    assert seen == ["a", "b"] and len(j) == 2


def test_fault_registry_documents_every_required_fault() -> None:
    assert set(FAULTS) >= REQUIRED
    for name, doc in FAULTS.items():
        assert "Caught by" in doc, name


def test_faults_set_clear_active_and_journal() -> None:
    j = Journal()
    f = Faults(["no-miss"], journal=j)
    assert f.active("no-miss") and not f.active("remap-all")
    f.set("remap-all")
    assert f.names() == ["no-miss", "remap-all"]
    g = f.generation
    f.clear("no-miss")
    assert not f.active("no-miss") and f.generation == g + 1
    assert [(e["kind"], e["name"]) for e in j.query(["fault."])] == [
        ("fault.set", "no-miss"),
        ("fault.set", "remap-all"),
        ("fault.clear", "no-miss"),
    ]
    assert set(Faults.known()) == set(FAULTS)


@pytest.mark.parametrize("op", ["set", "clear", "active"])
def test_unknown_fault_names_are_refused_with_the_list(op: str) -> None:
    f = Faults()
    with pytest.raises(ValueError) as ei:
        getattr(f, op)("stale-itolb")
    for name in REQUIRED:
        assert name in str(ei.value)
    with pytest.raises(ValueError):
        Faults(["nope"])


def test_entries_carry_a_monotonic_timestamp() -> None:
    """``mono_ns`` (CLOCK_MONOTONIC, host-wide) orders entries of different processes."""
    import time

    j = Journal()
    before = time.monotonic_ns()
    a = j.record("vq.stop", vq=0, mono_ns=1)  # a colliding field name is kept aside
    b = j.record("vq.start", vq=0)
    assert before <= a["mono_ns"] <= b["mono_ns"] <= time.monotonic_ns()
    assert a["mono_ns_"] == 1
