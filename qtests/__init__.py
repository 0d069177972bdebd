"""qtest driver library (``qtests.qos``) and the pytest suites that drive QEMU with it."""
