"""Shared by every pytest suite of the checkout (``make check`` runs them in one session).

Each test's log directory goes into the junit XML report (``make check`` and CI write
``test-logs/junit.xml``) as a ``<property>`` of its ``<testcase>``: ``log_dir`` (the qtest
suites' per-test ``test-logs/<test id>/``) and ``tmp_path`` (where unit tests keep a backend
process's log, journal, stdout and stderr).
"""

from __future__ import annotations

import pytest

#: fixtures whose value is a test's log directory, recorded under the fixture's name
LOG_DIR_FIXTURES = ("log_dir", "tmp_path")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Before the fixtures go: the teardown report carries ``item.user_properties`` into the
    junit report, also when the test or its set-up failed."""
    funcargs = getattr(item, "funcargs", None) or {}
    for name in LOG_DIR_FIXTURES:
        value = funcargs.get(name)
        if value is not None and (name, str(value)) not in item.user_properties:
            item.user_properties.append((name, str(value)))
