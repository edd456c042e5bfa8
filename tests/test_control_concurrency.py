"""Locks that fit the work (issues 11 and 12): a device whose I/O is stuck, or a create that
waits on a slow NBD server, delays only requests about that device. Other devices' control
requests (`ls`, `info`, `create`, `remove`) and their I/O complete meanwhile, and SIGTERM stops
the daemon even with a stuck device. Assertions are about order and completion, never time."""

from __future__ import annotations

import errno
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import Daemon, wait_until
from userdm.errors import DMError
from userdm.nbd.client import RemoteDevice

MiB = 1 << 20
SECTORS = 4 * MiB // 512


class Export:
    """An open of one of the daemon's NBD exports."""

    def __init__(self, d: Daemon, name: str) -> None:
        self.dev = RemoteDevice(f"nbd+unix:///{name}?socket={d.runtime / 'nbd.sock'}")
        self.handle = self.dev.open(write=True)

    def close(self) -> None:
        self.handle.close()
        self.dev.close_backing()


def delay_status(client, name: str) -> list[int]:
    return [int(x) for x in client.status(name)[0][3].split()]


@pytest.mark.hostile
def test_a_stuck_device_does_not_hold_up_requests_about_others(tmp_path, images):
    img, other_img = images(2, 4 * MiB)
    with open(other_img, "r+b") as f:
        f.write(b"other data")
    d = Daemon(tmp_path)
    d.start()
    exports: list[Export] = []
    threads: list[threading.Thread] = []
    try:
        d.run("create", "lower", "--table", f"0 {SECTORS} linear {img} 0")
        d.run("create", "stuck", "--table", f"0 {SECTORS} delay /dev/mapper/lower 0 600000")
        d.run("create", "flushy", "--table", f"0 {SECTORS} linear /dev/mapper/lower 0")
        d.run("create", "other", "--table", f"0 {SECTORS} linear {other_img} 0")
        stuck = Export(d, "stuck")
        exports.append(stuck)
        read_done = threading.Event()
        threads.append(threading.Thread(target=lambda: (stuck.handle.read(0, 4096), read_done.set())))
        threads[-1].start()
        with d.connect() as client:
            assert wait_until(lambda: delay_status(client, "stuck")[0] == 1)  # the read is held by delay
            client.suspend("lower")
            suspended = threading.Event()
            threads.append(threading.Thread(target=lambda: (d.connect().suspend("stuck"), suspended.set())))
            threads[-1].start()
            # and a suspend whose flush waits for `lower`
            flushed = threading.Event()
            threads.append(threading.Thread(target=lambda: (d.connect().suspend("flushy"), flushed.set())))
            threads[-1].start()
            # the suspend released the delayed read into `lower`, which holds it: the drain is stuck
            assert wait_until(lambda: delay_status(client, "stuck")[0] == 0)
            other = Export(d, "other")
            exports.append(other)
            for i in range(25):  # 100 requests about other devices, and I/O to another device
                assert client.info("other")["live"]
                assert "other" in [dev["name"] for dev in client.list()]
                client.create(f"n{i}", "0 8 zero")
                client.remove(f"n{i}")
                assert other.handle.read(0, 10) == b"other data"
            assert "stuck" in d.run("ls").stdout and not client.info("stuck")["suspended"]
            client.create("spare", "0 8 zero")
            left = client.remove_all()["left_open"]  # returns, leaving the busy and the open ones
            assert sorted(left) == ["flushy", "lower", "other", "stuck"] and "spare" not in d.run("ls").stdout
            assert not suspended.is_set() and not read_done.is_set()  # still stuck after all that
            assert not flushed.is_set()
            client.resume("lower")
            assert suspended.wait(60) and read_done.wait(60) and flushed.wait(60)
            assert client.info("stuck")["suspended"] and client.info("flushy")["suspended"]
            client.resume("stuck")
            client.resume("flushy")
    finally:
        for e in exports:
            e.close()
        d.stop()
        for t in threads:
            t.join(60)


@pytest.mark.hostile
def test_sigterm_stops_the_daemon_with_a_stuck_device(tmp_path, images):
    (img,) = images(1, 4 * MiB)
    d = Daemon(tmp_path)
    d.start()
    exports: list[Export] = []
    threads: list[threading.Thread] = []
    try:
        d.run("create", "lower", "--table", f"0 {SECTORS} linear {img} 0")
        d.run("create", "stuck", "--table", f"0 {SECTORS} linear /dev/mapper/lower 0")
        d.run("suspend", "lower")
        stuck = Export(d, "stuck")
        exports.append(stuck)

        def read() -> None:
            try:
                stuck.handle.read(0, 4096)
            except DMError:
                pass  # the daemon went away under the held read
        threads.append(threading.Thread(target=read))
        threads[-1].start()
        threads.append(threading.Thread(target=lambda: d.run("suspend", "stuck", check=False)))
        threads[-1].start()
        with d.connect() as client:
            assert wait_until(lambda: client.info("stuck")["open_count"] == 1)
        proc = d.proc
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)  # a hang guard only: the daemon's own bound is STOP_TIMEOUT
        assert proc.returncode is not None
        d.proc = None
        d.start()  # and it comes back with both devices, lower still suspended
        with d.connect() as client:
            assert client.info("lower")["suspended"] and client.info("stuck")["live"]
            client.resume("lower")
    finally:
        for e in exports:
            try:
                e.close()
            except DMError:
                pass
        d.stop()
        for t in threads:
            t.join(60)


class GatedProxy:
    """A Unix socket in front of an NBD server that holds every connection, before a single
    byte of the handshake, until `open()`: a slow NBD server, without any timing."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.waiting.release()
        self.gate.wait()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)
        self.conns.append(upstream)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")
def test_a_slow_create_does_not_block_other_creates(tmp_path):
    upstream = tmp_path / "nbdkit.sock"
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(upstream), "--exit-with-parent",
                               "memory", "64M"], stderr=subprocess.DEVNULL)
    proxy = None
    d = Daemon(tmp_path)
    slow_result: dict = {}
    slow = None
    try:
        assert wait_until(upstream.exists)
        proxy = GatedProxy(tmp_path / "slow.sock", str(upstream))
        d.start()

        def create_slow() -> None:
            try:
                with d.connect() as c:
                    slow_result["info"] = c.create("slow", f"0 {64 * MiB // 512} linear "
                                                           f"nbd+unix:///?socket={proxy.path} 0")
            except DMError as exc:
                slow_result["error"] = exc
        slow = threading.Thread(target=create_slow)
        slow.start()
        assert proxy.waiting.acquire(timeout=60)  # the slow create is connecting, held at the gate
        finished: list[str] = []
        with d.connect() as client:
            info = client.info("slow")  # its name is taken at create ...
            assert not info["live"]
            with pytest.raises(DMError) as exc:  # ... so a second create of it is EBUSY
                client.create("slow", "0 8 zero")
            assert exc.value.errno == errno.EBUSY
            for i in range(50):
                client.create(f"quick{i}", "0 8 zero")
                finished.append(f"quick{i}")
            assert len(client.list()) == 51
            assert slow.is_alive() and not slow_result  # all 50 finished before the slow one
            proxy.open()
            slow.join(60)
            assert "error" not in slow_result, slow_result
            assert slow_result["info"]["live"] and client.info("slow")["size"] == 64 * MiB
        assert len(finished) == 50
    finally:
        if proxy is not None:
            proxy.close()
        if slow is not None:
            slow.join(60)
        d.stop()
        nbdkit.terminate()
        try:
            nbdkit.wait(30)
        except subprocess.TimeoutExpired:
            nbdkit.kill()
            nbdkit.wait()
