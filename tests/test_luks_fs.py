"""ext4 on a LUKS2 volume opened by `userdm luks open`, through the daemon's FUSE file and the
kernel's loop driver: mkfs, mount, files with checksums, umount, `fsck -fn` clean; then
`luks close`, a new `luks open`, and everything still verifies. Every loop device and mount is
undone, and the daemon stopped, even when the test fails (the fixture of test_fault_fs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

# the FUSE/root requirements and helpers of the FUSE tests: importing them skips this module too
from test_fault_fs import fuse_daemon  # noqa: F401  (the fixture)
from test_fuse_export import check_tree, run, wait_for, write_tree

pytestmark = [pytest.mark.fuse, pytest.mark.root,
              pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup (cryptsetup-bin)")]

MiB = 1 << 20


def fsck_clean(loop: str) -> None:
    check = subprocess.run(["fsck.ext4", "-fn", loop], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_ext4_on_luks2_through_fuse_and_loop_survives_close_and_reopen(fuse_daemon):  # noqa: F811
    daemon, undo, work = fuse_daemon
    img = work / "vol.img"
    with open(img, "wb") as f:
        f.truncate(80 * MiB)
    (work / "pw").write_text("ext4 passphrase")
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--key-file", str(work / "pw"),
        "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768",
        "--pbkdf-parallel", "1", str(img))
    daemon.run("luks", "open", str(img), "secret", "--key-file", str(work / "pw"))
    assert "sector_size:4096" in daemon.run("table", "secret").stdout
    image = daemon.runtime / "mapper" / "secret"
    wait_for(image.exists, "the FUSE file of the opened volume")
    # the loop device speaks in the volume's 4 KiB encryption sectors, as a kernel dm-crypt
    # device with sector_size:4096 would make everyone above it do
    loop = undo.losetup(str(image), "--sector-size", "4096")
    run("mkfs.ext4", "-q", "-F", loop)
    mnt = work / "mnt"
    undo.mount(loop, str(mnt))
    sums = write_tree(mnt, seed=13)
    undo.umount(str(mnt))
    fsck_clean(loop)
    undo.detach(loop)
    wait_for(lambda: daemon.connect().info("secret")["open_count"] == 0, "the loop device's close")
    with open(image, "rb") as f:
        head = f.read(4096)
    wait_for(lambda: daemon.connect().info("secret")["open_count"] == 0, "the FUSE file's release")
    assert head[1080:1082] == b"\x53\xef"                       # ext4's superblock magic, in the clear
    daemon.run("luks", "close", "secret")
    with open(img, "rb") as f:                                  # and only encrypted on the disk
        f.seek(16 * MiB)
        assert f.read(4096) != head

    daemon.run("luks", "open", str(img), "again", "--key-file", str(work / "pw"))
    image = daemon.runtime / "mapper" / "again"
    wait_for(image.exists, "the FUSE file of the reopened volume")
    loop = undo.losetup(str(image), "--sector-size", "4096", "--read-only")
    fsck_clean(loop)
    undo.mount(loop, str(mnt))
    check_tree(mnt, sums)
    undo.umount(str(mnt))
    undo.detach(loop)
