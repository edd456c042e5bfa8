"""Big READs and WRITEs a worker process moves by splice (export/nbd/splice.py).

What must hold: the data is right while devices are suspended, resumed and reloaded under big
requests; a payload that arrives in pieces holds nothing but its own connection; a payload
cut short by a suspend, or by a file that fails part-way, goes back to the daemon whole (the
daemon's answer, its errno); a client that leaves mid-payload, or reads no big replies, costs
the others nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess

import pytest

from conftest import wait_until
from test_nbd_loop import Client, recv_exact
from test_nbd_offload import assert_verified_while_churning, churning, offloaded, served  # noqa: F401
from test_state_full_disk import small_fs  # noqa: F401 (a fixture: a 2 MiB tmpfs)
from userdm import Mapper
from userdm.export.nbd.server import NBDServer
from userdm.nbd import constants as C
from userdm.nbd.protocol import encode_request

MiB = 1 << 20


def fio_big_verify(uri: str, out, jobs: int, size: int, loops: int = 1) -> subprocess.CompletedProcess:  # noqa: ANN001
    """fio's random writes of 64 KiB to 1 MiB blocks, then its verify, over `jobs`
    connections (`size` MiB each, apart), `loops` times."""
    return subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bsrange=64k-1m",
         "--blockalign=64k", f"--loops={loops}", "--iodepth=4", f"--numjobs={jobs}", f"--size={size}M",
         f"--offset_increment={size}M", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
         "--group_reporting", f"--output={out}", "--output-format=json"],
        capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def one_device(path: str, size: int, **server):  # noqa: ANN003
    """A server (one worker process, `server` its other arguments) of device "vol", linear
    over the first `size` bytes of `path`; stopped at the end."""
    m = Mapper()
    m.create("vol", f"0 {size // 512} linear {path} 0\n")
    srv = NBDServer(m, offload_workers=1, **server)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        m.close()


def test_big_requests_verified_while_suspended_resumed_and_reloaded(served, tmp_path):
    """fio writes blocks of 64 KiB to 1 MiB at random and verifies them over four connections
    while "low" is reloaded onto the other file and "top" suspended and resumed, in a loop."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    m, srv, files = served
    srv.loop.offload.retry = 0.02
    out = tmp_path / "fio.json"
    with churning(m, srv, files) as turns:
        proc = fio_big_verify(f"nbd+unix:///top?socket={tmp_path / 'nbd.sock'}", out, 4, 8, loops=3)
    assert_verified_while_churning(proc, out, 3 * 4 * 8 * MiB, turns, srv, handed=2)


def test_a_payload_in_pieces_holds_only_its_own_connection(served):
    """Half of a 1 MiB WRITE's payload, then nothing: the worker serves the other connection
    meanwhile; the rest arrives and the write is answered and reads back."""
    m, srv, _ = served
    slow, other = (Client.plain(srv.unix_path, "top") for _ in range(2))
    offloaded(srv, [slow, other], 2)
    data = os.urandom(MiB)
    slow.cookie += 1
    slow.sock.sendall(encode_request(C.CMD_WRITE, slow.cookie, 4 * MiB, MiB) + data[:MiB // 2])
    for i in range(20):
        other.check(i * 4096, os.urandom(4096))
    assert srv.loop.offload.offloaded() == 2
    slow.sock.sendall(data[MiB // 2:])
    slow.reply(slow.cookie)
    assert slow.reply(slow.send_read(4 * MiB, MiB), MiB) == data
    for c in (slow, other):
        c.close()


def test_suspend_mid_payload_gives_the_write_back_whole(served):
    """A suspend while a worker has moved part of a WRITE's payload to the file: the request
    goes back to the daemon whole, waits for the resume, then is answered; the data reads
    back, and the other connection's worker went on meanwhile."""
    m, srv, files = served
    slow, other = (Client.plain(srv.unix_path, "top") for _ in range(2))
    offloaded(srv, [slow, other], 2)
    data = os.urandom(MiB)
    slow.cookie += 1
    slow.sock.sendall(encode_request(C.CMD_WRITE, slow.cookie, 8 * MiB, MiB) + data[:600 * 1024])
    # the worker moves what came beyond its receive buffer into the file
    with open(files[0], "rb") as f:
        assert wait_until(lambda: f.seek(8 * MiB + 300 * 1024) and f.read(4096) == data[300 * 1024:304 * 1024], 10)
    m.suspend("low")
    assert srv.loop.offload.offloaded() == 0
    slow.sock.sendall(data[600 * 1024:])
    slow.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        recv_exact(slow.sock, 1)
    slow.sock.settimeout(30)
    m.resume("low")
    slow.reply(slow.cookie)
    assert slow.reply(slow.send_read(8 * MiB, MiB), MiB) == data
    offloaded(srv, [slow, other], 2)
    for c in (slow, other):
        c.close()


def test_client_gone_mid_payload_or_reading_no_big_replies(tmp_path, images):
    """One client leaves with half a payload sent, another pipelines big READs and reads
    nothing: the worker serves the third throughout (a reply's data that does not fit
    waits), and neither of the two hangs it."""
    from userdm.export.nbd.limits import NBDLimits
    with one_device(images(1, 64 * MiB)[0], 64 * MiB, unix_path=tmp_path / "nbd.sock",
                    limits=NBDLimits(reply_timeout=2)) as srv:
        clients = [Client.plain(srv.unix_path, "vol") for _ in range(3)]
        try:
            offloaded(srv, clients, 3)
            gone, greedy, good = clients
            gone.sock.sendall(encode_request(C.CMD_WRITE, 99, 0, 4 * MiB) + os.urandom(MiB))
            good.check(0, os.urandom(4096))
            gone.close()
            greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # 768 KiB: the socket's buffer fills part-way through a reply's data, not at a header
            greedy.sock.sendall(b"".join(encode_request(C.CMD_READ, k, k % 32 * MiB, 768 << 10) for k in range(64)))
            for i in range(50):
                good.check(i * 4096, os.urandom(4096))
            assert wait_until(lambda: srv.connection_count() == 1, 60), srv.connection_count()
            for i in range(20):
                good.check(i * 65536, os.urandom(65536))
            assert srv.loop.offload.offloaded() == 1
        finally:
            for c in clients:
                c.close()


def test_a_write_the_file_cannot_take_gets_the_daemons_errno(tmp_path, small_fs):
    """A sparse 16 MiB file on a 2 MiB tmpfs: 1 MiB WRITEs succeed until it is full; the one
    that fills it part-way goes back to the daemon whole and gets ENOSPC, and the
    connection goes on (reads of what was written)."""
    path = small_fs / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    with one_device(path, 16 * MiB, unix_path=tmp_path / "nbd.sock") as srv:
        clients = [Client.plain(srv.unix_path, "vol") for _ in range(2)]
        try:
            offloaded(srv, clients, 2)
            c = clients[0]
            written = {}
            for k in range(4, 16):
                data = os.urandom(MiB)
                cookie = c.send_write(k * MiB, data)
                magic, err, got = struct.unpack(">IIQ", recv_exact(c.sock, 16))
                assert (magic, got) == (C.SIMPLE_REPLY_MAGIC, cookie)
                if err:
                    assert err == C.NBD_ENOSPC, err
                    break
                written[k] = data
            else:
                pytest.fail("16 MiB fitted on a 2 MiB tmpfs")
            assert len(written) == 1
            assert srv.loop.offload.returned >= 1
            for k, data in written.items():
                assert c.reply(c.send_read(k * MiB, MiB), MiB) == data
        finally:
            for c in clients:
                c.close()


def test_big_requests_over_tcp(tmp_path, images):
    """A TCP listener (plaintext): fio writes and verifies 64 KiB-1 MiB blocks over two
    connections, spliced from and to TCP sockets."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    with one_device(images(1, 64 * MiB)[0], 64 * MiB, tcp=("127.0.0.1", 0)) as srv:
        host, port = srv.tcp_address
        out = tmp_path / "fio.json"
        proc = fio_big_verify(f"nbd://{host}:{port}/vol", out, 2, 16)
        assert proc.returncode == 0, proc.stderr
        job = json.loads(out.read_text())["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 2 * 16 * MiB
        assert srv.loop.offload.handed >= 1
