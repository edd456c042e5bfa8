"""Holder hooks (issue 16 §3, seed 004): a holder outside the daemon, `userdm open NAME
--exclusive --hook SCRIPT -- CMD`, gets freeze/thaw/sync/notify-failure/mark-dead as runs of
SCRIPT. A failing freeze fails the suspend, a hanging one times out, notify-failure reaches
the top holder's hook with offsets translated, and the registration ends with the holder.
"""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import USERDM, wait_until
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
