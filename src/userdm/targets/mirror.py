"""mirror: RAID1 over 2 to 9 legs with a region log (`dm-raid1.c`, `dm-log.c`).

Table: `<log> <#mirrors> (<dev> <offset>)... [<#features> handle_errors [keep_log]]`, where
`<log>` is `core <1|2> <region_size> [sync|nosync]` or `disk <2|3> <logdev> <region_size>
[sync|nosync]`; sizes in sectors; region_size a power of two of at least 2 sectors and at
most the target's length. The logs are in `_mirror_log` (the disk log's format is there).

The log says which regions are in sync. From each resume a background thread copies the
regions that are not from the default mirror (leg 0 unless it failed) to the other legs,
one region at a time (the kernel's recovery, sweeping forward once per resume). A core log
starts with no region in sync (every region in sync with `nosync`) and lives as long as the
table; a disk log reads its clean bits from the log device at every resume, so that after a
crash or a reload only the regions that were dirty are copied.

A write goes to every healthy leg (from `PARALLEL_WRITE` bytes on, to all at once); while a
region is being copied, writes to it wait (and the copy waits for writes in flight there), as
the kernel's region hash delays them. With a
disk log the region is first marked dirty on the log device (written and flushed, shared by
concurrent writers); a cleaner thread marks regions clean again once they have had no write
for `CLEAN_INTERVAL` seconds and the legs have been flushed, and at suspend. A write that
missed a leg (failed or marked) leaves its regions out of sync, and dirty on the log, until a
resume copies them. Reads of in-sync regions are balanced over the healthy legs (round
robin); reads of other regions use the default mirror. Over files, reads take the collapsed
path (`remaps_reads`, `collapsed_read`), and a leg's write is one `pwritev` (`FileSink`), its
open doing it only when that fails. While the mirror is whole (every region in sync, no leg
failed: `_plain`, kept by the log's `on_whole` and by `_fail`) a collapsed read is a plain
remap, one `preadv` on the next leg as linear's; otherwise it costs one region check more.

Errors: without `handle_errors` an error of any leg fails the I/O (EIO). With it, the leg
is marked (`D` write, `R` read, `F` flush, `S` sync error), a table event is raised, and the
I/O goes on with the other legs: a read is retried on another in-sync leg; a write succeeds
if one leg took it. A failed default mirror is replaced by a healthy leg. When the disk log
fails (`D` write, `F` flush), writes go on without it, except with `keep_log`, where they
fail with EIO (the kernel fails them too; without keep_log it holds them for userspace).
A reload of the table with the leg back (a dead NBD export is connected afresh) resyncs what
the log says: every region with a core log, the dirty regions with a disk log.

INFO status: `<#mirrors> <dev>... <in_sync>/<nr_regions> 1 <health chars> <log status>`,
the log status `1 core` or `3 disk <logdev> <A|D|F>`; an event is also raised when a resync
completes, and the daemon's log says how many regions each resync copies.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ..block.device import SECTOR
from ..block.file import FileDisk
from ..dm.collapse import FileSink
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register
from ..errors import DMError
from ._mirror_log import DiskLog, build_log, count

MAX_MIRRORS = 9
#: bytes from which a write goes to the legs in parallel (below, a thread hand-off costs more)
PARALLEL_WRITE = 128 * 1024
#: seconds a region must go without writes before the cleaner marks it clean on the disk log
CLEAN_INTERVAL = 0.5

logger = logging.getLogger("userdm.targets.mirror")
_preadv = os.preadv


@register
class MirrorTarget(Target):
    name = "mirror"
    version = (1, 14, 0)
    remaps_reads = True
    __slots__ = ("legs", "offsets", "region", "nr_regions", "handle_errors", "keep_log", "log",
                 "health", "_alive", "default", "device_name", "_bases", "_opens", "_files",
                 "_sync", "_rbytes", "_file_turns", "_disk_log", "_sweeping", "_cond", "_writing", "_touched",
                 "_dirty", "_recovering", "_turn", "_thread", "_cleaner", "_stop", "_quiet",
                 "_settled", "_event", "_pool", "_plain")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 3:
            raise TargetError("Invalid argument count: mirror needs a log, the mirror count and legs")
        self.log, self.region, at = build_log(ctx, args, length)
        self.nr_regions = self.log.nr_regions
        if at >= len(args):
            raise TargetError("Invalid number of mirrors: missing")
        nr = count(args[at], "number of mirrors")
        if nr < 2 or nr > MAX_MIRRORS:
            raise TargetError(f"Invalid number of mirrors {nr} (2 to {MAX_MIRRORS})")
        at += 1
        if len(args) < at + 2 * nr:
            raise TargetError(f"Too few mirror arguments: {nr} mirrors need a device and an offset each")
        self.legs = []
        self.offsets = []
        for k in range(nr):
            start = parse_sector(args[at + 1], f"Invalid offset for mirror {k}")
            self.legs.append(ctx.get_device(args[at], start, length, role=f"mirror {k}"))
            self.offsets.append(start)
            at += 2
        self.handle_errors = self.keep_log = False
        if at < len(args):
            nf = count(args[at], "feature count")
            features = args[at + 1:]
            if len(features) != nf:
                raise TargetError(f"Invalid number of features: {nf} announced, {len(features)} given")
            for f in features:
                if f == "handle_errors":
                    self.handle_errors = True
                elif f == "keep_log":
                    self.keep_log = True
                else:
                    raise TargetError(f"Unrecognised feature requested: {f!r}")
            if self.keep_log and not self.handle_errors:
                raise TargetError("keep_log feature requires the handle_errors feature")
        self.health = ["A"] * nr
        self._alive = tuple(range(nr))
        self.default = 0
        self.device_name = ctx.device_name
        self._bases = [o * SECTOR for o in self.offsets]
        self._opens = [leg.open for leg in self.legs]
        #: per leg on a file, its one-system-call read and write (False: the open does it,
        #: and reports what went wrong)
        self._files = [FileSink(o.device, o.write_mode and not o.device.read_only)
                       if isinstance(o.device, FileDisk) and not o.device.direct else None
                       for o in self._opens]
        self._rbytes = self.region * SECTOR
        self._file_turns = self._turns_over_files()
        self._disk_log = isinstance(self.log, DiskLog)
        self._sync = self.log.sync          # one array for the log's life (updated in place)
        self._cond = threading.Condition()
        self._writing: dict[int, int] = {}
        self._touched: set[int] = set()     # regions written since the cleaner last looked
        self._dirty: set[int] = set()       # regions whose clean bit is clear on the disk log
        self._recovering: int | None = None
        self._sweeping = False              # the resync runs (it waits for writes to end)
        self._turn = itertools.count()      # round robin of balanced reads
        self._pool: ThreadPoolExecutor | None = None    # writes to legs 1.. of large writes
        self._thread: threading.Thread | None = None
        self._cleaner: threading.Thread | None = None
        self._stop = False
        self._quiet = threading.Event()     # set: the cleaner stops
        self._settled = True                # nothing to write to the log at suspend
        self._event = ctx.event
        #: while every region is in sync and no leg has failed, over files only: the round
        #: robin of (fd, leg offset, file) that makes a collapsed read a plain remap
        self._plain: Iterator[tuple[int, int, FileDisk]] | None = None
        self.log.on_whole = self._whole_changed
        self._whole_changed()

    # ---- regions ------------------------------------------------------------------------

    def _healthy(self) -> tuple[int, ...]:
        """The legs not marked failed (kept up to date by `_fail`, read without the lock)."""
        return self._alive

    def _fail(self, k: int, kind: str, exc: Exception) -> None:
        """A leg failed: with handle_errors mark it and raise an event, else pass the error on."""
        if not self.handle_errors:
            raise DMError(errno.EIO, f"mirror leg {k} ({self.legs[k].name}) failed: {exc}") from None
        with self._cond:
            first = self.health[k] == "A"
            if first:
                self.health[k] = kind
                self._plain = None      # first: no plain read picks this leg from now on
                self._alive = tuple(j for j, h in enumerate(self.health) if h == "A")
                self._file_turns = self._turns_over_files()
                logger.warning("%s: mirror leg %d (%s) failed (%s): %s", self.device_name, k,
                            self.legs[k].name, kind, exc)
            if k == self.default:
                alive = self._healthy()
                if alive:
                    self.default = alive[0]
        if first:
            self._event()

    def device_lost(self, dev) -> bool:
        """A leg died: with handle_errors and another healthy leg, mark it `D` and carry on.
        The disk log's device died: the log is marked `D` and the mirror carries on."""
        legs = [k for k, leg in enumerate(self.legs) if leg.device is dev]
        if legs:
            if not self.handle_errors:
                return False
            with self._cond:
                if not [k for k in self._healthy() if k not in legs]:
                    return False
        if isinstance(self.log, DiskLog) and self.log.dev.device is dev:
            self.log.fail("D")
        elif not legs:
            return False
        for k in legs:
            self._fail(k, "D", DMError(errno.ENODEV, f"{self.legs[k].name} is gone"))
        return True

    # ---- data path ----------------------------------------------------------------------

    def collapsed_read(self, offset: int, buf: memoryview) -> bool:
        """A read on the collapsed path (`userdm.dm.collapse`). While the mirror is whole
        (`_plain`: every region in sync, no leg failed) it is linear's: one system call on
        the next leg, no region check. Otherwise one region check, then one system call on
        the next healthy leg; every other read is `readinto`'s. False (the read goes through
        the table, which reports the failure) when the leg's file is dead or fails."""
        plain = self._plain
        if plain is not None:
            fd, base, disk = next(plain)
            if disk.dead:
                return False
            try:
                return _preadv(fd, [buf], base + offset) == len(buf)
            except OSError:
                return False
        rb = self._rbytes
        first, last = offset // rb, (offset + len(buf) - 1) // rb
        sync = self._sync
        if sync[first] and (first == last or all(sync[first:last + 1])):
            turns = self._file_turns
            if turns is not None:
                read, base = next(turns)
                return read(base + offset, buf)
        self.readinto(offset, buf)
        return True

    def _whole_changed(self) -> None:
        """Keep `_plain` exact: called when the log's last region comes in sync or the first
        goes out (with `_cond` held, or before I/O flows), after a log resume, and (cleared
        directly) when a leg fails."""
        files = self._files
        if (self.log.sync_count == self.nr_regions and len(self._alive) == len(self.legs)
                and all(f is not None for f in files)):
            self._plain = itertools.cycle([(f.fd, base, f.disk) for f, base in zip(files, self._bases)])
        else:
            self._plain = None

    def _turns_over_files(self) -> Iterator[tuple[Callable[[int, memoryview], bool], int]] | None:
        """The round robin of the collapsed reads: (read, leg offset) of each healthy leg,
        None unless they are all files (the collapsed path is then not taken) and one is."""
        turns = []
        for k in self._alive:
            leg = self._files[k]
            if leg is None:
                return None
            turns.append((leg.read, self._bases[k]))
        return itertools.cycle(turns) if turns else None

    def readinto(self, offset: int, buf: memoryview) -> None:
        rb = self._rbytes
        first, last = offset // rb, (offset + max(len(buf), 1) - 1) // rb
        sync = self._sync
        while True:
            # no lock: a leg marked or a region going out of sync meanwhile is what a read
            # that has just been sent meets anyway (a failed read tries another leg)
            alive = self._alive
            if not alive:
                raise DMError(errno.EIO, "mirror: every leg has failed")
            if sync[first] and (first == last or all(sync[first:last + 1])):
                k = alive[next(self._turn) % len(alive)]
            else:
                k = self.default
            try:
                self.legs[k].open.readinto(self._bases[k] + offset, buf)
                return
            except DMError as exc:
                self._fail(k, "R", exc)       # handle_errors: try another leg

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        rb = self._rbytes
        first, last = offset // rb, (offset + max(len(data), 1) - 1) // rb
        regions = range(first, last + 1)
        writing = self._writing
        with self._cond:
            while self._recovering is not None and first <= self._recovering <= last:
                self._cond.wait()
            for r in regions:
                writing[r] = writing.get(r, 0) + 1
            if self._disk_log:
                self._touched.update(regions)
                self._dirty.update(regions)
        try:
            if self._disk_log and not self.log.mark(regions) and self.keep_log:
                raise DMError(errno.EIO, f"mirror: the dirty region log ({self.log.status()}) has "
                                         "failed and keep_log is set: the write is refused")
            done = self._write_legs(offset, data, fua)
            if not done:
                raise DMError(errno.EIO, "mirror: the write reached no leg (every leg has failed)")
            if done < len(self.legs):
                with self._cond:            # a leg missed it: out of sync until a resync
                    for r in regions:
                        self.log.set_sync(r, False)
        finally:
            with self._cond:
                for r in regions:
                    n = writing[r] - 1
                    if n:
                        writing[r] = n
                    else:
                        del writing[r]
                if self._sweeping:          # only the resync waits for writes to end
                    self._cond.notify_all()

    def _write_legs(self, offset: int, data: memoryview, fua: bool) -> int:
        """Write to every healthy leg, large writes to all of them at once (as the kernel's
        dm-io sends one bio per leg); the number of legs that took it."""
        legs = self._alive
        if len(data) >= PARALLEL_WRITE and len(legs) > 1:
            pool = self._writers()
            others = [(k, pool.submit(self._write_leg, k, offset, data, fua)) for k in legs[1:]]
            results = [(legs[0], self._write_leg(legs[0], offset, data, fua))]
            results += [(k, f.result()) for k, f in others]
            failed = [(k, e) for k, e in results if e is not None]
        else:
            failed = []
            opens, bases, files = self._opens, self._bases, self._files
            for k in legs:
                at = bases[k] + offset
                leg = files[k]
                if leg is not None and leg.write(at, data, fua):
                    continue
                try:
                    opens[k].write(at, data, fua)
                except DMError as exc:
                    failed.append((k, exc))
            if not failed:
                return len(legs)
        for k, e in failed:
            self._fail(k, "D", e)
        return len(legs) - len(failed)

    def _write_leg(self, k: int, offset: int, data: memoryview, fua: bool) -> DMError | None:
        try:
            self._opens[k].write(self._bases[k] + offset, data, fua)
            return None
        except DMError as exc:
            return exc

    def _writers(self) -> ThreadPoolExecutor:
        with self._cond:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.legs) - 1, thread_name_prefix="mirror-write")
            return self._pool

    def flush(self) -> None:
        self._flush_legs()

    def _flush_legs(self) -> bool:
        """Flush every healthy leg; False if one failed (it is marked `F` with handle_errors)."""
        ok = True
        for k in self._healthy():
            try:
                self.legs[k].open.flush()
            except DMError as exc:
                ok = False
                self._fail(k, "F", exc)
        return ok

    def discard(self, offset: int, length: int) -> None:
        for k in self._healthy():
            self.legs[k].open.discard(self._bases[k] + offset, length)

    # ---- resume and suspend ---------------------------------------------------------------

    def preresume(self) -> None:
        """Before I/O flows: a disk log reads its clean bits (the kernel reads them in its
        resume, which also comes before I/O)."""
        if self._thread is not None or self._cleaner is not None:
            return
        with self._cond:
            self.log.resume()
            self._whole_changed()
            self._dirty = {r for r in range(self.nr_regions) if self.log.dirty_on_disk(r)} \
                if self._disk_log else set()
            self._touched.clear()

    def resume(self) -> None:
        if self._thread is not None or self._cleaner is not None:
            return
        self._stop = False
        self._settled = False
        if self.log.sync_count < self.nr_regions:
            self._thread = threading.Thread(target=self._resync, name="mirror-resync", daemon=True)
            self._thread.start()
        if self._disk_log:
            self._quiet.clear()
            self._cleaner = threading.Thread(target=self._clean_loop, name="mirror-cleaner", daemon=True)
            self._cleaner.start()

    def presuspend(self) -> None:
        self._halt()

    def postsuspend(self) -> None:
        self._settle()

    def destroy(self) -> None:
        self._halt()
        self._settle()
        if self._pool is not None:
            self._pool.shutdown()

    def _halt(self) -> None:
        """Stop the resync and the cleaner threads (the kernel's `dm_rh_stop_recovery`)."""
        thread, self._thread = self._thread, None
        cleaner, self._cleaner = self._cleaner, None
        self._stop = True
        self._quiet.set()
        with self._cond:
            self._cond.notify_all()
        for t in (thread, cleaner):
            if t is not None:
                t.join()

    def _settle(self) -> None:
        """With I/O drained: mark every idle in-sync region clean on the disk log, so that a
        reload or a restart copies only the regions that need it."""
        if self._settled:
            return
        self._settled = True
        self._clean_pass(final=True)

    # ---- the cleaner (disk log) ---------------------------------------------------------

    def _clean_loop(self) -> None:
        while not self._quiet.wait(CLEAN_INTERVAL):
            self._clean_pass(final=False)

    def _cleanable(self, r: int, final: bool) -> bool:
        return (bool(self.log.sync[r]) and not self._writing.get(r) and r != self._recovering
                and (final or r not in self._touched))

    def _clean_pass(self, final: bool) -> None:
        """Regions dirty on the log that had no write since the last pass and are in sync:
        flush the legs, then mark them clean (those still idle) in one write of the log."""
        log = self.log
        if not isinstance(log, DiskLog) or log.failed:
            return
        with self._cond:
            candidates = [r for r in self._dirty if self._cleanable(r, final)]
            self._touched.clear()
        if not candidates:
            return
        try:
            if not self._flush_legs():
                return
        except DMError:
            return                          # without handle_errors: nothing marked clean
        with self._cond:                    # a write that starts after this re-marks its regions
            clean = [r for r in candidates if self._cleanable(r, final)]
            self._dirty.difference_update(clean)
            log.clean(clean)
        if clean:
            log.commit()

    # ---- resync -------------------------------------------------------------------------

    def _resync(self) -> None:
        with self._cond:
            self._sweeping = True
        try:
            self._sweep()
        finally:
            with self._cond:
                self._sweeping = False

    def _sweep(self) -> None:
        """One pass over the regions out of sync, copying each from the default mirror."""
        rb = self._rbytes
        total = self.length * SECTOR
        buf = bytearray(rb)
        sync = self._sync
        todo = self.nr_regions - self.log.sync_count
        logger.info("%s: mirror resync of %d of %d regions from leg %d (%s log)", self.device_name,
                 todo, self.nr_regions, self.default, self.log.kind)
        copied = 0
        for r in range(self.nr_regions):
            if self._stop:
                return
            if sync[r]:
                continue
            with self._cond:
                while self._writing.get(r) and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._recovering = r
                src = self.default
            ok = False
            try:
                n = min(rb, total - r * rb)
                view = memoryview(buf)[:n]
                ok = self._copy(src, r * rb, view)
            finally:
                with self._cond:
                    self._recovering = None
                    if ok:
                        self.log.set_sync(r, True)
                        self._dirty.add(r)      # the cleaner marks it clean on the disk log
                        copied += 1
                    self._cond.notify_all()
        logger.info("%s: mirror resync copied %d regions, %d/%d in sync", self.device_name, copied,
                 self.log.sync_count, self.nr_regions)
        if self.log.sync_count == self.nr_regions:
            self._event()       # the kernel raises a table event when recovery completes

    def _copy(self, src: int, offset: int, view: memoryview) -> bool:
        """Copy one region from leg `src` to every other leg; True if every leg has it."""
        try:
            self.legs[src].open.readinto(self._bases[src] + offset, view)
        except DMError as exc:
            try:
                self._fail(src, "S", exc)
            except DMError:
                pass
            return False
        ok = True
        for k in range(len(self.legs)):
            if k == src:
                continue
            try:
                if self.health[k] != "A":
                    raise DMError(errno.EIO, f"leg {k} has failed ({self.health[k]})")
                self.legs[k].open.write(self._bases[k] + offset, view, False)
            except DMError as exc:
                ok = False
                try:
                    self._fail(k, "S", exc)
                except DMError:
                    pass
        return ok

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> str:
        names = " ".join(leg.name for leg in self.legs)
        return (f"{len(self.legs)} {names} {self.log.sync_count}/{self.nr_regions} 1 "
                f"{''.join(self.health)} {self.log.status()}")

    def table(self) -> str:
        legs = " ".join(f"{leg.name} {o}" for leg, o in zip(self.legs, self.offsets))
        features = [f for f, on in (("handle_errors", self.handle_errors), ("keep_log", self.keep_log)) if on]
        return (f"{self.log.table(self.region)} {len(self.legs)} {legs}"
                + (f" {len(features)} {' '.join(features)}" if features else ""))

    def devices(self):
        devs = list(self.legs)
        if self._disk_log:
            devs.append(self.log.dev)
        return devs
