"""The NBD server over a real Mapper, driven by the userdm NBD client and by raw sockets:
data round trips, open counts, read-only tables, suspend, removal, and garbage from clients."""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from userdm import Mapper
from userdm.errors import DMError
from userdm.nbd import constants as C
from userdm.nbd.client import NBDConnection, RemoteDevice, parse_url
from userdm.nbd.handshake import encode_go, encode_option
from userdm.nbd.protocol import encode_request
from userdm.export.nbd.server import NBDServer

MiB = 1 << 20


@pytest.fixture
def served(tmp_path, images):
    """(mapper, server, url(name)) with device vol0 (16 MiB linear over a file)."""
    m = Mapper()
    m.create("vol0", f"0 {16 * MiB // 512} linear {images(1, 16 * MiB)[0]} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock")
    srv.start()
    try:
        yield m, srv, lambda name="vol0": f"nbd+unix:///{name}?socket={tmp_path / 'nbd.sock'}"
    finally:
        srv.stop()
        m.close()


class Raw:
    """A raw NBD client socket after GO (simple replies unless `structured`)."""

    def __init__(self, path, name="vol0", structured=False):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(str(path))
        assert self.recv(18)[:8] == b"NBDMAGIC"
        opts = struct.pack(">I", 3)
        if structured:
            opts += encode_option(C.OPT_STRUCTURED_REPLY)
        self.s.sendall(opts + encode_go(name))
        if structured:
            self.option_reply()
        while self.option_reply()[0] != C.REP_ACK:
            pass

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def option_reply(self):
        _, _, rtype, length = struct.unpack(">QIII", self.recv(20))
        return rtype, self.recv(length)

    def simple(self):
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == C.SIMPLE_REPLY_MAGIC
        return err, cookie

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_round_trip_through_client(served):
    m, _, url = served
    dev = RemoteDevice(url())
    try:
        assert dev.size == 16 * MiB and not dev.read_only
        assert m.info("vol0")["open_count"] == 1
        data = bytes(range(256)) * 4096
        dev.write(MiB, data, fua=True)
        buf = bytearray(len(data))
        dev.readinto(MiB, memoryview(buf))
        assert buf == data
        dev.flush()
        dev.write_zeroes(MiB, 4096, may_unmap=False)
        dev.discard(2 * MiB - 65536, 65536)
        dev.readinto(MiB, memoryview(buf))
        assert buf[:4096] == bytes(4096) and buf[4096:8192] == data[4096:8192]
        ext = dev.block_status(0, 16 * MiB)
        assert ext[0][1] & C.STATE_HOLE and sum(n for n, _ in ext) <= 16 * MiB
    finally:
        dev.close_backing()


def test_open_count_follows_connections(served):
    m, srv, url = served
    conns = [NBDConnection(parse_url(url()), url()) for _ in range(3)]
    assert m.info("vol0")["open_count"] == 3
    for c in conns:
        c.close()
    _wait(lambda: m.info("vol0")["open_count"] == 0)
    assert srv.connection_count() == 0


def test_concurrent_clients_and_requests(served):
    _, _, url = served
    dev = RemoteDevice(url(), max_connections=4)
    errors = []

    def worker(i):
        try:
            pattern = bytes([i]) * 65536
            for j in range(20):
                off = (i * 20 + j) * 65536
                dev.write(off, pattern)
                assert dev.read(off, 65536) if hasattr(dev, "read") else True
                buf = bytearray(65536)
                dev.readinto(off, memoryview(buf))
                assert buf == pattern
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dev.close_backing()
    assert not errors


def test_list_and_unknown_export(served, tmp_path):
    m, _, url = served
    m.create("other", "0 8 zero\n")
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(tmp_path / "nbd.sock"))
    s.recv(18)
    s.sendall(struct.pack(">I", 1) + encode_option(C.OPT_LIST) + encode_option(C.OPT_ABORT))
    names = []
    while True:
        _, _, rtype, length = struct.unpack(">QIII", _recv(s, 20))
        data = _recv(s, length)
        if rtype != C.REP_SERVER:
            break
        names.append(data[4:].decode())
    assert names == ["other", "vol0"]
    s.close()
    with pytest.raises(DMError) as exc:
        RemoteDevice(url("nope"))
    assert exc.value.errno == errno.ENXIO


def test_read_only_table(served, images):
    m, _, url = served
    m.create("ro", f"0 2048 linear {images(1, MiB)[0]} 0\n", readonly=True)
    dev = RemoteDevice(url("ro"))
    try:
        assert dev.read_only and dev.tflags & C.TFLAG_READ_ONLY
        with pytest.raises(DMError) as exc:
            dev._write(0, memoryview(bytes(512)), False)
        assert exc.value.errno == errno.EPERM
        assert dev.read(0, 512) if hasattr(dev, "read") else True
    finally:
        dev.close_backing()


def test_suspended_device_holds_requests_until_resume(served):
    m, _, url = served
    dev = RemoteDevice(url())
    try:
        dev.write(0, b"s" * 4096)
        m.suspend("vol0")
        done = threading.Event()
        buf = bytearray(4096)

        def read():
            dev.readinto(0, memoryview(buf))
            done.set()

        t = threading.Thread(target=read)
        t.start()
        assert not done.wait(0.3)        # held, not failed
        m.resume("vol0")
        assert done.wait(20)
        t.join()
        assert buf == b"s" * 4096
    finally:
        dev.close_backing()


def test_deferred_remove_fires_when_the_client_leaves(served):
    m, _, url = served
    dev = RemoteDevice(url())
    with pytest.raises(DMError) as exc:
        m.remove("vol0")
    assert exc.value.errno == errno.EBUSY
    m.remove("vol0", deferred=True)
    assert m.info("vol0")["deferred_remove"]
    second = RemoteDevice(url())       # like the kernel: a deferred remove still allows opens
    dev.close_backing()
    assert "vol0" in [d["name"] for d in m.list()]
    second.close_backing()
    _wait(lambda: "vol0" not in [d["name"] for d in m.list()])


def test_stop_closes_connections(tmp_path, images):
    m = Mapper()
    m.create("vol0", f"0 2048 linear {images(1, MiB)[0]} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "s.sock")
    srv.start()
    raw = Raw(tmp_path / "s.sock")
    assert m.info("vol0")["open_count"] == 1
    srv.stop()
    assert raw.closed()
    assert m.info("vol0")["open_count"] == 0
    assert not (tmp_path / "s.sock").exists()
    m.close()


def test_tcp_listener(images):
    m = Mapper()
    m.create("vol0", f"0 2048 linear {images(1, MiB)[0]} 0\n")
    srv = NBDServer(m, tcp=("127.0.0.1", 0))
    srv.start()
    try:
        host, port = srv.tcp_address
        dev = RemoteDevice(f"nbd://{host}:{port}/vol0")
        dev.write(512, b"t" * 512)
        assert dev.read(512, 512) if hasattr(dev, "read") else True
        buf = bytearray(512)
        dev.readinto(512, memoryview(buf))
        assert buf == b"t" * 512
        dev.close_backing()
    finally:
        srv.stop()
        m.close()


# ---- garbage ----------------------------------------------------------------------------

def test_bad_magic_disconnects_only_that_client(served, tmp_path):
    m, _, _ = served
    good = Raw(tmp_path / "nbd.sock")
    bad = Raw(tmp_path / "nbd.sock")
    bad.s.sendall(b"\xde\xad\xbe\xef" * 7)
    assert bad.closed()
    good.s.sendall(encode_request(C.CMD_READ, 1, 0, 512))
    assert good.simple() == (0, 1)
    good.recv(512)
    _wait(lambda: m.info("vol0")["open_count"] == 1)


@pytest.mark.parametrize("cmd,flags,offset,length,want", [
    (42, 0, 0, 512, C.NBD_EINVAL),                         # unknown command
    (C.CMD_READ, 0, 0, 64 * MiB, C.NBD_EINVAL),            # over the maximum payload
    (C.CMD_READ, 0, 16 * MiB, 512, C.NBD_EINVAL),          # past the end
    (C.CMD_TRIM, 0, 16 * MiB - 512, 1024, C.NBD_ENOSPC),
    (C.CMD_READ, 1 << 12, 0, 512, C.NBD_EINVAL),           # unknown flag
    (C.CMD_BLOCK_STATUS, 0, 0, 512, C.NBD_EINVAL),         # no metadata context
    (C.CMD_WRITE_ZEROES, C.CMD_FLAG_FAST_ZERO, 0, 512, C.NBD_ENOTSUP),
])
def test_bad_requests_get_errors_and_the_connection_goes_on(served, tmp_path, cmd, flags, offset, length, want):
    raw = Raw(tmp_path / "nbd.sock")
    raw.s.sendall(encode_request(cmd, 7, offset, length, flags))
    assert raw.simple() == (want, 7)
    raw.s.sendall(encode_request(C.CMD_FLUSH, 8))
    assert raw.simple() == (0, 8)


def test_structured_error_has_a_message(served, tmp_path):
    raw = Raw(tmp_path / "nbd.sock", structured=True)
    raw.s.sendall(encode_request(C.CMD_WRITE, 3, 16 * MiB, 512) + bytes(512))
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", raw.recv(20))
    payload = raw.recv(length)
    assert (magic, rtype, cookie) == (C.STRUCTURED_REPLY_MAGIC, C.REPLY_TYPE_ERROR, 3)
    err, msglen = struct.unpack_from(">IH", payload)
    assert err == C.NBD_ENOSPC and b"beyond the end" in payload[6:]


def test_oversized_write_disconnects(served, tmp_path):
    raw = Raw(tmp_path / "nbd.sock")
    raw.s.sendall(encode_request(C.CMD_WRITE, 1, 0, 64 * MiB))
    assert raw.closed()


def test_client_vanishing_mid_request(served, tmp_path):
    m, _, url = served
    for _ in range(3):
        raw = Raw(tmp_path / "nbd.sock")
        raw.s.sendall(encode_request(C.CMD_WRITE, 1, 0, MiB) + b"x" * 1000)
        raw.s.close()
        raw = Raw(tmp_path / "nbd.sock")
        raw.s.sendall(encode_request(C.CMD_READ, 1, 0, 4 * MiB)[:20])
        raw.s.close()
    _wait(lambda: m.info("vol0")["open_count"] == 0)
    dev = RemoteDevice(url())
    buf = bytearray(512)
    dev.readinto(0, memoryview(buf))
    dev.close_backing()


def test_garbage_handshake(served, tmp_path):
    for junk in (b"\xff" * 4, struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8), b"\x00\x00\x00\x01" + b"\x00" * 3):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(tmp_path / "nbd.sock"))
        _recv(s, 18)
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
        s.close()
    Raw(tmp_path / "nbd.sock").s.close()


def test_unknown_option_then_go(served, tmp_path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(tmp_path / "nbd.sock"))
    _recv(s, 18)
    s.sendall(struct.pack(">I", 1) + encode_option(200, b"garbage") + encode_go("vol0"))
    _, opt, rtype, length = struct.unpack(">QIII", _recv(s, 20))
    assert (opt, rtype) == (200, C.REP_ERR_UNSUP)
    _recv(s, length)
    s.close()


# ---- the client against a table --------------------------------------------------------

def test_table_over_remote_export(served, images):
    """A second Mapper uses the first one's export as an nbd+unix underlying device."""
    m, _, url = served
    other = Mapper()
    try:
        other.create("stack", f"0 {8 * MiB // 512} linear {url()} {4 * MiB // 512}\n")
        h = other.open_device("stack", write=True)
        h.write(3, b"hello")                     # unaligned: read-modify-write in the client
        assert h.read(0, 8) == b"\0\0\0hello"
        h.close()
        top = m.open_device("vol0", write=False)
        assert top.read(4 * MiB + 3, 5) == b"hello"
        top.close()
        other.remove("stack")
    finally:
        other.close()


def _recv(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _wait(cond, timeout=20.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        ev.wait(0.02)
    assert cond()


def test_catalog_refusals():
    """UNKNOWN for a missing device, SHUTDOWN for one with a live table that is not exported
    any more (being removed)."""
    from userdm.export.nbd.catalog import MapperCatalog
    from userdm.nbd.handshake import Refused

    class Fake:
        def export_names(self):
            return []

        def exported(self, name):
            return None

        def info(self, name):
            if name == "dying":
                return {"live": True, "size": 512, "readonly": False}
            raise DMError(errno.ENXIO, f"device {name!r} does not exist")

        def open_device(self, name, *, write, holder=None):
            raise DMError(errno.ENXIO, "no")

    cat = MapperCatalog(Fake())
    for name, want in (("nope", C.REP_ERR_UNKNOWN), ("dying", C.REP_ERR_SHUTDOWN)):
        with pytest.raises(Refused) as exc:
            cat.select(name)
        assert exc.value.reply == want


def test_table_over_the_same_daemons_own_export(tmp_path, images):
    """Loading a table that connects to this daemon's own NBD export must not deadlock:
    opens, info and the export list do not wait for the registry lock held by the load."""
    from userdm import Mapper
    from userdm.export.nbd.server import NBDServer
    (img,) = images(1, 8 << 20)
    m = Mapper()
    sock = tmp_path / "own.sock"
    srv = NBDServer(m, unix_path=sock)
    srv.start()
    try:
        m.create("base", f"0 8192 linear {img} 0")
        m.create("loop", f"0 8192 linear nbd+unix:///base?socket={sock} 0")
        with m.open_device("loop", write=True) as dev:
            dev.write(4096, b"round trip")
        with m.open_device("base", write=False) as dev:
            assert dev.read(4096, 10) == b"round trip"
        assert m.info("base")["open_count"] == 1   # the NBD connection of "loop"
        m.remove("loop")
    finally:
        srv.stop()
        m.close()
