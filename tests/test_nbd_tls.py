"""NBD over TLS, both ways, with real clients and servers (issue 15).

Server: `userdm daemon --tls-certificates DIR [--tls-verify-peer] --nbd-listen 127.0.0.1:0`
served to nbdinfo, nbdcopy, fio (libnbd) and qemu-img/qemu-io (tls-creds-x509) through
`nbds://` and `nbds+unix://`; a client certificate required and checked; a plaintext client
refused on TCP; TCP without TLS refused unless --tls=off. Client: userdm's `nbds` references
against `nbdkit --tls=require`, and daemon B's table over daemon A's TLS export. Hostile
clients (garbage around STARTTLS, a TLS handshake that never ends, bad certificates) are
closed while the others carry on. Certificates come from scripts/tls-certs.sh (openssl).
Every daemon and server is stopped in a `finally` or a fixture's teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import USERDM, Daemon, wait_until
from userdm import Mapper
from userdm.errors import DMError
from userdm.nbd import constants as C
from userdm.nbd.client import RemoteDevice, parse_url
from userdm.nbd.handshake import ServerHandshake, encode_go, encode_option
from userdm.nbd.protocol import OPTION_REPLY
from userdm.nbd.tls import TLSStream, client_context, server_context

pytestmark = pytest.mark.interop
MiB = 1 << 20
SIZE = 16 * MiB
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tls-certs.sh"


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt: openssl, qemu-utils, libnbd-bin, nbdkit, fio)")


def run(*cmd: str, env: dict | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def fails(*cmd: str, env: dict | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode != 0, f"{cmd} succeeded but should have failed:\n{proc.stdout}"
    return proc.stdout + proc.stderr


@dataclass
class Certs:
    server: Path       # ca-cert.pem server-cert.pem server-key.pem (nbdkit's layout)
    client: Path       # ca-cert.pem client-cert.pem client-key.pem (libnbd's and qemu's layout)
    anonymous: Path    # ca-cert.pem only: trusts the server, has no client certificate
    impostor: Path     # trusts the server, client certificate from another CA
    rogue: Path        # trusts another CA only


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    need("openssl")
    base = tmp_path_factory.mktemp("certs")
    for name in ("good", "other"):
        run("bash", str(SCRIPT), str(base / name))
    anonymous = base / "anonymous"
    anonymous.mkdir()
    shutil.copy(base / "good/client/ca-cert.pem", anonymous)
    impostor = base / "impostor"
    impostor.mkdir()
    shutil.copy(base / "good/client/ca-cert.pem", impostor)
    for f in ("client-cert.pem", "client-key.pem"):
        shutil.copy(base / "other/client" / f, impostor)
    return Certs(base / "good/server", base / "good/client", anonymous, impostor, base / "other/client")


def tcp_port(d: Daemon) -> int:
    """The port of a daemon started with --nbd-listen 127.0.0.1:0, from its log."""
    m = re.search(r"nbds?://127\.0\.0\.1:(\d+)/", d.log.read_text())
    assert m, d.log.read_text()
    return int(m.group(1))


class TLSDaemon:
    """A daemon serving device `vol` (linear over `image`) with TLS on TCP and on nbd.sock."""

    def __init__(self, base: Path, certs: Certs, *extra: str, listen: str = "127.0.0.1:0") -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.d = Daemon(base)
        self.certs = certs
        self.image = base / "vol.img"
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
        self.args = ("--tls-certificates", str(certs.server), "--nbd-listen", listen, *extra)
        self.d.start(*self.args)
        try:
            self.port = tcp_port(self.d)
            self.d.run("create", "vol", "--table", f"0 {SIZE // 512} linear {self.image} 0")
        except BaseException:
            self.d.stop()
            raise
        self.sock = self.d.runtime / "nbd.sock"

    def tcp(self, certdir: Path | None = None, name: str = "vol") -> str:
        return f"nbds://localhost:{self.port}/{name}?tls-certificates={certdir or self.certs.client}"

    def unix(self, certdir: Path | None = None, name: str = "vol") -> str:
        return f"nbds+unix:///{name}?socket={self.sock}&tls-certificates={certdir or self.certs.client}"

    def stop(self) -> None:
        self.d.stop()


@pytest.fixture
def server(tmp_path, certs):
    srv = TLSDaemon(tmp_path / "a", certs)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def verifying_server(tmp_path, certs):
    srv = TLSDaemon(tmp_path / "a", certs, "--tls-verify-peer")
    try:
        yield srv
    finally:
        srv.stop()


def random_file(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def same_bytes(a: Path, b: Path, size: int = SIZE) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read(size) == fb.read(size)


# ---- the handshake as a state machine (no sockets) ----------------------------------------------

class _Catalog:
    def names(self):
        return ["vol0"]

    def info(self, name):
        from userdm.nbd.handshake import ExportInfo, Refused
        if name != "vol0":
            raise Refused(C.REP_ERR_UNKNOWN, f"no export {name}")
        return ExportInfo(name="vol0", size=MiB, read_only=False)

    select = info


def _replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, at = [], 0
    while at < len(data):
        _, opt, rtype, n = OPTION_REPLY.unpack_from(data, at)
        out.append((opt, rtype, data[at + OPTION_REPLY.size:at + OPTION_REPLY.size + n]))
        at += OPTION_REPLY.size + n
    return out


def _started(tls: str) -> ServerHandshake:
    hs = ServerHandshake(_Catalog(), tls)
    hs.receive_data(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE))
    return hs


def test_required_tls_refuses_every_option_until_starttls():
    hs = _started("require")
    for opt, data in ((C.OPT_LIST, b""), (C.OPT_STRUCTURED_REPLY, b""), (C.OPT_INFO, encode_go("vol0")[16:]),
                      (C.OPT_GO, encode_go("vol0")[16:]), (99, b"x")):
        (reply,) = _replies(hs.receive_data(encode_option(opt, data)))
        assert reply[:2] == (opt, C.REP_ERR_TLS_REQD) and b"STARTTLS" in reply[2]
    assert hs.state == "options"
    assert _replies(hs.receive_data(encode_option(C.OPT_STARTTLS, b"junk")))[0][1] == C.REP_ERR_INVALID
    assert _replies(hs.receive_data(encode_option(C.OPT_STARTTLS)))[0][1] == C.REP_ACK
    assert hs.state == "starttls"
    with pytest.raises(Exception):
        hs.receive_data(b"more")        # the bytes after the ACK belong to the TLS handshake
    hs.tls_started()
    (reply,) = _replies(hs.receive_data(encode_option(C.OPT_STARTTLS)))
    assert reply[1] == C.REP_ERR_INVALID                     # TLS is already up
    replies = _replies(hs.receive_data(encode_go("vol0")))
    assert replies[-1][1] == C.REP_ACK and hs.state == "transmission"


def test_required_tls_hangs_up_on_export_name_and_acks_abort():
    hs = _started("require")
    assert hs.receive_data(encode_option(C.OPT_EXPORT_NAME, b"vol0")) == b""
    assert hs.state == "closed"
    hs = _started("require")
    assert _replies(hs.receive_data(encode_option(C.OPT_ABORT)))[0][1] == C.REP_ACK
    assert hs.state == "closed"


def test_optional_tls_forgets_what_was_negotiated_before_starttls():
    hs = _started("on")
    assert _replies(hs.receive_data(encode_option(C.OPT_STRUCTURED_REPLY)))[0][1] == C.REP_ACK
    assert hs.structured
    hs.receive_data(encode_option(C.OPT_STARTTLS) + b"\x16\x03\x01")
    assert hs.state == "starttls" and hs.unused_data() == b"\x16\x03\x01"
    hs.tls_started()
    assert not hs.structured and hs.unused_data() == b""
    hs.receive_data(encode_go("vol0"))
    assert hs.state == "transmission" and not hs.export().structured


# ---- the TLS stream: one session, one reader and several writers at once --------------------

def test_tls_stream_carries_concurrent_writers_and_a_reader_intact(certs):
    a, b = socket.socketpair()
    server = TLSStream(a, server_context(certs.server), server_side=True)
    client = TLSStream(b, client_context(certs.client, check_hostname=False), server_side=False)
    t = threading.Thread(target=server.handshake)
    t.start()
    client.handshake()
    t.join()
    assert server.version() in ("TLSv1.2", "TLSv1.3")
    messages = {i: os.urandom(1 + (i * 7919) % 300_000) for i in range(40)}
    received = bytearray()

    def reader():
        buf = bytearray(100_000)
        while True:
            n = client.recv_into(buf)
            if n == 0:
                return
            received.extend(buf[:n])

    def writer(keys):
        for i in keys:
            head = struct.pack(">II", i, len(messages[i]))
            server.sendmsg([head, messages[i]])

    r = threading.Thread(target=reader)
    r.start()
    writers = [threading.Thread(target=writer, args=(range(k, 40, 4),)) for k in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    server.close()
    r.join(60)
    assert not r.is_alive()
    seen, at = set(), 0
    while at < len(received):
        i, n = struct.unpack_from(">II", received, at)
        assert bytes(received[at + 8:at + 8 + n]) == messages[i]
        seen.add(i)
        at += 8 + n
    assert seen == set(messages)
    client.close()


# ---- the server: real clients ------------------------------------------------------------------


def test_nbdinfo_over_tcp_and_unix_socket(server):
    need("nbdinfo")
    for uri in (server.tcp(), server.unix()):
        info = json.loads(run("nbdinfo", "--json", uri))
        assert info["TLS"] is True
        (export,) = info["exports"]
        assert export["export-name"] == "vol" and export["export-size"] == SIZE


def test_nbdcopy_both_ways_over_tls(server, tmp_path):
    need("nbdcopy")
    src = random_file(tmp_path / "src.img")
    run("nbdcopy", str(src), server.tcp())
    assert same_bytes(src, server.image)
    back = tmp_path / "back.img"
    run("nbdcopy", server.unix(), str(back))
    assert same_bytes(src, back)


def _libnbd_home(tmp_path: Path, certdir: Path) -> dict:
    """fio's nbd engine forbids tls-certificates= in URIs: libnbd then reads $HOME/.pki/libnbd."""
    home = tmp_path / "home"
    (home / ".pki").mkdir(parents=True, exist_ok=True)
    if not (home / ".pki/libnbd").exists():
        shutil.copytree(certdir, home / ".pki/libnbd")
    return {**os.environ, "HOME": str(home)}


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_fio_verify_over_tls(server, tmp_path, where):
    need("fio")
    env = _libnbd_home(tmp_path, server.certs.client)
    uri = (f"nbds://localhost:{server.port}/vol" if where == "tcp"
           else f"nbds+unix:///vol?socket={server.sock}")
    out = run("fio", "--name=tls", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
              "--size=8M", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", "--output-format=json",
              env=env, timeout=300)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 8 * MiB and job["read"]["io_bytes"] == 8 * MiB


def _qemu_opts(server, certdir: Path, where: str) -> list[str]:
    creds = f"tls-creds-x509,id=tls0,dir={certdir},endpoint=client"
    if where == "tcp":
        image = f"driver=nbd,server.type=inet,server.host=localhost,server.port={server.port},export=vol,tls-creds=tls0"
    else:
        image = (f"driver=nbd,server.type=unix,server.path={server.sock},export=vol,tls-creds=tls0,"
                 "tls-hostname=localhost")
    return ["--object", creds, image]


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_qemu_img_and_qemu_io_with_tls_creds_x509(server, tmp_path, where):
    need("qemu-img", "qemu-io")
    src = random_file(tmp_path / "src.img")
    obj, creds, image = _qemu_opts(server, server.certs.client, where)
    run("qemu-img", "convert", "-n", "-f", "raw", obj, creds, "--target-image-opts", str(src), image)
    assert same_bytes(src, server.image)
    out = run("qemu-io", obj, creds, "--image-opts", image, "-c", "write -P 0x5a 1M 64k",
              "-c", "read -P 0x5a 1M 64k", "-c", "flush")
    assert "Pattern verification failed" not in out
    with open(server.image, "rb") as f:
        f.seek(MiB)
        assert f.read(64 * 1024) == b"\x5a" * 65536
    info = json.loads(run("qemu-img", "info", "--output=json", obj, creds, "--image-opts", image))
    assert info["virtual-size"] == SIZE


def test_client_certificate_required_and_checked(verifying_server, tmp_path):
    need("nbdinfo", "qemu-io")
    srv = verifying_server
    run("nbdinfo", "--size", srv.tcp())
    for certdir in (srv.certs.anonymous, srv.certs.impostor):
        for uri in (srv.tcp(certdir), srv.unix(certdir)):
            fails("nbdinfo", "--size", uri)
        obj, creds, image = _qemu_opts(srv, certdir, "tcp")
        fails("qemu-io", obj, creds, "--image-opts", image, "-c", "read 0 4k")
    assert wait_until(lambda: "TLS handshake failed" in srv.d.log.read_text())
    assert run("nbdinfo", "--size", srv.unix()).strip() == str(SIZE)      # the others carry on


def _plain_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    magic, opt_magic, flags = struct.unpack(">QQH", _recv(s, 18))
    assert (magic, opt_magic) == (C.NBDMAGIC, C.IHAVEOPT) and flags & C.FLAG_FIXED_NEWSTYLE
    s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
    return s


def _recv(s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def _option(s, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    s.sendall(encode_option(opt, data))
    _, ropt, rtype, n = OPTION_REPLY.unpack(_recv(s, OPTION_REPLY.size))
    assert ropt == opt
    return rtype, _recv(s, n)


def _closed(s: socket.socket) -> bool:
    """True once the server closed `s` (EOF or reset; the socket has a timeout)."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def test_plaintext_client_refused_on_tcp(server):
    need("nbdinfo")
    out = fails("nbdinfo", f"nbd://localhost:{server.port}/vol")
    assert "TLS" in out or "not supported" in out
    with _plain_connect(server.port) as s:
        for opt, data in ((C.OPT_LIST, b""), (C.OPT_GO, encode_go("vol")[16:]), (C.OPT_INFO, encode_go("vol")[16:])):
            rtype, msg = _option(s, opt, data)
            assert rtype == C.REP_ERR_TLS_REQD and b"STARTTLS" in msg
        s.sendall(encode_option(C.OPT_EXPORT_NAME, b"vol"))      # cannot be refused: hang up
        assert _closed(s)
    # the Unix socket keeps TLS optional (the local, 0600 socket)
    assert run("nbdinfo", "--size", f"nbd+unix:///vol?socket={server.sock}").strip() == str(SIZE)


def _daemon_fails(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "USERDM_RUNTIME_DIR": str(tmp_path / "run"), "USERDM_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(USERDM + ["daemon", "--no-fuse", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "ready" not in proc.stdout and not (tmp_path / "run/control").exists()
    return proc.stderr


def test_tcp_without_tls_is_refused_unless_tls_off(tmp_path, certs):
    msg = _daemon_fails(tmp_path, "--nbd-listen", "127.0.0.1:0")
    assert "EINVAL" in msg and "--nbd-listen 127.0.0.1:0" in msg and "--tls=off" in msg
    assert "ENOENT" in _daemon_fails(tmp_path, "--tls-certificates", str(certs.client))  # no server-cert.pem
    assert "needs --tls-certificates" in _daemon_fails(tmp_path, "--tls=require", "--nbd-listen", "127.0.0.1:0")
    assert "PSK" in _daemon_fails(tmp_path, "--tls-psk", str(tmp_path / "keys.psk"))
    assert "--tls-verify-peer" in _daemon_fails(tmp_path, "--tls-verify-peer")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(certs.server, mismatched)
    shutil.copy(certs.client / "client-key.pem", mismatched / "server-key.pem")
    assert "EINVAL" in _daemon_fails(tmp_path, "--tls-certificates", str(mismatched))
    help_text = run(*USERDM, "help", "daemon")
    assert "--tls=off" in " ".join(help_text.split()) and "WARNING" in help_text
    (tmp_path / "plain").mkdir()
    d = Daemon(tmp_path / "plain")
    d.start("--nbd-listen", "127.0.0.1:0", "--tls=off")
    try:
        assert "WARNING" in d.log.read_text() and "plaintext" in d.log.read_text()
        port = tcp_port(d)
        with _plain_connect(port) as s:
            assert _option(s, C.OPT_STARTTLS)[0] == C.REP_ERR_POLICY
    finally:
        d.stop()


# ---- hostile clients ----------------------------------------------------------------------------

def _starttls(port: int) -> socket.socket:
    s = _plain_connect(port)
    assert _option(s, C.OPT_STARTTLS)[0] == C.REP_ACK
    return s


def _good_client(srv) -> RemoteDevice:
    return RemoteDevice(srv.tcp())


@pytest.mark.hostile
def test_garbage_around_starttls_closes_only_that_connection(server):
    dev = _good_client(server)             # an established TLS connection, before and after
    try:
        dev.write(0, b"\x11" * 4096)
        with _starttls(server.port) as s:  # plaintext garbage where the ClientHello belongs
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
            assert _closed(s)
        with _plain_connect(server.port) as s:  # garbage before STARTTLS: bad option magic
            s.sendall(b"\xff" * 64)
            assert _closed(s)
        with _plain_connect(server.port) as s:  # STARTTLS with data: refused, negotiation goes on
            assert _option(s, C.OPT_STARTTLS, b"junk")[0] == C.REP_ERR_INVALID
            assert _option(s, C.OPT_LIST)[0] == C.REP_ERR_TLS_REQD
        with _starttls(server.port) as s:  # a TLS session, then plaintext NBD inside it
            tls = TLSStream(s, client_context(server.certs.client), server_side=False, server_hostname="localhost")
            tls.handshake()
            tls.sendall(b"\x00" * 100)      # not IHAVEOPT: a protocol error
            assert tls.recv(100) == b""
        buf = bytearray(4096)
        dev.readinto(0, memoryview(buf))
        assert buf == b"\x11" * 4096
        run("nbdinfo", "--size", server.unix())
    finally:
        dev.close_backing()


@pytest.mark.hostile
def test_a_tls_handshake_that_never_completes_is_closed_at_the_deadline(tmp_path, certs):
    srv = TLSDaemon(tmp_path / "a", certs, "--nbd-handshake-deadline", "2")
    try:
        silent = _starttls(srv.port)                   # says nothing after the ACK
        partial = _starttls(srv.port)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00")   # a ClientHello record that never ends
        with silent, partial:
            assert run("nbdinfo", "--size", srv.tcp()).strip() == str(SIZE)   # meanwhile: served
            assert _closed(silent) and _closed(partial)
        run("nbdcopy", srv.tcp(), "null:")
    finally:
        srv.stop()


@pytest.mark.hostile
def test_bad_certificates_are_refused_and_the_server_carries_on(server, tmp_path):
    """A client that does not trust the server's CA refuses it (and says why); the server
    logs the failed handshake and goes on serving."""
    for uri in (server.tcp(server.certs.rogue), server.unix(server.certs.rogue)):
        with pytest.raises(DMError) as exc:
            RemoteDevice(uri)
        assert exc.value.errno == 6 and "certificate does not verify" in str(exc.value)  # ENXIO
    wrong_name = f"nbds://127.0.0.1:{server.port}/vol?tls-certificates={server.certs.client}&tls-hostname=elsewhere"
    with pytest.raises(DMError) as exc:
        RemoteDevice(wrong_name)
    assert "elsewhere" in str(exc.value)
    fails("nbdinfo", "--size", server.tcp(server.certs.rogue))
    assert run("nbdinfo", "--size", server.tcp()).strip() == str(SIZE)
    trusting = RemoteDevice(server.tcp(server.certs.rogue) + "&tls-verify-peer=false")   # explicitly unverified
    try:
        assert trusting.size == SIZE
    finally:
        trusting.close_backing()


# ---- the client: nbds:// references in tables ----------------------------------------------------

def test_tls_query_parameters(certs):
    addr = parse_url(f"nbds://host:1234/e?tls-certificates={certs.client}")
    assert addr.target == ("host", 1234) and addr.tls.certificates == str(certs.client)
    assert addr.tls.hostname == "host" and addr.tls.verify_peer
    addr = parse_url("nbds+unix:///e?socket=/s&tls-verify-peer=false")
    assert addr.tls.hostname is None and not addr.tls.verify_peer and addr.target == "/s"
    assert parse_url("nbd://host/e").tls is None
    for bad, words in (("nbds://h/e?tls-psk-file=/k", "Python 3.11's ssl"), ("nbds://h/e?tls-username=u", "PSK"),
                       ("nbds://h/e?tls-bogus=1", "tls-bogus"), ("nbds://h/e?tls-verify-peer=maybe", "maybe")):
        with pytest.raises(DMError) as exc:
            parse_url(bad)
        assert exc.value.errno == 22 and words in str(exc.value)


@pytest.fixture
def nbdkit_tls(tmp_path, certs):
    """nbdkit --tls=require --tls-verify-peer serving a file on a Unix socket."""
    need("nbdkit")
    image = tmp_path / "kit.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock, pidfile = tmp_path / "kit.sock", tmp_path / "kit.pid"
    run("nbdkit", "-U", str(sock), "-P", str(pidfile), "--tls=require", f"--tls-certificates={certs.server}",
        "--tls-verify-peer", "file", str(image))
    assert wait_until(pidfile.exists)
    pid = int(pidfile.read_text())
    try:
        yield sock, image
    finally:
        os.kill(pid, 15)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"))


def test_userdm_client_against_nbdkit_tls_require(nbdkit_tls, certs):
    sock, image = nbdkit_tls
    url = f"nbds+unix:///?socket={sock}&tls-certificates={certs.client}"
    m = Mapper()
    try:
        m.create("remote", f"0 {SIZE // 512} linear {url} 0\n")
        h = m.open_device("remote", write=True)
        data = os.urandom(3 * MiB)
        h.write(MiB, data)
        h.flush()
        assert h.read(MiB, len(data)) == data
        h.close()
        with open(image, "rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
        for bad, words in ((f"nbd+unix:///?socket={sock}", "requires TLS"),
                           (f"nbds+unix:///?socket={sock}&tls-certificates={certs.anonymous}", "client certificate"),
                           (f"nbds+unix:///?socket={sock}&tls-certificates={certs.rogue}", "does not verify")):
            with pytest.raises(DMError) as exc:
                m.create("bad", f"0 8 linear {bad} 0\n")
            assert exc.value.errno == 6 and words in str(exc.value), str(exc.value)   # ENXIO
    finally:
        m.close()


def test_a_reconnect_redoes_the_tls_handshake(nbdkit_tls, certs):
    sock, _image = nbdkit_tls
    dev = RemoteDevice(f"nbds+unix:///?socket={sock}&tls-certificates={certs.client}")
    try:
        dev.write(0, b"\x22" * 4096)
        (first,) = dev._idle
        assert first.sock.version() in ("TLSv1.2", "TLSv1.3")
        first.sock.raw.shutdown(socket.SHUT_RDWR)      # the connection breaks under the device
        buf = bytearray(4096)
        dev.readinto(0, memoryview(buf))
        assert buf == b"\x22" * 4096
        (second,) = dev._idle
        assert second is not first and second.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        dev.close_backing()


def test_daemon_b_table_over_daemon_a_tls_export(server, tmp_path):
    need("nbdcopy")
    b = Daemon(tmp_path / "b")
    (tmp_path / "b").mkdir()
    b.start()
    try:
        url = server.tcp()
        b.run("create", "remote", "--table", f"0 {SIZE // 512} linear {url} 0")
        assert url in b.run("table", "remote").stdout
        src = random_file(tmp_path / "src.img")
        run("nbdcopy", str(src), f"nbd+unix:///remote?socket={b.runtime}/nbd.sock")
        assert same_bytes(src, server.image)
        back = tmp_path / "back.img"
        run("nbdcopy", f"nbd+unix:///remote?socket={b.runtime}/nbd.sock", str(back))
        assert same_bytes(src, back)
    finally:
        b.stop()


def test_a_table_over_the_daemons_own_tls_export_is_a_cycle(server):
    for url in (server.tcp(), f"nbds://127.0.0.1:{server.port}/vol?tls-certificates={server.certs.client}",
                server.unix()):
        res = server.d.run("load", "vol", "--table", f"0 8 linear {url} 0", check=False)
        assert res.returncode != 0 and "ELOOP" in res.stderr and "vol -> vol" in res.stderr, res.stderr


def test_tls_on_lets_each_tcp_client_choose(tmp_path, certs):
    need("nbdinfo")
    srv = TLSDaemon(tmp_path / "a", certs, "--tls=on")
    try:
        assert "--tls=on lets clients" in srv.d.log.read_text()
        assert json.loads(run("nbdinfo", "--json", srv.tcp()))["TLS"] is True
        assert json.loads(run("nbdinfo", "--json", f"nbd://localhost:{srv.port}/vol"))["TLS"] is False
    finally:
        srv.stop()


@pytest.mark.hostile
@pytest.mark.timeout(180)
def test_tls_clients_that_never_read_replies_are_held_by_the_budget_and_cut_off(tmp_path, images, certs):
    """The byte budgets and the reply timeout hold over TLS: clients that pipeline 32 MiB
    READs and read nothing hold at most the budget, are cut off after --nbd-reply-timeout,
    and an honest TLS client's small and big requests go through."""
    from userdm.export.nbd.limits import NBDLimits
    from userdm.export.nbd.server import NBDServer
    from userdm.export.nbd.tls import ServerTLS
    from userdm.nbd.protocol import encode_request
    m = Mapper()
    m.create("vol", f"0 {128 * MiB // 512} linear {images(1, 128 * MiB)[0]} 0\n")
    srv = NBDServer(m, tcp=("127.0.0.1", 0), tls=ServerTLS("require", server_context(certs.server), str(certs.server)),
                    limits=NBDLimits(connection_bytes=32 * MiB, total_bytes=64 * MiB, reply_timeout=2))
    srv.start()
    url = f"nbds://127.0.0.1:{srv.tcp_address[1]}/vol?tls-certificates={certs.client}"
    greedy = []
    honest = RemoteDevice(url, max_connections=1)
    try:
        from userdm.nbd.client import NBDConnection
        for _ in range(4):
            conn = NBDConnection(parse_url(url), url, client_context(certs.client))
            conn.sock.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for cookie in range(8):
                conn.sock.sendall(encode_request(C.CMD_READ, cookie, (cookie % 4) * 32 * MiB, 32 * MiB))
            greedy.append(conn)
        data = os.urandom(4096)
        honest.write(5 * MiB, data)                         # small requests need no budget bytes
        buf = bytearray(4096)
        honest.readinto(5 * MiB, memoryview(buf))
        assert buf == data
        big = os.urandom(8 * MiB)
        honest.write(64 * MiB, big)                          # waits for bytes until they are cut off
        out = bytearray(8 * MiB)
        honest.readinto(64 * MiB, memoryview(out))
        assert out == big
        # cut off: only the honest connection is left (the greedy clients never see the
        # FIN, queued behind the replies they do not read), and its bytes are given back
        assert wait_until(lambda: srv.connection_count() == 1, 60)
        assert wait_until(lambda: srv.budget.used <= 8 * MiB, 30)
    finally:
        for conn in greedy:
            conn.sock.close()
        honest.close_backing()
        srv.stop()
        m.close()
