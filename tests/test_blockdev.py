"""Kernel block devices (issue 16): a loop device over a device's FUSE file at RUNTIME/dev/NAME,
with mkfs, mount, fsck and fstrim on it; it follows resizes, read-only tables and renames, is
detached at remove (EBUSY while mounted, a deferred remove fires at umount) and comes back after
a daemon restart. lockfs: suspend freezes what is mounted on the device's loop devices.

Every test runs a real daemon with its FUSE directory, and undoes its mounts and loop devices
whatever happens; the module checks that no loop device over its directories is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, wait_until
from test_fuse_export import missing_requirements

pytestmark = [pytest.mark.fuse, pytest.mark.root]

TOOLS = ("losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount", "fstrim", "fsfreeze", "dumpe2fs")
MiB = 1 << 20


if (_reason := missing_requirements(TOOLS, ("/dev/fuse", "/dev/loop-control"))) is not None:
    pytest.skip(_reason, allow_module_level=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def loops_under(base: Path) -> list[str]:
    return [line for line in run("losetup", "-a").stdout.splitlines() if str(base) in line]


class Env:
    """A daemon with FUSE, and the mounts and loop devices a test made, undone in reverse order."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemon = Daemon(base)
        self.mounts: list[str] = []
        self.loops: list[str] = []

    def start(self, *extra: str) -> None:
        self.daemon.start(*extra, fuse=True)

    def dev(self, name: str) -> Path:
        return self.daemon.runtime / "dev" / name

    def fuse_file(self, name: str) -> Path:
        return self.daemon.runtime / "mapper" / name

    def image(self, name: str, size: int = 64 * MiB) -> str:
        path = self.base / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    def create(self, name: str, size: int = 64 * MiB, *extra: str) -> None:
        img = self.image(name, size)
        self.daemon.run("create", name, *extra, "--table", f"0 {size // 512} linear {img} 0")

    def info(self, name: str) -> dict:
        return self.daemon.connect().info(name)

    def mount(self, dev: str, name: str, *opts: str) -> Path:
        where = self.base / f"mnt-{name}"
        where.mkdir(exist_ok=True)
        run("mount", *opts, dev, str(where))
        self.mounts.append(str(where))
        return where

    def umount(self, where: Path) -> None:
        run("umount", str(where))
        self.mounts.remove(str(where))

    def losetup(self, path: Path, *extra: str) -> str:
        dev = run("losetup", "--show", "-f", *extra, str(path)).stdout.strip()
        self.loops.append(dev)
        return dev

    def close(self) -> None:
        for where in reversed(self.mounts):
            run("fsfreeze", "-u", where, check=False)
            run("umount", where, check=False)
            run("umount", "-l", where, check=False)
        for dev in reversed(self.loops):
            run("losetup", "-d", dev, check=False)
        self.daemon.stop()


@pytest.fixture(scope="module", autouse=True)
def no_loop_device_left_by_the_module(tmp_path_factory) -> Iterator[None]:
    """`losetup -a` before and after the whole module: no loop device over any directory of
    this test session is left (others' loop devices on the machine are not ours to judge)."""
    base = tmp_path_factory.getbasetemp()
    before = set(loops_under(base))
    yield
    assert wait_until(lambda: set(loops_under(base)) <= before), f"loop devices left: {loops_under(base)}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()
    assert wait_until(lambda: not loops_under(tmp_path)), f"loop devices left: {loops_under(tmp_path)}"


def loop_of(env: Env, name: str) -> str:
    target = os.readlink(env.dev(name))
    assert target.startswith("/dev/loop"), target
    return target


def loop_size(loopdev: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(loopdev)}/size").read_text()) * 512


def fs_features(dev: str) -> str:
    out = run("dumpe2fs", "-h", dev).stdout
    return next(line for line in out.splitlines() if line.startswith("Filesystem features"))


# ---- block devices ----------------------------------------------------------------------------

def test_ext4_made_mounted_written_trimmed_and_checked_through_the_block_device(env):
    env.start()
    env.create("vm1", 64 * MiB, "--blockdev")
    dev = str(env.dev("vm1"))
    loopdev = loop_of(env, "vm1")
    assert Path(f"/sys/block/{os.path.basename(loopdev)}/loop/backing_file").read_text().strip() \
        == str(env.fuse_file("vm1"))
    assert Path(f"/sys/block/{os.path.basename(loopdev)}/loop/dio").read_text().strip() == "1"
    info = env.info("vm1")
    assert info["blockdev"] and info["block_device"] == loopdev
    assert os.path.basename(loopdev) in info["holders"]
    assert os.readlink(env.dev(f"by-diskseq/{info['diskseq']}")) == loopdev
    assert f"[blockdev {loopdev}]" in env.daemon.run("ls", "--tree").stdout
    run("mkfs.ext4", "-q", dev)
    mnt = env.mount(dev, "vm1")
    payload = os.urandom(3 * MiB)
    (mnt / "data").write_bytes(payload)
    os.sync()
    run("fstrim", str(mnt))
    env.umount(mnt)
    assert run("fsck.ext4", "-fn", dev).returncode == 0
    mnt = env.mount(dev, "vm1")
    assert (mnt / "data").read_bytes() == payload
    env.umount(mnt)


def test_remove_while_mounted_is_ebusy_and_a_deferred_remove_fires_at_umount(env):
    env.start()
    env.create("busy", 32 * MiB, "--blockdev")
    run("mkfs.ext4", "-q", str(env.dev("busy")))
    loopdev = loop_of(env, "busy")
    mnt = env.mount(str(env.dev("busy")), "busy")
    res = env.daemon.run("remove", "busy", check=False)
    assert res.returncode != 0 and "EBUSY" in res.stderr and "mounted" in res.stderr, res.stderr
    assert env.info("busy")["live"] and (mnt / "lost+found").is_dir()
    env.daemon.run("remove", "--deferred", "busy")
    assert env.info("busy")["deferred_remove"]
    env.umount(mnt)
    assert wait_until(lambda: "busy" not in env.daemon.run("ls").stdout)
    assert not env.dev("busy").exists()
    assert wait_until(lambda: not Path(f"/sys/block/{os.path.basename(loopdev)}/loop/backing_file").exists()
                      or str(env.base) not in Path(f"/sys/block/{os.path.basename(loopdev)}/loop/backing_file")
                      .read_text())


def autoclear_with_opener(env: Env, name: str) -> tuple[object, int]:
    """`create NAME --autoclear --blockdev` holding an open from its creation (seed 001)."""
    img = env.image(name, 32 * MiB)
    client = env.daemon.connect()
    info = client.create(name, f"0 {32 * MiB * 2 // 1024} linear {img} 0", autoclear=True, blockdev=True,
                         open_fd=True)
    assert info["open_count"] == 2 and env.dev(name).exists()  # the creator's and the loop device's
    return client, info["fd"]


def gone(env: Env, name: str, loopdev: str) -> bool:
    backing = Path(f"/sys/block/{os.path.basename(loopdev)}/loop/backing_file")
    return name not in env.daemon.run("ls").stdout and not env.dev(name).exists() \
        and (not backing.exists() or str(env.base) not in backing.read_text())


def test_autoclear_does_not_count_the_block_device_but_counts_a_mount_on_it(env):
    """The loop device is the daemon's own holder: an autoclear device whose other opens are
    closed goes at once, unless a filesystem is mounted on its block device: then at umount."""
    env.start()
    _, fd = autoclear_with_opener(env, "vm1")
    loopdev = loop_of(env, "vm1")
    run("mkfs.ext4", "-q", str(env.dev("vm1")))  # an open and close of the block device: nothing goes
    assert env.info("vm1")["open_count"] == 2  # the creator's and the loop device's
    mnt = env.mount(str(env.dev("vm1")), "vm1")
    os.close(fd)  # the creator lets go (or dies): the mount still holds the device
    assert wait_until(lambda: env.info("vm1")["open_count"] == 1)
    (mnt / "file").write_bytes(b"still here")
    assert (mnt / "file").read_bytes() == b"still here" and "vm1" in env.daemon.run("ls").stdout
    env.umount(mnt)  # the last user: the device goes, and its loop device with it
    assert wait_until(lambda: gone(env, "vm1", loopdev)), env.daemon.run("ls").stdout
    # unmounted: the creator's close is the last one
    _, fd = autoclear_with_opener(env, "vm2")
    loopdev = loop_of(env, "vm2")
    os.close(fd)
    assert wait_until(lambda: gone(env, "vm2", loopdev)), env.daemon.run("ls").stdout


def test_an_open_after_the_creator_left_keeps_the_mounted_autoclear_device(env):
    env.start()
    client, fd = autoclear_with_opener(env, "vm")
    loopdev = loop_of(env, "vm")
    run("mkfs.ext4", "-q", str(env.dev("vm")))
    mnt = env.mount(str(env.dev("vm")), "vm")
    os.close(fd)
    assert wait_until(lambda: env.info("vm")["open_count"] == 1)
    again = client.open("vm")  # a user opens it again before the umount
    env.umount(mnt)
    assert env.info("vm")["block_device"] == loopdev and loop_of(env, "vm") == loopdev
    run("fsck.ext4", "-fn", str(env.dev("vm")))  # the block device still works
    os.close(again["fd"])
    assert wait_until(lambda: gone(env, "vm", loopdev)), env.daemon.run("ls").stdout


def test_unmounted_block_device_is_detached_by_remove(env):
    env.start()
    env.create("plain", 16 * MiB, "--blockdev")
    assert loops_under(env.base)
    seq = env.info("plain")["diskseq"]
    env.daemon.run("remove", "plain")
    assert not loops_under(env.base) and not env.dev("plain").exists()
    assert not env.dev(f"by-diskseq/{seq}").exists()


def test_block_device_follows_resize_read_only_tables_and_rename(env):
    env.start("--block-devices")
    img = env.image("grow", 64 * MiB)
    env.daemon.run("create", "grow", "--table", f"0 {16 * MiB // 512} linear {img} 0")
    loopdev = loop_of(env, "grow")  # --block-devices: no --blockdev needed
    assert loop_size(loopdev) == 16 * MiB
    env.daemon.run("load", "grow", "--table", f"0 {48 * MiB // 512} linear {img} 0")
    env.daemon.run("resume", "grow")
    assert loop_size(loopdev) == 48 * MiB
    env.daemon.run("load", "grow", "-r", "--table", f"0 {48 * MiB // 512} linear {img} 0")
    env.daemon.run("resume", "grow")
    ro_dev = loop_of(env, "grow")
    assert Path(f"/sys/block/{os.path.basename(ro_dev)}/ro").read_text().strip() == "1"
    env.daemon.run("rename", "grow", "grown")
    assert not env.dev("grow").exists() and loop_of(env, "grown") == ro_dev
    assert env.info("grown")["block_device"] == ro_dev


def test_block_device_comes_back_after_a_daemon_restart(env):
    env.start()
    env.create("keep", 32 * MiB, "--blockdev")
    env.create("other", 16 * MiB)
    run("mkfs.ext4", "-q", str(env.dev("keep")))
    mnt = env.mount(str(env.dev("keep")), "keep")
    (mnt / "kept").write_text("still here")
    env.umount(mnt)
    env.daemon.stop()
    assert not loops_under(env.base)  # the stop detached it
    env.start()
    assert env.info("keep")["blockdev"] and not env.info("other")["blockdev"]
    assert not env.dev("other").exists()
    mnt = env.mount(str(env.dev("keep")), "keep")
    assert (mnt / "kept").read_text() == "still here"
    env.umount(mnt)


# ---- lockfs ------------------------------------------------------------------------------------

def frozen(where: Path) -> bool:
    """Whether the filesystem at `where` is frozen: freezing it again is EBUSY then."""
    res = run("fsfreeze", "-f", str(where), check=False)
    if res.returncode == 0:
        run("fsfreeze", "-u", str(where))
        return False
    assert "busy" in res.stderr.lower(), res.stderr
    return True


def test_suspend_freezes_filesystems_on_the_block_device_and_on_a_hand_made_loop(env):
    env.start()
    env.create("fz", 32 * MiB, "--blockdev")
    env.create("byhand", 32 * MiB)
    run("mkfs.ext4", "-q", str(env.dev("fz")))
    run("mkfs.ext4", "-q", str(env.fuse_file("byhand")))
    mnt = env.mount(str(env.dev("fz")), "fz")
    other = env.mount(env.losetup(env.fuse_file("byhand"), "--direct-io=on"), "byhand")
    for name, where in (("fz", mnt), ("byhand", other)):
        assert not frozen(where)
        env.daemon.run("suspend", name)
        try:
            assert json.loads(json.dumps(env.info(name)))["suspended"]
            # the freeze happened before the suspend: the test's own freeze finds it frozen
            # (a freeze attempt on a suspended, unfrozen filesystem would wait for the resume)
            assert frozen(where)
        finally:
            env.daemon.run("resume", name)
        assert not frozen(where)
        (where / "after").write_text("thawed")


@pytest.mark.hostile
def test_a_failed_freeze_fails_the_suspend_and_the_device_runs_on(env):
    env.start()
    env.create("stuck", 32 * MiB, "--blockdev")
    env.create("bystander", 16 * MiB, "--blockdev")
    run("mkfs.ext4", "-q", str(env.dev("stuck")))
    mnt = env.mount(str(env.dev("stuck")), "stuck")
    run("fsfreeze", "-f", str(mnt))  # frozen by someone else: our FIFREEZE is EBUSY
    try:
        res = env.daemon.run("suspend", "stuck", check=False)
        assert res.returncode != 0 and "EBUSY" in res.stderr and str(mnt) in res.stderr, res.stderr
        assert not env.info("stuck")["suspended"]
    finally:
        run("fsfreeze", "-u", str(mnt))
    (mnt / "written").write_text("the device runs on")
    os.sync()
    env.daemon.run("suspend", "bystander")
    env.daemon.run("resume", "bystander")
    env.daemon.run("suspend", "stuck")  # and a suspend works again once it can freeze
    env.daemon.run("resume", "stuck")
    env.daemon.stop()
    env.start()  # the failed suspend was undone in the state store too
    assert not env.info("stuck")["suspended"]


@pytest.mark.hostile
def test_a_loop_device_that_cannot_be_linked_is_detached_and_the_daemon_carries_on(env):
    env.start()
    (env.daemon.runtime / "dev" / "blocked").mkdir()  # RUNTIME/dev/blocked cannot become a link
    env.create("blocked", 16 * MiB, "--blockdev")
    info = env.info("blocked")
    assert info["live"] and info["block_device"] is None
    assert not loops_under(env.base)
    env.create("fine", 16 * MiB, "--blockdev")
    assert loop_of(env, "fine")
    env.daemon.run("remove", "blocked")
    env.daemon.run("remove", "fine")
    assert not loops_under(env.base)


@pytest.mark.hostile
def test_devices_removed_while_their_loop_devices_are_set_up_leak_none(env):
    env.start()
    img = env.image("race", 16 * MiB)
    errors: list[str] = []

    def creator() -> None:
        client = env.daemon.connect()
        for i in range(12):
            try:
                client.create(f"r{i}", f"0 {16 * MiB // 512} linear {img} 0", blockdev=True, shared=True)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"create r{i}: {exc}")

    def remover() -> None:
        client = env.daemon.connect()
        for i in range(12):
            wait_until(lambda: any(d["name"] == f"r{i}" for d in client.list()) or bool(errors))
            try:
                client.remove(f"r{i}")
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"remove r{i}: {exc}")

    threads = [threading.Thread(target=creator), threading.Thread(target=remover)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert env.daemon.connect().list() == []
    assert not loops_under(env.base)
    assert not [p for p in (env.daemon.runtime / "dev").iterdir() if p.is_symlink()]


# ---- a clean live backup -------------------------------------------------------------------------

WRITER = r"""
import os, sys
root, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    with open(os.path.join(root, f"f{i % 64}"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    i += 1
    if i % 16 == 0:
        os.sync()
print(i)
"""


def backup_snapshot_state(env: Env, *nolockfs: str) -> tuple[str, int, bool]:
    """ext4 mounted through the block device with a writer running; `backup start` while it
    writes; returns the snapshot's features line, `fsck -fn`'s exit status, and whether a
    read-only mount of it without journal replay (noload) works."""
    env.start()
    env.create("vm", 64 * MiB, "--blockdev")
    run("mkfs.ext4", "-q", str(env.dev("vm")))
    mnt = env.mount(str(env.dev("vm")), "vm")
    stop = env.base / "stop-writer"
    writer = subprocess.Popen(["python3", "-c", WRITER, str(mnt), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (mnt / "f20").exists(), 60)  # it is writing
        env.daemon.run("backup", "start", "vm", "--store", str(env.base / "store"), *nolockfs)
        assert (mnt / "f1").exists()
    finally:
        stop.touch()
        written = int(writer.communicate(timeout=120)[0])
    assert written > 20
    snap = env.losetup(env.fuse_file("vm-snap"), "-r")
    features = fs_features(snap)
    clean = run("fsck.ext4", "-fn", snap, check=False).returncode
    probe = env.base / "snap-probe"
    probe.mkdir()
    ok = run("mount", "-o", "ro", snap, str(probe), check=False).returncode == 0
    if ok:
        env.mounts.append(str(probe))
        assert (probe / "lost+found").is_dir()
        env.umount(probe)
    run("losetup", "-d", snap)
    env.loops.remove(snap)
    env.umount(mnt)
    assert wait_until(lambda: env.info("vm-snap")["open_count"] == 0)  # the FUSE release follows the detach
    env.daemon.run("backup", "drop", "vm", "--all")
    return features, clean, ok


def test_backup_of_a_mounted_filesystem_under_writes_is_clean(env):
    """lockfs: backup start freezes the filesystem, so its snapshot needs no journal
    recovery, mounts read-only and fsck finds nothing."""
    features, clean, mounted = backup_snapshot_state(env)
    assert "needs_recovery" not in features, features
    assert clean == 0
    assert mounted


def test_backup_with_nolockfs_needs_journal_recovery(env):
    """The contrast: without the freeze the snapshot is only crash-consistent."""
    features, clean, mounted = backup_snapshot_state(env, "--nolockfs")
    assert "needs_recovery" in features, features
    assert clean != 0 or not mounted


def test_remove_all_detaches_unmounted_block_devices_and_leaves_mounted_ones(env):
    env.start("--block-devices")
    env.create("idle", 16 * MiB)
    env.create("inuse", 32 * MiB)
    run("mkfs.ext4", "-q", str(env.dev("inuse")))
    mnt = env.mount(str(env.dev("inuse")), "inuse")
    env.daemon.run("remove_all")
    names = env.daemon.run("ls").stdout
    assert "idle" not in names and "inuse" in names
    assert not env.dev("idle").exists() and (mnt / "lost+found").is_dir()
    env.umount(mnt)
    env.daemon.run("remove_all")
    assert "No devices found" in env.daemon.run("ls").stdout
