"""mirror: RAID1 over 2 to 9 legs with a region log (`dm-raid1.c`, `dm-log.c`).

Table: `core <1|2> <region_size> [sync|nosync] <#mirrors> (<dev> <offset>)...
[<#features> handle_errors [keep_log]]`, sizes in sectors; region_size a power of two of at
least 2 sectors and at most the target's length. The `disk` log is not implemented yet:
its table is refused (EINVAL) with a sentence saying so.

The core log keeps, in memory, which regions are in sync. With `sync` (the default) none is
at first: from the first resume a background thread copies them from the default mirror
(leg 0 unless it failed) to the other legs, region by region; `nosync` declares them all in
sync. A write goes to every healthy leg; while a region is being copied, writes to it wait
(and the copy waits for writes in flight there), as the kernel's region hash delays them.
Reads of in-sync regions are balanced over the healthy legs (round robin); reads of other
regions use the default mirror. The copy pauses at suspend and goes on at resume; the log
forgets everything when the table is replaced (a core log is not persistent).

Errors: without `handle_errors` an error of any leg fails the I/O (EIO). With it, the leg
is marked (`D` write, `R` read, `F` flush, `S` sync error), a table event is raised, and the
I/O goes on with the other legs: a read is retried on another in-sync leg; a write succeeds
if one leg took it. A failed default mirror is replaced by a healthy leg. A reload with the
leg back starts from a fresh log, and so resyncs every region (with `sync`).

INFO status: `<#mirrors> <dev>... <in_sync>/<nr_regions> 1 <health chars> 1 core`;
an event is also raised when the resync completes.
"""

from __future__ import annotations

import errno
import threading

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register
from ..errors import DMError

MAX_MIRRORS = 9


def _count(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise TargetError(f"{what}: {text!r} is not a number")
    return int(text)


@register
class MirrorTarget(Target):
    name = "mirror"
    version = (1, 14, 0)
    __slots__ = ("legs", "offsets", "region", "nr_regions", "sync_arg", "handle_errors", "keep_log",
                 "in_sync", "sync_count", "health", "default", "_bases", "_cond", "_writing",
                 "_recovering", "_next", "_thread", "_stop", "_event")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 3:
            raise TargetError("Invalid argument count: mirror needs a log, the mirror count and legs")
        if args[0] == "disk":
            raise TargetError("the disk log is not implemented yet in userdm; use a core log")
        if args[0] != "core":
            raise TargetError(f"Unrecognised dirty log type {args[0]!r} (core or disk)")
        nlog = _count(args[1], "log argument count")
        if nlog not in (1, 2) or len(args) < 2 + nlog:
            raise TargetError(f"Invalid core log argument count {args[1]} (1 or 2)")
        self.region = _count(args[2], "region size")
        if self.region < 2 or self.region > length or self.region & (self.region - 1):
            raise TargetError(f"Invalid region size {args[2]}: a power of two from 2 to the "
                              f"target's length ({length} sectors)")
        self.sync_arg = ""
        if nlog == 2:
            if args[3] not in ("sync", "nosync"):
                raise TargetError(f"Unrecognised sync argument to mirror log: {args[3]!r}")
            self.sync_arg = args[3]
        at = 2 + nlog
        if at >= len(args):
            raise TargetError("Invalid number of mirrors: missing")
        nr = _count(args[at], "number of mirrors")
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
            nf = _count(args[at], "feature count")
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
        self.nr_regions = -(-length // self.region)
        synced = self.sync_arg == "nosync"
        self.in_sync = bytearray([1 if synced else 0]) * self.nr_regions
        self.sync_count = self.nr_regions if synced else 0
        self.health = ["A"] * nr
        self.default = 0
        self._bases = [o * SECTOR for o in self.offsets]
        self._cond = threading.Condition()
        self._writing: dict[int, int] = {}
        self._recovering: int | None = None
        self._next = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._event = ctx.event

    # ---- regions ------------------------------------------------------------------------

    def _regions(self, offset: int, length: int) -> range:
        rb = self.region * SECTOR
        return range(offset // rb, (offset + max(length, 1) - 1) // rb + 1)

    def _healthy(self) -> list[int]:
        return [k for k, h in enumerate(self.health) if h == "A"]

    def _fail(self, k: int, kind: str, exc: Exception) -> None:
        """A leg failed: with handle_errors mark it and raise an event, else pass the error on."""
        if not self.handle_errors:
            raise DMError(errno.EIO, f"mirror leg {k} ({self.legs[k].name}) failed: {exc}") from None
        with self._cond:
            first = self.health[k] == "A"
            if first:
                self.health[k] = kind
            if k == self.default:
                alive = self._healthy()
                if alive:
                    self.default = alive[0]
        if first:
            self._event()

    def device_lost(self, dev) -> bool:
        """A leg died: with handle_errors and another healthy leg, mark it `D` and carry on."""
        legs = [k for k, leg in enumerate(self.legs) if leg.device is dev]
        if not self.handle_errors or not legs:
            return False
        with self._cond:
            if not [k for k in self._healthy() if k not in legs]:
                return False
        for k in legs:
            self._fail(k, "D", DMError(errno.ENODEV, f"{self.legs[k].name} is gone"))
        return True

    # ---- data path ----------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        regions = self._regions(offset, len(buf))
        while True:
            with self._cond:
                alive = self._healthy()
                if not alive:
                    raise DMError(errno.EIO, "mirror: every leg has failed")
                if all(self.in_sync[r] for r in regions):
                    self._next = (self._next + 1) % len(alive)
                    k = alive[self._next]
                else:
                    k = self.default
            try:
                self.legs[k].open.readinto(self._bases[k] + offset, buf)
                return
            except DMError as exc:
                self._fail(k, "R", exc)       # handle_errors: try another leg

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        regions = self._regions(offset, len(data))
        with self._cond:
            while self._recovering is not None and self._recovering in regions:
                self._cond.wait()
            for r in regions:
                self._writing[r] = self._writing.get(r, 0) + 1
        try:
            done = 0
            for k in self._healthy():
                try:
                    self.legs[k].open.write(self._bases[k] + offset, data, fua)
                    done += 1
                except DMError as exc:
                    self._fail(k, "D", exc)
            if not done:
                raise DMError(errno.EIO, "mirror: the write reached no leg (every leg has failed)")
        finally:
            with self._cond:
                for r in regions:
                    n = self._writing[r] - 1
                    if n:
                        self._writing[r] = n
                    else:
                        del self._writing[r]
                self._cond.notify_all()

    def flush(self) -> None:
        for k in self._healthy():
            try:
                self.legs[k].open.flush()
            except DMError as exc:
                self._fail(k, "F", exc)

    def discard(self, offset: int, length: int) -> None:
        for k in self._healthy():
            self.legs[k].open.discard(self._bases[k] + offset, length)

    # ---- resync -------------------------------------------------------------------------

    def resume(self) -> None:
        if self.sync_count < self.nr_regions and self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._resync, name="mirror-resync", daemon=True)
            self._thread.start()

    def presuspend(self) -> None:
        self._halt()

    def destroy(self) -> None:
        self._halt()

    def _halt(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = True
            with self._cond:
                self._cond.notify_all()
            thread.join()

    def _resync(self) -> None:
        rb = self.region * SECTOR
        total = self.length * SECTOR
        buf = bytearray(rb)
        for r in range(self.nr_regions):
            if self._stop:
                return
            if self.in_sync[r]:
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
                        self.in_sync[r] = 1
                        self.sync_count += 1
                    self._cond.notify_all()
        if self.sync_count == self.nr_regions:
            self._event()       # the kernel raises a table event when recovery completes

    def _copy(self, src: int, offset: int, view: memoryview) -> bool:
        try:
            self.legs[src].open.readinto(self._bases[src] + offset, view)
        except DMError as exc:
            try:
                self._fail(src, "S", exc)
            except DMError:
                pass
            return False
        ok = True
        for k in self._healthy():
            if k == src:
                continue
            try:
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
        return (f"{len(self.legs)} {names} {self.sync_count}/{self.nr_regions} 1 "
                f"{''.join(self.health)} 1 core")

    def table(self) -> str:
        log = f"core {2 if self.sync_arg else 1} {self.region}" + (f" {self.sync_arg}" if self.sync_arg else "")
        legs = " ".join(f"{leg.name} {o}" for leg, o in zip(self.legs, self.offsets))
        features = [f for f, on in (("handle_errors", self.handle_errors), ("keep_log", self.keep_log)) if on]
        return f"{log} {len(self.legs)} {legs}" + (f" {len(features)} {' '.join(features)}" if features else "")

    def devices(self):
        return list(self.legs)
