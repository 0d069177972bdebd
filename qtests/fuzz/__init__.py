"""Fuzzers that attack the backend as a hostile peer would (issue #12).

* :mod:`qtests.fuzz.vhost_user` - a hostile vhost-user front-end (hypothesis stateful testing)
  against the real ``python -m backends`` over its socket.
* :mod:`qtests.fuzz.descriptors` - hostile descriptor tables (split and packed) written by the
  qtest driver into real QEMU's guest memory, processed by the real backend.
* :mod:`qtests.fuzz.target` - the process under test: liveness probe, fd and RSS sampling.

``python -m qtests.fuzz`` (``make fuzz``) runs them; a bounded slice of each runs in
``make check`` (qtests/test_fuzz.py).
"""
