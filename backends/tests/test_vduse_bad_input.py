"""Bad input on the VDUSE transport gets a clear error and loses nothing: every case leaves a
journal entry and a log line that say what happened, and the device keeps working."""

from __future__ import annotations

import errno
import logging

import pytest

from backends.tests.vduse_rig import NAME, Rig, make_rig, tx_chain
from backends.vduse import uapi
from backends.vduse.transport import VduseError


def still_works(rig: Rig) -> None:
    """The device still answers and moves frames."""
    rig.bring_up()
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready")
    tx_chain(rig.rings[1], b"\x42" * 64)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "a TX frame after the bad input")


def test_unknown_message_is_answered_failed(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rid = rig.kernel.send(uapi.Request(7, 99, b"\x01" * 128))
    assert rid == 99
    result, _ = rig.reply(99)
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    err = rig.journal("error.vduse")[-1]
    assert err["op"] == "message" and err["type"] == 7 and err["request_id"] == 99
    assert "unknown VDUSE request type 7" in err["detail"]
    msg = rig.journal("vduse.msg")[-1]
    assert (msg["type"], msg["result"]) == ("UNKNOWN(7)", "failed")
    assert "unknown VDUSE request type 7" in caplog.text
    still_works(rig)


def test_short_message_is_journalled_not_answered(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    before = len(rig.kernel.responses)
    rig.kernel.queue(b"\x01\x00\x00\x00")
    rig.wait(lambda: rig.journal("error.vduse"), "the malformed-request error")
    assert "malformed request (4 bytes)" in rig.journal("error.vduse")[-1]["detail"]
    assert len(rig.kernel.responses) == before
    assert "malformed request" in caplog.text
    still_works(rig)


def test_get_vq_state_for_a_missing_queue(rig: Rig) -> None:
    result, _ = rig.reply(rig.kernel.get_vq_state(9))
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert "GET_VQ_STATE for vq 9" in rig.journal("error.vduse")[-1]["detail"]
    still_works(rig)


def test_kick_on_a_queue_never_enabled(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rig.bring_up(enable=False)
    rig.transport._cancel_ready_poll()
    tx_chain(rig.rings[1], b"\x01" * 60)
    for n in range(1, 4):
        rig.kernel.kick(1, force=True)  # a kernel that does not filter kicks
        rig.wait(lambda n=n: rig.transport.rings[1].kicks == n, f"kick {n} read")
    errs = [e for e in rig.journal("error.vduse") if e["op"] == "kick"]
    assert len(errs) == 1, "journalled once, counted after"
    assert "kick on vq 1, which was never enabled" in errs[0]["detail"]
    assert rig.transport.rings[1].ignored_kicks == 3
    assert rig.wire.sent == [], "nothing processed on a disabled queue"
    assert "never enabled" in caplog.text
    rig.kernel.set_ready(1)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "the frame once the queue is enabled")


def test_vdpa_dev_add_failing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    r = make_rig(start=False, add_status=255, add_output="kernel answers: Operation not supported")
    try:
        with pytest.raises(VduseError, match="vdpa dev add name vduse-unit mgmtdev vduse failed"):
            r.transport.start()
        err = r.journal("error.vduse")[-1]
        assert err["op"] == "attach" and "Operation not supported" in err["detail"]
        assert r.kernel.destroyed, "the half-made device is destroyed again"
        assert not r.kernel.opened
        assert "vdpa dev add" in caplog.text
    finally:
        r.close()


def test_name_already_taken(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    r = make_rig(start=False, taken_names={NAME})
    try:
        with pytest.raises(VduseError, match="already exists"):
            r.transport.start()
        err = r.journal("error.vduse")[-1]
        assert err["op"] == "create" and err["errno"] == errno.EEXIST
        assert "name taken" in err["detail"] and "name taken" in caplog.text
        assert "destroy" not in r.kernel.calls, "someone else's device is left alone"
    finally:
        r.close()


def test_reply_refused_by_the_kernel(rig: Rig) -> None:
    """The kernel gave up on a request (msg_timeout): the late reply is refused."""

    def refuse(data: bytes) -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    rig.kernel.write_response = refuse  # type: ignore[method-assign]
    rig.kernel.set_status(1)
    rig.wait(lambda: rig.journal("error.vduse"), "the refused reply")
    err = rig.journal("error.vduse")[-1]
    assert err["op"] == "reply" and err["errno"] == errno.ENOENT


def test_interrupt_refused_is_counted_once(rig: Rig) -> None:
    rig.kernel.irq_errno = errno.EINVAL
    still_works(rig)
    rig.wait(lambda: rig.transport.rings[1].irq_errors >= 1, "the refused interrupt")
    errs = [e for e in rig.journal("error.vduse") if e["op"] == "irq"]
    assert len(errs) == 1 and "VDUSE_VQ_INJECT_IRQ vq 1" in errs[0]["detail"]


def test_features_refused_by_the_model_answer_failed(rig: Rig) -> None:
    rig.set_status(0)
    rig.set_status(3)
    rig.kernel.driver_features = 1 << 17 | 1 << 32  # CTRL_VQ was never offered
    result, _ = rig.reply(rig.kernel.set_status(0xB))
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert "FEATURES_OK refused" in rig.journal("error.vduse")[-1]["detail"]
    still_works(rig)


def test_broken_device_fd_is_no_busy_loop(rig: Rig) -> None:
    """A message fd that stays readable with nothing to read (a broken device) is dropped."""
    rig.kernel.requests.clear()
    import os

    os.write(rig.kernel._pipe[1], b"x" * 2000)  # readable forever, no request behind it
    rig.wait(
        lambda: any(e["op"] == "read" for e in rig.journal("error.vduse")),
        "the broken-device error",
    )
    assert "no longer read" in rig.journal("error.vduse")[-1]["detail"]


def test_queue_pairs_need_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        uapi.pack_name("")
    with pytest.raises(ValueError):
        uapi.pack_name("a/b")
