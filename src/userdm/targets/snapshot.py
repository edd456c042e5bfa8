"""snapshot-origin, snapshot and snapshot-merge: copy-on-write snapshots (`dm-snap.c`).

Tables (sizes in sectors):
- `snapshot-origin <origin>`: reads pass through; before a write (or discard, write-zeroes)
  reaches a chunk of the origin, the old data of that chunk is copied to every active snapshot
  of the origin that has no exception for it yet; then the request goes down whole (the
  kernel splits it at the smallest chunk size, userdm copies every chunk first). An origin
  without snapshots passes every request straight through (the split that crashed in seed 003
  never happens). INFO status is empty; table: `<origin>`.
- `snapshot <origin> <COW device> <P|PO|N> <chunksize> [<#features> <feature>...]`, features
  `discard_zeroes_cow` and `discard_passdown_origin` (which needs the first): reads come from
  the COW device for chunks with an exception, else from the origin; writes allocate an
  exception (the old chunk is copied first unless the write covers it whole). The chunk size
  is a power of two, a multiple of both devices' logical block size; 0 means the default (or
  the on-disk one). The exception store is `_exception_store.py` (P: the kernel's on-disk
  format, survives restarts and crashes; N: in memory). When the COW device is full the
  snapshot becomes invalid (I/O fails with EIO, the origin carries on), or with `PO` and a
  write to the snapshot itself, overflowed (writes fail, reads go on). INFO status:
  `<sectors_allocated>/<total_sectors> <metadata_sectors>`, or `Invalid`, `Merge failed`,
  `Overflow`; table: `<origin> <COW> P|PO|N <chunksize>[ <#features> <features>]`.
- `snapshot-merge <origin> <COW device> <P|PO> <chunksize> [features]`: replaces the
  snapshot-origin table of the origin and merges the COW store back into it, from the last
  exception to the first, in a thread that runs from resume to suspend. Meanwhile the device
  shows the snapshot's content (chunks not yet merged are read from the COW device) and acts as
  the origin of the other snapshots. When the store is empty (`sectors_allocated ==
  metadata_sectors`) a table event is raised (the kernel lets LVM poll; userdm also raises it
  so that `dmsetup wait` works).

As in the kernel, snapshot and origin targets use the device's absolute sector numbers, and
the constructor of a snapshot whose COW device an active snapshot already uses becomes the
destination of an exception handover (a reload, or the snapshot-merge that follows a
snapshot): it takes over the store when it resumes, which needs the source suspended, and the
source becomes invalid. A snapshot must name the same underlying device as its
snapshot-origin (LVM's `-real` device), not the origin's mapped device.

The origin registry (the kernel's `_origins` hash) maps an underlying `BlockDevice` (the
object behind `TableDevice.device`) to its snapshots. It is all another module needs to act
as an origin (the interposer does):
- `copy_on_write(device, offset, length)`: call before overwriting bytes [offset,
  offset+length) of `device`; returns once every active snapshot holds its own copy of the
  chunks in that range. With no snapshots it returns at once.
- `has_snapshots(device)`, `snapshots_of(device)`: who is registered.
Chunk locks keep concurrent writers of one chunk from copying it twice; snapshot reads take no
lock (they re-check the exception after reading the origin).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..block.device import SECTOR, BlockDevice
from ..dm.target import TableDevice, Target, TargetContext, TargetError, register
from ..errors import DMError
from ._exception_store import ExceptionStore, PersistentStore, StoreError, StoreFull, create_store

log = logging.getLogger("userdm.snapshot")

#: chunks handled under one set of chunk locks by an origin write (and copied in runs of at
#: most COPY_BYTES)
BATCH_CHUNKS = 1024
COPY_BYTES = 1 << 20


# ---- locks --------------------------------------------------------------------------------

class ChunkLocks:
    """Exclusive locks on chunk numbers. A set of chunks is taken all at once (or waited for),
    so holders of several chunks never deadlock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[int] = set()

    @contextmanager
    def hold(self, chunks: Iterable[int]) -> Iterator[None]:
        chunks = tuple(chunks)
        with self._cond:
            while not self._held.isdisjoint(chunks):
                self._cond.wait()
            self._held.update(chunks)
        try:
            yield
        finally:
            with self._cond:
                self._held.difference_update(chunks)
                self._cond.notify_all()


class _RWLock:
    """Many readers (origin writes copying out) or one writer (registration, handover)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---- the origin registry ---------------------------------------------------------------------

class _Origin:
    """The snapshots of one origin device (the kernel's `struct origin`)."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.snapshots: list[SnapshotTarget] = []
        self.lock = _RWLock()


_origins: dict[BlockDevice, _Origin] = {}
_origins_lock = threading.Lock()


def _key(device: BlockDevice) -> BlockDevice:
    """The origin a device stands for: an interposer's view of DEV (`userdm.dm.interposer`) is
    DEV, so a snapshot of /dev/mapper/DEV and the interposed snapshot-origin meet."""
    return getattr(device, "origin_identity", device)


def snapshots_of(device: BlockDevice) -> list[SnapshotTarget]:
    """The snapshot (and snapshot-merge) targets registered on `device`, loaded or live."""
    origin = _origins.get(_key(device))
    return list(origin.snapshots) if origin is not None else []


def has_snapshots(device: BlockDevice) -> bool:
    origin = _origins.get(_key(device))
    return origin is not None and bool(origin.snapshots)


def copy_on_write(device: BlockDevice, offset: int, length: int) -> None:
    """Before bytes [offset, offset+length) of `device` change: copy the old data of those
    chunks to every valid, active, non-merging snapshot of `device` that lacks it (`do_origin`).
    A snapshot that cannot take the copy becomes invalid; the write goes on regardless."""
    origin = _origins.get(_key(device))
    if origin is None or length <= 0:
        return
    with origin.lock.read():
        for snap in origin.snapshots:
            if snap.active and snap.valid and not snap.merging:
                snap.copy_out(offset, length)


def _sharing_cow(origin: _Origin, snap: SnapshotTarget):
    """`__find_snapshots_sharing_cow`: (count, source, destination, merging snapshot)."""
    count, src, dest, merging = 0, None, None, None
    for other in origin.snapshots:
        if other.merging:
            merging = other
        if other.cow.device is not snap.cow.device:
            continue
        if other.active:
            src = other
        else:
            dest = other
        count += 1
    return count, src, dest, merging


def _register(snap: SnapshotTarget) -> bool:
    """Add a new snapshot to its origin's list; True if it is a handover destination."""
    device = snap.origin.device
    with _origins_lock:
        origin = _origins.get(_key(device))
        if origin is None:
            origin = _origins[_key(device)] = _Origin(device)
    with origin.lock.write():
        count, src, dest, merging = _sharing_cow(origin, snap)
        if count == 2 or dest is not None:
            raise TargetError("Snapshot cow pairing for exception table handover failed: "
                              f"{snap.cow.name} is already being handed over")
        if src is not None and snap.merging:
            if merging is not None:
                raise TargetError(f"A snapshot is already merging into {snap.origin.name}.")
            if not src.store.persistent:
                raise TargetError("Snapshot exception store does not support snapshot-merge: "
                                  f"the snapshot on {snap.cow.name} is transient (N)")
        origin.snapshots.append(snap)
        return src is not None


def _unregister(snap: SnapshotTarget) -> None:
    with _origins_lock:
        origin = _origins.get(_key(snap.origin.device))
    if origin is None:
        return
    with origin.lock.write():
        _count, src, dest, _merging = _sharing_cow(origin, snap)
        if src is snap and dest is not None:
            log.error("Cancelling snapshot handover.")
            dest.valid = False
        if snap in origin.snapshots:
            origin.snapshots.remove(snap)
    with _origins_lock:
        if not origin.snapshots and _origins.get(_key(snap.origin.device)) is origin:
            del _origins[_key(snap.origin.device)]


def _get_device(ctx: TargetContext, ref: str, start: int, length: int, what: str,
                write: bool | None = None, **role) -> TableDevice:
    try:
        return ctx.get_device(ref, start, length, write=write, **role)
    except TargetError as exc:
        raise TargetError(f"{what}: {exc}", exc.errno) from None


# ---- snapshot-origin --------------------------------------------------------------------------

@register
class SnapshotOriginTarget(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) != 1:
            raise TargetError(f"origin: incorrect number of arguments: {len(args)}, expected <origin>")
        self.dev = _get_device(ctx, args[0], 0, begin + length, "Cannot get target device")
        self._open = self.dev.open
        self._base = begin * SECTOR

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._open.readinto(self._base + offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        copy_on_write(self._open.device, self._base + offset, len(data))
        self._open.write(self._base + offset, data, fua)

    def discard(self, offset: int, length: int) -> None:
        copy_on_write(self._open.device, self._base + offset, length)
        self._open.discard(self._base + offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        copy_on_write(self._open.device, self._base + offset, length)
        self._open.write_zeroes(self._base + offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._open.block_status(self._base + offset, length)

    def table(self) -> str:
        return self.dev.name

    def devices(self) -> list[TableDevice]:
        return [self.dev]

    def also_reaches(self) -> list[TableDevice]:
        """Origin writes copy chunks into the COW device of every snapshot of the origin."""
        return [snap.cow for snap in snapshots_of(self.dev.device)]

    def direct_map(self) -> tuple[TableDevice, int]:
        return self.dev, self._base


# ---- snapshot ---------------------------------------------------------------------------------

def _parse_features(args: list[str]) -> tuple[bool, bool]:
    """`parse_snapshot_features`: `<#features> <feature>...` (trailing words are ignored)."""
    if not args:
        return False, False
    count = args[0]
    if not (count.isascii() and count.isdigit()) or int(count) > 2 or int(count) > len(args) - 1:
        raise TargetError(f"Invalid number of feature arguments: {count!r} (0 to 2 features follow it)")
    zeroes = passdown = False
    for word in args[1:1 + int(count)]:
        if word.lower() == "discard_zeroes_cow":
            zeroes = True
        elif word.lower() == "discard_passdown_origin":
            passdown = True
        else:
            raise TargetError(f"Unrecognised feature requested: {word!r}")
    if passdown and not zeroes:
        raise TargetError("discard_passdown_origin feature depends on discard_zeroes_cow")
    return zeroes, passdown


@register
class SnapshotTarget(Target):
    name = "snapshot"
    version = (1, 16, 0)
    merging = False

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 4:
            raise TargetError(f"requires 4 or more arguments: <origin> <COW device> <P|PO|N> "
                              f"<chunksize>, got {len(args)}")
        self.discard_zeroes_cow, self.discard_passdown_origin = _parse_features(args[4:])
        self._check_store_kind(args[2], ctx)
        self.origin = _get_device(ctx, args[0], 0, begin + length, "Cannot get origin device",
                                  role="origin device")
        # Read-write even in a read-only table: origin writes copy into it.
        self.cow = _get_device(ctx, args[1], 0, 0, "Cannot get COW device", write=True, region=False)
        if self.cow.device is self.origin.device:
            raise TargetError(f"COW device cannot be the same as origin device ({args[1]})")
        ctx.use_region(self.cow, 0, 0, "COW device")  # e.g. a partition of the origin
        try:
            self.store: ExceptionStore = create_store(args[2], args[3], self.cow.open,
                                                      self.origin.device.logical_block_size)
        except StoreError as exc:
            raise TargetError(f"Couldn't create exception store: {exc}") from None
        self.device_name = ctx.device_name
        self._event = ctx.event
        self._base = begin * SECTOR
        self._end = (begin + length) * SECTOR
        #: old chunk -> new chunk; only grows (a merging snapshot's only shrinks)
        self.exceptions: dict[int, int] = {}
        self.locks = ChunkLocks()
        self.valid = True
        self.overflowed = False
        self.merge_failed = False
        self.active = False            # origin writes copy into it only once resumed
        self.suspended = False
        self._state_lock = threading.Lock()
        handover = _register(self)
        if handover:  # the store comes from the active snapshot at resume
            self._chunk = 0
            return
        try:
            try:
                if not self.store.read_metadata(self.exceptions.__setitem__):
                    log.warning("Snapshot is marked invalid: %s", self.cow.name)
                    self.valid = False
            except StoreError as exc:
                raise TargetError(f"Failed to read snapshot metadata: {exc}", exc.errno) from None
            if not self.store.chunk_sectors:
                raise TargetError("Chunk size not set: a transient (N) snapshot needs a chunk size")
        except TargetError:
            _unregister(self)
            raise
        self._chunk = self.store.chunk_sectors * SECTOR

    def _check_store_kind(self, kind: str, ctx: TargetContext) -> None:
        """Hook for snapshot-merge."""

    # ---- helpers --------------------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk, offset in chunk, position in the request, length) over a request."""
        cb = self._chunk
        pos = self._base + offset
        end = pos + length
        at = 0
        while pos < end:
            chunk, in_chunk = divmod(pos, cb)
            n = min(cb - in_chunk, end - pos)
            yield chunk, in_chunk, at, n
            pos += n
            at += n

    def _invalidate(self, why: str) -> None:
        """`__invalidate_snapshot`: the snapshot is unusable from now on (and says so on disk)."""
        with self._state_lock:
            if not self.valid:
                return
            self.valid = False
        log.error("Invalidating snapshot %s: %s", self.device_name, why)
        self.store.drop_snapshot()
        self._event()

    def _eio(self, what: str) -> DMError:
        return DMError(errno.EIO, f"snapshot {self.device_name} ({self.cow.name}): {what}")

    def _copy_chunks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy origin chunk `old` to COW chunk `new` for each pair, in runs of neighbours."""
        cb = self._chunk
        origin, cow = self.origin.open, self.cow.open
        per_run = max(1, COPY_BYTES // cb)
        i = 0
        while i < len(pairs):
            j = i + 1
            while (j < len(pairs) and j - i < per_run and pairs[j][0] == pairs[j - 1][0] + 1
                   and pairs[j][1] == pairs[j - 1][1] + 1):
                j += 1
            start = pairs[i][0] * cb
            size = min((j - i) * cb, origin.size - start)
            buf = bytearray(size)
            origin.readinto(start, buf)
            cow.write(pairs[i][1] * cb, buf)
            i = j

    def _add_exceptions(self, chunks: list[int], whole: dict[int, memoryview] | None = None) -> set[int]:
        """Give each chunk that has none an exception: copy its origin data (or write the new
        data of a chunk that a snapshot write replaces `whole`) to a new COW chunk, commit,
        then publish. Returns the chunks whose new data was written. Raises StoreFull, DMError."""
        with self.locks.hold(chunks):
            todo = [c for c in chunks if c not in self.exceptions]
            if not todo or not self.valid:
                return set()
            pairs = [(c, self.store.prepare_exception()) for c in todo]
            written = set()
            try:
                copies = []
                for old, new in pairs:
                    data = whole.get(old) if whole else None
                    if data is None:
                        copies.append((old, new))
                    else:
                        self.cow.open.write(new * self._chunk, data)
                        written.add(old)
                self._copy_chunks(copies)
                self.store.commit_exceptions(pairs)
            except DMError as exc:
                self._invalidate(f"Error reading/writing: {exc}")
                raise
            self.exceptions.update(pairs)
            return written

    # ---- the origin side ----------------------------------------------------------------

    def copy_out(self, offset: int, length: int) -> None:
        """An origin write is about to change bytes [offset, offset+length) of the origin."""
        cb = self._chunk
        end = min(offset + length, self._end)
        if offset >= end:
            return
        first, last = offset // cb, (end - 1) // cb
        for batch in range(first, last + 1, BATCH_CHUNKS):
            missing = [c for c in range(batch, min(batch + BATCH_CHUNKS, last + 1)) if c not in self.exceptions]
            if not missing:
                continue
            try:
                self._add_exceptions(missing)
            except StoreFull:
                self._invalidate(f"Unable to allocate exception: {self.cow.name} is full")
                return
            except DMError:
                return  # invalidated: the origin write goes on

    # ---- the data path --------------------------------------------------------------------

    def _require(self, write: bool) -> None:
        if not self.valid:
            raise self._eio("the snapshot is invalid")
        if write and self.overflowed:
            raise self._eio("the snapshot has overflowed; it can be read, not written")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._require(False)
        self._read(offset, buf)

    def _read(self, offset: int, buf: memoryview) -> None:
        """COW chunks from the COW device, runs of other chunks from the origin in one read."""
        cb, exceptions, cow = self._chunk, self.exceptions, self.cow.open
        run: list[int] = []
        run_at = run_pos = 0
        for chunk, in_chunk, at, n in self._pieces(offset, len(buf)):
            new = exceptions.get(chunk)
            if new is None:
                if not run:
                    run_at, run_pos = at, chunk * cb + in_chunk
                run.append(chunk)
                continue
            if run:
                self._read_origin(run_pos, buf[run_at:at], run)
                run = []
            cow.readinto(new * cb + in_chunk, buf[at:at + n])
        if run:
            self._read_origin(run_pos, buf[run_at:], run)

    def _read_origin(self, pos: int, view: memoryview, chunks: list[int]) -> None:
        """Read chunks without exception from the origin. An origin write publishes the
        exception before it overwrites the origin, so a chunk that still has none after the
        read was read before any change; one that has one now is read again from the COW."""
        self.origin.open.readinto(pos, view)
        cb, end = self._chunk, pos + len(view)
        for chunk in chunks:
            new = self.exceptions.get(chunk)
            if new is not None:
                lo, hi = max(pos, chunk * cb), min(end, (chunk + 1) * cb)
                self.cow.open.readinto(new * cb + lo - chunk * cb, view[lo - pos:hi - pos])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._require(True)
        cb = self._chunk
        pieces = list(self._pieces(offset, len(data)))
        written: set[int] = set()
        missing = [p for p in pieces if p[0] not in self.exceptions]
        if missing:
            whole = {p[0]: data[p[2]:p[2] + p[3]] for p in missing if p[3] == cb}
            try:
                written = self._add_exceptions([p[0] for p in missing], whole)
            except StoreFull:
                if self.store.overflow_ok:
                    if not self.overflowed:
                        self.overflowed = True
                        log.error("Snapshot %s overflowed: Unable to allocate exception.", self.device_name)
                else:
                    self._invalidate(f"Unable to allocate exception: {self.cow.name} is full")
                raise self._eio(f"no room left on {self.cow.name} for another exception") from None
            except DMError as exc:
                raise self._eio(str(exc)) from None
            self._require(True)
        cow = self.cow.open
        for chunk, in_chunk, at, n in pieces:
            if chunk not in written:
                cow.write(self.exceptions[chunk] * cb + in_chunk, data[at:at + n], fua)

    def discard(self, offset: int, length: int) -> None:
        """Only with `discard_zeroes_cow`: a chunk with an exception that the discard covers
        whole is zeroed on the COW device; chunks without one need nothing."""
        if not self.discard_zeroes_cow:
            return
        self._require(True)
        cb = self._chunk
        for chunk, in_chunk, _at, n in self._pieces(offset, length):
            new = self.exceptions.get(chunk)
            if new is not None:
                if n == cb:
                    self.cow.open.write_zeroes(new * cb, cb, False)
                else:
                    self.cow.open.discard(new * cb + in_chunk, n)
        if self.discard_passdown_origin:  # as the kernel: without copying to other snapshots
            self.origin.open.discard(self._base + offset, length)

    # ---- lifecycle --------------------------------------------------------------------------

    def preresume(self) -> None:
        """Check, then do the exception handover here rather than in `resume` (the kernel's
        place): userdm destroys the old table before it resumes the new one, and the new
        snapshot must be active from the moment it owns the store, or origin writes in between
        would copy into neither."""
        with _origins_lock:
            origin = _origins.get(_key(self.origin.device))
        if origin is None:
            return
        with origin.lock.write():
            _count, src, dest, _merging = _sharing_cow(origin, self)
            if src is None or dest is None:
                return
            if src is self:
                raise DMError(errno.EINVAL, f"snapshot {self.device_name}: Unable to resume snapshot "
                              "source until handover completes.")
            if not src.suspended:
                raise DMError(errno.EINVAL, f"snapshot {self.device_name}: Unable to perform snapshot "
                              f"handover until source {src.device_name} is suspended.")
            if dest is self:
                self._take_over(src)
                self.active = True

    def resume(self) -> None:
        self.suspended = False
        self.active = True

    def _take_over(self, src: SnapshotTarget) -> None:
        """`__handover_exceptions`: swap stores and exception tables with the source."""
        overflow_ok = self.store.overflow_ok
        self.store, src.store = src.store, self.store
        self.store.overflow_ok = overflow_ok
        self.exceptions, src.exceptions = src.exceptions, self.exceptions
        self._chunk = self.store.chunk_sectors * SECTOR
        self.valid, self.overflowed = src.valid, src.overflowed
        src.valid = False  # it receives no further I/O

    def postsuspend(self) -> None:
        self.suspended = True

    def destroy(self) -> None:
        _unregister(self)

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> str:
        if not self.valid:
            return "Invalid"
        if self.merge_failed:
            return "Merge failed"
        if self.overflowed:
            return "Overflow"
        total, allocated, metadata = self.store.usage()
        return f"{allocated}/{total} {metadata}"

    def table(self) -> str:
        line = f"{self.origin.name} {self.cow.name} {self.store.table_args()}"
        features = [f for f, on in (("discard_zeroes_cow", self.discard_zeroes_cow),
                                     ("discard_passdown_origin", self.discard_passdown_origin)) if on]
        if features:
            line += f" {len(features)} " + " ".join(features)
        return line

    def devices(self) -> list[TableDevice]:
        return [self.origin, self.cow]

    def failure(self, dev: BlockDevice, offset: int, length: int) -> list[tuple[int, int]]:
        """A failure on the COW device hits the chunks whose exceptions live there; one on the
        origin hits the chunks without exception (they are still read there). Ranges are
        relative to the target start."""
        cb, end = self._chunk, offset + length
        if not cb or length <= 0:
            return []
        if dev is self.cow.device:
            hits = sorted((old, new) for old, new in self.exceptions.items()
                          if new * cb < end and (new + 1) * cb > offset)
        elif dev is self.origin.device:
            hits = [(c, c) for c in range(offset // cb, (end - 1) // cb + 1) if c not in self.exceptions]
        else:
            return []
        out: list[tuple[int, int]] = []
        for old, where in hits:
            lo = max(offset, where * cb) - where * cb + old * cb
            hi = min(end, (where + 1) * cb) - where * cb + old * cb
            lo, hi = max(lo, self._base) - self._base, min(hi, self._end) - self._base
            if lo >= hi:
                continue
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        return out


# ---- snapshot-merge ---------------------------------------------------------------------------

@register
class SnapshotMergeTarget(SnapshotTarget):
    name = "snapshot-merge"
    version = (1, 5, 0)
    merging = True

    def _check_store_kind(self, kind: str, ctx: TargetContext) -> None:
        if kind[:1].upper() == "N":
            raise TargetError(f"snapshot-merge needs a persistent exception store (P or PO), not {kind!r}")
        if ctx.read_only:
            raise TargetError("snapshot-merge writes the origin, so its table cannot be read-only")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Reads: the snapshot's view (a merging snapshot never gains exceptions, so no re-check
    # races). An invalid merging snapshot redirects everything to the origin.
    def readinto(self, offset: int, buf: memoryview) -> None:
        if not self.valid:
            self.origin.open.readinto(self._base + offset, buf)
            return
        self._read(offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Chunks not merged yet are written in the COW device; the others in the origin, which
        first copies them to the other snapshots. A write to a chunk being merged waits for it."""
        if not self.valid:
            self._write_origin(self._base + offset, data, fua)
            return
        cb = self._chunk
        run_at = run_pos = -1
        for chunk, in_chunk, at, n in self._pieces(offset, len(data)):
            if chunk in self.exceptions:
                with self.locks.hold((chunk,)):
                    new = self.exceptions.get(chunk)
                    if new is not None:
                        if run_at >= 0:
                            self._write_origin(run_pos, data[run_at:at], fua)
                            run_at = -1
                        self.cow.open.write(new * cb + in_chunk, data[at:at + n], fua)
                        continue
            if run_at < 0:
                run_at, run_pos = at, chunk * cb + in_chunk
        if run_at >= 0:
            self._write_origin(run_pos, data[run_at:], fua)

    def _write_origin(self, pos: int, data: memoryview, fua: bool) -> None:
        copy_on_write(self.origin.device, pos, len(data))
        self.origin.open.write(pos, data, fua)

    def discard(self, offset: int, length: int) -> None:
        """Once merging, discards no longer effect change (the kernel's words)."""

    # ---- the merge thread ---------------------------------------------------------------

    def resume(self) -> None:
        super().resume()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._merge, name=f"snapshot-merge {self.device_name}",
                                            daemon=True)
            self._thread.start()

    def presuspend(self) -> None:
        self._stop_merge()

    def destroy(self) -> None:
        self._stop_merge()
        super().destroy()

    def _stop_merge(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stop.set()
            thread.join()
            self._thread = None

    def _merge(self) -> None:
        """`snapshot_merge_next_chunks`: merge the last run of consecutive exceptions, forget
        it, repeat until the store is empty or the merge is stopped."""
        store = self.store
        assert isinstance(store, PersistentStore)
        cb, origin = self._chunk, self.origin.open
        while not self._stop.is_set():
            if not self.valid:
                log.error("Snapshot %s is invalid: can't merge", self.device_name)
                return
            try:
                count, last_old, last_new = store.prepare_merge()
                if count == 0:
                    self._event()  # merged: LVM polls the status, `dmsetup wait` gets this
                    return
                old, new = last_old + 1 - count, last_new + 1 - count
                start = old * cb
                size = min(count * cb, origin.size - start)
                copy_on_write(origin.device, start, count * cb)  # the other snapshots keep theirs
                chunks = range(old, old + count)
                with self.locks.hold(chunks):
                    buf = bytearray(min(size, max(cb, COPY_BYTES)))
                    done = 0
                    while done < size:
                        view = memoryview(buf)[:min(len(buf), size - done)]
                        self.cow.open.readinto(new * cb + done, view)
                        origin.write(start + done, view)
                        done += len(view)
                    origin.flush()
                    store.commit_merge(count)
                    for chunk in chunks:
                        self.exceptions.pop(chunk, None)
            except DMError as exc:
                log.error("snapshot-merge %s: I/O error, shutting down merge: %s", self.device_name, exc)
                self.merge_failed = True
                self._event()
                return
