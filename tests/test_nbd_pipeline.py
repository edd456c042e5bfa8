"""The NBD server's data path under pipelining: many requests sent before any reply is read,
big and small mixed (the reader's header-only receives after a big WRITE, payloads landing
in task buffers, batched inline replies), and a suspended device holding more big requests
than the worker pool runs at once while the device keeps up."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from conftest import wait_until
from userdm import Mapper
from userdm.nbd import constants as C
from userdm.nbd.handshake import encode_go
from userdm.nbd.protocol import encode_request
from userdm.export.nbd.server import NBDServer

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def served(tmp_path, images):
    """(mapper, server, socket path, backing file) with device vol0 (32 MiB linear over a file)."""
    m = Mapper()
    backing = images(1, SIZE)[0]
    m.create("vol0", f"0 {SIZE // 512} linear {backing} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock")
    srv.start()
    try:
        yield m, srv, tmp_path / "nbd.sock", backing
    finally:
        srv.stop()
        m.close()


def connect(path) -> socket.socket:
    """A raw client socket after NBD_OPT_GO on vol0 (simple replies)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    assert recv(s, 18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3) + encode_go("vol0"))
    while True:
        _, _, rtype, length = struct.unpack(">QIII", recv(s, 20))
        recv(s, length)
        if rtype == C.REP_ACK:
            return s


def recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def pattern(i: int, length: int) -> bytes:
    return (struct.pack(">I", i) * 8 + os.urandom(32)) * (length // 64)


def test_pipelined_mix_of_big_and_small_requests(served):
    """Writes of 1 MiB, 4 KiB and 192 KiB back to back (some headers arriving together with
    the previous payload's tail), then reads of all of it, all sent before any reply is read:
    every reply comes with its cookie and every byte lands where it was written."""
    m, _, path, backing = served
    s = connect(path)
    sizes = [MiB, MiB, 4096, MiB, 4096, 4096, 192 * 1024, MiB, 512, MiB]
    writes, pos = [], 0
    for i, n in enumerate(sizes):
        writes.append((pos, pattern(i, n)))
        pos += n
    stream = bytearray()
    for cookie, (off, data) in enumerate(writes, 1):
        stream += encode_request(C.CMD_WRITE, cookie, off, len(data)) + data
    stream += encode_request(C.CMD_FLUSH, 100)
    s.sendall(stream)
    cookies = set()
    for _ in range(len(writes) + 1):
        magic, err, cookie = struct.unpack(">IIQ", recv(s, 16))
        assert (magic, err) == (C.SIMPLE_REPLY_MAGIC, 0)
        cookies.add(cookie)
    assert cookies == set(range(1, len(writes) + 1)) | {100}

    s.sendall(b"".join(encode_request(C.CMD_READ, 200 + i, off, len(data))
                       for i, (off, data) in enumerate(writes)))
    for _ in writes:
        magic, err, cookie = struct.unpack(">IIQ", recv(s, 16))
        assert (magic, err) == (C.SIMPLE_REPLY_MAGIC, 0)
        off, data = writes[cookie - 200]
        assert recv(s, len(data)) == data
    with open(backing, "rb") as f:
        for off, data in writes:
            f.seek(off)
            assert f.read(len(data)) == data
    s.sendall(encode_request(C.CMD_DISC, 0))
    s.close()
    assert wait_until(lambda: m.info("vol0")["open_count"] == 0)


def test_suspended_device_holds_more_big_requests_than_the_fast_limit(served):
    """While the device keeps up only FAST_IN_FLIGHT big requests are in flight; a suspended
    device makes the reader wait for a slot, and then the pool lets all 8 of its threads
    wait in the device. After resume every request completes with the right data."""
    m, srv, path, backing = served
    data = [pattern(i, MiB) for i in range(8)]
    with open(backing, "r+b") as f:
        for i, d in enumerate(data):
            f.seek(i * MiB)
            f.write(d)
    s = connect(path)
    m.suspend("vol0")
    try:
        s.sendall(b"".join(encode_request(C.CMD_READ, i + 1, i * MiB, MiB) for i in range(8)))
        [conn] = list(srv._connections)
        assert wait_until(lambda: conn._pool is not None and conn._pool._in_flight == 8)
        assert len(conn._pool.threads) == 8
    finally:
        m.resume("vol0")
    for _ in range(8):
        magic, err, cookie = struct.unpack(">IIQ", recv(s, 16))
        assert (magic, err) == (C.SIMPLE_REPLY_MAGIC, 0)
        assert recv(s, MiB) == data[cookie - 1]
    s.close()
