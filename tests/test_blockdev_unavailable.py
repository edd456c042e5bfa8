"""Block devices where they cannot be had (issue 16 §1): without the FUSE export, or without
/dev/loop-control, `daemon --block-devices` does not start and `create --blockdev` is refused,
each with the errno and a sentence naming what is missing (never accepted silently).

The missing /dev/loop-control is real: the daemon runs in a mount namespace of its own whose
/dev holds only null, zero, urandom and fuse.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import USERDM, Daemon

SECTORS = 2048


def test_create_blockdev_without_the_fuse_export_is_eopnotsupp(daemon, images):
    (img,) = images()
    res = daemon.run("create", "vm", "--blockdev", "--table", f"0 {SECTORS} linear {img} 0", check=False)
    assert res.returncode != 0 and "EOPNOTSUPP" in res.stderr and "--no-fuse" in res.stderr \
        and "vm" in res.stderr, res.stderr
    assert daemon.connect().list() == []  # nothing was created
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")  # without the flag it is fine


def test_daemon_block_devices_without_the_fuse_export_does_not_start(tmp_path):
    d = Daemon(tmp_path)
    res = subprocess.run(USERDM + ["daemon", "--no-fuse", "--block-devices"], env=d.env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode != 0 and "EOPNOTSUPP" in res.stderr and "--block-devices" in res.stderr \
        and "FUSE" in res.stderr, res.stderr
    assert not (d.runtime / "control").exists()


#: a /dev with only what the daemon needs besides the loop driver, in a mount namespace of its own
NO_LOOP_DEV = """
mkdir -p "$0/dev" && mount -t tmpfs tmpfs "$0/dev" || exit 97
for n in null zero full random urandom fuse; do
    touch "$0/dev/$n" && mount --bind "/dev/$n" "$0/dev/$n" || exit 97
done
mount --rbind "$0/dev" /dev || exit 97
exec "$@"
"""


def without_loop_control(base: Path, *args: str) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", NO_LOOP_DEV, str(base), *USERDM, *args]


needs_namespace = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                                     or not os.path.exists("/dev/fuse"),
                                     reason="needs root, unshare and /dev/fuse")


@needs_namespace
@pytest.mark.root
@pytest.mark.fuse
def test_without_loop_control_block_devices_are_enodev(tmp_path, images):
    d = Daemon(tmp_path)
    res = subprocess.run(without_loop_control(tmp_path, "daemon", "--block-devices"), env=d.env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode not in (0, 97), res.stderr
    assert "ENODEV" in res.stderr and "/dev/loop-control" in res.stderr, res.stderr
    # without --block-devices it runs (FUSE and all), and refuses `create --blockdev`
    (img,) = images()
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(without_loop_control(tmp_path, "daemon"), env=d.env, stdout=subprocess.PIPE,
                                stderr=log, text=True)
    try:
        assert "ready" in proc.stdout.readline(), (tmp_path / "daemon.log").read_text()
        res = d.run("create", "vm", "--blockdev", "--table", f"0 {SECTORS} linear {img} 0", check=False)
        assert res.returncode != 0 and "ENODEV" in res.stderr and "/dev/loop-control" in res.stderr, res.stderr
        d.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
        assert d.connect().info("vm")["block_device"] is None
    finally:
        proc.send_signal(signal.SIGTERM)  # its FUSE mount lives in its namespace and goes with it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
