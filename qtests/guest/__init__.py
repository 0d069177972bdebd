"""Library for suites that boot a real Linux guest (the avocado suite, ``make shell``).

``vm.py`` (`GuestVM`: the QEMU command line, launch, QMP, serial console, shutdown),
``console.py`` (`GuestConsole`: pexpect on the serial socket, marker-framed commands),
``peer.py`` (`UdpPeer`: the fake host at the far end of a UDP wire) with ``frames.py`` (its
frame layouts) and ``pcap.py`` (its pcap log), ``ports.py`` (free UDP ports).
The qtest driver (no guest OS) is ``qtests/qos/``.
"""
