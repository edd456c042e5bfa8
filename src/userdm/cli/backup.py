"""`userdm backup`: back up a device while it is in use, in three commands (issue 6 §4, seed 003).

    userdm backup start DEV --store DIR      consistent snapshot DEV-snap, at a new era
    userdm backup copy DEV DEST [--since E]  copy DEV-snap to DEST, everything or only the
                                             blocks written since era E, with a progress bar
    userdm backup drop DEV [--all]           remove DEV-snap and its origin; era keeps
                                             tracking changes (with --all it goes too)

`start` puts two interposers in front of DEV (DESIGN.md §5), without closing any of DEV's opens:
`DEV-era` (an `era` target, kept between backups, metadata in DIR/DEV.era) and `DEV-origin`
(a `snapshot-origin`), then holds DEV's I/O, starts a new era, creates the persistent snapshot
`DEV-snap` (COW store in DIR/DEV.cow) and lets the I/O go on. It prints the era of that
moment: blocks written after the snapshot have that era or a later one, so the next backup's
`copy --since` that era copies exactly what changed between the two snapshots.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any, TextIO

from ..errors import DMError

MiB = 1 << 20
ERA_BLOCK_SECTORS = 128          # era tracks 64 KiB blocks
SNAPSHOT_CHUNK_SECTORS = 8       # 4 KiB copy-on-write chunks
COPY_CHUNK = 4 * MiB


def names(dev: str) -> tuple[str, str, str]:
    return f"{dev}-era", f"{dev}-origin", f"{dev}-snap"


def _exists(dm: Any, name: str) -> bool:
    return any(d["name"] == name for d in dm.list())


def _create_file(path: str, size: int) -> None:
    with open(path, "ab") as f:
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)


def era_metadata_size(sectors: int) -> int:
    """Room for the era store (`targets/_era_metadata.py`): the era array (4 bytes a block) and
    the writeset bitmap, copied on write, twice over, plus the superblocks."""
    blocks = -(-sectors // ERA_BLOCK_SECTORS)
    return max(4 * MiB, (blocks * 4 * 4 + blocks // 2 + 64 * 4096 + 4095) // 4096 * 4096)


def start(dm: Any, dev: str, store: str, *, cow_size: int | None = None, nolockfs: bool = False) -> dict[str, Any]:
    """Take a consistent snapshot of `dev` while it is in use; returns the snapshot and its era.
    The suspend freezes the filesystems mounted on DEV's loop devices (lockfs), so the snapshot
    is clean; with `nolockfs` it is only crash-consistent."""
    era_dev, origin_dev, snap_dev = names(dev)
    info = dm.info(dev)
    if not info["live"]:
        raise DMError(errno.ENXIO, f"device {dev} has no live table to back up")
    if _exists(dm, snap_dev):
        raise DMError(errno.EEXIST, f"a backup snapshot {snap_dev} exists already; "
                      f"copy it and `userdm backup drop {dev}` first")
    sectors = info["size"] // 512
    os.makedirs(store, exist_ok=True)
    era_meta = os.path.join(os.path.abspath(store), f"{dev}.era")
    cow = os.path.join(os.path.abspath(store), f"{dev}.cow")
    if not _exists(dm, era_dev):
        _create_file(era_meta, era_metadata_size(sectors))
        dm.create(era_dev, f"0 {sectors} era {era_meta} [interpose]/dev/mapper/{dev} {ERA_BLOCK_SECTORS}",
                  interpose=True)
    if not _exists(dm, origin_dev):
        dm.create(origin_dev, f"0 {sectors} snapshot-origin [interpose]/dev/mapper/{dev}", interpose=True)
    if os.path.exists(cow):
        os.unlink(cow)  # a new snapshot starts with an empty store
    _create_file(cow, cow_size or max(16 * MiB, info["size"] // 4))
    dm.suspend(dev, nolockfs=nolockfs)  # DEV's users wait here (frozen); what they had in flight has completed
    try:
        dm.message(era_dev, 0, "checkpoint")
        era = int(dm.status(era_dev)[0][3].split()[2])
        dm.create(snap_dev, f"0 {sectors} snapshot /dev/mapper/{dev} {cow} P {SNAPSHOT_CHUNK_SECTORS}")
    finally:
        dm.resume(dev)
    return {"snapshot": snap_dev, "era": era, "cow": cow, "era_metadata": era_meta}


def ranges_since(dm: Any, dev: str, since: int | None, size: int) -> list[tuple[int, int]]:
    """Byte ranges to copy: all of the device, or what era says changed since era `since`."""
    if since is None:
        return [(0, size)]
    return [(r["begin"] * 512, min(r["length"] * 512, size - r["begin"] * 512))
            for r in dm.era_changed(names(dev)[0], since=since)]


def copy(dm: Any, nbd_socket: str, dev: str, dest: str, *, since: int | None = None,
         progress: TextIO | None = sys.stderr) -> dict[str, Any]:
    """Copy the backup snapshot of `dev` (through the daemon's NBD export) into file `dest`."""
    from ..nbd.client import open_url
    snap_dev = names(dev)[2]
    size = dm.info(snap_dev)["size"]
    ranges = ranges_since(dm, dev, since, size)
    total = sum(n for _, n in ranges)
    remote = open_url(f"nbd+unix:///{snap_dev}?socket={nbd_socket}")
    bar = ProgressBar(total, progress)
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        for offset, length in ranges:
            end = offset + length
            while offset < end:
                n = min(COPY_CHUNK, end - offset)
                remote.readinto(offset, view[:n])
                os.pwrite(fd, view[:n], offset)
                offset += n
                bar.advance(n)
        os.fsync(fd)
    finally:
        os.close(fd)
        remote.close_backing()
        bar.done()
    return {"copied": total, "ranges": len(ranges), "size": size}


def drop(dm: Any, dev: str, *, everything: bool = False) -> list[str]:
    """Remove the snapshot and the snapshot-origin interposer (and with `everything` era too)."""
    era_dev, origin_dev, snap_dev = names(dev)
    removed = []
    for name in (snap_dev, origin_dev) + ((era_dev,) if everything else ()):
        if _exists(dm, name):
            dm.remove(name)
            removed.append(name)
    return removed


class ProgressBar:
    """`[#####.....]  45%  123/456 MiB  89 MiB/s` on one line, redrawn at most every 1%."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total = max(total, 1)
        self.out = out
        self.done_bytes = 0
        self._shown = -1
        self._t0 = time.monotonic()

    def advance(self, n: int) -> None:
        self.done_bytes += n
        percent = self.done_bytes * 100 // self.total
        if percent != self._shown:
            self._shown = percent
            self._draw(percent)

    def _draw(self, percent: int) -> None:
        if self.out is None:
            return
        filled = percent // 5
        rate = self.done_bytes / MiB / max(time.monotonic() - self._t0, 1e-6)
        self.out.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {percent:3d}%  "
                       f"{self.done_bytes // MiB}/{self.total // MiB} MiB  {rate:.0f} MiB/s")
        self.out.flush()

    def done(self) -> None:
        if self.out is not None and self._shown >= 0:
            self.out.write("\n")
            self.out.flush()
