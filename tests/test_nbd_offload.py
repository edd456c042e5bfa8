"""NBD connections served by worker processes (export/nbd/offload.py, worker.py).

What must hold: data written through offloaded connections is right while the device, and
the device below it, are suspended, resumed and reloaded onto another file in a loop (the
revocation is exact: fio's verify would see a write that went to the old file); a worker
killed with SIGKILL closes its connections and the daemon serves the others and new ones;
stop with offloaded connections ends them; what a worker does not do (refusals, TRIM,
garbage) gets the daemon's answer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading

import pytest

from conftest import wait_until
from test_nbd_loop import Client, recv_exact
from userdm import Mapper
from userdm.export.nbd.server import NBDServer
from userdm.nbd import constants as C
from userdm.nbd.protocol import encode_request

MiB = 1 << 20
SECTORS = 64 * MiB // 512


@pytest.fixture
def served(tmp_path, images):
    """(mapper, server, [file a, file b]): "low" linear over a, "top" linear over low,
    served on nbd.sock with one worker process."""
    m = Mapper()
    a, b = images(2, 64 * MiB)
    m.create("low", f"0 {SECTORS} linear {a} 0\n")
    m.create("top", f"0 {SECTORS} linear /dev/mapper/low 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", offload_workers=1)
    srv.start()
    try:
        yield m, srv, [a, b]
    finally:
        srv.stop()
        m.close()


def offloaded(srv: NBDServer, clients: list[Client], n: int) -> None:
    """A write and read on each client until a worker serves `n` connections (a connection
    moves when its thread next waits for a request with others open, and a second after a
    refusal), 30 s at most."""
    def io() -> bool:
        for i, c in enumerate(clients):
            c.check(i * 4096, os.urandom(4096))
        return srv.loop.offload.offloaded() == n
    assert wait_until(io, 30), srv.loop.offload.offloaded()


def fio_verify(uri: str, jobs: int, size: str, out, env: dict | None = None,  # noqa: ANN001
               loops: int = 1) -> subprocess.CompletedProcess:
    """fio's random 4K writes, then its verify, over `jobs` connections (8 MiB apart), `loops`
    times."""
    return subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", f"--loops={loops}",
         "--iodepth=8", f"--numjobs={jobs}", f"--size={size}", "--offset_increment=8M", "--verify=crc32c",
         "--do_verify=1", "--verify_state_save=0", "--group_reporting", f"--output={out}",
         "--output-format=json"], capture_output=True, text=True, timeout=300, env=env)


def assert_verified_while_churning(proc: subprocess.CompletedProcess, out, written: int, turns: list[int],  # noqa: ANN001
                                   srv: NBDServer, handed: int) -> None:
    """`fio_verify` wrote `written` bytes and verified them without an error while the
    devices churned (at least one turn), and the offloader handed connections to workers
    at least `handed` times and took one back."""
    assert proc.returncode == 0, proc.stderr
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == written
    assert turns[0] >= 1
    off = srv.loop.offload
    assert off.handed >= handed and off.returned >= 1, (off.handed, off.returned)


@contextlib.contextmanager
def churning(m: Mapper, srv: NBDServer, files: list[str], ready=None):  # noqa: ANN001
    """While the block runs, in a loop, each turn once `ready()` (default: a worker serves two
    connections): "low" reloaded onto the other file (a copy made while suspended) and "top"
    suspended and resumed. Yields the number of turns so far (a list of one); fails if a turn
    failed."""
    stop = threading.Event()
    turns = [0]
    errors: list[BaseException] = []
    if ready is None:
        def ready() -> bool:
            return srv.loop.offload.offloaded() >= 2

    def churn() -> None:
        now = 0
        try:
            while wait_until(lambda: stop.is_set() or ready(), 60) and not stop.is_set():
                m.suspend("low")
                shutil.copyfile(files[now], files[1 - now])   # nothing moves while suspended
                now = 1 - now
                m.load("low", f"0 {SECTORS} linear {files[now]} 0\n")
                m.resume("low")
                stop.wait(0.05)
                m.suspend("top")
                stop.wait(0.01)
                m.resume("top")
                stop.wait(0.05)
                turns[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=churn)
    t.start()
    try:
        yield turns
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors


def workers(srv: NBDServer) -> list[int]:
    return [w.proc.pid for w in srv.loop.offload._workers if w.alive]


def test_fio_verify_while_suspended_resumed_and_reloaded(served, tmp_path):
    """Six fio connections write and verify while "low" is reloaded onto the other file (a
    copy made while suspended) and "top" suspended and resumed, in a loop."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    m, srv, files = served
    out = tmp_path / "fio.json"
    # connections refused while a device is suspended are offered again soon, and fio runs
    # four loops (new connections each): a turn always finds connections in the worker
    srv.loop.offload.retry = 0.02
    with churning(m, srv, files) as turns:
        proc = fio_verify(f"nbd+unix:///top?socket={tmp_path / 'nbd.sock'}", 6, "8M", out, loops=4)
    assert_verified_while_churning(proc, out, 4 * 6 * 8 * MiB, turns, srv, handed=2)


def test_suspend_takes_the_connection_back_and_holds_its_io(served):
    """A suspend completes with connections offloaded (they come back); their next request
    waits for the resume, then goes on (offloaded again later)."""
    m, srv, _ = served
    clients = [Client.plain(srv.unix_path, "top") for _ in range(2)]
    offloaded(srv, clients, 2)
    m.suspend("low")
    assert srv.loop.offload.offloaded() == 0
    cookie = clients[0].send_read(0, 4096)
    clients[0].sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        recv_exact(clients[0].sock, 1)
    clients[0].sock.settimeout(30)
    m.resume("low")
    assert len(clients[0].reply(cookie, 4096)) == 4096
    offloaded(srv, clients, 2)
    for c in clients:
        c.close()


def test_worker_killed_mid_io_closes_its_connections_only(served):
    m, srv, _ = served
    clients = [Client.plain(srv.unix_path, "top") for _ in range(3)]
    offloaded(srv, clients, 3)
    pids = workers(srv)
    assert len(pids) == 1
    for c in clients:
        c.send_write(0, os.urandom(4096))
    os.kill(pids[0], signal.SIGKILL)
    for c in clients:    # each gets its reply, or the connection closes: none hangs
        try:
            while c.sock.recv(65536):
                pass
        except OSError:
            pass
        c.close()
    assert wait_until(lambda: srv.connection_count() == 0, 20), srv.connection_count()
    fresh = [Client.plain(srv.unix_path, "top") for _ in range(2)]
    offloaded(srv, fresh, 2)     # a new worker serves them
    assert workers(srv) and workers(srv)[0] != pids[0]
    for c in fresh:
        c.close()


def test_stop_with_offloaded_connections(tmp_path, images):
    (a,) = images(1, 64 * MiB)
    m = Mapper()
    m.create("vol", f"0 {SECTORS} linear {a} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", offload_workers=2)
    srv.start()
    try:
        clients = [Client.plain(srv.unix_path, "vol") for _ in range(3)]
        offloaded(srv, clients, 3)
        pids = workers(srv)
    finally:
        srv.stop()
        m.close()
    for c in clients:
        assert c.sock.recv(1) == b""
        c.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_what_a_worker_does_not_do_gets_the_daemons_answer(served):
    """Refusals (out of range, unaligned flags), TRIM and FLUSH, then garbage: the same
    replies as from the daemon, and a bad magic ends the connection."""
    m, srv, _ = served
    clients = [Client.plain(srv.unix_path, "top") for _ in range(2)]
    offloaded(srv, clients, 2)
    c = clients[0]
    c.cookie += 1
    c.sock.sendall(encode_request(C.CMD_READ, c.cookie, 64 * MiB, 4096))
    magic, err, got = struct.unpack(">IIQ", recv_exact(c.sock, 16))
    assert (magic, err, got) == (C.SIMPLE_REPLY_MAGIC, C.NBD_EINVAL, c.cookie)
    c.cookie += 1
    c.sock.sendall(encode_request(C.CMD_WRITE, c.cookie, 0, 4096, flags=0x8000) + bytes(4096))
    magic, err, got = struct.unpack(">IIQ", recv_exact(c.sock, 16))
    assert (magic, err, got) == (C.SIMPLE_REPLY_MAGIC, C.NBD_EINVAL, c.cookie)
    c.check(8192, b"x" * 4096)
    c.cookie += 1
    c.sock.sendall(encode_request(C.CMD_TRIM, c.cookie, 0, 4096))
    assert struct.unpack(">IIQ", recv_exact(c.sock, 16)) == (C.SIMPLE_REPLY_MAGIC, 0, c.cookie)
    c.cookie += 1
    c.sock.sendall(encode_request(C.CMD_FLUSH, c.cookie, 0, 0))
    assert struct.unpack(">IIQ", recv_exact(c.sock, 16)) == (C.SIMPLE_REPLY_MAGIC, 0, c.cookie)
    offloaded(srv, clients, 2)
    c.sock.sendall(os.urandom(28))           # not a request: the daemon hangs up
    assert c.sock.recv(1) == b""
    c.close()
    clients[1].check(0, b"y" * 4096)         # the other goes on
    clients[1].close()


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def worker_processes(pid: int) -> list[int]:
    """The NBD worker processes of the daemon `pid`."""
    return [p for p in children(pid) if b"userdm.export.nbd.worker" in open(f"/proc/{p}/cmdline", "rb").read()]


def assert_ended(pids: list[int]) -> None:
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or b"zombie" in open(f"/proc/{pid}/status", "rb").read().lower()


def test_daemon_serves_four_fio_connections_from_workers_and_stops_them(tmp_path, images):
    """The real daemon (--nbd-workers 2): fio verify over four connections; its worker
    processes end with it."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    from conftest import Daemon
    (a,) = images(1, 64 * MiB)
    d = Daemon(tmp_path)
    d.start("--nbd-workers", "2")
    try:
        d.run("create", "vol", input=f"0 {SECTORS} linear {a} 0\n")
        sock = d.runtime / "nbd.sock"
        out = tmp_path / "fio.json"
        proc = fio_verify(f"nbd+unix:///vol?socket={sock}", 4, "4M", out)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text())["jobs"][0]["error"] == 0
        workers = worker_processes(d.proc.pid)
        assert workers
    finally:
        d.stop()
    assert_ended(workers)


def test_daemon_refuses_a_negative_worker_count(tmp_path):
    from conftest import USERDM
    res = subprocess.run(USERDM + ["daemon", "--no-fuse", "--nbd-workers", "-1"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "USERDM_RUNTIME_DIR": str(tmp_path / "run"),
                                          "USERDM_STATE_DIR": str(tmp_path / "state")})
    assert res.returncode != 0
    assert "--nbd-workers -1: must be from 0 to" in res.stderr, res.stderr


def test_client_that_reads_no_replies_goes_back_and_is_cut_off(tmp_path, images):
    """An offloaded connection that pipelines READs and never reads the replies: the worker
    does not wait for it (it goes back to the daemon, whose send gives up after
    --nbd-reply-timeout and hangs up); the others go on in the worker."""
    from userdm.export.nbd.limits import NBDLimits
    m = Mapper()
    m.create("vol", f"0 {SECTORS} linear {images(1, 64 * MiB)[0]} 0\n")
    srv = NBDServer(m, unix_path=tmp_path / "nbd.sock", limits=NBDLimits(reply_timeout=2), offload_workers=1)
    srv.start()
    clients = [Client.plain(srv.unix_path, "vol") for _ in range(3)]
    try:
        offloaded(srv, clients, 3)
        greedy = clients[0]
        greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.sock.sendall(b"".join(encode_request(C.CMD_READ, k, k % 256 * 4096, 4096) for k in range(4000)))
        assert wait_until(lambda: srv.connection_count() == 2, 60)
        assert srv.loop.offload.returned >= 1
        for i in range(20):
            for j, c in enumerate(clients[1:]):
                c.check((i * 2 + j) * 4096, os.urandom(4096))
        assert srv.loop.offload.offloaded() == 2
    finally:
        for c in clients:
            c.close()
        srv.stop()
        m.close()
