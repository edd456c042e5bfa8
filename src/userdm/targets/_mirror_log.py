"""The mirror target's region logs (`dm-log.c`): which regions are in sync, and, for the
`disk` log, which regions may differ between the legs after a crash.

`CoreLog` keeps the sync bits in memory only. `DiskLog` adds the kernel's *clean bits*,
kept on a log device: a region's bit is cleared, and the log written and flushed, before a
write to that region reaches the legs (`mark`); it is set again lazily, once the region has
had no write for a while, is in sync, and the legs have been flushed (`clean`). After a
crash only the regions whose clean bit is clear are copied again.

On-disk format (the kernel's, `dm-log.c`, all little-endian): sector 0 holds the header
`u32 magic = 0x4D695272 ("rRiM"), u32 version = 2, u64 nr_regions`; the clean bitmap starts
at byte 1024 (2 sectors in), one bit per region (bit `r % 8` of byte `r // 8`, set = clean),
its length rounded up to 8 bytes; the whole area is rounded up to the log device's logical
block size and rewritten as one piece. `disk_area(nr_regions, lbs)` gives its size.

Rules at resume (the kernel's `disk_resume`): with `sync` or `nosync` in the table, or without
the magic, the log starts afresh (every region out of sync, or with `nosync` every region
clean); otherwise the clean bits on the device are the sync bits, and regions beyond the
header's `nr_regions` (the device grew) are out of sync. A version other than 2 or a read
error fails the log (`D`): every region is then out of sync. A failed write of the log marks
it `D`, a failed flush `F`; the log is not used after that (the mirror decides what writes do).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable

from ..block.device import SECTOR
from ..dm.target import TableDevice, TargetContext, TargetError
from ..errors import DMError

logger = logging.getLogger("userdm.targets.mirror")

MAGIC = 0x4D695272
VERSION = 2
HEADER = struct.Struct("<IIQ")
BITMAP_OFFSET = 2 * SECTOR
#: the logs keep a byte per region in memory: a table that needs more regions is refused
MAX_REGIONS = 1 << 24


def count(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise TargetError(f"{what}: {text!r} is not a number")
    return int(text)


def build_log(ctx: TargetContext, args: list[str], length: int) -> tuple[CoreLog, int, int]:
    """The log a mirror table starts with (`core <1|2> <region_size> [sync|nosync]` or
    `disk <2|3> <logdev> <region_size> [sync|nosync]`, the kernel's `create_dirty_log`) for a
    target of `length` sectors: (log, region size, number of arguments it took)."""
    kind = args[0]
    if kind not in ("core", "disk"):
        raise TargetError(f"Unrecognised dirty log type {kind!r} (core or disk)")
    nlog = count(args[1], "log argument count")
    counts = (1, 2) if kind == "core" else (2, 3)
    if nlog not in counts or len(args) < 2 + nlog:
        raise TargetError(f"Invalid {kind} log argument count {args[1]} ({counts[0]} or {counts[1]}, "
                          f"then that many arguments)")
    log_args = args[2:2 + nlog]
    logref = log_args.pop(0) if kind == "disk" else ""
    region = count(log_args[0], "region size")
    if region < 2 or region > length or region & (region - 1):
        raise TargetError(f"Invalid region size {log_args[0]}: a power of two from 2 to the "
                          f"target's length ({length} sectors)")
    sync_arg = ""
    if len(log_args) == 2:
        if log_args[1] not in ("sync", "nosync"):
            raise TargetError(f"Unrecognised sync argument to mirror log: {log_args[1]!r}")
        sync_arg = log_args[1]
    nr_regions = -(-length // region)
    if nr_regions > MAX_REGIONS:
        raise TargetError(f"Invalid region size {region}: {nr_regions} regions, at most "
                          f"{MAX_REGIONS} (the log keeps a byte per region in memory): use a larger one")
    if kind == "core":
        return CoreLog(nr_regions, sync_arg), region, 2 + nlog
    dev = ctx.get_device(logref, 0, 0, role="log", region=False, lookup_error="Log device lookup failed")
    need = disk_area(nr_regions, dev.open.device.logical_block_size)
    if dev.open.size < need:
        raise TargetError(f"log device {dev.name} too small: need {need} bytes "
                          f"for {nr_regions} regions, it has {dev.open.size}")
    ctx.use_region(dev, 0, need // SECTOR, "log")
    return DiskLog(nr_regions, sync_arg, dev, ctx.event), region, 2 + nlog


def bitmap_bytes(nr_regions: int) -> int:
    return -(-nr_regions // 64) * 8


def disk_area(nr_regions: int, logical_block_size: int) -> int:
    """Bytes of the log device the disk log uses (header and clean bitmap, rounded up)."""
    need = BITMAP_OFFSET + bitmap_bytes(nr_regions)
    return -(-need // logical_block_size) * logical_block_size


def _nothing() -> None:
    pass


class CoreLog:
    """In-memory sync bits (`core`). The mirror's lock guards `sync` and `sync_count`.
    `on_whole` is called (with that lock held) when every region has come in sync, or when
    one of them all goes out of sync: the mirror keeps its plain-read flag by it."""

    kind = "core"
    failed = ""

    def __init__(self, nr_regions: int, sync_arg: str) -> None:
        self.nr_regions = nr_regions
        self.sync_arg = sync_arg
        synced = sync_arg == "nosync"
        self.sync = bytearray([1 if synced else 0]) * nr_regions
        self.sync_count = nr_regions if synced else 0
        self.on_whole: Callable[[], None] = _nothing

    def set_sync(self, region: int, in_sync: bool) -> None:
        if in_sync and not self.sync[region]:
            self.sync[region] = 1
            self.sync_count += 1
            if self.sync_count == self.nr_regions:
                self.on_whole()
        elif not in_sync and self.sync[region]:
            self.sync[region] = 0
            self.sync_count -= 1
            if self.sync_count == self.nr_regions - 1:
                self.on_whole()

    def resume(self) -> None:
        """A core log keeps its bits across suspend and resume (they are all it has)."""

    def mark(self, regions: Iterable[int]) -> bool:
        """Record that `regions` are about to be written; False if the log has failed."""
        return True

    def dirty_on_disk(self, region: int) -> bool:
        return False

    def clean(self, regions: list[int]) -> None:
        """Record that `regions` are clean again (nothing for a core log)."""

    def status(self) -> str:
        return "1 core"

    def table(self, region_size: int) -> str:
        sync = f" {self.sync_arg}" if self.sync_arg else ""
        return f"core {2 if self.sync_arg else 1} {region_size}{sync}"


class DiskLog(CoreLog):
    """Sync bits in memory plus clean bits on `dev` (`disk`), written with group commit:
    writers that dirty regions while the log is being written share the next write."""

    kind = "disk"

    def __init__(self, nr_regions: int, sync_arg: str, dev: TableDevice,
                 event: Callable[[], None]) -> None:
        super().__init__(nr_regions, sync_arg)
        self.dev = dev
        self._event = event       # the kernel raises a table event when the log fails
        self.size = disk_area(nr_regions, dev.open.device.logical_block_size)
        self._bits = bytearray(bitmap_bytes(nr_regions))   # clean bits, as on the device
        self._cond = threading.Condition()
        self._changes = 0         # clean bits cleared so far (dirtied regions)
        self._written = 0         # ... of which the device has a flushed copy
        self._busy = False        # someone is writing the log
        self.failed = ""          # "", "D" (write or read error), "F" (flush error)

    # ---- bits ---------------------------------------------------------------------------

    def dirty_on_disk(self, region: int) -> bool:
        return not self._bits[region >> 3] >> (region & 7) & 1

    def _set_clean(self, region: int, clean: bool) -> None:
        if clean:
            self._bits[region >> 3] |= 1 << (region & 7)
        else:
            self._bits[region >> 3] &= ~(1 << (region & 7)) & 0xFF

    # ---- resume: read the device ------------------------------------------------------------

    def resume(self) -> None:
        """Read the log (the kernel's `disk_resume`): the clean bits become the sync bits."""
        buf = bytearray(self.size)
        try:
            if self.failed:
                raise DMError(0, f"it failed before ({self.failed})")
            self.dev.open.readinto(0, memoryview(buf))
            magic, version, nr = HEADER.unpack_from(buf)
            if self.sync_arg or magic != MAGIC:
                nr = 0                          # a new log
            elif version != VERSION:
                raise DMError(0, f"incompatible disk log version {version} (userdm and the kernel use {VERSION})")
            known = min(nr, self.nr_regions)
            self._bits[:] = buf[BITMAP_OFFSET:BITMAP_OFFSET + len(self._bits)]
        except DMError as exc:
            logger.warning("%s: the dirty region log cannot be read, every region is out of sync: %s",
                        self.dev.name, exc)
            self.fail("D")
            known = 0
        fresh = self.sync_arg == "nosync"
        for r in range(known, self.nr_regions):
            self._set_clean(r, fresh)
        for r in range(self.nr_regions, len(self._bits) * 8):   # bits past the end stay clear
            self._set_clean(r, False)
        self.sync_count = 0
        for r in range(self.nr_regions):
            in_sync = 0 if self.dirty_on_disk(r) else 1
            self.sync[r] = in_sync
            self.sync_count += in_sync
        if not self.failed:
            with self._cond:
                self._changes += 1
            self.commit()

    # ---- writing ----------------------------------------------------------------------------

    def mark(self, regions: Iterable[int]) -> bool:
        """Clear the clean bits of `regions`; return once the device holds them (flushed)."""
        with self._cond:
            if self.failed:
                return False
            for r in regions:
                if not self.dirty_on_disk(r):
                    self._set_clean(r, False)
                    self._changes += 1
            want = self._changes
        if want > self._written:
            self.commit(want)
        return not self.failed

    def clean(self, regions: list[int]) -> None:
        """Set the clean bits of `regions` in memory (the caller has flushed the legs first,
        as the kernel's flush callback does, and holds the mirror's lock, so that no write to
        them starts meanwhile); `commit` writes them."""
        if not regions or self.failed:
            return
        with self._cond:
            for r in regions:
                self._set_clean(r, True)
            self._changes += 1

    def commit(self, want: int | None = None) -> None:
        """Write and flush the log until it covers change number `want` (the latest if None)."""
        with self._cond:
            if want is None:
                want = self._changes
            while self._written < want and not self.failed:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                upto = self._changes
                image = bytearray(self.size)
                HEADER.pack_into(image, 0, MAGIC, VERSION, self.nr_regions)
                image[BITMAP_OFFSET:BITMAP_OFFSET + len(self._bits)] = self._bits
                self._cond.release()
                failed = ""
                try:
                    try:
                        self.dev.open.write(0, memoryview(image), False)
                    except DMError as exc:
                        failed = "D"
                        logger.warning("%s: writing the dirty region log failed: %s", self.dev.name, exc)
                    else:
                        try:
                            self.dev.open.flush()
                        except DMError as exc:
                            failed = "F"
                            logger.warning("%s: flushing the dirty region log failed: %s", self.dev.name, exc)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    if failed:
                        self._cond.release()
                        try:
                            self.fail(failed)
                        finally:
                            self._cond.acquire()
                    else:
                        self._written = max(self._written, upto)
                    self._cond.notify_all()

    def fail(self, kind: str) -> None:
        """The log device failed (`D`) or could not be flushed (`F`), or it is gone: the log
        is not used from now on; an event is raised the first time."""
        with self._cond:
            first = not self.failed
            if first:
                self.failed = kind
            self._cond.notify_all()
        if first:
            self._event()

    # ---- reporting --------------------------------------------------------------------------

    def status(self) -> str:
        return f"3 disk {self.dev.name} {self.failed or 'A'}"

    def table(self, region_size: int) -> str:
        sync = f" {self.sync_arg}" if self.sync_arg else ""
        return f"disk {3 if self.sync_arg else 2} {self.dev.name} {region_size}{sync}"
