"""The vhost-vdpa lab: an L1 VM with the vDPA modules, for hosts that cannot load them.

``vm``: boot L1 and run one command in it (:func:`run_in_lab`). ``host``: can this host run
the lane directly (vduse + vhost_vdpa loadable), through the lab, or not at all. ``lane``: run
the ``vdpa_lane`` tests in L1 with one inner pytest and read back each test's result.
``plugin``: the pytest plugin that turns each lane test into an ordinary host result.
"""
