"""The VDUSE wire format: struct sizes, ioctl numbers (checked against the C header when a
compiler and the uapi headers are installed), message round trips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from backends.vduse import uapi

IOCTLS = [
    "VDUSE_GET_API_VERSION",
    "VDUSE_SET_API_VERSION",
    "VDUSE_CREATE_DEV",
    "VDUSE_DESTROY_DEV",
    "VDUSE_IOTLB_GET_FD",
    "VDUSE_DEV_GET_FEATURES",
    "VDUSE_DEV_SET_CONFIG",
    "VDUSE_DEV_INJECT_CONFIG_IRQ",
    "VDUSE_VQ_SETUP",
    "VDUSE_VQ_GET_INFO",
    "VDUSE_VQ_SETUP_KICKFD",
    "VDUSE_VQ_INJECT_IRQ",
]
SIZES = {
    "struct vduse_dev_config": uapi.DEV_CONFIG.size,
    "struct vduse_iotlb_entry": uapi.IOTLB_ENTRY.size,
    "struct vduse_vq_config": uapi.VQ_CONFIG.size,
    "struct vduse_vq_info": uapi.VQ_INFO.size,
    "struct vduse_vq_eventfd": uapi.VQ_EVENTFD.size,
    "struct vduse_dev_request": uapi.MESSAGE_SIZE,
    "struct vduse_dev_response": uapi.MESSAGE_SIZE,
}


def test_known_numbers() -> None:
    assert uapi.VDUSE_CREATE_DEV == 0x41508102
    assert uapi.VDUSE_IOTLB_GET_FD == 0xC0208110
    assert uapi.VDUSE_VQ_GET_INFO == 0xC0308115
    assert uapi.VDUSE_DEV_INJECT_CONFIG_IRQ == 0x8113


@pytest.mark.skipif(
    not shutil.which("gcc") or not Path("/usr/include/linux/vduse.h").exists(),
    reason="needs gcc and linux-libc-dev's <linux/vduse.h>",
)
def test_against_the_c_header(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <linux/ioctl.h>", "#include <linux/types.h>"]
    lines += ["#include <linux/vduse.h>", "int main(void) {"]
    lines += [f'printf("%lu\\n", (unsigned long){name});' for name in IOCTLS]
    lines += [f'printf("%zu\\n", sizeof({s}));' for s in SIZES]
    lines += ["return 0; }"]
    src = tmp_path / "v.c"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "v"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "v")], check=True, capture_output=True, text=True)
    values = [int(v) for v in out.stdout.split()]
    assert values[: len(IOCTLS)] == [getattr(uapi, n) for n in IOCTLS]
    assert values[len(IOCTLS) :] == list(SIZES.values())


def test_request_round_trip() -> None:
    req = uapi.update_iotlb_request(5, 0x1000, (1 << 64) - 1)
    back = uapi.Request.unpack(req.pack())
    assert (back.type_name, back.request_id, back.iova_range) == (
        "UPDATE_IOTLB",
        5,
        (0x1000, (1 << 64) - 1),
    )
    assert uapi.Request.unpack(uapi.set_status_request(1, 0xF).pack()).status == 0xF
    assert uapi.Request.unpack(uapi.get_vq_state_request(2, 3).pack()).vq_index == 3
    with pytest.raises(ValueError, match="152 bytes"):
        uapi.Request.unpack(b"\0" * 151)


def test_dev_config_round_trip() -> None:
    blob = uapi.pack_dev_config(
        "net0", device_id=1, features=3 << 32, vq_num=4, vq_align=4096, config=b"\x01" * 12
    )
    assert len(blob) == 336 + 12
    assert uapi.unpack_dev_config(blob) == ("net0", 0, 1, 3 << 32, 4, 4096, b"\x01" * 12)


def test_split_vq_state_is_free_running() -> None:
    _, avail, _ = uapi.unpack_vq_state(uapi.pack_vq_state(0, packed=False, last_avail_idx=70000))
    assert avail == 70000 & 0xFFFF
