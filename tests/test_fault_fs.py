"""Fault injection under a real filesystem: ext4 on a loop device over a daemon's FUSE file of a
`flakey` and of a `dust` device. The filesystem is made and filled while the device is good,
then the target fails (flakey reloaded into its down interval; dust bad blocks on blocks of a
file, then `enable`), the kernel's reads and writes get EIO, the daemon keeps serving other
devices and commands, and after recovery (flakey up again, dust `disable`) fsck finds a clean
filesystem and the files written before the failure are intact.

Everything runs against a real `userdm daemon` with its FUSE directory; every mount and loop
device is undone, and the daemon stopped, even when a test fails.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

# the same requirements as the FUSE export tests: importing their helpers skips this module too
from test_fuse_export import Undo, check_tree, fuse_daemon, run, wait_for, write_tree  # noqa: F401

from conftest import Daemon
from userdm.export.fuse.unmount import fuse_mounts

pytestmark = [pytest.mark.fuse, pytest.mark.root]

MiB = 1 << 20
SIZE = 64 * MiB
SECTORS = SIZE // 512
BLOCK = 4096

for _tool in ("debugfs", "blockdev", "dd"):
    if shutil.which(_tool) is None:
        pytest.skip(f"needs {_tool} (e2fsprogs, util-linux, coreutils)", allow_module_level=True)


def backing_file(work: Path, name: str, size: int) -> str:
    path = work / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def reload(daemon: Daemon, name: str, table: str) -> None:
    """Swap a new table in under the mounted filesystem, as xfstests' _load_flakey_table does."""
    daemon.run("load", name, "--table", table)
    daemon.run("resume", name)
    assert daemon.run("table", name).stdout.startswith(table)


def read_direct(path: str | Path) -> bytes:
    """Read a whole file with O_DIRECT (past the page cache, so the device's answer counts)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, max(BLOCK, -(-size // BLOCK) * BLOCK))
        got = os.preadv(fd, [buf], 0)
        return bytes(buf[:min(got, size)])
    finally:
        os.close(fd)


def dd_direct(loop: str, block: int) -> subprocess.CompletedProcess:
    return subprocess.run(["dd", f"if={loop}", "of=/dev/null", f"bs={BLOCK}", f"skip={block}", "count=1",
                           "iflag=direct"], capture_output=True, text=True, timeout=60)


def assert_daemon_healthy(daemon: Daemon, failing: str, other_image: Path) -> None:
    """The daemon answers commands and another device keeps working through FUSE."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert f"Name:              {failing}" in daemon.run("info", failing).stdout
    assert "other" in daemon.run("ls").stdout
    payload = random.Random(3).randbytes(64 * 1024)
    with open(other_image, "r+b") as f:
        f.seek(MiB)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert read_direct(other_image)[MiB:MiB + len(payload)] == payload


def fsck_clean(loop: str) -> None:
    """After recovery: the buffered state written back, the journal replayed, then no errors."""
    run("blockdev", "--flushbufs", loop)
    repair = subprocess.run(["fsck.ext4", "-fy", loop], capture_output=True, text=True, timeout=120)
    assert repair.returncode in (0, 1), repair.stdout + repair.stderr  # 1: errors corrected
    check = subprocess.run(["fsck.ext4", "-fn", loop], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_ext4_on_flakey_sees_eio_while_down_and_fscks_clean_after(fuse_daemon):
    daemon, undo, work = fuse_daemon
    disk = backing_file(work, "disk.img", SIZE)
    other = backing_file(work, "other.img", 8 * MiB)
    up = f"0 {SECTORS} flakey {disk} 0 3600 0 2 error_reads error_writes"  # never down
    daemon.run("create", "fl", "--table", up)
    daemon.run("create", "other", "--table", f"0 {8 * MiB // 512} linear {other} 0")
    mapper_dir = daemon.runtime / "mapper"
    loop = undo.losetup(str(mapper_dir / "fl"))
    run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), loop)
    mnt = work / "mnt"
    undo.mount(loop, str(mnt))
    sums = write_tree(mnt, seed=11)
    before = random.Random(5).randbytes(300_000)
    (mnt / "before").write_bytes(before)
    run("sync")

    # down, writes fail: the kernel's fsync gets EIO, reads still work
    reload(daemon, "fl", f"0 {SECTORS} flakey {disk} 0 0 3600 1 error_writes")
    fd = os.open(mnt / "during", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"lost" * 50_000)
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert read_direct(mnt / "before") == before
    assert_daemon_healthy(daemon, "fl", mapper_dir / "other")

    # down with the default features: reads fail too
    reload(daemon, "fl", f"0 {SECTORS} flakey {disk} 0 0 3600")
    assert daemon.run("table", "fl").stdout.endswith("0 0 3600 2 error_reads error_writes\n")
    with pytest.raises(OSError) as exc:
        read_direct(mnt / "before")
    assert exc.value.errno == errno.EIO
    dd = dd_direct(loop, 0)
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    assert_daemon_healthy(daemon, "fl", mapper_dir / "other")

    # up again: the filesystem recovers and everything synced before the failure is there
    reload(daemon, "fl", up)
    assert dd_direct(loop, 0).returncode == 0
    undo.umount(str(mnt))
    fsck_clean(loop)
    undo.mount(loop, str(mnt))
    check_tree(mnt, sums)
    assert (mnt / "before").read_bytes() == before
    undo.umount(str(mnt))
    undo.detach(loop)


def test_ext4_on_dust_sees_eio_on_bad_blocks_and_fscks_clean_after_disable(fuse_daemon):
    daemon, undo, work = fuse_daemon
    disk = backing_file(work, "disk.img", SIZE)
    other = backing_file(work, "other.img", 8 * MiB)
    daemon.run("create", "du", "--table", f"0 {SECTORS} dust {disk} 0 {BLOCK}")
    daemon.run("create", "other", "--table", f"0 {8 * MiB // 512} linear {other} 0")
    mapper_dir = daemon.runtime / "mapper"
    loop = undo.losetup(str(mapper_dir / "du"))
    run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), loop)
    mnt = work / "mnt"
    undo.mount(loop, str(mnt))
    sums = write_tree(mnt, seed=12)
    victim = random.Random(6).randbytes(256 * 1024)
    (mnt / "victim").write_bytes(victim)
    run("sync")
    # the filesystem blocks of the file are dust blocks (both 4096 bytes, offset 0)
    blocks = [int(b) for b in run("debugfs", "-R", "blocks /victim", loop).split()]
    assert len(blocks) == len(victim) // BLOCK
    msg = lambda *words: daemon.run("message", "du", "0", *words).stdout  # noqa: E731
    for block in blocks[:4]:
        assert msg("addbadblock", str(block)) == ""
    assert msg("countbadblocks") == "countbadblocks: 4 badblock(s) found\n"
    assert read_direct(mnt / "victim") == victim  # bypass: the list alone changes nothing

    msg("enable")
    assert daemon.run("status", "du").stdout == f"0 {SECTORS} dust {disk} fail_read_on_bad_block verbose\n"
    with pytest.raises(OSError) as exc:
        read_direct(mnt / "victim")
    assert exc.value.errno == errno.EIO
    dd = dd_direct(loop, blocks[0])
    assert dd.returncode != 0 and "Input/output error" in dd.stderr
    assert dd_direct(loop, blocks[0] - 1 if blocks[0] - 1 not in blocks else blocks[-1]).returncode == 0
    check_tree(mnt, sums)  # files on good blocks still read
    assert_daemon_healthy(daemon, "du", mapper_dir / "other")
    assert msg("queryblock", str(blocks[0])) == f"dust_query_block: block {blocks[0]} found in badblocklist\n"

    msg("disable")
    assert hashlib.sha256(read_direct(mnt / "victim")).digest() == hashlib.sha256(victim).digest()
    assert msg("countbadblocks") == "countbadblocks: 4 badblock(s) found\n"  # reads never remap
    undo.umount(str(mnt))
    fsck_clean(loop)
    undo.detach(loop)
    wait_for(lambda: "Open count:        0" in daemon.run("info", "du").stdout, "the loop device's close")
