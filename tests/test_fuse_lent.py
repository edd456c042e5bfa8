"""READs and WRITEs of FUSE serving threads through tables lent to them (export/fuse/lent.py).

What must hold, for each FUSE transport: a suspend below a device whose table a serving
thread borrowed completes while the mount keeps serving another device, and the device's
next request waits for the resume; after a reload below, the next request reads the new
file, never the old one; a request to a device that died fails with EIO."""

from __future__ import annotations

import errno
import os
import shutil
import threading

import pytest

from conftest import wait_until
from userdm import Mapper

pytestmark = [pytest.mark.fuse, pytest.mark.root]

if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
    pytest.skip("needs root and /dev/fuse", allow_module_level=True)
try:
    from userdm.export.fuse import FuseExport
except (ImportError, OSError) as _exc:
    pytest.skip(f"cannot load the FUSE server: {_exc}", allow_module_level=True)

MiB = 1 << 20
SECTORS = 4 * MiB // 512


@pytest.fixture
def served(tmp_path, images, fuse_transport, lends):
    """(mapper, mount directory, [file a, file b], lends): "low" linear over a, "top" over
    low, "busy" over a third file; lends[0] counts the tables lent."""
    a, b, c = images(3, 4 * MiB)
    m = Mapper()
    m.create("low", f"0 {SECTORS} linear {a} 0")
    m.create("top", f"0 {SECTORS} linear /dev/mapper/low 0")
    m.create("busy", f"0 {SECTORS} linear {c} 0")
    export = FuseExport(m, tmp_path / "mapper", **fuse_transport)
    export.start()
    try:
        yield m, tmp_path / "mapper", [a, b], lends
    finally:
        export.stop()
        m.close()


@pytest.fixture
def streaming(served):
    """4 KiB reads of "busy", one after another, until the test ends: the serving threads
    are rarely idle (they give back their tables when they sleep)."""
    stop = threading.Event()
    count = [0]

    def stream() -> None:
        fd = os.open(served[1] / "busy", os.O_RDONLY)
        try:
            while not stop.is_set():
                os.pread(fd, 4096, (count[0] % 1024) * 4096)
                count[0] += 1
        finally:
            os.close(fd)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    yield count
    stop.set()
    t.join(30)


def in_thread(fn, *args):  # noqa: ANN001, ANN201
    """Run fn(*args) in a thread; returns (thread, [result or exception])."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_suspend_below_completes_while_the_mount_is_busy_and_holds_the_next_read(served, streaming):
    m, mnt, _, lends = served
    fd = os.open(mnt / "top", os.O_RDWR)
    try:
        data = os.urandom(4096)
        for i in range(64):
            assert os.pwrite(fd, data, i * 4096) == 4096
            assert os.pread(fd, 4096, i * 4096) == data
        assert lends[0] > 0
        before = streaming[0]
        t, _ = in_thread(m.suspend, "low")
        t.join(30)
        assert not t.is_alive(), "the suspend waits for a table lent to a serving thread"
        reader, got = in_thread(os.pread, fd, 4096, 0)
        reader.join(0.3)
        assert reader.is_alive() and not got, "a read of a suspended device must wait"
        m.resume("low")
        reader.join(30)
        assert got == [data]
        assert streaming[0] > before      # the mount served "busy" meanwhile
    finally:
        os.close(fd)


def test_after_a_reload_below_the_next_read_sees_the_new_file(served, streaming):
    m, mnt, (a, b), _ = served
    fd = os.open(mnt / "top", os.O_RDWR)
    try:
        old, new = os.urandom(4096), os.urandom(4096)
        for _ in range(16):
            os.pwrite(fd, old, 8192)
            assert os.pread(fd, 4096, 8192) == old
        m.suspend("low")
        shutil.copyfile(a, b)
        with open(b, "r+b") as f:
            f.seek(8192)
            f.write(new)
        m.load("low", f"0 {SECTORS} linear {b} 0")
        m.resume("low")
        assert os.pread(fd, 4096, 8192) == new
        os.pwrite(fd, old, 12288)
        with open(b, "rb") as f:
            f.seek(12288)
            assert f.read(4096) == old         # and writes land in the new file
    finally:
        os.close(fd)


def test_a_read_after_the_device_died_fails_with_eio(served):
    m, mnt, _, lends = served
    fd = os.open(mnt / "top", os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)
        assert lends[0] > 0
        m.device("low").mark_dead(False)
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_writers_lose_nothing_while_an_interposer_attaches_and_detaches_below(served):
    """Writes and reads through "top"'s FUSE file while interposers attach to and detach
    from "low" in a loop: every write is read back, and lands in low's file."""
    m, mnt, (a, _), lends = served
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}
    count = [0]

    def writer() -> None:
        fd = os.open(mnt / "top", os.O_RDWR)
        try:
            while not stop.is_set():
                n = count[0]
                block = (n % 512) * 4096
                data = bytes([n % 251 + 1]) * 4096
                assert os.pwrite(fd, data, block) == 4096
                assert os.pread(fd, 4096, block) == data
                written[block] = data
                count[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            os.close(fd)

    def more_writes() -> None:
        """Wait for 20 more writes (or a writer that failed)."""
        until = count[0] + 20
        assert wait_until(lambda: count[0] >= until or errors, 30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(10):
            more_writes()
            m.create(f"front{i}", f"0 {SECTORS} linear [interpose]/dev/mapper/low 0", interpose=True)
            more_writes()
            m.remove(f"front{i}")
        more_writes()
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors[0]
    assert written and lends[0] > 1
    with open(a, "rb") as f:
        for block, data in written.items():
            f.seek(block)
            assert f.read(4096) == data
