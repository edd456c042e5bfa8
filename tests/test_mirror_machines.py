"""The mirror target across daemons (issue 15): losing the machine that holds a leg, and a
crash of the daemon that mirrors, with the disk log.

- Losing a machine: daemon B mirrors a local file and daemon A's TLS export, fio verify
  writes through B; A is killed mid-run, fio sees no error and the leg shows `D`; A comes back
  and the same table is loaded and resumed again: B connects afresh, resyncs the regions its
  disk log holds dirty (as many as were out of sync), and the legs are byte-identical (`cmp`).
- A crash of the mirroring daemon: B is SIGKILLed while fio writes into a few regions; the
  regions dirty on the log are exactly those the restart copies (the daemon's log counts
  them, a clean region deliberately made different is left alone), and the data written and
  flushed before is all there.
Every daemon and fio is stopped in a `finally`.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import Daemon, wait_until
from test_nbd_tls import SIZE, TLSDaemon, certs, need, random_file, run  # noqa: F401 (certs: a fixture)

pytestmark = pytest.mark.interop
MiB = 1 << 20
REGION = 512 * 1024           # region_size 1024 sectors


def status(d: Daemon, name: str = "mir") -> list[str]:
    return d.run("status", name).stdout.split()


def resync_counts(d: Daemon, since: int) -> list[tuple[int, int]]:
    """(regions to copy, of how many) of each resync the daemon's log reports after `since`."""
    text = d.log.read_text()[since:]
    return [(int(a), int(b)) for a, b in re.findall(r"mirror resync of (\d+) of (\d+) regions", text)]


def dirty_on_log(path: Path, nr: int) -> list[int]:
    raw = path.read_bytes()[:4096]
    magic, version, count = struct.unpack_from("<IIQ", raw)
    assert (magic, version, count) == (0x4D695272, 2, nr)
    return [r for r in range(nr) if not raw[1024 + r // 8] >> (r % 8) & 1]


def fio(uri: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["fio", "--name=mirror", "--ioengine=nbd", f"--uri={uri}", "--bs=64k",
                             "--iodepth=4", "--output-format=json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def mirror_with_a_kept_log(b: Daemon, size: int, logdev: Path, legs: str) -> str:
    """Create `mir` on `b` with a new disk log (`nosync`), then reload it without `nosync`
    (which starts a new log at every resume, as in the kernel): the table to keep. Its URI."""
    b.run("create", "mir", "--table", f"0 {size // 512} mirror disk 3 {logdev} 1024 nosync {legs}")
    b.run("load", "mir", "--table", f"0 {size // 512} mirror disk 2 {logdev} 1024 {legs}")
    b.run("resume", "mir")
    nr = size // REGION
    assert status(b)[-7:] == [f"{nr}/{nr}", "1", "AA", "3", "disk", str(logdev), "A"]
    return f"nbd+unix:///mir?socket={b.runtime}/nbd.sock"


def crash_under_writes(b: Daemon, uri: str, logdev: Path, nr: int, offset: int, length: int) -> list[int]:
    """fio writes into [offset, offset + length) until the log holds dirty regions, then `b`
    is SIGKILLed: the regions dirty on the log, checked to lie in that range."""
    job = fio(uri, "--rw=randwrite", f"--offset={offset}", f"--size={length}", "--time_based", "--runtime=60")
    try:
        assert wait_until(lambda: dirty_on_log(logdev, nr) != [], 30)
        b.stop(9)                                         # the mirroring daemon crashes
    finally:
        stop(job)
    dirty = dirty_on_log(logdev, nr)
    assert dirty and set(dirty) <= set(range(offset // REGION, (offset + length) // REGION)), dirty
    return dirty


def opened(d: Daemon) -> bool:
    return int(d.run("info", "-c", "--noheadings", "-o", "open", "mir").stdout.strip() or 0) > 0


@pytest.mark.timeout(300)
def test_losing_a_machine_then_a_reload_of_the_same_table_resyncs_its_leg(tmp_path, certs):
    need("fio", "cmp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    a = TLSDaemon(tmp_path / "a", certs, listen=f"127.0.0.1:{port}")
    (tmp_path / "b").mkdir()
    b = Daemon(tmp_path / "b")
    job = None
    try:
        b.start()
        local, logdev = tmp_path / "local.img", tmp_path / "log.img"
        for path, size in ((local, SIZE), (logdev, 4096)):
            with open(path, "wb") as f:
                f.truncate(size)
        table = (f"0 {SIZE // 512} mirror disk 2 {logdev} 1024 2 {local} 0 {a.tcp()} 0 1 handle_errors")
        b.run("create", "mir", "--table", table)
        assert wait_until(lambda: status(b)[-7:] == ["32/32", "1", "AA", "3", "disk", str(logdev), "A"], 60)
        job = fio(f"nbd+unix:///mir?socket={b.runtime}/nbd.sock", "--rw=randwrite", "--verify=crc32c",
                  "--verify_backlog=32", "--verify_state_save=0", "--time_based", "--runtime=6")
        assert wait_until(lambda: opened(b), 30)
        assert job.poll() is None
        a.d.stop(9)                                      # machine A is lost
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        result = json.loads(out[out.index("{"):])["jobs"][0]
        assert result["error"] == 0 and result["write"]["io_bytes"] > 0
        assert wait_until(lambda: status(b)[-6:-3] == ["1", "AD", "3"], 30)
        in_sync = int(status(b)[-7].split("/")[0])
        assert in_sync < 32                              # what A missed is out of sync
        a.d.start(*a.args)                               # A is back with its device
        since = len(b.log.read_text())
        b.run("load", "mir", "--table", table)           # the same table again
        b.run("resume", "mir")
        assert wait_until(lambda: status(b)[-7:] == ["32/32", "1", "AA", "3", "disk", str(logdev), "A"], 120)
        assert resync_counts(b, since) == [(32 - in_sync, 32)]   # the dirty regions, no more
        run("cmp", str(local), str(a.image))
    finally:
        stop(job)
        b.stop()
        a.stop()


@pytest.mark.timeout(300)
def test_a_crash_of_the_mirroring_daemon_resyncs_only_the_dirty_regions(tmp_path):
    need("fio", "nbdcopy", "cmp")
    size, nr = 32 * MiB, 64
    (tmp_path / "b").mkdir()
    b = Daemon(tmp_path / "b")
    leg0, leg1, logdev = tmp_path / "leg0.img", tmp_path / "leg1.img", tmp_path / "log.img"
    for path, n in ((leg0, size), (leg1, size), (logdev, 4096)):
        with open(path, "wb") as f:
            f.truncate(n)
    try:
        b.start()
        uri = mirror_with_a_kept_log(b, size, logdev, f"2 {leg0} 0 {leg1} 0")
        src = random_file(tmp_path / "src.img", size)
        run("nbdcopy", str(src), uri)                     # written and flushed (nbdcopy flushes)
        assert wait_until(lambda: dirty_on_log(logdev, nr) == [], 30)   # idle: cleaned on the log
        dirty = crash_under_writes(b, uri, logdev, nr, 16 * MiB, 4 * MiB)   # regions 32 to 39
        with open(leg1, "r+b") as f:                      # a clean region made different: a
            f.seek(2 * REGION)                            # resync of everything would copy it
            f.write(b"\x5a" * 4096)
        since = len(b.log.read_text())
        b.start()                                         # restores the table and resumes it
        assert wait_until(lambda: status(b)[-7:-4] == [f"{nr}/{nr}", "1", "AA"], 60)
        assert resync_counts(b, since) == [(len(dirty), nr)]
        events = [json.loads(line)["event"] for line in b.run("events", "mir").stdout.splitlines()]
        assert "table_event" in events                    # the resync completed
        assert wait_until(lambda: dirty_on_log(logdev, nr) == [], 30)
        l0, l1, s = leg0.read_bytes(), leg1.read_bytes(), src.read_bytes()
        regions = [slice(r * REGION, (r + 1) * REGION) for r in range(nr)]
        assert [r for r in range(nr) if l0[regions[r]] != l1[regions[r]]] == [2]   # only that one
        fio_area = slice(16 * MiB, 20 * MiB)
        assert l0[:fio_area.start] == s[:fio_area.start] and l0[fio_area.stop:] == s[fio_area.stop:]
        back = tmp_path / "back.img"
        run("nbdcopy", uri, str(back))                    # and the mirror reads it back
        data = back.read_bytes()
        assert data[:2 * REGION] == s[:2 * REGION] and data[fio_area.stop:] == s[fio_area.stop:]
    finally:
        b.stop()
