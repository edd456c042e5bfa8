"""Backing up a device while it is in use (issue 6): a live snapshot through the interposer under
fio, and the three-command backup workflow with era-based incremental copies, across a SIGKILL
of the daemon. Real clients throughout: fio, nbdcopy and qemu-io over the daemon's NBD socket.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import USERDM, wait_until

MiB = 1 << 20
SIZE = 32 * MiB
SECTORS = SIZE // 512


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def uri(daemon, name: str) -> str:
    return f"nbd+unix:///{name}?socket={daemon.runtime / 'nbd.sock'}"


def nbd_read_all(daemon, name: str, dest: Path) -> str:
    subprocess.run(["nbdcopy", uri(daemon, name), str(dest)], check=True, timeout=120)
    return sha(dest)


def qemu_io(daemon, name: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw", uri(daemon, name)]
    for c in cmds:
        args += ["-c", c]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "error" not in out.stdout.lower(), out.stdout + out.stderr


def test_live_snapshot_of_a_device_under_fio(daemon, images, tmp_path):
    """fio writes with verification to DEV over NBD; a snapshot-origin is interposed, a persistent
    snapshot taken with DEV's writes paused, read while fio goes on, and detached again: the
    snapshot equals DEV at that moment and fio sees no error and no disconnect."""
    need("fio", "nbdcopy")
    img, cow = images(1, SIZE)[0], images(1, 16 * MiB)[0]
    client = daemon.connect()
    client.create("dev", f"0 {SECTORS} linear {img} 0")
    out = tmp_path / "fio.json"
    fio = subprocess.Popen(["fio", "--name=live", "--ioengine=nbd", f"--uri={uri(daemon, 'dev')}",
                            "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=24M", "--time_based",
                            "--runtime=6", "--verify=crc32c", "--verify_backlog=128",
                            "--verify_state_save=0", f"--output={out}", "--output-format=json"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: client.info("dev")["open_count"] >= 1)
        client.create("dev-origin", f"0 {SECTORS} snapshot-origin [interpose]/dev/mapper/dev",
                      interpose=True)
        assert client.info("dev")["interposed_by"] == ["dev-origin"]
        client.suspend("dev")                       # fio's writes wait here, nothing fails
        at_snapshot = sha(img)
        client.create("snap", f"0 {SECTORS} snapshot /dev/mapper/dev {cow} P 8")
        client.resume("dev")
        assert nbd_read_all(daemon, "snap", tmp_path / "snap1.img") == at_snapshot
        still_running_at_detach = fio.poll() is None
        client.remove("snap")
        client.remove("dev-origin")                 # detach while fio writes
        assert client.info("dev")["interposed_by"] == []
        assert fio.wait(120) == 0, fio.stderr.read()
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0
    assert still_running_at_detach, "fio finished before the detach: make it run longer"
    assert client.info("dev")["open_count"] == 0
    client.close()


def test_three_command_backup_with_incremental_copy_across_a_daemon_kill(daemon, images, tmp_path):
    need("qemu-io", "nbdcopy")
    (img,) = images(1, SIZE)
    store = tmp_path / "store"
    full = tmp_path / "backup.img"
    daemon.run("create", "vm", "--table", f"0 {SECTORS} linear {img} 0")
    user = subprocess.Popen(USERDM + ["open", "vm", "--", "sleep", "600"], env=daemon.env)  # in use
    try:
        qemu_io(daemon, "vm", f"write -P 0x11 0 {SIZE}")
        expected_first = sha(img)

        res = daemon.run("backup", "start", "vm", "--store", str(store))
        era1 = int(re.search(r"taken at era (\d+)", res.stdout).group(1))
        qemu_io(daemon, "vm", "write -P 0x22 1M 64k")          # after the snapshot
        assert nbd_read_all(daemon, "vm-snap", tmp_path / "s.img") == expected_first

        # The snapshot survives a SIGKILL of the daemon and reads the same afterwards.
        daemon.stop(signal.SIGKILL)
        user.kill()  # its open died with the daemon
        user.wait()
        daemon.start()
        user = subprocess.Popen(USERDM + ["open", "vm", "--", "sleep", "600"], env=daemon.env)
        res = daemon.run("backup", "copy", "vm", str(full), "--progress")   # a bar, though not a terminal
        assert sha(full) == expected_first
        assert f"copied {SIZE} of {SIZE} bytes" in res.stdout and "100%" in res.stderr
        daemon.run("backup", "drop", "vm")

        qemu_io(daemon, "vm", "write -P 0x33 20M 128k")
        res = daemon.run("backup", "start", "vm", "--store", str(store))
        era2 = int(re.search(r"taken at era (\d+)", res.stdout).group(1))
        assert era2 > era1
        res = daemon.run("backup", "copy", "vm", str(full), "--since", str(era1))
        copied = int(re.search(r"copied (\d+) of", res.stdout).group(1))
        assert "%" not in res.stderr                          # no bar off a terminal
        assert sha(full) == sha(img)                          # the device as of the second snapshot
        assert copied < SIZE // 16
        print(f"\nincremental backup copied {copied} bytes for 192 KiB written: "
              f"ratio {copied / (192 * 1024):.2f}")
        res = daemon.run("backup", "drop", "vm", "--all")
        assert "vm-era" in res.stdout
        assert daemon.run("ls").stdout.split()[0] == "vm"
    finally:
        user.kill()
        user.wait()


def test_interposed_era_reports_every_block_fio_wrote_after_the_checkpoint(daemon, images, tmp_path):
    """era interposed in front of DEV while fio writes to it over NBD; after a checkpoint a
    second fio run's every written block is in the changed ranges, and little else."""
    need("fio")
    from test_era import fio_writes
    img, meta = images(1, SIZE)[0], images(1, 4 * MiB)[0]
    client = daemon.connect()
    client.create("dev", f"0 {SECTORS} linear {img} 0")

    def fio(*extra: str, background: bool = False):
        args = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri(daemon, 'dev')}", "--rw=randwrite",
                "--bs=4k", "--iodepth=8", "--verify=crc32c", "--verify_state_save=0", *extra]
        if background:
            return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return None

    first = fio("--size=8M", "--time_based", "--runtime=3", "--verify_backlog=64", background=True)
    try:
        assert wait_until(lambda: client.info("dev")["open_count"] >= 1)
        client.create("dev-era", f"0 {SECTORS} era {meta} [interpose]/dev/mapper/dev 128", interpose=True)
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    client.message("dev-era", 0, "checkpoint")
    era = int(client.status("dev-era")[0][3].split()[2])
    iolog = tmp_path / "fio.iolog"
    fio("--offset=12M", "--size=16M", "--io_size=2M", "--randseed=7", "--do_verify=1",
        f"--write_iolog={iolog}")
    written = set()
    for offset, length in fio_writes(iolog):
        written.update(range(offset // 512, (offset + length) // 512))
    reported = set()
    for r in client.era_changed("dev-era", since=era):
        reported.update(range(r["begin"], r["begin"] + r["length"]))
    assert written and written <= reported
    assert {s // 128 for s in reported} == {s // 128 for s in written}  # whole era blocks only
    print(f"\ninterposed era: {len(reported)} sectors reported / {len(written)} written by fio "
          f"= ratio {len(reported) / len(written):.2f} (64 KiB era blocks, 4 KiB writes)")
    client.remove("dev-era")
    client.close()
