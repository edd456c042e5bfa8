"""Polling before sleeping (export/busypoll.py): the adaptive window, `--poll-us`, and the
serving threads that poll (an NBD connection alone in its thread, the FUSE leader on
/dev/fuse and on io_uring): requests one after another are all answered right, and once the
client stops, the serving threads stop using the CPU (a poll that never ends would burn it)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from test_nbd_loop import Client
from userdm import Mapper
from userdm.errors import DMError
from userdm.export import busypoll
from userdm.export.busypoll import FLOOR, START, PollWindow
from userdm.export.nbd.server import NBDServer

MiB = 1 << 20


# ---- the window ----------------------------------------------------------------------------

def test_a_window_that_catches_requests_stays_open():
    w = PollWindow(100e-6)
    assert w.window == 100e-6
    before = time.perf_counter()
    deadline = w.deadline()
    assert before + 100e-6 <= deadline <= time.perf_counter() + 100e-6
    w.slept(20e-6)                      # just missed: a longer poll would have caught it
    assert w.window == 100e-6           # (never above the limit)


def test_long_sleeps_close_the_window_and_short_ones_open_it_again():
    w = PollWindow(100e-6)
    halvings = []
    while w.window:
        w.slept(0.5)                    # the client paused: polling was wasted
        halvings.append(w.window)
    assert halvings == [50e-6, 25e-6, 12.5e-6, 6.25e-6, 0.0]
    assert 6.25e-6 / 2 < FLOOR
    assert w.deadline() == 0.0          # closed: sleep at once
    w.slept(30e-6)                      # a request soon after the thread slept: open again
    assert w.window == START
    w.slept(30e-6)
    assert w.window == 2 * START
    for _ in range(10):
        w.slept(1e-6)
    assert w.window == 100e-6


def test_wait_polls_then_sleeps_once():
    w = PollWindow(100e-6)
    assert w.wait(lambda: [1], lambda: pytest.fail("slept with a request there")) == [1]
    looks: list[int] = []
    assert w.wait(lambda: looks.append(1) or [], lambda: ["woken"]) == ["woken"]
    assert len(looks) >= 1              # the poll looked at least once before it slept
    closed = PollWindow(0.0)
    looks.clear()
    assert closed.wait(lambda: looks.append(1) or [], lambda: ["woken"]) == ["woken"]
    assert looks == [1]                 # no window: one look, then sleep


def test_limit_zero_never_polls():
    w = PollWindow(0.0)
    assert w.deadline() == 0.0
    w.slept(1e-6)
    assert w.deadline() == 0.0 and w.window == 0.0


def test_a_poll_gives_way_when_the_cpus_are_wanted():
    """With more runnable processes than CPUs, `pause` does not yield (a yield into a busy
    run queue loses the CPU for a whole slice): it ends the poll and shrinks the window."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)) + 2)]
    try:
        time.sleep(0.3)                 # all of them running
        w = PollWindow(100e-6)
        assert not any(w.pause() for _ in range(20))
        assert w.window == 0.0
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.mark.parametrize("us", [-1, busypoll.MAX_US + 1])
def test_configure_refuses_a_window_out_of_range(us):
    with pytest.raises(DMError) as exc:
        busypoll.configure(us)
    assert exc.value.errno == errno.EINVAL and "--poll-us" in str(exc.value)


def test_configure_sets_the_windows_made_after_it(monkeypatch):
    monkeypatch.setattr(busypoll, "LIMIT", busypoll.LIMIT)
    busypoll.configure(0)
    assert PollWindow().deadline() == 0.0
    busypoll.configure(300)
    assert PollWindow().window == pytest.approx(300e-6)


def test_the_daemon_refuses_poll_us_out_of_range(tmp_path):
    r = subprocess.run([sys.executable, "-m", "userdm", "daemon", "--runtime-dir", str(tmp_path / "run"),
                        "--state-dir", str(tmp_path / "state"), "--no-fuse", "--no-nbd", "--poll-us", "-3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--poll-us -3" in r.stderr and "microseconds" in r.stderr


# ---- serving threads ----------------------------------------------------------------------

def _cpu_while_idle(seconds: float = 0.5) -> float:
    """CPU seconds this process used over `seconds` of wall time, in which it waits."""
    t = os.times()
    time.sleep(seconds)
    u = os.times()
    return (u.user + u.system) - (t.user + t.system)


@pytest.mark.parametrize("us", [200, 0])
def test_nbd_requests_one_after_another_then_idle(tmp_path, images, monkeypatch, us):
    """One connection alone (its thread polls unless --poll-us 0): 300 writes and reads at
    queue depth 1, each checked; then the client waits, and the server uses no CPU."""
    monkeypatch.setattr(busypoll, "LIMIT", us * 1e-6)
    (img,) = images(1, 4 * MiB)
    m = Mapper()
    m.create("vol", f"0 {4 * MiB // 512} linear {img} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", offload_workers=0)
    srv.start()
    c = Client.plain(tmp_path / "nbd.sock", "vol")
    try:
        for i in range(300):                # a write and its read back, one after another
            block = os.urandom(4096)
            c.check((i * 7919 % 1024) * 4096, block)
        assert _cpu_while_idle() < 0.1      # the connection's thread sleeps in recv
        with open(img, "rb") as f:
            f.seek((299 * 7919 % 1024) * 4096)
            assert f.read(4096) == block
    finally:
        c.close()
        srv.stop()
        m.close()


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_fuse_requests_one_after_another_then_idle(tmp_path, fuse_transport):
    """The FUSE leader polls (on /dev/fuse, or on the ring): 300 O_DIRECT writes and reads one
    after another, each checked; then nothing comes, and the leader uses no CPU."""
    from userdm.export.fuse import FuseExport
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    m = Mapper()
    m.create("dev", f"0 {4 * MiB // 512} linear {backing} 0")
    export = FuseExport(m, tmp_path / "mapper", **fuse_transport)
    export.start()
    try:
        buf = bytearray(4096)
        fd = os.open(tmp_path / "mapper" / "dev", os.O_RDWR | os.O_DIRECT)
        try:
            import mmap
            aligned = mmap.mmap(-1, 4096)
            for i in range(300):
                block = os.urandom(4096)
                aligned[:] = block
                offset = (i * 7919 % 1024) * 4096
                assert os.pwritev(fd, [aligned], offset) == 4096
                aligned[:] = bytes(4096)
                assert os.preadv(fd, [aligned], offset) == 4096
                assert aligned[:] == block
            buf[:] = aligned[:]
        finally:
            os.close(fd)
        assert _cpu_while_idle() < 0.1
        with open(backing, "rb") as f:
            f.seek((299 * 7919 % 1024) * 4096)
            assert f.read(4096) == bytes(buf)
    finally:
        export.stop()
        m.close()
