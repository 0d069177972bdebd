"""The test front-end moved to :mod:`backends.testing.frontend` (library code: the fuzzers use
it too); this name stays for the tests that import it."""

from backends.testing.frontend import *  # noqa: F403
