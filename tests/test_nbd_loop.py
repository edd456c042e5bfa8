"""The NBD server's event loop (export/nbd/loop.py): while several connections are open, one
thread serves their small requests. What must hold: a request to a suspended device, or a
client that sends half a request and stalls, does not hold up the other connections; TLS and
plaintext connections share the loop; many connections at once; DISC, EOF and server stop.

Connections are driven by hand (raw sockets, or the TLS stream of userdm's client) so that
each request is where the test wants it; every reply is checked."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from conftest import wait_until
from userdm import Mapper
from userdm.export.nbd.server import NBDServer
from userdm.export.nbd.tls import ServerTLS
from userdm.nbd import constants as C
from userdm.nbd.client import NBDConnection, parse_url
from userdm.nbd.handshake import encode_go
from userdm.nbd.protocol import encode_request
from userdm.nbd.tls import client_context, server_context

MiB = 1 << 20
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tls-certs.sh"


def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the server closed the connection")
        buf += chunk
    return buf


class Client:
    """One NBD connection in the transmission phase (simple replies), over a plain socket or
    a TLS stream: requests are sent and replies read separately, so they can be pipelined."""

    def __init__(self, sock, structured: bool = False) -> None:
        self.sock = sock
        self.structured = structured   # READ replies are one OFFSET_DATA chunk
        self.cookie = 0

    @classmethod
    def plain(cls, path: Path, name: str) -> "Client":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(str(path))
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3) + encode_go(name))
        while True:
            _, _, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
            recv_exact(s, length)
            if rtype == C.REP_ACK:
                return cls(s)

    def send_write(self, offset: int, data: bytes) -> int:
        self.cookie += 1
        self.sock.sendall(encode_request(C.CMD_WRITE, self.cookie, offset, len(data)) + data)
        return self.cookie

    def send_read(self, offset: int, length: int) -> int:
        self.cookie += 1
        self.sock.sendall(encode_request(C.CMD_READ, self.cookie, offset, length))
        return self.cookie

    def reply(self, cookie: int, length: int = 0) -> bytes:
        """The reply to request `cookie` (a READ's `length` bytes of data)."""
        if length and self.structured:
            magic, flags, kind, got, size, offset = struct.unpack(">IHHQIQ", recv_exact(self.sock, 28))
            assert (magic, flags, kind, got, size) == (C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE,
                                                       C.REPLY_TYPE_OFFSET_DATA, cookie, length + 8)
            return recv_exact(self.sock, length)
        magic, err, got = struct.unpack(">IIQ", recv_exact(self.sock, 16))
        assert (magic, err, got) == (C.SIMPLE_REPLY_MAGIC, 0, cookie)
        return recv_exact(self.sock, length) if length else b""

    def check(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset` and read it back."""
        self.reply(self.send_write(offset, data))
        assert self.reply(self.send_read(offset, len(data)), len(data)) == data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def two_devices(tmp_path, images):
    """(mapper, server) with devices vol0 and vol1 (16 MiB linear each) on nbd.sock."""
    m = Mapper()
    a, b = images(2, 16 * MiB)
    m.create("vol0", f"0 {16 * MiB // 512} linear {a} 0\n")
    m.create("vol1", f"0 {16 * MiB // 512} linear {b} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock")
    srv.start()
    try:
        yield m, srv
    finally:
        srv.stop()
        m.close()


def run_all(clients: list[Client], work) -> None:
    """`work(index, client)` for every client in a thread of its own, at once; fails with
    the first error any of them raised (each has a 30 s socket timeout)."""
    errors: list[BaseException] = []

    def run(index: int, c: Client) -> None:
        try:
            work(index, c)
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def in_loop(srv: NBDServer, clients: list[Client], n: int) -> list[bytes]:
    """One write and read on each client (client i at block i), then wait until the loop
    serves `n` connections (a connection joins it when its thread next waits for a
    request); the blocks written."""
    written = []
    for i, c in enumerate(clients):
        written.append(os.urandom(4096))
        c.check(i * 4096, written[-1])
    assert wait_until(lambda: srv.loop.served() == n, 20), srv.loop.served()
    return written


def test_suspended_device_does_not_hold_the_other_connections(two_devices):
    """READs of a suspended device, run by the loop, wait for the resume; each time, the
    watchdog gives the other connections a new loop thread: they go on with their I/O.
    Two connections get stuck one after the other; after the resume both go on, each
    served by the thread that was stuck in it, and come back to the loop."""
    m, srv = two_devices
    held = [Client.plain(srv.unix_path, "vol0") for _ in range(2)]
    others = [Client.plain(srv.unix_path, "vol1") for _ in range(2)]

    def others_go_on() -> None:
        for round_ in range(50):
            for i, c in enumerate(others):
                c.check((round_ * 2 + i) * 4096, os.urandom(4096))

    try:
        in_loop(srv, [*held, *others], 4)
        data = os.urandom(4096)
        held[0].check(8192, data)
        m.suspend("vol0")
        cookies = []
        for k, c in enumerate(held):
            cookies.append(c.send_read(8192, 4096))
            others_go_on()
            assert srv.loop.gen >= k + 1          # the loop thread was replaced
        for c in held:
            c.sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # still held, not failed
                c.sock.recv(1)
            c.sock.settimeout(30)
        m.resume("vol0")
        for c, cookie in zip(held, cookies):
            assert c.reply(cookie, 4096) == data
        # served by threads of their own now, and back in the loop after enough small requests
        for i in range(300):
            for c in held:
                c.check(i * 4096 % MiB, os.urandom(4096))
        assert wait_until(lambda: srv.loop.served() == 4, 20)
        others_go_on()
    finally:
        if m.info("vol0")["suspended"]:
            m.resume("vol0")
        for c in (*held, *others):
            c.close()


def test_half_a_request_does_not_hold_the_other_connections(two_devices):
    """A client that sends part of a header, or a WRITE whose payload stops halfway, and
    then nothing: the loop serves the others; the rest arrives and is served in order."""
    _, srv = two_devices
    slow_header = Client.plain(srv.unix_path, "vol0")
    slow_payload = Client.plain(srv.unix_path, "vol0")
    other = Client.plain(srv.unix_path, "vol1")
    try:
        written = in_loop(srv, [slow_header, slow_payload, other], 3)
        header = encode_request(C.CMD_READ, 77, 0, 4096)
        slow_header.sock.sendall(header[:10])
        data = os.urandom(4096)
        write = encode_request(C.CMD_WRITE, 78, MiB, 4096) + data
        slow_payload.sock.sendall(write[:28 + 2000])
        for i in range(200):
            other.check(i * 4096, os.urandom(4096))
        assert srv.loop.served() == 3
        slow_payload.sock.sendall(write[28 + 2000:])
        slow_payload.reply(78)
        slow_header.sock.sendall(header[10:])
        assert slow_header.reply(77, 4096) == written[0]
        assert slow_payload.reply(slow_payload.send_read(MiB, 4096), 4096) == data
    finally:
        for c in (slow_header, slow_payload, other):
            c.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if not os.path.exists("/usr/bin/openssl"):
        pytest.skip("openssl is not installed")
    base = tmp_path_factory.mktemp("certs")
    import subprocess
    subprocess.run(["bash", str(SCRIPT), str(base / "good")], check=True, capture_output=True, timeout=120)
    return base / "good"


def test_tls_and_plain_clients_share_the_loop(tmp_path, images, certs):
    """By default, TLS connections keep their own threads. With `loop.tls`, two TLS clients
    and two plaintext ones are in the loop at once, each pipelining 32
    writes and then 32 reads (several TLS records per receive: the loop serves what the
    session holds without waiting for the socket), every byte checked."""
    m = Mapper()
    m.create("vol", f"0 {64 * MiB // 512} linear {images(1, 64 * MiB)[0]} 0\n")
    path = tmp_path / "nbd.sock"
    srv = NBDServer(m, unix_path=path, tls=ServerTLS("on", server_context(certs / "server"),
                                                     str(certs / "server")))
    srv.start()
    clients: list[Client] = []
    try:
        url = f"nbds+unix:///vol?socket={path}&tls-certificates={certs / 'client'}"
        # by default TLS connections keep their threads: only the plaintext ones join
        tls = NBDConnection(parse_url(url), url, client_context(certs / "client", check_hostname=False))
        tls.sock.settimeout(30)
        plain = [Client.plain(path, "vol") for _ in range(2)]
        in_loop(srv, [Client(tls.sock, tls.structured), *plain], 2)
        tls.sock.close()
        for c in plain:
            c.close()
        assert wait_until(lambda: srv.connection_count() == 0, 20)
        srv.loop.tls = True
        for _ in range(2):
            conn = NBDConnection(parse_url(url), url, client_context(certs / "client", check_hostname=False))
            assert conn.sock.__class__.__name__ == "TLSStream"
            conn.sock.settimeout(30)
            clients.append(Client(conn.sock, conn.structured))
        clients += [Client.plain(path, "vol") for _ in range(2)]

        def work(index: int, c: Client) -> None:
            base = index * 8 * MiB
            blocks = [os.urandom(4096) for _ in range(32)]
            for round_ in range(4):
                at = base + round_ * 32 * 4096
                # 32 writes in one send (132 KiB: more than one receive buffer of the
                # server, so whole TLS records stay in the session after its first pass)
                first = c.cookie + 1
                c.sock.sendall(b"".join(encode_request(C.CMD_WRITE, first + i, at + i * 4096, 4096) + b
                                        for i, b in enumerate(blocks)))
                c.cookie += 32
                for k in range(first, first + 32):
                    c.reply(k)
                cookies = [c.send_read(at + i * 4096, 4096) for i in range(32)]
                for k, b in zip(cookies, blocks):
                    assert c.reply(k, 4096) == b

        in_loop(srv, clients, 4)
        run_all(clients, work)
        assert srv.loop.served() == 4
    finally:
        for c in clients:
            c.close()
        srv.stop()
        m.close()


def test_many_connections_through_the_loop(two_devices):
    """64 connections at once, each writing and reading back its own blocks; when they
    close, the loop and the server forget them."""
    _, srv = two_devices
    clients = [Client.plain(srv.unix_path, f"vol{i % 2}") for i in range(64)]

    def work(index: int, c: Client) -> None:
        for i in range(20):
            c.check((index // 2 * 20 + i) * 4096, os.urandom(4096))

    try:
        run_all(clients, work)
        assert wait_until(lambda: srv.loop.served() == 64, 20), srv.loop.served()
    finally:
        for c in clients:
            c.close()
    assert wait_until(lambda: srv.connection_count() == 0, 20)
    assert srv.loop.served() == 0


def test_disc_eof_and_stop_from_the_loop(two_devices):
    """A DISC and an EOF of connections in the loop end them (their requests answered
    first); stopping the server closes the ones left."""
    _, srv = two_devices
    clients = [Client.plain(srv.unix_path, "vol1") for _ in range(4)]
    try:
        in_loop(srv, clients, 4)
        data = os.urandom(4096)
        cookie = clients[0].send_write(0, data)
        clients[0].sock.sendall(encode_request(C.CMD_DISC, 99, 0, 0))
        clients[0].reply(cookie)
        assert clients[0].sock.recv(1) == b""
        clients[1].close()
        assert wait_until(lambda: srv.connection_count() == 2, 20)
        assert clients[2].reply(clients[2].send_read(0, 4096), 4096) == data
        srv.stop()
        for c in clients[2:]:
            assert c.sock.recv(1) == b""
        assert srv.loop.served() == 0
    finally:
        for c in clients:
            c.close()


def test_client_that_reads_no_replies_leaves_the_loop_and_is_cut_off(tmp_path, images):
    """A connection in the loop that pipelines small READs and never reads the replies:
    the loop does not wait for its socket (the rest of the batch goes to a thread of its
    own, which waits at most --nbd-reply-timeout and then hangs up); the others go on."""
    from userdm.export.nbd.limits import NBDLimits
    m = Mapper()
    m.create("vol", f"0 {16 * MiB // 512} linear {images(1, 16 * MiB)[0]} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", limits=NBDLimits(reply_timeout=2))
    srv.start()
    clients = [Client.plain(srv.unix_path, "vol") for _ in range(3)]
    try:
        in_loop(srv, clients, 3)
        greedy = clients[0]
        greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.sock.sendall(b"".join(encode_request(C.CMD_READ, k, k % 256 * 4096, 4096) for k in range(4000)))
        for i in range(200):
            for j, c in enumerate(clients[1:]):
                c.check((i * 2 + j) * 4096 % (16 * MiB), os.urandom(4096))
        assert wait_until(lambda: srv.connection_count() == 2, 60)
        for c in clients[1:]:
            c.check(0, os.urandom(4096))
    finally:
        for c in clients:
            c.close()
        srv.stop()
        m.close()
