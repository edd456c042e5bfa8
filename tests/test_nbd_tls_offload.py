"""NBD over TLS with the sessions in worker processes (export/nbd/tunnel.py, offload.py).

What must hold: a worker runs the TLS handshake and relays, the daemon's Connection serves
the handshake and whatever the worker does not do over its end of the relay, and the worker
serves READ/WRITE/FLUSH over the session (DIRECT) while the device lends its files, one
connection alone included; fio's verify over four TLS connections is right while the
devices are suspended, resumed and reloaded (DIRECT -> relay -> DIRECT); a worker killed
with SIGKILL closes its connections only; a client failing the handshake, garbage after
STARTTLS, a silent handshake and a client that reads no replies are closed while the
others go on; stop ends every connection and worker. The daemon's own TLS tests
(test_nbd_tls.py) run through workers too: the daemon has them by default."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket

import pytest

from conftest import wait_until
from test_nbd_loop import Client
from test_nbd_offload import (assert_ended, assert_verified_while_churning, churning, fio_verify,
                              worker_processes)
from test_nbd_tls import _closed, _libnbd_home, _starttls, certs  # noqa: F401 - `certs` is a fixture
from userdm import Mapper
from userdm.errors import DMError
from userdm.export.nbd.limits import NBDLimits
from userdm.export.nbd.server import NBDServer
from userdm.export.nbd.tls import ServerTLS
from userdm.nbd import constants as C
from userdm.nbd.client import NBDConnection, RemoteDevice, parse_url
from userdm.nbd.protocol import encode_request
from userdm.nbd.tls import client_context, server_context

pytestmark = pytest.mark.interop
MiB = 1 << 20
SECTORS = 64 * MiB // 512


def tls_server(tmp_path, m: Mapper, certs, *, verify_peer: bool = False, workers: int = 2,  # noqa: F811
               limits: NBDLimits | None = None) -> NBDServer:
    tls = ServerTLS("require", server_context(certs.server, verify_peer), str(certs.server), verify_peer)
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", tcp=("127.0.0.1", 0), tls=tls,
                    offload_workers=workers, limits=limits)
    srv.start()
    return srv


@pytest.fixture
def served(tmp_path, images, certs):  # noqa: F811
    """(mapper, server, [file a, file b]): "low" linear over a, "top" linear over low, "slow"
    a delay target over b (not lent to workers: served through the relay)."""
    m = Mapper()
    a, b = images(2, 64 * MiB)
    m.create("low", f"0 {SECTORS} linear {a} 0\n")
    m.create("top", f"0 {SECTORS} linear /dev/mapper/low 0\n")
    srv = tls_server(tmp_path, m, certs)
    try:
        yield m, srv, [a, b]
    finally:
        srv.stop()
        m.close()


def tls_client(srv: NBDServer, certs, name: str, tcp: bool = True) -> tuple[Client, NBDConnection]:  # noqa: F811
    if tcp:
        url = f"nbds://localhost:{srv.tcp_address[1]}/{name}?tls-certificates={certs.client}"
    else:
        url = f"nbds+unix:///{name}?socket={srv.unix_path}&tls-certificates={certs.client}&tls-hostname=localhost"
    conn = NBDConnection(parse_url(url), url, client_context(certs.client))
    assert conn.sock.__class__.__name__ == "TLSStream"
    conn.sock.settimeout(30)
    return Client(conn.sock, conn.structured), conn


def direct(srv: NBDServer, clients: list[Client], n: int) -> None:
    """A write and read on each client until a worker serves `n` connections, 30 s at most."""
    def io() -> bool:
        for i, c in enumerate(clients):
            c.check(i * 4096, os.urandom(4096))
        return srv.loop.offload.offloaded() == n
    assert wait_until(io, 30), srv.loop.offload.offloaded()


def worker_pids(srv: NBDServer) -> list[int]:
    return [w.proc.pid for w in srv.loop.offload._workers if w.alive]


def test_one_tls_connection_is_served_by_the_worker_holding_its_session(served, certs):  # noqa: F811
    """Alone, over TCP and over the Unix socket: the worker holds the session and serves
    the data path; FLUSH and TRIM go back to the daemon (through the relay) and come back."""
    m, srv, files = served
    for tcp in (True, False):
        c, _ = tls_client(srv, certs, "top", tcp)
        direct(srv, [c], 1)
        assert len(srv.loop.offload._tunnels) == 1
        data = os.urandom(64 * 1024)
        c.check(MiB, data)
        c.cookie += 1
        c.sock.sendall(encode_request(C.CMD_TRIM, c.cookie, 2 * MiB, 4096))
        c.reply(c.cookie)
        c.cookie += 1
        c.sock.sendall(encode_request(C.CMD_FLUSH, c.cookie, 0, 0))
        c.reply(c.cookie)
        with open(files[0], "rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
        direct(srv, [c], 1)
        c.close()
        assert wait_until(lambda: srv.connection_count() == 0 and not srv.loop.offload._tunnels, 20)
    assert srv.loop.offload.returned >= 2


def test_a_device_the_worker_cannot_serve_is_served_through_the_relay(tmp_path, images, certs):  # noqa: F811
    m = Mapper()
    (a,) = images(1, 64 * MiB)
    m.create("slow", f"0 {SECTORS} delay {a} 0 0\n")
    srv = tls_server(tmp_path, m, certs)
    try:
        clients = [tls_client(srv, certs, "slow")[0] for _ in range(2)]
        for i in range(20):
            for j, c in enumerate(clients):
                c.check((i * 2 + j) * 65536, os.urandom(65536))
        assert srv.loop.offload.offloaded() == 0 and len(srv.loop.offload._tunnels) == 2
        for c in clients:
            c.close()
    finally:
        srv.stop()
        m.close()


def test_fio_verify_over_four_tls_connections_while_suspended_and_reloaded(served, tmp_path, certs):  # noqa: F811
    """fio writes and verifies over four TLS connections while "low" is reloaded onto the
    other file and "top" suspended and resumed in a loop: each turn takes the connections
    back to relaying and the daemon, then to their workers again."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    m, srv, files = served
    out = tmp_path / "fio.json"
    with churning(m, srv, files) as turns:
        proc = fio_verify(f"nbds+unix:///top?socket={srv.unix_path}", 4, "8M", out, _libnbd_home(tmp_path, certs.client))
    assert_verified_while_churning(proc, out, 4 * 8 * MiB, turns, srv, handed=4)


def test_worker_killed_closes_its_tls_connections_only(served, certs):  # noqa: F811
    m, srv, _ = served
    first, _ = tls_client(srv, certs, "top")
    second, _ = tls_client(srv, certs, "top")
    direct(srv, [first, second], 2)
    off = srv.loop.offload
    victim = off._tunnels[min(off._tunnels)].worker.proc.pid
    other = off._tunnels[max(off._tunnels)].worker.proc.pid
    assert victim != other            # a connection per worker while there are enough
    first.send_write(0, os.urandom(4096))
    os.kill(victim, signal.SIGKILL)
    assert _closed(first.sock)        # its reply, or the close: it does not hang
    first.close()
    for i in range(10):
        second.check(i * 4096, os.urandom(4096))
    assert wait_until(lambda: srv.connection_count() == 1, 20), srv.connection_count()
    fresh, _ = tls_client(srv, certs, "top")      # a new worker takes the next session
    direct(srv, [second, fresh], 2)
    assert victim not in worker_pids(srv)
    for c in (second, fresh):
        c.close()


def test_a_client_failing_the_tls_handshake_is_logged_and_closed(tmp_path, images, certs, caplog):  # noqa: F811
    """--tls-verify-peer: clients without a certificate of the CA fail in the worker; the
    daemon logs why; a good client goes on being served."""
    m = Mapper()
    m.create("vol", f"0 {SECTORS} linear {images(1, 64 * MiB)[0]} 0\n")
    srv = tls_server(tmp_path, m, certs, verify_peer=True)
    caplog.set_level(logging.INFO, logger="userdm.nbd")
    try:
        good, _ = tls_client(srv, certs, "vol")
        for certdir in (certs.anonymous, certs.impostor):
            url = f"nbds://localhost:{srv.tcp_address[1]}/vol?tls-certificates={certdir}"
            with pytest.raises(DMError):
                RemoteDevice(url)
        assert wait_until(lambda: "TLS handshake failed" in caplog.text, 20)
        assert "(from 127.0.0.1:" in caplog.text
        for i in range(5):
            good.check(i * 4096, os.urandom(4096))
        assert wait_until(lambda: srv.connection_count() == 1 and len(srv.loop.offload._tunnels) == 1, 20)
        good.close()
    finally:
        srv.stop()
        m.close()


@pytest.mark.hostile
def test_garbage_after_starttls_and_a_silent_handshake_are_closed(tmp_path, images, certs):  # noqa: F811
    m = Mapper()
    m.create("vol", f"0 {SECTORS} linear {images(1, 64 * MiB)[0]} 0\n")
    srv = tls_server(tmp_path, m, certs, workers=1, limits=NBDLimits(handshake_deadline=2))
    try:
        good, _ = tls_client(srv, certs, "vol")
        port = srv.tcp_address[1]
        silent = _starttls(port)                          # says nothing after the ACK
        partial = _starttls(port)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00")  # a ClientHello record that never ends
        with _starttls(port) as s:                        # plaintext where the ClientHello belongs
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
            assert _closed(s)
        for i in range(5):                                # the worker serves the good one meanwhile
            good.check(i * 4096, os.urandom(4096))
        with silent, partial:
            assert _closed(silent) and _closed(partial)
        assert wait_until(lambda: srv.connection_count() == 1 and len(srv.loop.offload._tunnels) == 1, 20)
        good.check(0, b"z" * 4096)
        good.close()
    finally:
        srv.stop()
        m.close()


@pytest.mark.hostile
@pytest.mark.timeout(180)
def test_a_tls_client_that_reads_no_replies_is_cut_off(tmp_path, images, certs):  # noqa: F811
    """It pipelines READs and never reads: its worker hands it back to the daemon (and does
    not take it again at once), whose send gives up after --nbd-reply-timeout; the worker
    then closes it; the others go on."""
    m = Mapper()
    m.create("vol", f"0 {SECTORS} linear {images(1, 64 * MiB)[0]} 0\n")
    srv = tls_server(tmp_path, m, certs, workers=1, limits=NBDLimits(reply_timeout=2))
    clients = []
    try:
        clients = [tls_client(srv, certs, "vol") for _ in range(3)]
        direct(srv, [c for c, _ in clients], 3)
        greedy = clients[0][0]
        greedy.sock.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 250 MiB of replies: more than the relay's socket buffers hold (the socketpair's
        # and the TCP socket's, a few MiB each)
        greedy.sock.sendall(b"".join(encode_request(C.CMD_READ, k, k % 256 * 65536, 65536) for k in range(4000)))
        assert wait_until(lambda: srv.connection_count() == 2, 60)
        assert wait_until(lambda: len(srv.loop.offload._tunnels) == 2, 30)
        assert srv.loop.offload.returned >= 1
        for i in range(20):
            for j, (c, _) in enumerate(clients[1:]):
                c.check((i * 2 + j) * 4096, os.urandom(4096))
        assert srv.loop.offload.offloaded() == 2
    finally:
        for c, _ in clients:
            c.close()
        srv.stop()
        m.close()


def test_stop_ends_tls_connections_and_their_workers(tmp_path, images, certs):  # noqa: F811
    m = Mapper()
    a, b = images(2, 64 * MiB)
    m.create("vol", f"0 {SECTORS} linear {a} 0\n")
    m.create("slow", f"0 {SECTORS} delay {b} 0 0\n")
    srv = tls_server(tmp_path, m, certs)
    try:
        lent, _ = tls_client(srv, certs, "vol")
        relayed, _ = tls_client(srv, certs, "slow")
        direct(srv, [lent], 1)
        relayed.check(0, b"r" * 4096)
        pids = worker_pids(srv)
        assert pids
    finally:
        srv.stop()
        m.close()
    for c in (lent, relayed):
        assert _closed(c.sock)
        c.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_the_daemon_serves_fio_over_tls_from_its_workers(tmp_path, images, certs):  # noqa: F811
    """The real daemon (workers on by default): fio verify over four TLS connections, then
    one alone; the sessions live in its worker processes, which end with it."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    from conftest import Daemon
    (a,) = images(1, 64 * MiB)
    d = Daemon(tmp_path)
    d.start("--tls-certificates", str(certs.server))
    try:
        d.run("create", "vol", input=f"0 {SECTORS} linear {a} 0\n")
        env = _libnbd_home(tmp_path, certs.client)
        uri = f"nbds+unix:///vol?socket={d.runtime / 'nbd.sock'}"
        for jobs in (4, 1):
            out = tmp_path / "fio.json"
            proc = fio_verify(uri, jobs, "4M", out, env)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(out.read_text())["jobs"][0]["error"] == 0
        workers = worker_processes(d.proc.pid)
        assert workers
    finally:
        d.stop()
    assert_ended(workers)
