"""A mirror whose disk log and one leg live on another daemon's FUSE files (issue 15: "the disk
log records dirty regions durably", legs "in any mix"): daemon A serves two devices through
its FUSE directory; daemon B mirrors a local file and a loop device over A's file `legdev`,
with its disk log on A's file `logdev` (a regular file on FUSE, written and fdatasync'ed
through it). B is SIGKILLed while fio writes into a few regions: the regions dirty on the log
(read back through A's FUSE file) are exactly those B's restart copies, a clean region made
different is left alone, and everything written and flushed before is on both legs.

Every daemon, fio and loop device is stopped or detached in a `finally`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Daemon, wait_until
from test_fuse_export import fuse_daemon  # noqa: F401 (a fixture; skips the module without FUSE)
from test_mirror_machines import (crash_under_writes, dirty_on_log, mirror_with_a_kept_log, resync_counts,
                                  status)
from test_nbd_tls import need, random_file, run

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]
MiB = 1 << 20
REGION = 512 * 1024           # region_size 1024 sectors


def read_region(path: str | Path, r: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(r * REGION)
        return f.read(REGION)


@pytest.mark.timeout(300)
def test_a_crash_resyncs_only_the_dirty_regions_of_a_log_and_leg_on_fuse(fuse_daemon, tmp_path):
    need("fio", "nbdcopy")
    a, undo, _ = fuse_daemon
    size, nr = 16 * MiB, 32
    leg0, leg1, log = tmp_path / "leg0.img", tmp_path / "leg1.img", tmp_path / "log.img"
    for path, n in ((leg0, size), (leg1, size), (log, 4096)):
        with open(path, "wb") as f:
            f.truncate(n)
    a.run("create", "logdev", "--table", f"0 8 linear {log} 0")
    a.run("create", "legdev", "--table", f"0 {size // 512} linear {leg1} 0")
    fuse_log = a.runtime / "mapper" / "logdev"
    loop = undo.losetup(str(a.runtime / "mapper" / "legdev"))
    (tmp_path / "b").mkdir()
    b = Daemon(tmp_path / "b")
    try:
        b.start()
        uri = mirror_with_a_kept_log(b, size, fuse_log, f"2 {leg0} 0 {loop} 0")
        src = random_file(tmp_path / "src.img", size)
        run("nbdcopy", str(src), uri)                     # written and flushed
        assert wait_until(lambda: dirty_on_log(fuse_log, nr) == [], 30)   # cleaned when idle
        dirty = crash_under_writes(b, uri, fuse_log, nr, 8 * MiB, 2 * MiB)   # regions 16 to 19
        fd = os.open(loop, os.O_WRONLY)                   # a clean region made different on
        try:                                              # the loop leg: a resync of every
            os.pwrite(fd, b"\x5a" * 4096, 2 * REGION)     # region would copy it back
            os.fsync(fd)
        finally:
            os.close(fd)
        since = len(b.log.read_text())
        b.start()                                         # restores the table and resumes it
        assert wait_until(lambda: status(b)[-7:-4] == [f"{nr}/{nr}", "1", "AA"], 60)
        assert resync_counts(b, since) == [(len(dirty), nr)]
        assert wait_until(lambda: dirty_on_log(fuse_log, nr) == [], 30)
        b.run("remove", "mir")                            # flushes both legs
        s = Path(src).read_bytes()
        differ = [r for r in range(nr) if read_region(leg0, r) != read_region(loop, r)]
        assert differ == [2], differ                      # only the region made different
        assert read_region(loop, 2)[4096:] == s[2 * REGION + 4096:3 * REGION]
        fio_area = slice(8 * MiB, 10 * MiB)
        l0 = leg0.read_bytes()
        assert l0[:fio_area.start] == s[:fio_area.start] and l0[fio_area.stop:] == s[fio_area.stop:]
    finally:
        b.stop()
