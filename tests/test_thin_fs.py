"""ext4 on a thin device, through the daemon's FUSE file and a loop device: files written and
synced take data blocks from the pool, `fstrim` after deleting them gives the blocks back (the
pool's status shows fewer used data blocks), fsck finds the filesystem clean, and thin_check
passes on the pool's metadata. Every mount and loop device is undone, and the daemon stopped,
even when the test fails."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon

# the same requirements as the FUSE export tests: importing their helpers skips this module too
from test_fuse_export import fuse_daemon, run  # noqa: F401

from userdm.export.fuse.unmount import fuse_mounts

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
BS = 128  # 64 KiB data blocks

for _tool in ("thin_check", "fstrim", "mkfs.ext4"):
    if shutil.which(_tool) is None:
        pytest.skip(f"needs {_tool} (thin-provisioning-tools, util-linux, e2fsprogs)",
                    allow_module_level=True)


def used_data(daemon: Daemon) -> int:
    return int(daemon.run("status", "pool").stdout.split()[5].split("/")[0])


def test_ext4_on_thin_and_fstrim_returns_blocks(fuse_daemon):
    daemon, undo, work = fuse_daemon
    meta, data = work / "meta.img", work / "data.img"
    for path, size in ((meta, 4 * MiB), (data, 256 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    blocks = 256 * MiB // (BS * 512)
    daemon.run("create", "pool", "--table", f"0 {blocks * BS} thin-pool {meta} {data} {BS} 0")
    daemon.run("message", "pool", "0", "create_thin", "1")
    daemon.run("create", "vol", "--table", f"0 {1024 * 2048} thin /dev/mapper/pool 1")  # 1 GiB virtual
    loop = undo.losetup(str(daemon.runtime / "mapper" / "vol"))
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
    mnt = work / "mnt"
    undo.mount(loop, str(mnt))
    empty = used_data(daemon)
    payload = random.Random(9).randbytes(48 * MiB)
    (mnt / "big").write_bytes(payload)
    run("sync")
    full = used_data(daemon)
    assert full >= empty + 48 * MiB // (BS * 512), (empty, full)
    assert (mnt / "big").read_bytes() == payload
    (mnt / "big").unlink()
    run("sync")
    trimmed = subprocess.run(["fstrim", "-v", str(mnt)], capture_output=True, text=True, timeout=120)
    assert trimmed.returncode == 0, trimmed.stderr
    after = used_data(daemon)
    assert after <= full - 40 * MiB // (BS * 512), (full, after)
    undo.umount(str(mnt))
    run("blockdev", "--flushbufs", loop)
    check = subprocess.run(["fsck.ext4", "-fn", loop], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    undo.detach(loop)
    daemon.run("remove", "vol")
    daemon.run("remove", "pool")
    res = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
