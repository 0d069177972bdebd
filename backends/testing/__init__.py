"""Peers for driving the backend without QEMU: a vhost-user front-end in Python, the backend
as a subprocess or in-process thread, its monitor client. Library code shared by the tests,
the fuzzers (``qtests/fuzz``) and the benchmarks."""
