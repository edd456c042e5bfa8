"""Holder hooks (issue 16 §3, seed 004): a holder outside the daemon, `userdm open NAME
--exclusive --hook SCRIPT -- CMD`, gets freeze/thaw/sync/notify-failure/mark-dead as runs of
SCRIPT. A failing freeze fails the suspend, a hanging one times out, notify-failure reaches
the top holder's hook with offsets translated, and the registration ends with the holder.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import USERDM, wait_until

from userdm.control import protocol
from userdm.errors import DMError

SECTORS = 8192
MiB = 1 << 20


def write_hook(path: Path, log: Path, *, fail_freeze: int = 0, hang_freeze: bool = False) -> str:
    body = [f'echo "$USERDM_DEVICE $*" >> {log}']
    if fail_freeze:
        body.append(f'[ "$1" = freeze ] && {{ echo "cannot flush the guest" >&2; exit {fail_freeze}; }}')
    if hang_freeze:
        body.append('[ "$1" = freeze ] && exec sleep 600')
    body.append("exit 0")
    path.write_text("#!/bin/sh\n" + "\n".join(body) + "\n")
    path.chmod(0o755)
    return str(path)


class Holder:
    """`userdm open NAME --exclusive --hook SCRIPT -- sleep`, killed at the end."""

    def __init__(self, daemon, name: str, hook: str, *extra: str) -> None:
        self.proc = subprocess.Popen(USERDM + ["open", name, "--holder", f"h-{name}", "--hook", hook, *extra,
                                               "--", "sleep", "600"], env=daemon.env, start_new_session=True)
        client = daemon.connect()
        try:
            assert wait_until(lambda: client.info(name)["holder"] == f"h-{name}" or self.proc.poll() is not None)
            assert self.proc.poll() is None, "the holder did not start"
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_hook_records_freeze_and_thaw_around_a_suspend(daemon, images, tmp_path):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    log = tmp_path / "hook.log"
    holder = Holder(daemon, "vm", write_hook(tmp_path / "hook", log))
    try:
        daemon.run("suspend", "vm")
        assert lines(log) == ["vm freeze"]
        daemon.run("resume", "vm")
        assert lines(log) == ["vm freeze", "vm thaw"]
        daemon.run("suspend", "--nolockfs", "vm")
        daemon.run("resume", "vm")
        assert lines(log) == ["vm freeze", "vm thaw"]  # --nolockfs: the holder is not frozen
        # one registration per device: a second holder's hook is EBUSY
        res = daemon.run("open", "vm", "--holder", "h-vm", "--hook", str(tmp_path / "hook"), "--", "true",
                         check=False)
        assert res.returncode != 0 and "EBUSY" in res.stderr, res.stderr
    finally:
        holder.kill()
    # a holder that dies is unregistered: the suspend runs no hook
    client = daemon.connect()
    assert wait_until(lambda: client.info("vm")["holder"] == "-")
    daemon.run("suspend", "vm")
    daemon.run("resume", "vm")
    assert lines(log) == ["vm freeze", "vm thaw"]
    client.close()


@pytest.mark.hostile
def test_a_failing_freeze_hook_fails_the_suspend_and_the_device_runs_on(daemon, images, tmp_path):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    daemon.run("create", "other", "--table", f"0 {SECTORS} linear {img} 0", "--shared")
    log = tmp_path / "hook.log"
    hook = write_hook(tmp_path / "hook", log, fail_freeze=3)
    holder = Holder(daemon, "vm", hook)
    try:
        res = daemon.run("suspend", "vm", check=False)
        assert res.returncode != 0 and "EIO" in res.stderr and hook in res.stderr and "status 3" in res.stderr \
            and "cannot flush the guest" in res.stderr, res.stderr
        client = daemon.connect()
        assert not client.info("vm")["suspended"]
        client.message("vm", 0, "@cancel_deferred_remove")  # the device answers control requests
        daemon.run("suspend", "other")
        daemon.run("resume", "other")
        client.close()
        assert lines(log) == ["vm freeze"]  # nothing was frozen, so nothing is thawed
    finally:
        holder.kill()


@pytest.mark.hostile
def test_a_hanging_freeze_hook_times_out(daemon, images, tmp_path):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    hook = write_hook(tmp_path / "hook", tmp_path / "hook.log", hang_freeze=True)
    holder = Holder(daemon, "vm", hook, "--hook-timeout", "0.5")
    try:
        res = daemon.run("suspend", "vm", check=False)
        assert res.returncode != 0 and "ETIMEDOUT" in res.stderr and "killed" in res.stderr, res.stderr
        assert not daemon.connect().info("vm")["suspended"]
    finally:
        holder.kill()


def test_notify_failure_at_the_bottom_of_three_reaches_the_top_hook_translated(daemon, images, tmp_path):
    (img,) = images(1, 16 * MiB)
    daemon.run("create", "bottom", "--table", f"0 {16 * MiB // 512} linear {img} 0")
    daemon.run("create", "middle", "--table", f"0 {8 * MiB // 512} linear /dev/mapper/bottom {4 * MiB // 512}")
    daemon.run("create", "top", "--table", f"0 {4 * MiB // 512} linear /dev/mapper/middle {2 * MiB // 512}")
    log = tmp_path / "hook.log"
    holder = Holder(daemon, "top", write_hook(tmp_path / "hook", log))
    try:
        # bottom byte 6 MiB + 4 KiB is middle's 2 MiB + 4 KiB, top's 4 KiB
        res = daemon.run("notify-failure", "bottom", str(6 * MiB + 4096), "4096")
        assert res.returncode == 0
        assert "top: bytes 4096+4096" in res.stdout and "taken by its holder" in res.stdout, res.stdout
        assert lines(log) == ["top notify-failure 4096 4096 0"]
    finally:
        holder.kill()


def test_hook_requests_are_checked(daemon, images, tmp_path):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    client = daemon.connect()
    with pytest.raises(DMError) as exc:
        client.open("vm", hook=str(tmp_path / "hook"))
    assert exc.value.errno == errno.EINVAL and "exclusive" in exc.value.message
    with pytest.raises(DMError) as exc:
        client.open("vm", exclusive=True, hook=str(tmp_path / "missing"))
    assert exc.value.errno == errno.ENOENT and "missing" in exc.value.message
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(DMError) as exc:
        client.open("vm", exclusive=True, hook=str(plain))
    assert exc.value.errno == errno.EACCES
    assert client.info("vm")["open_count"] == 0
    client.close()


# ---- the same holder ops through the Python client (callbacks over the control connection) ----

class Recorder:
    """Holder ops as callbacks: each call is recorded; `freeze` may raise or wait for `release`."""

    def __init__(self, *, fail_freeze: bool = False, hang_freeze: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_freeze = fail_freeze
        self.hang_freeze = hang_freeze
        self.release = threading.Event()

    def freeze(self) -> None:
        self.calls.append(("freeze",))
        if self.fail_freeze:
            raise RuntimeError("cannot flush the guest")
        if self.hang_freeze:
            self.release.wait(60)

    def thaw(self) -> None:
        self.calls.append(("thaw",))

    def notify_failure(self, offset: int, length: int, flags: int) -> None:
        self.calls.append(("notify_failure", offset, length, flags))


def held(client, name: str, ops, **kwargs):
    info = client.open(name, holder=f"py-{name}", ops=ops, **kwargs)
    assert info["holder"] == f"py-{name}" and isinstance(info["fd"], int)
    return info


def release(info) -> None:
    info["ops"].close()
    os.close(info["fd"])


@contextmanager
def python_holder(daemon, images, timeout: float | None = None, **behaviour):
    """Device `vm` held by holder `py-vm` with a `Recorder`'s callbacks: (client, recorder)."""
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    client = daemon.connect()
    ops = Recorder(**behaviour)
    info = held(client, "vm", ops, hook_timeout=timeout)
    try:
        yield client, ops
    finally:
        ops.release.set()
        release(info)
        client.close()


def test_python_callbacks_record_freeze_and_thaw_around_a_suspend(daemon, images):
    with python_holder(daemon, images) as (client, ops):
        client.suspend("vm")
        assert ops.calls == [("freeze",)]
        client.resume("vm")
        assert ops.calls == [("freeze",), ("thaw",)]
        client.suspend("vm", nolockfs=True)
        client.resume("vm")
        assert ops.calls == [("freeze",), ("thaw",)]
        # one registration per device: a second one (a hook, or callbacks) is EBUSY
        with pytest.raises(DMError) as exc:
            client.open("vm", holder="py-vm", ops={"freeze": lambda: None})
        assert exc.value.errno == errno.EBUSY and "py-vm" in exc.value.message


@pytest.mark.hostile
def test_a_raising_freeze_callback_fails_the_suspend_naming_the_holder(daemon, images):
    with python_holder(daemon, images, fail_freeze=True) as (client, ops):
        with pytest.raises(DMError) as exc:
            client.suspend("vm")
        assert exc.value.errno == errno.EIO
        assert "holder py-vm" in exc.value.message and "cannot flush the guest" in exc.value.message, exc.value
        assert not client.info("vm")["suspended"]
        with client.open_device("vm") as dev:  # the device runs on
            dev.write(0, b"x" * 512)
        assert ops.calls == [("freeze",)]  # nothing was frozen, so nothing is thawed


@pytest.mark.hostile
def test_a_hanging_freeze_callback_times_out_and_is_thawed_when_it_ends(daemon, images):
    with python_holder(daemon, images, timeout=0.5, hang_freeze=True) as (client, ops):
        with pytest.raises(DMError) as exc:
            client.suspend("vm")
        assert exc.value.errno == errno.ETIMEDOUT and "py-vm" in exc.value.message, exc.value
        assert not client.info("vm")["suspended"]
        ops.release.set()  # the freeze ends late: the thaw sent after the timeout follows it
        assert wait_until(lambda: ops.calls == [("freeze",), ("thaw",)])


def test_notify_failure_at_the_bottom_reaches_the_top_callback_translated(daemon, images):
    (img,) = images(1, 16 * MiB)
    daemon.run("create", "bottom", "--table", f"0 {16 * MiB // 512} linear {img} 0")
    daemon.run("create", "middle", "--table", f"0 {8 * MiB // 512} linear /dev/mapper/bottom {4 * MiB // 512}")
    daemon.run("create", "top", "--table", f"0 {4 * MiB // 512} linear /dev/mapper/middle {2 * MiB // 512}")
    client = daemon.connect()
    ops = Recorder()
    info = held(client, "top", ops)
    try:
        res = daemon.run("notify-failure", "bottom", str(6 * MiB + 4096), "4096")
        assert "top: bytes 4096+4096" in res.stdout and "taken by its holder" in res.stdout, res.stdout
        assert ops.calls == [("notify_failure", 4096, 4096, 0)]
    finally:
        release(info)
    # the registration ended with the channel: nobody takes the failure now
    res = daemon.run("notify-failure", "bottom", str(6 * MiB + 4096), "4096", check=False)
    assert res.returncode != 0 and "EOPNOTSUPP" in res.stderr, res.stderr
    client.close()


HOLDER_SCRIPT = """
import sys, time, userdm
calls = []
client = userdm.connect()
info = client.open("vm", holder="killed", ops={"freeze": lambda: calls.append(1)})
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.hostile
def test_a_python_holder_that_is_sigkilled_is_unregistered(daemon, images):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT], env=daemon.env, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    client = daemon.connect()
    try:
        assert proc.stdout.readline() == "held\n"
        assert client.info("vm")["holder"] == "killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: client.info("vm")["holder"] == "-")
        client.suspend("vm")  # no holder to freeze
        client.resume("vm")
        ops = Recorder()
        info = held(client, "vm", ops)  # the registration is free again
        release(info)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    client.close()


@pytest.mark.hostile
def test_a_channel_closed_while_its_open_stays_is_unregistered(daemon, images):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    client = daemon.connect()
    ops = Recorder()
    info = held(client, "vm", ops)
    info["ops"].close()
    try:
        assert client.info("vm")["holder"] == "py-vm"  # the open lasts while its fd does
        # the registration is gone: the suspend freezes nobody, a new registration is taken
        assert wait_until(lambda: _suspend_resume(client) and ops.calls == [])
        again = Recorder()
        second = held(client, "vm", again)
        client.suspend("vm")
        client.resume("vm")
        assert again.calls == [("freeze",), ("thaw",)] and ops.calls == []
        release(second)
    finally:
        os.close(info["fd"])
    client.close()


def _suspend_resume(client) -> bool:
    client.suspend("vm")
    client.resume("vm")
    return True


@pytest.mark.hostile
def test_holder_ops_requests_are_checked(daemon, images):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    client = daemon.connect()
    with pytest.raises(DMError) as exc:
        client.open("vm", ops={"freeze": lambda: None})
    assert exc.value.errno == errno.EINVAL and "exclusive" in exc.value.message
    with pytest.raises(DMError) as exc:
        client.open("vm", exclusive=True, ops=object())
    assert exc.value.errno == errno.EINVAL and "none of" in exc.value.message
    with pytest.raises(DMError) as exc:
        client.open("vm", exclusive=True, ops={"freeze": 5})
    assert exc.value.errno == errno.EINVAL and "freeze" in exc.value.message
    for bad in ([], ["freeze", "freeze"], ["boil"], "freeze", {"freeze": True}):
        with pytest.raises(DMError) as exc:
            client.call("open", name="vm", exclusive=True, ops=bad)
        assert exc.value.errno == errno.EINVAL and "'ops'" in exc.value.message, exc.value
    assert client.info("vm")["open_count"] == 0
    client.close()


def raw_holder(daemon, name: str, *, timeout: float = 0.5) -> tuple[socket.socket, int]:
    """A control connection that registered freeze (and never answers): the socket, the open's fd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(Path(daemon.env["USERDM_RUNTIME_DIR"]) / "control"))
    sock.sendall(protocol.encode(protocol.request("open", name=name, holder="raw", ops=["freeze"],
                                                  hook_timeout=timeout)))
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    assert protocol.Decoder().feed(data)[0]["ok"] and len(fds) == 1
    return sock, fds[0]


@pytest.mark.hostile
def test_a_holder_that_never_answers_or_answers_garbage_cannot_hold_up_the_daemon(daemon, images):
    (img,) = images()
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    client = daemon.connect()
    sock, fd = raw_holder(daemon, "vm")
    try:
        for _ in range(2):  # it never reads: the second operation must not wait for the first
            with pytest.raises(DMError) as exc:
                client.suspend("vm")
            assert exc.value.errno == errno.ETIMEDOUT and "raw" in exc.value.message, exc.value
        assert not client.info("vm")["suspended"]
        sock.sendall(protocol.encode({"answer": "not one"}))  # garbage: the daemon hangs up
        sock.settimeout(30)
        while sock.recv(1 << 20):  # the operations sent so far, then the end
            pass
        assert wait_until(lambda: _suspend_resume(client))  # unregistered: nothing to freeze
    finally:
        sock.close()
        os.close(fd)
    assert wait_until(lambda: client.info("vm")["open_count"] == 0)
    client.close()


def test_callbacks_in_process_are_the_same_holder_ops(images):
    """`Mapper.open(..., ops=...)` in process: the callbacks are called directly, an exception
    names the holder, and the registration ends with the open."""
    from userdm import Mapper
    (img,) = images()
    m = Mapper()
    try:
        m.create("vm", f"0 {SECTORS} linear {img} 0")
        ops = Recorder(fail_freeze=True)
        info = m.open("vm", holder="inproc", ops=ops)
        with pytest.raises(DMError) as exc:
            m.suspend("vm")
        assert exc.value.errno == errno.EIO and "holder inproc" in exc.value.message \
            and "cannot flush the guest" in exc.value.message
        assert not m.info("vm")["suspended"] and ops.calls == [("freeze",)]
        ops.fail_freeze = False
        m.suspend("vm")
        m.resume("vm")
        assert ops.calls == [("freeze",), ("freeze",), ("thaw",)]
        os.close(info["fd"])
        assert wait_until(lambda: m.info("vm")["open_count"] == 0)
        m.suspend("vm")
        m.resume("vm")
        assert len(ops.calls) == 3
    finally:
        m.close()
