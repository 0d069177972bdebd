"""``python -m backends`` as a real process: CLI, READY line, signals, journal file, wires,
reconnects, withheld features."""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.vhost_user import messages as m
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM
from qtests.qos.backend_process import REPO_ROOT, BackendProcess
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend, VhostUserRing
from qtests.qos.waiting import poll_until

HDR = bytes(12)


@pytest.fixture
def mem() -> Iterator[SharedGuestMemory]:
    g = SharedGuestMemory(1 << 20)
    try:
        yield g
    finally:
        g.close()


def run_cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backends", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def tx_one(bp: BackendProcess, mem: SharedGuestMemory, data: bytes) -> int:
    """Connect like QEMU, send one frame on TX 0, wait for it to be used; GET_VRING_BASE."""
    rx, tx = VhostUserRing(mem, 0, 16), VhostUserRing(mem, 1, 16)
    fe = Frontend(bp.socket)
    try:
        fe.init_like_qemu(2)
        features = fe.device_features & ~(1 << m.VHOST_F_LOG_ALL | 1 << VIRTIO_F_ACCESS_PLATFORM)
        fe.start_like_qemu(mem, [rx, tx], features)
        buf = mem.alloc(len(HDR) + len(data))
        mem.write(buf, HDR + data)
        tx.add(out=[(buf, len(HDR) + len(data))])
        tx.kick()
        tx.wait_used(1)
        return fe.get_vring_base(1)
    finally:
        fe.close_init_fds()
        fe.close()
        rx.close()
        tx.close()


def test_ready_sigterm_exit_0_and_journal_file(tmp_path: Path, mem: SharedGuestMemory) -> None:
    bp = BackendProcess.launch(tmp_path, "--wire", "null")
    try:
        assert bp.ready_line == f"READY socket={bp.socket}"
        assert tx_one(bp, mem, b"\xff" * 60) == 1
    finally:
        rc = bp.stop(sig=signal.SIGTERM)
    assert rc == 0, bp.tails()
    entries = bp.read_journal_file()
    kinds = [e["kind"] for e in entries]
    assert "vhost.connect" in kinds and "vhost.disconnect" in kinds and "vq.start" in kinds
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert not os.path.exists(bp.socket)  # the listener cleaned up its socket


def test_sigint_exits_0_while_connected(tmp_path: Path) -> None:
    bp = BackendProcess.launch(tmp_path, monitor=False)
    fe = Frontend(bp.socket)
    try:
        fe.init_like_qemu(2)
        rc = bp.stop(sig=signal.SIGINT)
    finally:
        fe.close_init_fds()
        fe.close()
        bp.kill()
    assert rc == 0, bp.tails()
    kinds = [e["kind"] for e in bp.read_journal_file()]
    assert kinds[-1] != "vhost.connect" and "vhost.disconnect" in kinds


def test_keeps_listening_across_reconnects(tmp_path: Path, mem: SharedGuestMemory) -> None:
    bp = BackendProcess.launch(tmp_path)
    try:
        for _ in range(3):
            mark = bp.mark()
            assert tx_one(bp, mem, b"\x01" * 60) == 1
            disconnect = functools.partial(bp.journal, ["vhost.disconnect"], mark)
            poll_until(disconnect, 5, "the disconnect")
        assert bp.cmd("query-status")["connection"]["connected"] is False
    finally:
        assert bp.stop() == 0


def test_withheld_features_and_queues(tmp_path: Path) -> None:
    bp = BackendProcess.launch(
        tmp_path, "--no-iommu", "--no-log", "--no-mem-slots", "--queues", "2", monitor=False
    )
    try:
        with Frontend(bp.socket) as fe:
            f = fe.get_features()
            p = fe.get_protocol_features()
            fe.set_protocol_features(p)
            assert fe.get_queue_num() == 2
            assert fe.get_max_mem_slots() == m.MEM_TABLE_MAX_REGIONS
    finally:
        assert bp.stop() == 0
    assert not f >> VIRTIO_F_ACCESS_PLATFORM & 1
    assert not f >> m.VHOST_F_LOG_ALL & 1
    assert f >> m.VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert not p >> PF.LOG_SHMFD & 1 and not p >> PF.CONFIGURE_MEM_SLOTS & 1
    assert p >> PF.MQ & 1


def test_udp_wire_carries_tx_frames(tmp_path: Path, mem: SharedGuestMemory) -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)
        port = peer.getsockname()[1]
        bp = BackendProcess.launch(tmp_path, "--wire", f"udp:127.0.0.1:0:{port}", monitor=False)
        try:
            data = b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x08\x00" + b"udp!" * 20
            tx_one(bp, mem, data)
            assert peer.recv(4096) == data
        finally:
            assert bp.stop() == 0
    finally:
        peer.close()


def test_faults_mac_and_monitor(tmp_path: Path) -> None:
    bp = BackendProcess.launch(
        tmp_path, "--fault", "drop-tx", "--fault", "no-miss", "--mac", "02:00:00:00:00:07"
    )
    try:
        assert bp.cmd("query-faults")["active"] == ["drop-tx", "no-miss"]
        with Frontend(bp.socket) as fe:
            fe.get_features()
            fe.set_protocol_features(fe.get_protocol_features())
            fe.set_owner()
            assert fe.get_config(0, 6) == bytes.fromhex("020000000007")
    finally:
        assert bp.stop() == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--fault", "no-such-fault"], 2, "known faults"),
        (["--mac", "zz:zz"], 2, "MAC"),
        (["--queues", "0"], 2, ">= 1"),
        (["--wire", "bogus"], 1, "wire spec"),
    ],
    ids=["fault", "mac", "queues", "wire"],
)
def test_bad_arguments(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    r = run_cli("--socket", str(tmp_path / "s"), *args)
    assert r.returncode == code
    assert message in r.stderr
    assert "READY" not in r.stdout


def test_refuses_a_live_socket_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    bp = BackendProcess.launch(tmp_path, monitor=False)
    try:
        r = run_cli("--socket", bp.socket)
        assert r.returncode == 1 and "listening" in r.stderr
    finally:
        assert bp.stop() == 0


def test_console_script_entry_point() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["vdpa-backend"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_journal_file_is_json_lines(tmp_path: Path) -> None:
    bp = BackendProcess.launch(tmp_path, "--fault", "drop-tx", monitor=False)
    assert bp.stop() == 0
    lines = bp.journal_path.read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert any(json.loads(line)["kind"] == "fault.set" for line in lines)
