"""The control protocol as pure functions, and the control socket against garbage."""

import errno
import os
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from userdm.control import protocol
from userdm.errors import DMError


def test_roundtrip_and_split_delivery():
    data = protocol.encode(protocol.request("info", name="v")) + protocol.encode(protocol.ok([1, 2]))
    dec = protocol.Decoder()
    got = []
    for i in range(len(data)):  # one byte at a time
        got += dec.feed(data[i:i + 1])
    assert got == [{"cmd": "info", "args": {"name": "v"}}, {"ok": True, "result": [1, 2]}]
    assert dec.pending == 0


def test_oversized_and_invalid_messages_are_protocol_errors():
    for bad in (struct.pack(">I", protocol.MAX_MESSAGE + 1), struct.pack(">I", 3) + b"\xff\xfe{",
                struct.pack(">I", 2) + b"[]"):
        try:
            protocol.Decoder().feed(bad)
        except protocol.ProtocolError:
            continue
        raise AssertionError(f"accepted {bad!r}")


class Fake:
    def info(self, name):
        raise DMError(errno.ENXIO, f"device {name!r} does not exist")

    def list(self):
        return []


def test_dispatch_maps_every_failure_to_an_errno():
    fake = Fake()
    assert protocol.dispatch(fake, {"cmd": "list"}) == {"ok": True, "result": []}
    assert protocol.dispatch(fake, {"cmd": "info", "args": {"name": "x"}})["errno"] == "ENXIO"
    assert protocol.dispatch(fake, {"cmd": "__class__"})["errno"] == "ENOTTY"
    assert protocol.dispatch(fake, {"cmd": "info", "args": {"bogus": 1}})["errno"] == "EINVAL"
    assert protocol.dispatch(fake, {"cmd": "info", "args": [1]})["errno"] == "EINVAL"
    assert protocol.dispatch(fake, {})["errno"] == "EINVAL"  # no 'cmd' field
    err = protocol.dispatch(fake, {"cmd": "info", "args": {"name": "x"}})
    try:
        protocol.result_of(err)
    except DMError as exc:
        assert exc.errno == errno.ENXIO and "does not exist" in exc.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(data):
    try:
        for message in protocol.Decoder().feed(data):
            assert isinstance(message, dict)
            protocol.dispatch(Fake(), message)
    except protocol.ProtocolError:
        pass


def test_daemon_survives_garbage_and_checks_socket_mode(daemon):
    path = daemon.runtime / "control"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for junk in (b"\xff" * 16, struct.pack(">I", 5) + b"nope!", b"\x00\x00"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        s.recv(4096)
        s.close()
    with daemon.connect() as client:
        assert client.list() is not None
        try:
            client.call("frobnicate")
        except DMError as exc:
            assert exc.errno == errno.ENOTTY


def test_peer_credentials_are_checked():
    """Even with the socket mode opened up, a peer of another uid is disconnected unanswered."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import pytest

    from conftest import Daemon
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as another user")
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)
    daemon = Daemon(base)
    daemon.start()
    try:
        path = daemon.runtime / "control"
        os.chmod(daemon.runtime, 0o755)
        os.chmod(path, 0o666)
        probe = (
            "import socket, struct, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "body = b'{\"cmd\":\"list\",\"args\":{}}'\n"
            "try:\n"
            "    s.sendall(struct.pack('>I', len(body)) + body)\n"
            "    print(repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print('disconnected')\n"
        )
        res = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                             user=65534, timeout=30)
        assert res.stdout.strip() in ("b''", "disconnected"), res  # connected, then dropped unanswered
        with daemon.connect() as client:
            assert client.list() == []
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_control_socket_passes_an_nbd_socket(daemon, images):
    """`connect_nbd` hands the client a file descriptor (SCM_RIGHTS) already served by the
    daemon's NBD server; libnbd does the handshake on it and the open counts."""
    import subprocess

    import pytest
    if not os.path.exists("/usr/bin/python3") or subprocess.run(
            ["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("needs Debian's python3-libnbd")
    (img,) = images(1)
    with daemon.connect() as client:
        client.create("fdtest", f"0 2048 linear {img} 0")
        sock = client.connect_nbd()
        script = ("import nbd, os, sys\n"
                  "h = nbd.NBD(); h.set_export_name('fdtest'); h.connect_socket(int(sys.argv[1]))\n"
                  "h.pwrite(b'via-fd'.ljust(512, b'.'), 512); print(h.get_size(), h.pread(512, 512)[:6].decode())\n"
                  "sys.stdout.flush(); sys.stdin.readline()\n")
        proc = subprocess.Popen(["/usr/bin/python3", "-c", script, str(sock.fileno())],
                                pass_fds=[sock.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sock.close()  # the child holds the only copy now
        try:
            line = proc.stdout.readline()
            assert line.split() == ["1048576", "via-fd"], proc.stderr.read() if not line else line
            assert client.info("fdtest")["open_count"] == 1
        finally:
            proc.stdin.close()
            proc.wait(30)
        from conftest import wait_until
        assert wait_until(lambda: client.info("fdtest")["open_count"] == 0)
        client.remove("fdtest")
    with open(img, "rb") as f:
        f.seek(512)
        assert f.read(6) == b"via-fd"
