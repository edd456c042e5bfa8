"""Hostile clients of the FUSE export through the kernel: requests the server does not know,
a request interrupted by a signal while its device is suspended, and a forced unmount from
outside while a process does I/O, also while the serving threads hold replies of a deep
queue. The export and the mapper carry on (or end cleanly)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import threads_held_by_suspends, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.hostile]

if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
    pytest.skip("needs root and /dev/fuse", allow_module_level=True)

from userdm import Mapper  # noqa: E402
from userdm.export.fuse import FuseExport  # noqa: E402
from userdm.export.fuse.unmount import fuse_mounts  # noqa: E402
from test_fuse_io import served  # noqa: E402,F401  (mapper, export, backing): device `dev`, 4 MiB

MiB = 1 << 20


def child(code: str) -> subprocess.Popen[str]:
    # close_fds=False: see test_fuse_io.test_unmounted_from_outside (vfork and this process's FUSE files)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, close_fds=False)


def test_requests_the_server_does_not_know_fail_and_the_mount_serves_on(served):
    m, export, _ = served
    mnt = export.mountpoint
    for call, err in ((lambda: os.mkdir(os.path.join(mnt, "d")), errno.ENOSYS),
                      (lambda: os.symlink("dev", os.path.join(mnt, "l")), errno.ENOSYS),
                      (lambda: os.link(os.path.join(mnt, "dev"), os.path.join(mnt, "h")), errno.EPERM),   # the kernel turns LINK's ENOSYS into EPERM
                      (lambda: open(os.path.join(mnt, "new"), "w"), errno.ENOSYS),     # CREATE, MKNOD
                      (lambda: os.unlink(os.path.join(mnt, "dev")), errno.ENOSYS),
                      (lambda: os.rename(os.path.join(mnt, "dev"), os.path.join(mnt, "x")), errno.ENOSYS),
                      (lambda: os.setxattr(os.path.join(mnt, "dev"), "user.a", b"1"), errno.EOPNOTSUPP),
                      (lambda: os.chmod(os.path.join(mnt, "dev"), 0o600), errno.EPERM),
                      (lambda: os.truncate(os.path.join(mnt, "dev"), MiB), errno.EINVAL)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == err
    with open(os.path.join(mnt, "dev"), "r+b") as f:
        f.write(b"still served")
        f.seek(0)
        assert f.read(12) == b"still served"
    assert os.listdir(mnt) == ["dev"]
    assert wait_until(lambda: m.info("dev")["open_count"] == 0)   # RELEASE follows the close


def test_an_interrupted_request_completes_when_its_device_resumes(served):
    """A signal to a reader held by a suspended device makes the kernel send INTERRUPT; the
    server finishes the read after resume and the reader gets its data."""
    m, export, _ = served
    path = os.path.join(export.mountpoint, "dev")
    with open(path, "r+b") as f:
        f.write(b"interrupted")
    m.suspend("dev")
    try:
        reader = child(f"""
            import os, signal, sys
            signal.signal(signal.SIGUSR1, lambda *a: None)
            fd = os.open({path!r}, os.O_RDONLY)
            print("open", flush=True)
            print(os.pread(fd, 11, 0).decode(), flush=True)
        """)
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "open"
        assert wait_until(lambda: threads_held_by_suspends() >= 1)   # the READ is held
        before = export._ops.interrupts
        reader.send_signal(signal.SIGUSR1)
        assert wait_until(lambda: export._ops.interrupts > before)
        assert reader.poll() is None
    finally:
        m.resume("dev")
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert out.strip() == "interrupted"
    assert wait_until(lambda: m.info("dev")["open_count"] == 0)


def test_forced_unmount_from_outside_mid_io(served):
    """`umount -f` aborts the connection while a process writes and reads in a loop: its I/O
    fails (it does not hang), the export notices and closes the opens, the mapper carries on."""
    m, export, _ = served
    path = os.path.join(export.mountpoint, "dev")
    writer = child(f"""
        import os
        fd = os.open({path!r}, os.O_RDWR)
        print("open", flush=True)
        block = os.urandom(65536)
        try:
            while True:
                for off in range(0, 4 << 20, 65536):
                    os.pwrite(fd, block, off)
                    assert os.pread(fd, 65536, off) == block
        except OSError as exc:
            print(exc.errno, flush=True)
    """)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "open"
    assert wait_until(lambda: m.info("dev")["open_count"] == 1)
    subprocess.run(["umount", "-f", export.mountpoint], capture_output=True, close_fds=False)
    out, err = writer.communicate(timeout=30)
    assert int(out.strip()) in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV), err
    assert wait_until(lambda: not export.serving)
    assert wait_until(lambda: m.info("dev")["open_count"] == 0)
    m.remove("dev")                      # no open is left behind
    export.stop()
    assert export.mountpoint not in fuse_mounts()


@pytest.fixture
def served_from_dev_fuse(tmp_path):
    """(mapper, export): device `dev` (4 MiB) served from /dev/fuse, where serving threads hold
    replies (`replies.py`; entries of FUSE over io_uring are committed by the ring)."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    m = Mapper()
    m.create("dev", f"0 {4 * MiB // 512} linear {backing} 0")
    export = FuseExport(m, tmp_path / "mapper", uring=False)
    export.start()
    try:
        yield m, export
    finally:
        export.stop()
        m.close()


def test_forced_unmount_while_replies_are_held(served_from_dev_fuse, batches, caplog):
    """`umount -f` while fio keeps 32 direct reads and writes in flight, so that the serving
    threads hold replies: fio fails instead of hanging, the held replies go nowhere without
    an error logged, and the export ends cleanly."""
    if shutil.which("fio") is None:
        pytest.skip("needs fio")
    m, export = served_from_dev_fuse
    path = os.path.join(export.mountpoint, "dev")
    fio = subprocess.Popen(["fio", "--name=deep", f"--filename={path}", "--rw=randrw", "--bs=4k",
                            "--iodepth=32", "--ioengine=libaio", "--direct=1", "--time_based",
                            "--runtime=60", "--output-format=terse"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, close_fds=False)
    try:
        assert wait_until(lambda: batches[0] > 0), "no replies were held"
        with caplog.at_level(logging.ERROR, logger="userdm"):
            subprocess.run(["umount", "-f", export.mountpoint], capture_output=True, close_fds=False)
            fio.communicate(timeout=30)
            assert fio.returncode != 0
            assert wait_until(lambda: not export.serving)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert wait_until(lambda: m.info("dev")["open_count"] == 0)
        m.remove("dev")
        export.stop()
        assert export.mountpoint not in fuse_mounts()
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
