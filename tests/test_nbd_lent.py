"""Inline NBD requests served through a Flat lent to the batch (export/nbd/connection.py,
`_lent`), by a connection in its own thread and by the server's loop (two connections, no
worker processes).

What must hold: the lent Flat is given back before anything can wait, so a suspend here or
below completes while a connection streams requests, and the next request waits for the
resume; data written while the devices are suspended, resumed and reloaded onto another
file is right (fio's verify); a request to a device that died fails with EIO through the
open, and the connection goes on."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import threading

import pytest

from conftest import wait_until
from test_nbd_loop import Client, recv_exact
from test_nbd_offload import SECTORS, churning, fio_verify
from userdm import Mapper
from userdm.export.nbd.server import NBDServer
from userdm.nbd import constants as C

MiB = 1 << 20


@pytest.fixture
def served(tmp_path, images, lends):
    """(mapper, server, [file a, file b], lends): "low" linear over a, "top" linear over low,
    served on nbd.sock without worker processes; lends[0] counts the Flats lent."""
    m = Mapper()
    a, b = images(2, 64 * MiB)
    m.create("low", f"0 {SECTORS} linear {a} 0\n")
    m.create("top", f"0 {SECTORS} linear /dev/mapper/low 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", offload_workers=0)
    srv.start()
    try:
        yield m, srv, [a, b], lends
    finally:
        srv.stop()
        m.close()


def test_fio_verify_one_connection_while_suspended_resumed_and_reloaded(served, tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    m, srv, files, lends = served
    out = tmp_path / "fio.json"
    with churning(m, srv, files, ready=lambda: lends[0] > 0) as turns:
        proc = fio_verify(f"nbd+unix:///top?socket={tmp_path / 'nbd.sock'}", 1, "16M", out)
    assert proc.returncode == 0, proc.stderr
    assert '"error" : 0' in out.read_text()
    assert turns[0] >= 1 and lends[0] > 0


def suspended_in_time(m: Mapper, name: str) -> None:
    """Suspend `name` from another thread; fail if it does not complete (a lent Flat kept)."""
    t = threading.Thread(target=m.suspend, args=(name,), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), f"suspend of {name} hangs"


@pytest.mark.parametrize("connections", [1, 2], ids=["own-thread", "loop"])
def test_suspend_below_completes_and_holds_the_next_request(served, connections):
    m, srv, _, lends = served
    clients = [Client.plain(srv.unix_path, "top") for _ in range(connections)]
    def io() -> bool:
        for i, c in enumerate(clients):
            c.check(i * 8192, os.urandom(4096))
        return srv.loop.served() == (connections if connections > 1 else 0)   # two: both in the loop

    assert wait_until(io, 30) and lends[0] > 0
    suspended_in_time(m, "low")
    cookie = clients[0].send_read(0, 4096)
    clients[0].sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        recv_exact(clients[0].sock, 1)
    clients[0].sock.settimeout(30)
    m.resume("low")
    assert len(clients[0].reply(cookie, 4096)) == 4096
    for i, c in enumerate(clients):
        c.check(i * 8192, os.urandom(4096))
        c.close()


def test_a_request_after_the_device_died_fails_with_eio(served):
    m, srv, _, lends = served
    c = Client.plain(srv.unix_path, "top")
    c.check(0, os.urandom(4096))
    assert lends[0] > 0
    m.device("low").mark_dead(False)
    cookie = c.send_read(0, 4096)
    magic, err, got = struct.unpack(">IIQ", recv_exact(c.sock, 16))
    assert (magic, err, got) == (C.SIMPLE_REPLY_MAGIC, errno.EIO, cookie)
    cookie = c.send_write(4096, os.urandom(4096))
    magic, err, got = struct.unpack(">IIQ", recv_exact(c.sock, 16))
    assert (magic, err, got) == (C.SIMPLE_REPLY_MAGIC, errno.EIO, cookie)
    c.close()


def test_fio_verify_one_connection_while_an_interposer_attaches_and_detaches(served, tmp_path):
    """An interposer over "low" takes the I/O of "top" (through low) while attached: the
    connection's lent table is dropped at each attach and detach, and no write is lost."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    m, srv, _, lends = served
    stop = threading.Event()
    rounds = [0]
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                m.create(f"front{rounds[0]}", f"0 {SECTORS} linear [interpose]/dev/mapper/low 0", interpose=True)
                stop.wait(0.02)
                m.remove(f"front{rounds[0]}")
                rounds[0] += 1
                stop.wait(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=churn)
    out = tmp_path / "fio.json"
    t.start()
    try:
        proc = fio_verify(f"nbd+unix:///top?socket={tmp_path / 'nbd.sock'}", 1, "16M", out)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr
    assert '"error" : 0' in out.read_text()
    assert rounds[0] >= 1 and lends[0] > 1
