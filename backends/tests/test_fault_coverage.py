"""Every registered fault has a qtest meta-test that proves a scenario catches it.

A meta-test is a ``test_*`` function in ``qtests/test_*.py`` whose source (decorators
included) starts a backend with the fault (the quoted name next to a ``faults...=`` argument or
``--fault``, directly or through its parametrisation) and expects a specific failure:
``pytest.raises(AssertionError, match=...)``. A fault without one fails ``make check``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from backends.vdpa.faults import FAULTS

QTESTS = Path(__file__).resolve().parents[2] / "qtests"
RAISES = re.compile(r"pytest\.raises\(\s*AssertionError,\s*match=")
STARTS_WITH_FAULT = re.compile(r"\bfaults\w*\s*=|--fault\b")


def meta_tests() -> dict[str, str]:
    """``file::test`` -> source of the test functions that expect an AssertionError with a
    message from a backend started with faults."""
    found: dict[str, str] = {}
    for path in sorted(QTESTS.glob("test_*.py")):
        text = path.read_text()
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            src = "\n".join(text.splitlines()[start - 1 : node.end_lineno])
            if RAISES.search(src) and STARTS_WITH_FAULT.search(src):
                found[f"{path.name}::{node.name}"] = src
    return found


def test_meta_tests_are_found() -> None:
    found = meta_tests()
    assert len(found) >= 10, sorted(found)
    assert "test_datapath.py::test_tx_scenario_catches_drop_tx" in found


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_every_fault_has_a_meta_test(name: str) -> None:
    users = [test for test, src in meta_tests().items() if f'"{name}"' in src]
    assert users, (
        f"fault {name!r} has no meta-test in qtests/test_*.py: add a test that starts the "
        f'backend with faults=["{name}"] and expects pytest.raises(AssertionError, match=...)'
    )


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_every_fault_description_names_the_suite_that_catches_it(name: str) -> None:
    assert re.search(r"Caught by the [\w /-]+ suites?", FAULTS[name]), FAULTS[name]
