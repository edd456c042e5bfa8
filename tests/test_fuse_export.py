"""The FUSE export with real clients: loop devices, ext4, fsck, suspend, resize, removal.

In-process `Mapper` + `FuseExport` on a temporary directory. Every loop device and mount a
test makes is undone in a `finally`, and the module ends by checking that none is left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from userdm import Mapper
from userdm.errors import DMError

pytestmark = [pytest.mark.fuse, pytest.mark.root]

TOOLS = ("losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount", "fusermount3")


def missing_requirements(tools: tuple[str, ...] = TOOLS, nodes: tuple[str, ...] = ("/dev/fuse",)) -> str | None:
    """Why tests of ext4 over the FUSE export cannot run here, or None (also for test_blockdev)."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    for node in nodes:
        if not os.path.exists(node):
            return f"needs {node}"
    try:
        import userdm.export.fuse.server  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"cannot load the FUSE server: {exc}"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


if (_reason := missing_requirements()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from userdm.export.fuse import FuseExport, cleanup_stale  # noqa: E402
from userdm.export.fuse.unmount import fuse_mounts  # noqa: E402
from conftest import Daemon  # noqa: E402

MiB = 1 << 20
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def wait_for(pred: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll until `pred()` (FUSE sends release asynchronously after close)."""
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for: {what}")
        time.sleep(0.02)


class Undo:
    """Loop devices and mounts made by a test, undone in reverse order whatever happens."""

    def __init__(self) -> None:
        self.loops: list[str] = []
        self.mounts: list[str] = []

    def losetup(self, path: str, *extra: str) -> str:
        dev = run("losetup", "--show", "-f", *extra, path).strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run("losetup", "-d", dev)
        self.loops.remove(dev)

    def mount(self, dev: str, where: str) -> None:
        os.makedirs(where, exist_ok=True)
        run("mount", dev, where)
        self.mounts.append(where)

    def umount(self, where: str) -> None:
        run("umount", where)
        self.mounts.remove(where)

    def close(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", where], check=False)
            subprocess.run(["umount", "-l", where], check=False, capture_output=True)
        for dev in reversed(self.loops):
            subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def fuse_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Undo, Path]]:
    """A daemon serving FUSE in tmp_path/run/mapper, and the undo list for loops and mounts."""
    daemon = Daemon(tmp_path)
    daemon.start(fuse=True)
    undo = Undo()
    try:
        mapper_dir = str(daemon.runtime / "mapper")
        assert mapper_dir in fuse_mounts(), f"no FUSE export: {daemon.log.read_text()}"
        yield daemon, undo, tmp_path
    finally:
        try:
            undo.close()
        finally:
            daemon.stop()
        left = [line for line in run("losetup", "-a").splitlines() if str(tmp_path) in line]
        assert not left, left
        assert str(daemon.runtime / "mapper") not in fuse_mounts()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("userdm-fuse")
    yield base
    # nothing this module made may survive it, even after failures
    leftover_loops = [line for line in run("losetup", "-a").splitlines() if str(base) in line]
    leftover_mounts = [m for m in fuse_mounts() if m.startswith(str(base))]
    with open("/proc/self/mountinfo") as f:
        leftover_mounts += [line.split()[4] for line in f if str(base) in line.split()[4]]
    assert not leftover_loops, leftover_loops
    assert not leftover_mounts, leftover_mounts


@contextmanager
def exported(work: Path, **options: bool) -> Iterator[tuple[Mapper, FuseExport, Undo, Path]]:
    """A mapper exported in work/mapper, and the undo list, all undone at the end."""
    mapper = Mapper()
    export = FuseExport(mapper, work / "mapper", **options)
    undo = Undo()
    export.start()
    try:
        yield mapper, export, undo, work
    finally:
        try:
            undo.close()
        finally:
            export.stop()
            mapper.close()


@pytest.fixture
def env(base, request, fuse_transport) -> Iterator[tuple[Mapper, FuseExport, Undo, Path]]:
    """An export for each FUSE transport (io_uring, /dev/fuse)."""
    work = base / request.node.name
    work.mkdir()
    with exported(work, **fuse_transport) as made:
        yield made


def backing_file(work: Path, name: str, size: int) -> str:
    path = work / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def write_tree(root: Path, seed: int) -> dict[str, str]:
    """A few directories of files of assorted sizes; returns path -> sha256."""
    rnd = random.Random(seed)
    sums = {}
    for d in range(4):
        (root / f"dir{d}").mkdir()
        for i in range(6):
            data = rnd.randbytes(rnd.choice([0, 1, 511, 4096, 70_000, 1_000_000]))
            rel = f"dir{d}/file{i}"
            (root / rel).write_bytes(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def check_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


def ext4_round_trip(mapper: Mapper, export: FuseExport, undo: Undo, work: Path, name: str) -> None:
    image = os.path.join(export.mountpoint, name)
    assert os.path.getsize(image) == mapper.info(name)["size"]
    loop = undo.losetup(image)
    assert mapper.info(name)["open_count"] == 1
    run("mkfs.ext4", "-q", "-F", loop)
    mnt = str(work / "mnt")
    undo.mount(loop, mnt)
    sums = write_tree(Path(mnt), seed=len(name))
    undo.umount(mnt)
    subprocess.run(["fsck.ext4", "-fn", loop], check=True, capture_output=True)
    undo.mount(loop, mnt)
    check_tree(Path(mnt), sums)
    undo.umount(mnt)
    undo.detach(loop)
    wait_for(lambda: mapper.info(name)["open_count"] == 0, "the loop device's close")


def test_ext4_on_linear_device(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 64 * MiB)
    mapper.create("lin", f"0 {64 * MiB // 512} linear {disk} 0")
    ext4_round_trip(mapper, export, undo, work, "lin")


def test_ext4_on_striped_device(env):
    mapper, export, undo, work = env
    parts = [backing_file(work, f"part{i}.img", 24 * MiB) for i in range(3)]
    sectors = 3 * 24 * MiB // 512
    mapper.create("str", f"0 {sectors} striped 3 128 " + " ".join(f"{p} 0" for p in parts))
    ext4_round_trip(mapper, export, undo, work, "str")


def test_o_direct_loop_device(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 16 * MiB)
    mapper.create("dio", f"0 {16 * MiB // 512} linear {disk} 0")
    loop = undo.losetup(os.path.join(export.mountpoint, "dio"), "--direct-io=on")
    data = random.Random(1).randbytes(MiB)
    fd = os.open(loop, os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    undo.detach(loop)
    with open(disk, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data


def test_remove_while_mounted_is_ebusy_and_deferred_remove_waits(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 32 * MiB)
    mapper.create("busy", f"0 {32 * MiB // 512} linear {disk} 0")
    image = os.path.join(export.mountpoint, "busy")
    loop = undo.losetup(image)
    run("mkfs.ext4", "-q", "-F", loop)
    mnt = str(work / "mnt")
    undo.mount(loop, mnt)
    with pytest.raises(DMError) as exc:
        mapper.remove("busy")
    assert exc.value.errno == errno.EBUSY
    mapper.remove("busy", deferred=True)
    info = mapper.info("busy")
    assert info["deferred_remove"] and info["open_count"] == 1
    assert os.path.exists(image)
    (Path(mnt) / "still-works").write_text("yes")
    undo.umount(mnt)
    assert mapper.info("busy")["deferred_remove"]
    undo.detach(loop)
    wait_for(lambda: "busy" not in mapper.export_names(), "the deferred removal")
    with pytest.raises(DMError):
        mapper.info("busy")
    assert "busy" not in os.listdir(export.mountpoint)
    assert not os.path.exists(image)


def test_read_only_table_refuses_write_opens(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 4 * MiB)
    with open(disk, "r+b") as f:
        f.write(b"ro data")
    mapper.create("ro", f"0 {4 * MiB // 512} linear {disk} 0", readonly=True)
    image = os.path.join(export.mountpoint, "ro")
    assert os.stat(image).st_mode & 0o777 == 0o444
    with pytest.raises(OSError) as exc:
        os.open(image, os.O_RDWR)
    assert exc.value.errno in (errno.EACCES, errno.EROFS)
    with open(image, "rb") as f:
        assert f.read(7) == b"ro data"


def test_suspended_device_blocks_readers_until_resume(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 4 * MiB)
    other = backing_file(work, "other.img", 4 * MiB)
    with open(disk, "r+b") as f:
        f.write(b"payload")
    mapper.create("sus", f"0 {4 * MiB // 512} linear {disk} 0")
    mapper.create("other", f"0 {4 * MiB // 512} linear {other} 0")
    fd = os.open(os.path.join(export.mountpoint, "sus"), os.O_RDONLY)
    try:
        mapper.suspend("sus")
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(os.pread(fd, 7, 0)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not got, "a read of a suspended device must wait"
        # the mount keeps serving other devices and the directory meanwhile
        with open(os.path.join(export.mountpoint, "other"), "r+b") as f:
            f.write(b"other works")
            f.seek(0)
            assert f.read(11) == b"other works"
        assert sorted(os.listdir(export.mountpoint)) == ["other", "sus"]
        assert reader.is_alive()
        mapper.resume("sus")
        reader.join(30)
        assert not reader.is_alive()
        assert got == [b"payload"]
    finally:
        os.close(fd)


def test_resize_changes_the_file_size(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", 8 * MiB)
    mapper.create("grow", f"0 {4 * MiB // 512} linear {disk} 0")
    image = os.path.join(export.mountpoint, "grow")
    fd = os.open(image, os.O_RDWR)
    try:
        assert os.fstat(fd).st_size == 4 * MiB
        mapper.load("grow", f"0 {8 * MiB // 512} linear {disk} 0")
        mapper.resume("grow")
        assert os.stat(image).st_size == 8 * MiB
        assert os.fstat(fd).st_size == 8 * MiB
        os.pwrite(fd, b"tail", 8 * MiB - 4)
        assert os.pread(fd, 4, 8 * MiB - 4) == b"tail"
    finally:
        os.close(fd)


def test_stale_data_never_survives_a_table_reload(env):
    mapper, export, undo, work = env
    a = backing_file(work, "a.img", MiB)
    b = backing_file(work, "b.img", MiB)
    Path(a).write_bytes(b"A" * MiB)
    Path(b).write_bytes(b"B" * MiB)
    mapper.create("swap", f"0 {MiB // 512} linear {a} 0")
    image = os.path.join(export.mountpoint, "swap")
    with open(image, "rb") as f:
        assert f.read(4) == b"AAAA"
    mapper.load("swap", f"0 {MiB // 512} linear {b} 0")
    mapper.resume("swap")
    with open(image, "rb") as f:
        assert f.read(4) == b"BBBB"


def test_open_counts_follow_file_opens(env):
    mapper, export, undo, work = env
    disk = backing_file(work, "disk.img", MiB)
    mapper.create("cnt", f"0 {MiB // 512} linear {disk} 0")
    image = os.path.join(export.mountpoint, "cnt")
    fds = [os.open(image, os.O_RDONLY), os.open(image, os.O_RDWR)]
    assert mapper.info("cnt")["open_count"] == 2
    for fd in fds:
        os.close(fd)
    wait_for(lambda: mapper.info("cnt")["open_count"] == 0, "release of both opens")
    mapper.create("later", f"0 {MiB // 512} linear {disk} 0")
    assert "later" in os.listdir(export.mountpoint)
    mapper.remove("later")
    assert "later" not in os.listdir(export.mountpoint)


def test_stop_with_a_loop_device_attached(base, request, fuse_transport):
    work = base / request.node.name
    work.mkdir()
    mapper = Mapper()
    export = FuseExport(mapper, work / "mapper", **fuse_transport)
    undo = Undo()
    try:
        disk = backing_file(work, "disk.img", MiB)
        mapper.create("held", f"0 {MiB // 512} linear {disk} 0")
        export.start()
        undo.losetup(os.path.join(export.mountpoint, "held"))
        export.stop()  # must not hang or fail: the loop device gets EIO from now on
        assert str(work / "mapper") not in fuse_mounts()
        assert mapper.info("held")["open_count"] == 0
    finally:
        undo.close()
        export.stop()
        mapper.close()


def test_cleanup_stale_mount_of_a_killed_daemon(base, request):
    work = base / request.node.name
    work.mkdir()
    mnt = work / "mapper"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from userdm import Mapper
        from userdm.export.fuse import FuseExport
        FuseExport(Mapper(), {str(mnt)!r}).start()
        print("ready", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        child.wait()
        with pytest.raises(OSError) as exc:
            os.stat(mnt)
        # ECONNABORTED when the connection took FUSE over io_uring (its teardown aborts it)
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert cleanup_stale(mnt) is True
        assert os.path.isdir(mnt) and str(mnt) not in fuse_mounts()
        assert cleanup_stale(mnt) is False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if str(mnt) in fuse_mounts():
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_stop_while_a_reader_waits_on_a_suspended_device(base, request, fuse_transport):
    work = base / request.node.name
    work.mkdir()
    mapper = Mapper()
    export = FuseExport(mapper, work / "mapper", **fuse_transport)
    try:
        disk = backing_file(work, "disk.img", MiB)
        mapper.create("frozen", f"0 {MiB // 512} linear {disk} 0")
        export.start()
        fd = os.open(os.path.join(export.mountpoint, "frozen"), os.O_RDONLY)
        mapper.suspend("frozen")
        outcome: list[object] = []

        def read() -> None:
            try:
                outcome.append(os.pread(fd, 512, 0))
            except OSError as exc:
                outcome.append(exc.errno)

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()
        export.stop()  # must not wait for the suspended device
        reader.join(30)
        assert not reader.is_alive()
        assert outcome and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
        try:
            os.close(fd)
        except OSError as exc:  # the close's FUSE flush finds the connection gone
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert str(work / "mapper") not in fuse_mounts()
    finally:
        export.stop()
        mapper.close()


def test_ext4_on_a_passthrough_file_and_its_device_pinned_meanwhile(base, request):
    """A loop device on a passthrough FUSE file (the kernel does its I/O on the file): ext4
    made, filled, checked and read back; while the loop holds the file, the device refuses
    suspend (EBUSY), and accepts it once the loop is gone."""
    work = base / request.node.name
    work.mkdir()
    with exported(work, passthrough=True) as (mapper, export, undo, _):
        disk = backing_file(work, "disk.img", 64 * MiB)
        mapper.create("pt", f"0 {64 * MiB // 512} linear {disk} 0")
        loop = undo.losetup(os.path.join(export.mountpoint, "pt"), "--direct-io=on")
        with pytest.raises(DMError) as refused:
            mapper.suspend("pt")
        assert refused.value.errno == errno.EBUSY
        undo.detach(loop)
        wait_for(lambda: mapper.info("pt")["open_count"] == 0, "the loop device's close")
        ext4_round_trip(mapper, export, undo, work, "pt")
        assert export._ops.passthrough_opens >= 2
        mapper.suspend("pt")
        mapper.resume("pt")
