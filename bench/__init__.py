"""Benchmarks: how fast the backend and the test suite are, side by side with a C peer.

``python -m bench`` (``make bench``) measures and writes ``bench/results/report.json`` (a flat
object: one key per figure, ``null`` with a reason in ``notes`` when a figure could not be
taken) plus PNG plots. One module per concept:

* :mod:`bench.datapath` - packets/s through our backend driven by DPDK's virtio-user PMD in
  ``dpdk-testpmd``, and the same testpmd against DPDK's own vhost PMD (the reference);
* :mod:`bench.mapdiff` - ADD_MEM_REG / REM_MEM_REG vs a full SET_MEM_TABLE / set_map;
* :mod:`bench.iotlb` - IOTLB lookups/s and the MISS round trip;
* :mod:`bench.migration` - migration downtime and GET_VRING_BASE latency;
* :mod:`bench.suite` - wall time of the qtest suite and the avocado CI subset;
* :mod:`bench.dpdk` (testpmd install + runs), :mod:`bench.backend` (our backend as a
  benchmark process), :mod:`bench.genwire` (a frame generator wire), :mod:`bench.procs`,
  :mod:`bench.timing`, :mod:`bench.report`, :mod:`bench.plots`, :mod:`bench.profile`.
"""
