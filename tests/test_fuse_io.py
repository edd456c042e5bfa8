"""The FUSE files' I/O paths beyond read/write: fallocate (punch hole, zero range), lseek
SEEK_DATA/SEEK_HOLE, requests held by a suspended device while the mount serves others,
several exports in one process, and a mount unmounted from outside."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import threads_held_by_suspends, wait_until
from userdm import Mapper
from userdm.errors import DMError

pytestmark = [pytest.mark.fuse, pytest.mark.root]

if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
    pytest.skip("needs root and /dev/fuse", allow_module_level=True)
try:
    from userdm.export.fuse import FuseExport
    from userdm.export.fuse.server import BIG_THREADS, MIN_THREADS, RING_ENTRIES, _reply_pipe
    from userdm.export.fuse.unmount import fuse_mounts
except (ImportError, OSError) as _exc:
    pytest.skip(f"cannot load the FUSE server: {_exc}", allow_module_level=True)

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


@pytest.fixture
def served(tmp_path, fuse_transport):
    """(mapper, export, backing file) with device `dev` (4 MiB linear over a sparse file), for
    each FUSE transport (io_uring, /dev/fuse)."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    m = Mapper()
    m.create("dev", f"0 {4 * MiB // 512} linear {backing} 0")
    export = FuseExport(m, tmp_path / "mapper", **fuse_transport)
    export.start()
    try:
        assert (export._session.ring_entries > 0) == fuse_transport["uring"]
        yield m, export, backing
    finally:
        export.stop()
        m.close()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_punch_hole_and_zero_range_read_back_as_zeroes(served):
    m, export, backing = served
    fd = os.open(os.path.join(export.mountpoint, "dev"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\xab" * (2 * MiB), 0)
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, MiB, 4096)
        _fallocate(fd, 0, 0, 4 * MiB)                       # allocation: every byte exists
        with pytest.raises(OSError) as exc:
            _fallocate(fd, 0, 0, 8 * MiB)                   # a device cannot grow
        assert exc.value.errno == errno.EFBIG
        data = os.pread(fd, 2 * MiB, 0)
        assert os.fstat(fd).st_size == 4 * MiB
    finally:
        os.close(fd)
    want = bytearray(b"\xab" * (2 * MiB))
    want[4096:12288] = bytes(8192)
    want[MiB:MiB + 4096] = bytes(4096)
    assert data == want
    assert backing.read_bytes()[:2 * MiB] == want


def test_seek_data_and_seek_hole_follow_the_backing_file(served):
    m, export, backing = served
    fd = os.open(os.path.join(export.mountpoint, "dev"), os.O_RDWR)
    try:
        os.pwrite(fd, b"d" * MiB, MiB)                      # data in [1 MiB, 2 MiB), holes around
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == 2 * MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 3 * MiB, os.SEEK_HOLE) == 3 * MiB
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 3 * MiB, os.SEEK_DATA)             # only a hole up to the end
        assert exc.value.errno == errno.ENXIO
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 4 * MiB, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("length, data, readers", [
    (4, b"held", MIN_THREADS + 5),                          # more than the export starts with
    (256 * 1024, b"big" * 1000, BIG_THREADS + 3),           # more than start for big requests
    (4, b"many", 2 * RING_ENTRIES + 4),                     # more than a ring queue starts with
], ids=["small", "big", "many"])
def test_requests_held_by_a_suspended_device_do_not_stop_the_mount(served, tmp_path, length, data, readers):
    """More readers than the threads the export starts for them wait on a suspended device
    (big reads are served beside the leader, by at most BIG_THREADS threads started for
    them), and more than the entries an io_uring queue starts with; the directory and another
    device are served meanwhile; all complete after resume."""
    m, export, backing = served
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(MiB)
    m.create("other", f"0 {MiB // 512} linear {other} 0")
    fd = os.open(os.path.join(export.mountpoint, "dev"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        m.suspend("dev")
        got: list[bytes] = []
        threads = [threading.Thread(target=lambda: got.append(os.pread(fd, length, 0)[:len(data)]))
                   for _ in range(readers)]
        for i, t in enumerate(threads):   # one after the other: requests that come at once while
            t.start()                     # no io_uring entry is free wait in the kernel's queue
            assert wait_until(lambda: threads_held_by_suspends() > i)   # held inside the device
        assert not got

        def use_other() -> None:
            with open(os.path.join(export.mountpoint, "other"), "r+b") as f:
                f.write(b"served")
                f.seek(0)
                other_read.append(f.read(6))
            listing.append(sorted(os.listdir(export.mountpoint)))
        other_read: list[bytes] = []
        listing: list[list[str]] = []
        other_user = threading.Thread(target=use_other, daemon=True)   # a starved mount: fail, not hang
        other_user.start()
        other_user.join(30)
        assert other_read == [b"served"], "the other device was not served while reads were held"
        assert listing == [["dev", "other"]]
        assert not got
        m.resume("dev")
        for t in threads:
            t.join(30)
        assert got == [data] * len(threads)
        session = export._session
        assert (session._rings.taken > len(threads)) == (session.ring_entries > 0)   # they came by the ring
    finally:
        os.close(fd)


def test_two_exports_in_one_process(tmp_path):
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(MiB)
    m = Mapper()
    m.create("dev", f"0 {MiB // 512} linear {backing} 0")
    first, second = FuseExport(m, tmp_path / "a"), FuseExport(m, tmp_path / "b")
    first.start()
    try:
        second.start()
        try:
            Path(first.mountpoint, "dev").write_bytes(b"one mapper, two mounts")
            assert Path(second.mountpoint, "dev").read_bytes()[:22] == b"one mapper, two mounts"
        finally:
            second.stop()
        assert str(tmp_path / "b") not in fuse_mounts()
        assert Path(first.mountpoint, "dev").read_bytes()[:3] == b"one"
    finally:
        first.stop()
        m.close()
    assert str(tmp_path / "a") not in fuse_mounts()


def test_unmounted_from_outside(served):
    """The export notices; the opens of its files end with the mount (a deferred removal fires)."""
    m, export, backing = served
    fd = os.open(os.path.join(export.mountpoint, "dev"), os.O_RDONLY)
    assert m.info("dev")["open_count"] == 1
    m.remove("dev", deferred=True)
    # close_fds=False: Python 3.11 forks with vfork and keeps the GIL until the child execs, so
    # a child that closed its copy of `fd` before exec would wait for a FLUSH that this very
    # process (the FUSE server) cannot answer; CLOEXEC closes it after exec instead.
    subprocess.run(["umount", "-l", export.mountpoint], check=True, close_fds=False)
    os.close(fd)   # the kernel's release of a lazily detached mount may come late or never
    assert wait_until(lambda: not export.serving)
    assert wait_until(lambda: "dev" not in m.export_names())
    export.stop()
    assert export.mountpoint not in fuse_mounts()


def test_big_reads_are_spliced_from_the_file_and_read_what_the_device_holds(tmp_path):
    """READs of 64 KiB and more that lie in one file below a collapsed table are answered by
    splice (file -> pipe -> /dev/fuse); the others (across two segments, a target that is not
    a remap, past the end) fall back to a copy after the pipe is drained. Every read returns
    exactly the device's bytes."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    data = {p: os.urandom(8 * MiB) for p in (a, b)}
    for p, d in data.items():
        p.write_bytes(d)
    da, db = data[a], data[b]
    m = Mapper()
    m.create("lin", f"0 4096 linear {a} 4096")                              # at 2 MiB of a
    m.create("str", f"0 16384 striped 2 128 {a} 0 {b} 0")                   # 64 KiB chunks
    m.create("two", f"0 2048 linear {a} 0\n2048 2048 linear {b} 0")         # 1 MiB of each
    m.create("zero", "0 4096 zero")
    expect = {
        "lin": da[2 * MiB:4 * MiB],
        "str": b"".join((da if i % 2 == 0 else db)[i // 2 * 65536:(i // 2 + 1) * 65536] for i in range(128)),
        "two": da[:MiB] + db[:MiB],
        "zero": bytes(2 * MiB),
    }
    export = FuseExport(m, tmp_path / "mapper", uring=False)   # through io_uring, every read is copied
    export.start()
    try:
        ops = export._ops
        for name, want in expect.items():
            fd = os.open(os.path.join(export.mountpoint, name), os.O_RDONLY)
            try:
                for off, n in ((0, 65536), (4096, 200000), (MiB - 65536, 131072), (len(want) - 65536, MiB),
                               (0, 512 * 1024)):
                    assert os.pread(fd, n, off) == want[off:off + n], (name, off, n)
            finally:
                os.close(fd)
        # spliced: lin 4 and the 1 MiB request where a pipe may grow past 1 MiB (pipe-max-size,
        # or CAP_SYS_RESOURCE: the header takes a page), str 1 (the others cross a chunk), two 3
        # (two cross the segments), zero none
        pipe = _reply_pipe()
        assert pipe is not None
        os.close(pipe[0])
        os.close(pipe[1])
        assert ops.spliced == 8 + (pipe[2] >= MiB)
    finally:
        export.stop()
        m.close()


def test_passthrough_opens_do_their_io_in_the_kernel_and_pin_their_device(tmp_path, fuse_transport):
    """With passthrough, an open of a device that maps one file byte for byte reads and writes
    that file in the kernel (nothing reaches the server), and pins the device: suspend and a
    reload's resume are refused with EBUSY until it closes. Other devices, and opens made
    while the device is suspended, come through userdm; a deferred remove fires at the close."""
    a = tmp_path / "a.img"
    data = bytearray(os.urandom(8 * MiB))
    a.write_bytes(data)
    m = Mapper()
    m.create("whole", f"0 {8 * MiB // 512} linear {a} 0")
    m.create("off", f"0 {4 * MiB // 512} linear {a} {4 * MiB // 512}")      # not at offset 0
    m.create("part", f"0 {4 * MiB // 512} linear {a} 0")                     # not the whole file
    export = FuseExport(m, tmp_path / "mapper", passthrough=True, **fuse_transport)
    export.start()
    ops = export._ops
    path = lambda name: os.path.join(export.mountpoint, name)   # noqa: E731
    try:
        fd = os.open(path("whole"), os.O_RDWR)
        try:
            assert (ops.passthrough_opens, m.device("whole").kernel_io_opens) == (1, 1)
            assert os.pread(fd, 512 * 1024, 4096) == data[4096:4096 + 512 * 1024]
            os.pwrite(fd, b"through the kernel", 100)
            with open(a, "rb") as f:
                f.seek(100)
                assert f.read(18) == b"through the kernel"
            data[100:118] = b"through the kernel"
            assert ops.spliced == 0                          # the big read never came here
            with pytest.raises(DMError) as refused:
                m.suspend("whole")
            assert refused.value.errno == errno.EBUSY and "whole" in str(refused.value)
            m.load("whole", f"0 {8 * MiB // 512} zero")
            with pytest.raises(DMError) as refused:
                m.resume("whole")
            assert refused.value.errno == errno.EBUSY
            assert m.table("whole")[0][2] == "linear"
            m.clear("whole")
            for name in ("off", "part"):                     # these come through userdm
                with open(path(name), "rb", buffering=0) as f:
                    assert f.read(512 * 1024) == data[4 * MiB if name == "off" else 0:][:512 * 1024]
            # (big reads are spliced from /dev/fuse; through io_uring they are copied)
            assert ops.passthrough_opens == 1 and ops.spliced == (0 if fuse_transport["uring"] else 2)
            m.remove("whole", deferred=True)
        finally:
            os.close(fd)
        assert wait_until(lambda: "whole" not in m.export_names())   # the release fired the removal
        m.suspend("off")
        fd = os.open(path("off"), os.O_RDONLY)               # opened while suspended: held I/O
        try:
            m.resume("off")
            assert os.pread(fd, 4096, 0) == data[4 * MiB:4 * MiB + 4096]
            assert ops.passthrough_opens == 1
        finally:
            os.close(fd)
    finally:
        export.stop()
        m.close()
