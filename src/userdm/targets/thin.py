"""thin-pool and thin: thin provisioning and snapshots (`dm-thin.c`).

Tables (sizes in sectors):
- `thin-pool <metadata dev> <data dev> <data block size> <low water mark> [<#features>
  <feature>...]`: the pool's data blocks are the target's length divided by the block size
  (128 to 2097152 sectors, a multiple of 128); features `skip_block_zeroing`,
  `ignore_discard`, `no_discard_passdown`, `read_only`, `error_if_no_space`. A metadata
  device whose first 4 KiB are zeroes is formatted. Reloading the pool with a longer table
  grows the data space (queued writes then go on). I/O to the pool device itself goes to the
  data device, as in the kernel. INFO status: `<transaction id> <used metadata>/<total
  metadata> <used data>/<total data> <held root|-> rw|ro|out_of_data_space
  discard_passdown|no_discard_passdown|ignore_discard error_if_no_space|queue_if_no_space
  needs_check|- <metadata low water mark> ` (or `Fail`); the status commits first, as the
  kernel's does. Table: `<metadata> <data> <block size> <low water mark> <#features>
  <features>... ` (trailing space, as the kernel prints it). Messages (committed at once):
  `create_thin <id>`, `create_snap <id> <origin id>`, `delete <id>`, `set_transaction_id
  <current> <new>`, `reserve_metadata_snap`, `release_metadata_snap`; ids are 0..2^24-1.
- `thin <pool dev> <dev id> [<external origin dev>]`: a thin device of the pool. Reads of
  unmapped blocks give zeroes (or the external origin's data); a write to an unmapped block
  provisions one (the rest of it zeroed, or copied from the external origin, unless
  `skip_block_zeroing`); a write to a block shared with a snapshot copies it first; discards
  of whole blocks unmap them (and pass the freed blocks down to the data device, after the
  unmapping is committed, unless `no_discard_passdown`). Block numbers count from the
  device's sector 0, as in the kernel. INFO status: `<mapped sectors> <highest mapped sector|->`
  or `Fail`; table: `<pool dev> <dev id>[ <external origin>]`.

Metadata (the kernel's format, `_thin_metadata.py` over `_pdata.py`) is committed on every
flush and FUA write that provisioned, after every message, at suspend, and at least once a
second by the pool's timer. When data space runs out the pool commits (blocks freed by
discards become usable), then writes wait (`out_of_data_space`, a table event) until a reload
grows the pool, or fail with ENOSPC under `error_if_no_space` or once they have waited
`NO_SPACE_TIMEOUT` seconds (the kernel's `no_space_timeout`, 60; the status then says
`error_if_no_space` until the pool grows). When free data blocks fall to
the low water mark, the pool raises one table event (again after each resize).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..block.device import SECTOR
from ..dm.target import ZERO_EXTENT, TableDevice, Target, TargetContext, TargetError, register
from ..errors import DMError
from ._pdata import BLOCK
from ._thin_metadata import MAX_DEV_ID, MAX_METADATA_BLOCKS, ThinMetadata

log = logging.getLogger("userdm.thin")

MIN_BLOCK_SECTORS = 128
MAX_BLOCK_SECTORS = 2097152
COMMIT_PERIOD = 1.0  # seconds, the kernel's COMMIT_PERIOD
#: seconds writes wait for data space before they fail with ENOSPC (the kernel's
#: `no_space_timeout` module parameter, 60 by default; 0 waits forever)
NO_SPACE_TIMEOUT = 60.0
FEATURES = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only",
            "error_if_no_space")


class BlockLocks:
    """Exclusive locks on virtual blocks of thin devices (the kernel's bio prison cells)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[tuple[int, int]] = set()

    @contextmanager
    def hold(self, dev: int, first: int, last: int) -> Iterator[None]:
        keys = {(dev, first)} if first == last else {(dev, b) for b in range(first, last + 1)}
        with self._cond:
            while not self._held.isdisjoint(keys):
                self._cond.wait()
            self._held |= keys
        try:
            yield
        finally:
            with self._cond:
                self._held -= keys
                self._cond.notify_all()


class Pool:
    """The state a pool keeps across reloads of its table (the kernel's `struct pool`)."""

    def __init__(self, owner: str, metadata: TableDevice, block_sectors: int, data_blocks: int) -> None:
        self.owner = owner
        self.metadata = metadata
        self.block_sectors = block_sectors
        self.block = block_sectors * SECTOR
        self.md = ThinMetadata(metadata.open, block_sectors, data_blocks)
        self.cond = threading.Condition(self.md.lock)
        self.locks = BlockLocks()
        self.target: ThinPoolTarget | None = None  # the bound (live) pool target
        self.users = 0
        self.open_devices: dict[int, int] = {}
        self.mode = "rw"
        self.metadata_full = False
        self.low_water_triggered = False
        self.no_space_since: float | None = None  # when writes began to wait for data space
        self.no_space_timed_out = False
        self._in_flight = 0
        self._draining = False
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    # ---- binding and the commit timer -----------------------------------------------------------

    @property
    def data(self):
        target = self.target
        if target is None:
            raise DMError(errno.EIO, f"thin-pool {self.owner} has no active table (resume it first)")
        return target.data_dev.open

    def start_timer(self) -> None:
        if self._timer is None:
            self._stop.clear()
            self._timer = threading.Thread(target=self._tick, name=f"thin-pool commit {self.owner}",
                                           daemon=True)
            self._timer.start()

    def stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            self._stop.set()
            timer.join()

    def _tick(self) -> None:
        while not self._stop.wait(COMMIT_PERIOD):
            if not self.md.dirty:
                continue
            try:
                self.commit()
            except DMError as exc:
                log.error("thin-pool %s: periodic commit failed: %s", self.owner, exc)

    def commit(self) -> None:
        """Flush the data device, then commit the metadata (the kernel's order)."""
        with self.md.lock:
            if self.mode == "fail" or self.target is None:
                return
            self.data.flush()
            if self.md.dirty and self.mode != "ro":
                self._wait_for_io()
                self.change_metadata(self.md.commit)

    # Blocks freed in a transaction become allocatable at its commit; an I/O that looked up
    # such a block before it was freed must be done with it by then, or it could read what
    # another thin device writes there next, or write into it. I/O is counted from its lookup
    # to its end, and a commit waits for the count to drain: new lookups need the metadata
    # lock, which the commit holds except while it waits (`cond.wait` releases it).
    def lookup_for_io(self, dev: int, first: int, last: int) -> dict[int, tuple[int, bool]]:
        """`find`, counting the caller as in flight until `io_done`."""
        with self.md.lock:
            self._in_flight += 1
            return self.md.find(dev, first, last)

    def lookup_one_for_io(self, dev: int, block: int) -> tuple[int, bool] | None:
        with self.md.lock:
            self._in_flight += 1
            return self.md.find_one(dev, block)

    def io_done(self) -> None:
        with self.md.lock:
            self._in_flight -= 1
            if not self._in_flight and self._draining:
                self.cond.notify_all()

    def _wait_for_io(self) -> None:
        """Called under the metadata lock."""
        while self._in_flight:
            self._draining = True
            self.cond.wait()
        self._draining = False

    def change_metadata(self, change, *args):
        """Run a metadata change. When the metadata device is full or fails, the pool goes back
        to its last commit (`dm_pool_abort_metadata`) and stops provisioning: read-only until a
        reload gives the metadata more room (ENOSPC), failed otherwise."""
        with self.md.lock:
            try:
                return change(*args)
            except DMError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EILSEQ):
                    raise
                self._abort(exc)
                raise DMError(exc.errno, f"thin-pool {self.owner}: metadata operation failed, the pool "
                              f"is back at its last commit and {self.mode}: {exc.message}") from None

    def _abort(self, exc: DMError) -> None:
        log.error("thin-pool %s: metadata operation failed: %s", self.owner, exc)
        try:
            self.md.abort()
            if self.target is not None:
                self.md.resize_data(self.target.data_blocks)
            self.metadata_full = exc.errno == errno.ENOSPC
            self.mode = "ro" if self.metadata_full else "fail"
        except DMError as again:
            log.error("thin-pool %s: cannot go back to the last commit: %s", self.owner, again)
            self.mode = "fail"
        self._event()

    def _event(self) -> None:
        if self.target is not None:
            self.target.ctx_event()

    # ---- data space -------------------------------------------------------------------------------

    def allocate(self, n: int) -> tuple[np.ndarray, int]:
        """`n` new data blocks and the metadata's abort count they belong to; when there are
        none, commit, then wait for a resize (or ENOSPC)."""
        with self.cond:
            committed = False
            while True:
                self._check_writable()
                got = self.md.alloc_data(n)
                if got is not None:
                    if self.mode == "out_of_data_space":
                        self.mode = "rw"  # discards gave blocks back
                        self.no_space_since = None
                        self.no_space_timed_out = False
                    self._check_low_water()
                    return got, self.md.aborts
                if not committed and self.md.dirty:
                    self.commit()  # blocks freed in this transaction become usable
                    committed = True
                    continue
                if self.mode != "out_of_data_space":
                    self.mode = "out_of_data_space"
                    log.warning("thin-pool %s: switching to out-of-data-space mode", self.owner)
                    self._event()
                if self.no_space_timed_out or (self.target is not None and self.target.error_if_no_space):
                    raise DMError(errno.ENOSPC, f"thin-pool {self.owner} is out of data space "
                                  f"(all {self.md.data.nr_blocks} blocks are in use)")
                if self.no_space_since is None:
                    self.no_space_since = time.monotonic()
                left = self.no_space_since + NO_SPACE_TIMEOUT - time.monotonic() if NO_SPACE_TIMEOUT else None
                if left is not None and left <= 0:
                    # as the kernel's do_no_space_timeout: from now on the pool errors instead
                    log.warning("thin-pool %s: no_space_timeout expired, erroring queued writes", self.owner)
                    self.no_space_timed_out = True
                    self.cond.notify_all()
                    continue
                self.cond.wait(left)

    def _check_writable(self) -> None:
        if self.mode == "fail":
            raise DMError(errno.EIO, f"thin-pool {self.owner} has failed")
        if self.mode == "ro":
            raise DMError(errno.EIO, f"thin-pool {self.owner} is read-only: blocks cannot be provisioned")

    def _check_low_water(self) -> None:
        target = self.target
        if self.low_water_triggered or target is None or not target.low_water_blocks:
            return
        if self.md.data.nr_free() <= target.low_water_blocks:
            self.low_water_triggered = True
            log.warning("thin-pool %s: reached low water mark for data device", self.owner)
            self._event()

    def resized(self, data_blocks: int, metadata_blocks: int) -> None:
        with self.cond:
            grew = data_blocks > self.md.data.nr_blocks
            meta_grew = metadata_blocks > self.md.tm.meta.nr_blocks
            self.md.resize_data(data_blocks)
            self.md.resize_metadata(metadata_blocks)
            if meta_grew and self.metadata_full:
                self.metadata_full = False
                if self.mode == "ro" and not (self.target and "read_only" in self.target.features):
                    self.mode = "rw"
            if grew:
                self.low_water_triggered = False
                self.no_space_since = None
                self.no_space_timed_out = False
                if self.mode == "out_of_data_space":
                    self.mode = "rw"
            self.cond.notify_all()

    def passdown(self, blocks: np.ndarray) -> None:
        """Discard freed data blocks on the data device once their unmapping is committed,
        before anyone can allocate them again (both under the metadata lock)."""
        with self.md.lock:
            self.commit()
            free = np.unique(blocks[self.md.data.counts[blocks.astype(np.int64)] == 0].astype(np.int64))
            for run in np.split(free, np.flatnonzero(np.diff(free) != 1) + 1) if len(free) else ():
                try:
                    self.data.discard(int(run[0]) * self.block, len(run) * self.block)
                except DMError:
                    return  # a data device without discard keeps its old contents

    # ---- thin devices ---------------------------------------------------------------------------

    def open_thin(self, dev: int) -> None:
        with self.md.lock:
            if not self.md.exists(dev):
                raise DMError(errno.ENODATA, f"thin device {dev} does not exist in pool {self.owner}")
            self.open_devices[dev] = self.open_devices.get(dev, 0) + 1

    def close_thin(self, dev: int) -> None:
        with self.md.lock:
            self.open_devices[dev] -= 1
            if not self.open_devices[dev]:
                del self.open_devices[dev]


#: pools by metadata device (the kernel's `dm_thin_pool_table`)
_POOLS: dict[object, Pool] = {}
_POOLS_LOCK = threading.Lock()


def _number(text: str, limit: int) -> int | None:
    if not (text.isascii() and text.isdigit()) or int(text) > limit:
        return None
    return int(text)


@register
class ThinPoolTarget(Target):
    name = "thin-pool"
    version = (1, 23, 0)
    singleton = True
    immutable = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        self.ctx_event = ctx.event
        try:
            self.metadata_dev = ctx.get_device(args[0], 0, 0)
        except TargetError as exc:
            raise TargetError(f"Error opening metadata block device: {exc}", exc.errno) from None
        try:
            self.data_dev = ctx.get_device(args[1], 0, length)
        except TargetError as exc:
            raise TargetError(f"Error getting data device: {exc}", exc.errno) from None
        bs = _number(args[2], MAX_BLOCK_SECTORS)
        if bs is None or bs < MIN_BLOCK_SECTORS or bs % MIN_BLOCK_SECTORS:
            raise TargetError(f"Invalid block size: {args[2]!r} (a multiple of {MIN_BLOCK_SECTORS} "
                              f"sectors from {MIN_BLOCK_SECTORS} to {MAX_BLOCK_SECTORS})")
        self.block_sectors = bs
        lwm = _number(args[3], (1 << 64) - 1)
        if lwm is None:
            raise TargetError(f"Invalid low water mark: {args[3]!r}")
        self.low_water_blocks = lwm
        self.features = self._features(args[4:])
        if ctx.read_only:
            self.features.add("read_only")
        self.error_if_no_space = "error_if_no_space" in self.features
        self.data_blocks = length // bs
        if not self.data_blocks:
            raise TargetError(f"Invalid target length: {length} sectors hold no data block of {bs} sectors")
        self.pool = self._find_pool(ctx, length)

    @staticmethod
    def _features(args: list[str]) -> set[str]:
        if not args:
            return set()
        count = _number(args[0], len(FEATURES))
        if count is None or count != len(args) - 1:
            raise TargetError(f"Invalid number of pool feature arguments: {args[0]!r} "
                              f"({len(args) - 1} given)")
        features = set()
        for word in args[1:]:
            if word.lower() not in FEATURES:
                raise TargetError(f"Unrecognised pool feature requested: {word!r}")
            features.add(word.lower())
        return features

    def _find_pool(self, ctx: TargetContext, length: int) -> Pool:
        key = self.metadata_dev.device
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is not None:
                if pool.owner != ctx.device_name:
                    raise TargetError(f"metadata device already in use by a pool ({pool.owner})", errno.EBUSY)
                if pool.block_sectors != self.block_sectors:
                    raise TargetError(f"Pool block size {self.block_sectors} does not match the "
                                      f"existing pool's {pool.block_sectors} sectors")
            else:
                try:
                    pool = Pool(ctx.device_name, self.metadata_dev, self.block_sectors, self.data_blocks)
                except DMError as exc:
                    raise TargetError(f"Error creating metadata object: {exc.message}", exc.errno) from None
                _POOLS[key] = pool
            pool.users += 1
        return pool

    # ---- lifecycle -----------------------------------------------------------------------------

    def preresume(self) -> None:
        pool = self.pool
        with pool.cond:
            pool.target = self
            if "read_only" in self.features or pool.md.needs_check:
                pool.mode = "ro"  # the kernel will not write a pool whose metadata needs checking
            elif pool.mode == "ro" and not pool.metadata_full:
                pool.mode = "rw"
        metadata_blocks = min(self.metadata_dev.open.size // BLOCK, MAX_METADATA_BLOCKS)
        pool.resized(self.data_blocks, metadata_blocks)

    def resume(self) -> None:
        self.pool.start_timer()

    def postsuspend(self) -> None:
        self.pool.stop_timer()
        try:
            self.pool.commit()
        except DMError as exc:
            log.error("thin-pool %s: commit at suspend failed: %s", self.pool.owner, exc)

    def destroy(self) -> None:
        pool = self.pool
        with _POOLS_LOCK:
            pool.users -= 1
            last = not pool.users
            if last:
                _POOLS.pop(self.metadata_dev.device, None)
        if last or pool.target is self:
            pool.stop_timer()
            try:
                pool.commit()
            except DMError as exc:
                log.error("thin-pool %s: commit at destroy failed: %s", pool.owner, exc)
            if pool.target is self:
                pool.target = None

    # ---- I/O to the pool device goes to the data device -------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.data_dev.open.readinto(offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.data_dev.open.write(offset, data, fua)

    def flush(self) -> None:
        self.pool.commit()

    def discard(self, offset: int, length: int) -> None:
        self.data_dev.open.discard(offset, length)

    # ---- messages -------------------------------------------------------------------------------

    def message(self, args: list[str]) -> str | None:
        pool = self.pool
        if pool.mode in ("ro", "fail"):
            raise DMError(errno.EOPNOTSUPP, f"{pool.owner}: unable to service pool target messages "
                          "in READ_ONLY or FAIL mode")
        word = args[0].lower() if args else ""
        handlers = {"create_thin": (2, self._create_thin), "create_snap": (3, self._create_snap),
                    "delete": (2, self._delete), "set_transaction_id": (3, self._set_transaction_id),
                    "reserve_metadata_snap": (1, lambda a: pool.md.reserve_metadata_snap()),
                    "release_metadata_snap": (1, lambda a: pool.md.release_metadata_snap())}
        if word not in handlers:
            raise DMError(errno.EINVAL, f"Unrecognised thin pool target message received: "
                          f"{args[0] if args else ''!r}")
        argc, handler = handlers[word]
        if len(args) != argc:
            raise DMError(errno.EINVAL, f"Message {word} received with {len(args) - 1} arguments "
                          f"instead of {argc - 1}.")
        with pool.md.lock:
            pool.change_metadata(handler, args)
            pool.commit()
        return None

    @staticmethod
    def _dev_id(text: str) -> int:
        value = _number(text, MAX_DEV_ID)
        if value is None:
            raise DMError(errno.EINVAL, f"Message received with invalid device id: {text!r} "
                          f"(0 to {MAX_DEV_ID})")
        return value

    def _create_thin(self, args: list[str]) -> None:
        dev = self._dev_id(args[1])
        try:
            self.pool.md.create_thin(dev)
        except DMError as exc:
            raise DMError(exc.errno, f"Creation of new thinly-provisioned device with id {args[1]} "
                          f"failed: {exc.message}") from None

    def _create_snap(self, args: list[str]) -> None:
        dev, origin = self._dev_id(args[1]), self._dev_id(args[2])
        try:
            self.pool.md.create_snap(dev, origin)
        except DMError as exc:
            raise DMError(exc.errno, f"Creation of new snapshot {args[1]} of device {args[2]} "
                          f"failed: {exc.message}") from None

    def _delete(self, args: list[str]) -> None:
        dev = self._dev_id(args[1])
        try:
            if dev in self.pool.open_devices:
                raise DMError(errno.EBUSY, f"thin device {dev} is open")
            self.pool.md.delete(dev)
        except DMError as exc:
            raise DMError(exc.errno, f"Deletion of thin device {args[1]} failed: {exc.message}") from None

    def _set_transaction_id(self, args: list[str]) -> None:
        values = []
        for text in args[1:]:
            if _number(text, (1 << 64) - 1) is None:
                raise DMError(errno.EINVAL, f"set_transaction_id message: Unrecognised id {text!r}.")
            values.append(int(text))
        try:
            self.pool.md.set_transaction_id(*values)
        except DMError as exc:
            raise DMError(exc.errno, f"Failed to change transaction id from {args[1]} to {args[2]}: "
                          f"{exc.message}") from None

    # ---- reporting -------------------------------------------------------------------------------

    def status(self) -> str:
        pool = self.pool
        if pool.mode == "fail":
            return "Fail"
        try:
            if pool.md.dirty:
                pool.commit()
        except DMError:
            return "Fail"
        md = pool.md
        with md.lock:
            meta_total = md.tm.meta.nr_blocks
            reserve = min(4096, meta_total // 10)
            meta_used = meta_total - max(md.tm.meta.nr_free() - reserve, 0)
            data_total = md.data.nr_blocks
            data_used = data_total - md.data.nr_free()
            held = str(md.held_root) if md.held_root else "-"
            trans = md.trans_id
        if "ignore_discard" in self.features:
            discard = "ignore_discard"
        elif "no_discard_passdown" in self.features:
            discard = "no_discard_passdown"
        else:
            discard = "discard_passdown"
        space = "error_if_no_space" if self.error_if_no_space or pool.no_space_timed_out else "queue_if_no_space"
        threshold = min(1024, min(self.metadata_dev.open.size // BLOCK, MAX_METADATA_BLOCKS) // 4)
        check = "needs_check" if md.needs_check else "-"
        return (f"{trans} {meta_used}/{meta_total} {data_used}/{data_total} {held} {pool.mode} "
                f"{discard} {space} {check} {threshold} ")

    def table(self) -> str:
        flags = [f for f in FEATURES if f in self.features]
        return (f"{self.metadata_dev.name} {self.data_dev.name} {self.block_sectors} "
                f"{self.low_water_blocks} {len(flags)} " + "".join(f + " " for f in flags))

    def devices(self) -> list[TableDevice]:
        return [self.metadata_dev, self.data_dev]


def _write_runs(out, pieces: list[tuple[int, int, int]], data: memoryview, fua: bool) -> None:
    """Write (device offset, request position, length) pieces, one write per contiguous run."""
    run: tuple[int, int, int] | None = None
    for where, pos, n in pieces:
        if run is not None and run[0] + run[2] == where and run[1] + run[2] == pos:
            run = (run[0], run[1], run[2] + n)
            continue
        if run is not None:
            out.write(run[0], data[run[1]:run[1] + run[2]], fua)
        run = (where, pos, n)
    if run is not None:
        out.write(run[0], data[run[1]:run[1] + run[2]], fua)


@register
class ThinTarget(Target):
    name = "thin"
    version = (1, 23, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) not in (2, 3):
            raise TargetError("Invalid argument count")
        try:
            self.pool_dev = ctx.get_device(args[0], 0, 0)
        except TargetError as exc:
            raise TargetError(f"Error opening pool device: {exc}", exc.errno) from None
        pool = self._pool_of(self.pool_dev)
        value = _number(args[1], MAX_DEV_ID)
        if value is None:
            raise TargetError(f"Invalid device id: {args[1]!r} (0 to {MAX_DEV_ID})")
        self.dev_id = value
        self.origin_dev: TableDevice | None = None
        if len(args) == 3:
            try:
                self.origin_dev = ctx.get_device(args[2], 0, 0, write=False)
            except TargetError as exc:
                raise TargetError(f"Error opening origin device: {exc}", exc.errno) from None
            if self.origin_dev.device is self.pool_dev.device:
                raise TargetError("Error opening origin device: the external origin cannot be the pool")
        if pool.mode == "fail":
            raise TargetError("Couldn't open thin device, Pool is in fail mode")
        try:
            pool.open_thin(self.dev_id)
        except DMError as exc:
            raise TargetError(f"Couldn't open thin internal device: {exc.message}", exc.errno) from None
        self.pool = pool
        self._base = begin * SECTOR  # the kernel maps by the device's sector, not the target's

    @staticmethod
    def _pool_of(dev: TableDevice) -> Pool:
        """The pool whose table (live, else inactive) the pool device holds (`__pool_table_lookup`)."""
        for slot in ("live", "inactive"):
            table = getattr(dev.device, slot, None)
            for target in getattr(table, "targets", ()):
                if isinstance(target, ThinPoolTarget):
                    return target.pool
        raise TargetError(f"Couldn't find pool object: {dev.name} is not a thin-pool device")

    def destroy(self) -> None:
        self.pool.close_thin(self.dev_id)

    # ---- helpers ---------------------------------------------------------------------------------

    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(virtual block, offset in block, position in request, length) pieces."""
        bs = self.pool.block
        pos = self._base + offset
        done = 0
        while done < length:
            b, inner = divmod(pos + done, bs)
            n = min(bs - inner, length - done)
            yield b, inner, done, n
            done += n

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.pool.block
        pos = self._base + offset
        return pos // bs, (pos + length - 1) // bs

    def _read_unmapped(self, b: int, inner: int, view: memoryview) -> None:
        origin = self.origin_dev
        if origin is None:
            view[:] = bytes(len(view))
            return
        pos = b * self.pool.block + inner
        size = origin.open.size
        n = max(0, min(len(view), size - pos))
        if n:
            origin.open.readinto(pos, view[:n])
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    # ---- the data path ----------------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        pool = self.pool
        if pool.mode == "fail":
            raise DMError(errno.EIO, f"thin-pool {pool.owner} has failed")
        bs = pool.block
        b, inner = divmod(self._base + offset, bs)
        if inner + len(buf) <= bs:  # the common case: inside one block
            m = pool.lookup_one_for_io(self.dev_id, b)
            try:
                if m is None:
                    self._read_unmapped(b, inner, buf)
                else:
                    pool.data.readinto(m[0] * bs + inner, buf)
            finally:
                pool.io_done()
            return
        mapped = pool.lookup_for_io(self.dev_id, *self._span(offset, len(buf)))
        try:
            self._read_pieces(offset, buf, mapped)
        finally:
            pool.io_done()

    def _read_pieces(self, offset: int, buf: memoryview, mapped: dict[int, tuple[int, bool]]) -> None:
        pool = self.pool
        bs = pool.block
        data = pool.data
        run: tuple[int, int, int] | None = None  # (data offset, buffer position, length)
        for b, inner, pos, n in self._blocks(offset, len(buf)):
            m = mapped.get(b)
            if m is None:
                self._read_unmapped(b, inner, buf[pos:pos + n])
                continue
            where = m[0] * bs + inner
            if run is not None and run[0] + run[2] == where and run[1] + run[2] == pos:
                run = (run[0], run[1], run[2] + n)
                continue
            if run is not None:
                data.readinto(run[0], buf[run[1]:run[1] + run[2]])
            run = (where, pos, n)
        if run is not None:
            data.readinto(run[0], buf[run[1]:run[1] + run[2]])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        pool = self.pool
        bs = pool.block
        b, inner = divmod(self._base + offset, bs)
        if inner + len(data) <= bs:  # the common case: inside one block that is ours already
            m = pool.lookup_one_for_io(self.dev_id, b)
            try:
                if m is not None and not m[1]:
                    pool.data.write(m[0] * bs + inner, data, fua)
                    return
            finally:
                pool.io_done()
        first, last = self._span(offset, len(data))
        with pool.locks.hold(self.dev_id, first, last):
            mapped = pool.md.find(self.dev_id, first, last)
            pieces = list(self._blocks(offset, len(data)))
            needs = [p for p in pieces if p[0] not in mapped or mapped[p[0]][1]]
            provisioned = False
            if needs:
                pool._check_writable()
                new, aborts = pool.allocate(len(needs))
                whole: list[tuple[int, int, int]] = []  # full new blocks: written in runs
                try:
                    for (b, inner, pos, n), d in zip(needs, new.tolist()):
                        old = mapped.get(b)
                        if n == pool.block:
                            whole.append((d * pool.block, pos, n))
                        else:
                            self._fill(b, d, inner, data[pos:pos + n], None if old is None else old[0])
                    _write_runs(pool.data, whole, data, False)
                except BaseException:
                    pool.md.free_data(new)
                    raise
                vblocks = np.array([p[0] for p in needs], np.uint64)
                pool.change_metadata(pool.md.insert, self.dev_id, vblocks, new, aborts)
                provisioned = True
            in_place = [(m[0] * pool.block + inner, pos, n) for b, inner, pos, n in pieces
                        if (m := mapped.get(b)) is not None and not m[1]]
            _write_runs(pool.data, in_place, data, fua)
        if fua and provisioned:
            pool.commit()

    def _fill(self, b: int, d: int, inner: int, piece: memoryview, old: int | None) -> None:
        """Write `piece` at `inner` of new data block `d` for virtual block `b`: the rest of the
        block comes from the shared block `old`, the external origin, or zeroes."""
        pool = self.pool
        bs = pool.block
        out = pool.data
        if len(piece) == bs:
            out.write(d * bs, piece)
            return
        target = pool.target
        skip_zero = target is not None and "skip_block_zeroing" in target.features
        if old is None and self.origin_dev is None:
            if not skip_zero:  # zeroes around the write, without moving them through Python
                end = inner + len(piece)
                if inner:
                    out.write_zeroes(d * bs, inner, True)
                if end < bs:
                    out.write_zeroes(d * bs + end, bs - end, True)
            out.write(d * bs + inner, piece)
            return
        block = bytearray(bs)
        if old is not None:
            out.readinto(old * bs, memoryview(block))
        elif self.origin_dev is not None:
            self._read_unmapped(b, 0, memoryview(block))
        block[inner:inner + len(piece)] = piece
        out.write(d * bs, block)

    def flush(self) -> None:
        if self.pool.mode == "fail":
            raise DMError(errno.EIO, f"thin-pool {self.pool.owner} has failed: nothing can be made durable")
        self.pool.commit()

    def discard(self, offset: int, length: int) -> None:
        pool = self.pool
        target = pool.target
        if target is None or "ignore_discard" in target.features:
            return
        bs = pool.block
        pos = self._base + offset
        first, end = -(-pos // bs), (pos + length) // bs
        if first >= end:
            return
        pool._check_writable()
        with pool.locks.hold(self.dev_id, first, end - 1):
            freed = pool.change_metadata(pool.md.remove, self.dev_id, first, end - first)
        if len(freed) and "no_discard_passdown" not in target.features:
            pool.passdown(freed)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        bs = self.pool.block
        pos = self._base + offset
        first, end = -(-pos // bs), (pos + length) // bs
        if self.origin_dev is not None or first >= end:
            super().write_zeroes(offset, length, may_unmap)
            return
        self.pool._check_writable()
        with self.pool.locks.hold(self.dev_id, first, end - 1):
            self.pool.change_metadata(self.pool.md.remove, self.dev_id, first, end - first)
        head = first * bs - pos
        tail = pos + length - end * bs
        if head:
            super().write_zeroes(offset, head, may_unmap)
        if tail:
            super().write_zeroes(offset + length - tail, tail, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self.origin_dev is not None:
            return [(length, 0)]
        mapped = self.pool.md.find(self.dev_id, *self._span(offset, length))
        out: list[tuple[int, int]] = []
        for b, _inner, _pos, n in self._blocks(offset, length):
            flags = 0 if b in mapped else ZERO_EXTENT
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
        return out

    # ---- reporting -------------------------------------------------------------------------------

    def status(self) -> str:
        pool = self.pool
        if pool.mode == "fail":
            return "Fail"
        try:
            mapped = pool.md.mapped_blocks(self.dev_id)
            highest = pool.md.highest_mapped(self.dev_id)
        except (DMError, KeyError):
            return "-"
        spb = pool.block_sectors
        return f"{mapped * spb} " + ("-" if highest is None else str((highest + 1) * spb - 1))

    def table(self) -> str:
        text = f"{self.pool_dev.name} {self.dev_id}"
        return text + (f" {self.origin_dev.name}" if self.origin_dev is not None else "")

    def devices(self) -> list[TableDevice]:
        return [self.pool_dev] + ([self.origin_dev] if self.origin_dev is not None else [])
