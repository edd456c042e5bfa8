"""Replies to /dev/fuse held and sent in batches (export/fuse/replies.py).

What must hold: how many replies a thread holds follows the depth of the queue (one request
at a time, or a queue of four, holds none); held replies all arrive, also those built while
the held ones left; under a deep queue of direct I/O the replies go in batches and fio's
verify passes; and a request held by a suspended device never holds the replies of another
device's requests that the same thread served before it."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from conftest import wait_until
from userdm import Mapper
from userdm.export.fuse import replies as R

MiB = 1 << 20


def _ring_or_skip() -> None:
    from userdm.export.fuse.uring import Ring
    try:
        ring = Ring(2)
    except OSError as exc:
        pytest.skip(f"no io_uring here: {exc}")
    with ring.lock:
        ring.close()
    ring.release_fd()


@pytest.fixture
def pipe_replies():
    """(Replies writing to a pipe, the pipe's read end)."""
    _ring_or_skip()
    r, w = os.pipe()
    replies = R.Replies(w, "test")
    try:
        yield replies, r
    finally:
        replies.close()
        os.close(r)
        os.close(w)


def deepen(replies: R.Replies, reads: int = 10_000) -> None:
    for _ in range(reads):
        replies.read()


def test_a_deep_queue_holds_more_and_a_dry_queue_halves_it(pipe_replies):
    replies, _ = pipe_replies
    assert not replies.holding
    deepen(replies)
    assert replies.holding and replies.limit == R.MOST
    replies.drained()         # after a long run: the queue is deeper than what is held
    assert replies.limit == R.MOST
    for _ in range(10):       # the queue was 10 deep
        replies.read()
    replies.drained()
    assert replies.limit == 5 and replies.holding
    for _ in range(6):
        replies.read()
    replies.drained()
    assert replies.limit == 3 and not replies.holding


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_shallow_queues_never_hold(pipe_replies, depth):
    replies, _ = pipe_replies
    for _ in range(20_000):
        for _ in range(depth):
            replies.read()
            assert not replies.holding
        replies.drained()


def test_without_io_uring_nothing_is_held(monkeypatch):
    """A kernel or a seccomp filter that refuses io_uring: every reply goes at once."""
    import errno

    def refused(entries):  # noqa: ANN001, ANN202
        raise OSError(errno.EPERM, "io_uring_setup: Operation not permitted")

    monkeypatch.setattr(R, "Ring", refused)
    replies = R.Replies(-1, "test")
    deepen(replies)
    assert not replies.holding and not replies.usable and replies.limit == 1


def test_held_replies_all_arrive(pipe_replies):
    replies, r = pipe_replies
    deepen(replies)
    records = [bytes([i]) * 64 for i in range(40)]
    for i, rec in enumerate(records):
        if i % 2:
            replies.hold(rec)                     # a reply made as bytes
        else:
            buf = replies.buffer()                # a reply built in place
            buf[:64] = rec
            replies.hold(buf[:64])
        if i == 25:
            replies.send()                        # a wait comes
    replies.drained()
    got = os.read(r, 1 << 16)
    assert sorted(got[i:i + 64] for i in range(0, len(got), 64)) == sorted(records)


def test_a_reply_built_while_the_held_ones_leave_arrives_whole(pipe_replies):
    replies, r = pipe_replies
    deepen(replies)
    for i in range(3):
        replies.hold(bytes([i]) * 16)
    buf = replies.buffer()                        # slot 3 handed out...
    replies.send()                                # ...the held ones leave while it is built
    buf[:16] = b"\x07" * 16
    replies.hold(buf[:16])
    replies.send()
    got = os.read(r, 1 << 16)
    assert sorted(got[i:i + 16] for i in range(0, len(got), 16)) == sorted(
        [bytes([i]) * 16 for i in range(3)] + [b"\x07" * 16])


def test_ring_writes_wait_for_all_and_report_each_failure():
    """`Ring.write_all` across the completion queue's wrap: every write lands, and a write
    that fails is named with its errno."""
    _ring_or_skip()
    import ctypes
    import errno
    from userdm.export.fuse.uring import Ring
    ring = Ring(8)                            # 8 submission slots, 16 completions: wraps often
    data = ctypes.create_string_buffer(b"abc" * 8)
    r, w = os.pipe()
    bad = os.open(os.devnull, os.O_RDONLY)
    try:
        for rounds in range(12):
            n = 1 + rounds % 8
            assert ring.write_all(w, [(ctypes.addressof(data) + 3 * i, 3) for i in range(n)]) == []
            assert os.read(r, 100) == b"abc" * n
            failed = ring.write_all(bad, [(ctypes.addressof(data), 3)] * 3)
            assert failed == [(i, -errno.EBADF) for i in range(3)]
    finally:
        with ring.lock:
            ring.close()
        ring.release_fd()
        for fd in (r, w, bad):
            os.close(fd)


# ---- with the kernel ---------------------------------------------------------------------


def _fuse_or_skip() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    if shutil.which("fio") is None:
        pytest.skip("needs fio")
    _ring_or_skip()


@pytest.fixture
def mount(tmp_path, images, batches):
    """(mapper, mount directory, batches): devices "a" and "b" over files, served from /dev/fuse."""
    _fuse_or_skip()
    from userdm.export.fuse import FuseExport
    a, b = images(2, 64 * MiB)
    m = Mapper()
    m.create("a", f"0 {64 * MiB // 512} linear {a} 0")
    m.create("b", f"0 {64 * MiB // 512} linear {b} 0")
    export = FuseExport(m, tmp_path / "mapper", uring=False)
    export.start()
    try:
        yield m, tmp_path / "mapper", batches
    finally:
        export.stop()
        m.close()


def fio(path, *extra: str) -> list[str]:
    return ["fio", "--name=deep", f"--filename={path}", "--bs=4k", "--iodepth=32", "--ioengine=libaio",
            "--direct=1", "--output-format=terse", "--verify_state_save=0", *extra]


def test_a_deep_queue_of_direct_writes_verifies_through_batches(mount):
    _, mnt, batches = mount
    res = subprocess.run(fio(mnt / "a", "--rw=randwrite", "--size=32m", "--verify=crc32c",
                             "--verify_fatal=1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert batches[0] > 0, "no replies were sent in batches"


def test_a_suspended_device_never_holds_the_replies_of_another(mount):
    """The thread that takes a request of suspended "b" sends the replies of "a" it held
    first: fio on "a" finishes its run while "b" stays suspended."""
    m, mnt, batches = mount
    with open(mnt / "b", "r+b", buffering=0) as f:
        f.write(b"B" * 4096)
    deep = subprocess.Popen(fio(mnt / "a", "--rw=randread", "--size=64m", "--time_based", "--runtime=3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[bytes] = []
    reader = None
    try:
        assert wait_until(lambda: batches[0] > 0), "no replies held under fio's queue"
        m.suspend("b")
        try:
            def read_b() -> None:
                fd = os.open(mnt / "b", os.O_RDONLY)
                try:
                    got.append(os.pread(fd, 4096, 0))
                finally:
                    os.close(fd)

            reader = threading.Thread(target=read_b, daemon=True)
            reader.start()
            out, err = deep.communicate(timeout=60)
            assert deep.returncode == 0, err
            assert reader.is_alive() and not got, "the read of suspended b did not wait"
        finally:
            m.resume("b")
        reader.join(30)
        assert got == [b"B" * 4096]
    finally:
        if deep.poll() is None:
            deep.kill()
            deep.wait()
