"""Exception stores of the snapshot targets (`dm-exception-store.c`, `dm-snap-persistent.c`,
`dm-snap-transient.c`): where a snapshot puts the chunks it copies and how it finds them again.

An exception says "chunk `old` of the origin is now kept in chunk `new` of the COW device".
The store allocates `new` chunks (`prepare_exception`), makes a batch of exceptions durable
(`commit_exceptions`, which returns only once they are), reports its usage for `status`, and
for snapshot-merge hands back the last exceptions and forgets them once merged.

Transient (`N`): exceptions live in memory only; COW chunks are handed out from chunk 0 on.

Persistent (`P`, `PO`): the kernel's on-disk format, little-endian, in chunks of the COW device.
Chunk 0 is the header `{u32 magic = 0x70416e53 "SnAp", u32 valid, u32 version = 1, u32
chunk_size (sectors)}`. Metadata area *i* is the chunk `1 + (exceptions_per_area + 1) * i`;
an area is an array of `exceptions_per_area = chunk_size * 512 / 16` entries `{u64 old_chunk,
u64 new_chunk}` ending at the first entry whose `new_chunk` is 0, and the data chunks of its
exceptions follow it, so the first data chunk is 2. A zero magic means a new snapshot: the
header is written and area 0 wiped. When an area fills, the next one is wiped before the full
one is written. Copied data is flushed before the metadata that points at it, and the metadata
is written with FUA, so a crash at any point leaves either the old or the new exception.
An existing header's chunk size wins over the table's. Running out of room marks the header
invalid (`valid = 0`), and an invalid snapshot stays invalid.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable
from typing import ClassVar

from ..block.device import SECTOR, BlockOpen
from ..errors import DMError

log = logging.getLogger("userdm.snapshot")

SNAP_MAGIC = 0x70416E53            # "SnAp"
SNAPSHOT_DISK_VERSION = 1
NUM_SNAPSHOT_HDR_CHUNKS = 1
DEFAULT_CHUNK_SECTORS = 32         # DM_CHUNK_SIZE_DEFAULT_SECTORS (16 KiB)
MAX_CHUNK_SECTORS = (2**31 - 1) >> 9
HEADER = struct.Struct("<IIII")            # magic, valid, version, chunk_size
DISK_EXCEPTION = struct.Struct("<QQ")      # old_chunk, new_chunk


class StoreError(Exception):
    """A store refusal (the constructor turns it into a `TargetError`)."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class StoreFull(Exception):
    """No COW chunk left for another exception (the kernel's -ENOSPC)."""


def parse_chunk_size(text: str) -> int:
    """The table's chunk size as `kstrtouint` reads it; 0 means "default"."""
    digits = text.removeprefix("+")
    if not (digits.isascii() and digits.isdigit()) or int(digits) >= 1 << 32:
        raise StoreError(f"Invalid chunk size {text!r}")
    return int(digits)


def check_chunk_size(chunk: int, cow_lbs: int, origin_lbs: int) -> None:
    """`dm_exception_store_set_chunk_size`: a power of two, a multiple of both devices'
    logical block sizes, and small enough for the kernel's int arithmetic."""
    if chunk <= 0 or chunk & (chunk - 1):
        raise StoreError(f"Chunk size is not a power of 2: {chunk}")
    if chunk % (cow_lbs // SECTOR) or chunk % (origin_lbs // SECTOR):
        raise StoreError(f"Chunk size is not a multiple of device blocksize: {chunk} sectors, "
                         f"blocks of {origin_lbs} bytes (origin) and {cow_lbs} bytes (COW)")
    if chunk > MAX_CHUNK_SECTORS:
        raise StoreError(f"Chunk size is too high: {chunk} sectors, at most {MAX_CHUNK_SECTORS}")


class ExceptionStore:
    """What every store does; `chunk_sectors` is 0 until known (see `read_metadata`)."""

    persistent: ClassVar[bool] = False

    def __init__(self, cow: BlockOpen, chunk_sectors: int, origin_lbs: int, overflow_ok: bool) -> None:
        self.cow = cow
        self.chunk_sectors = chunk_sectors
        self.origin_lbs = origin_lbs
        #: `PO`: userspace understands "Overflow" (a full snapshot stays readable)
        self.overflow_ok = overflow_ok

    def set_chunk_size(self, chunk: int) -> None:
        check_chunk_size(chunk, self.cow.device.logical_block_size, self.origin_lbs)
        self.chunk_sectors = chunk

    @property
    def cow_sectors(self) -> int:
        return self.cow.size // SECTOR

    def read_metadata(self, add: Callable[[int, int], None]) -> bool:
        """Call `add(old, new)` for each stored exception; False if the snapshot is invalid."""
        return True

    def prepare_exception(self) -> int:
        raise NotImplementedError

    def commit_exceptions(self, pairs: list[tuple[int, int]]) -> None:
        """Make the exceptions `(old, new)` durable; their data is already on the COW device."""

    def usage(self) -> tuple[int, int, int]:
        """(total sectors, sectors allocated, metadata sectors), as `status` prints them."""
        raise NotImplementedError

    def drop_snapshot(self) -> None:
        """The snapshot became invalid: remember it."""

    def table_args(self) -> str:
        raise NotImplementedError


class TransientStore(ExceptionStore):
    """`N`: exceptions in memory; the COW device is only a pool of chunks."""

    def __init__(self, cow: BlockOpen, chunk_sectors: int, origin_lbs: int, overflow_ok: bool) -> None:
        super().__init__(cow, chunk_sectors, origin_lbs, False)
        self.next_free = 0  # in sectors, as the kernel counts it
        self._lock = threading.Lock()

    def prepare_exception(self) -> int:
        with self._lock:
            if self.cow_sectors < self.next_free + self.chunk_sectors:
                raise StoreFull()
            new = self.next_free // self.chunk_sectors
            self.next_free += self.chunk_sectors
            return new

    def usage(self) -> tuple[int, int, int]:
        return self.cow_sectors, self.next_free, 0

    def table_args(self) -> str:
        return f"N {self.chunk_sectors}"


class PersistentStore(ExceptionStore):
    """`P`/`PO`: the kernel's on-disk exception store (see the module docstring)."""

    persistent = True

    def __init__(self, cow: BlockOpen, chunk_sectors: int, origin_lbs: int, overflow_ok: bool) -> None:
        super().__init__(cow, chunk_sectors, origin_lbs, overflow_ok)
        self.valid = True
        self.version = SNAPSHOT_DISK_VERSION
        self.exceptions_per_area = 0
        self.current_area = 0
        self.current_committed = 0
        self.next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1  # header and the first area
        self._area = bytearray()
        self._zero = b""
        self._lock = threading.Lock()          # the area in memory, counters, allocation
        self._commit_lock = threading.Lock()   # metadata reaches the disk in order, one writer
        self._full_areas: list[tuple[int, bytes]] = []
        self._added = 0       # batches put into the area
        self._durable = 0     # batches on disk
        self._failed: DMError | None = None

    # ---- layout ---------------------------------------------------------------------------

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR

    def area_location(self, area: int) -> int:
        return NUM_SNAPSHOT_HDR_CHUNKS + (self.exceptions_per_area + 1) * area

    def _skip_metadata(self) -> None:
        if self.next_free % (self.exceptions_per_area + 1) == NUM_SNAPSHOT_HDR_CHUNKS:
            self.next_free += 1

    def _read_chunk(self, chunk: int) -> bytearray:
        buf = bytearray(self.chunk_bytes)
        if (chunk + 1) * self.chunk_bytes > self.cow.size:
            raise StoreError(f"{self.cow.device.ref}: metadata chunk {chunk} lies beyond the end of "
                             f"the COW device ({self.cow_sectors} sectors)", errno.EIO)
        try:
            self.cow.readinto(chunk * self.chunk_bytes, buf)
        except DMError as exc:
            raise StoreError(f"reading metadata chunk {chunk}: {exc}", errno.EIO) from None
        return buf

    def _write_chunk(self, chunk: int, data: bytes | bytearray, fua: bool) -> None:
        self.cow.write(chunk * self.chunk_bytes, data, fua)

    def _write_header(self) -> None:
        header = bytearray(self.chunk_bytes)
        HEADER.pack_into(header, 0, SNAP_MAGIC, int(self.valid), self.version, self.chunk_sectors)
        self._write_chunk(0, header, True)

    # ---- loading ----------------------------------------------------------------------------

    def read_metadata(self, add: Callable[[int, int], None]) -> bool:
        supplied = self.chunk_sectors != 0
        if not supplied:
            self.chunk_sectors = max(DEFAULT_CHUNK_SECTORS, self.cow.device.logical_block_size // SECTOR)
        if self.cow.size < self.chunk_bytes:
            raise StoreError(f"{self.cow.device.ref} ({self.cow_sectors} sectors) cannot hold the "
                             f"snapshot header chunk of {self.chunk_sectors} sectors", errno.EIO)
        magic, valid, version, chunk = HEADER.unpack_from(self._read_chunk(0))
        new_snapshot = magic == 0
        if not new_snapshot:
            if magic != SNAP_MAGIC:
                raise StoreError(f"Invalid or corrupt snapshot: {self.cow.device.ref} has magic "
                                 f"0x{magic:08x}, not 0x{SNAP_MAGIC:08x} (SnAp)", errno.ENXIO)
            self.valid = bool(valid)
            self.version = version
            if chunk != self.chunk_sectors:
                if supplied:
                    log.warning("chunk size %u in device metadata overrides table chunk size of %u.",
                                chunk, self.chunk_sectors)
                try:
                    self.set_chunk_size(chunk)
                except StoreError as exc:
                    raise StoreError(f"invalid on-disk chunk size {chunk}: {exc}") from None
        self.exceptions_per_area = self.chunk_bytes // DISK_EXCEPTION.size
        self._area = bytearray(self.chunk_bytes)
        self._zero = bytes(self.chunk_bytes)
        try:
            if new_snapshot:
                self._write_header()
                self._write_chunk(self.area_location(0), self._zero, True)
                return True
        except DMError as exc:
            raise StoreError(f"writing a new snapshot header: {exc}", errno.EIO) from None
        if version != SNAPSHOT_DISK_VERSION:
            raise StoreError(f"unable to handle snapshot disk version {version} "
                             f"(only {SNAPSHOT_DISK_VERSION})")
        if not self.valid:
            return False
        self._read_exceptions(add)
        return True

    def _read_exceptions(self, add: Callable[[int, int], None]) -> None:
        """Read areas until one is not full; it becomes the current area."""
        area = 0
        while True:
            buf = self._read_chunk(self.area_location(area))
            full = True
            for i, (old, new) in enumerate(DISK_EXCEPTION.iter_unpack(buf)):
                if new == 0:
                    self.current_committed = i
                    full = False
                    break
                if self.next_free <= new:
                    self.next_free = new + 1
                add(old, new)
            if not full:
                self._area[:] = buf
                self.current_area = area
                break
            area += 1
        self._skip_metadata()

    # ---- exceptions ------------------------------------------------------------------------

    def prepare_exception(self) -> int:
        with self._lock:
            if self.cow_sectors < (self.next_free + 1) * self.chunk_sectors:
                raise StoreFull()
            new = self.next_free
            self.next_free += 1
            self._skip_metadata()
            return new

    def commit_exceptions(self, pairs: list[tuple[int, int]]) -> None:
        """Put the entries into the area, then write it (group commit: one writer at a time
        writes everything added so far, so concurrent commits share one disk write)."""
        if not pairs:
            return
        with self._lock:
            if not self.valid:
                raise DMError(errno.EIO, f"snapshot store on {self.cow.device.ref} is invalid")
            for old, new in pairs:
                DISK_EXCEPTION.pack_into(self._area, self.current_committed * DISK_EXCEPTION.size, old, new)
                self.current_committed += 1
                if self.current_committed == self.exceptions_per_area:
                    self._full_areas.append((self.current_area, bytes(self._area)))
                    self.current_area += 1
                    self.current_committed = 0
                    self._area[:] = self._zero
            self._added += 1
            mine = self._added
        with self._commit_lock:
            if self._durable >= mine:
                return
            if self._failed is not None:
                raise DMError(errno.EIO, f"snapshot metadata on {self.cow.device.ref} could not be "
                              f"written: {self._failed}")
            with self._lock:
                full, self._full_areas = self._full_areas, []
                upto = self._added
                current = bytes(self._area) if self.current_committed else None
                area = self.current_area
            try:
                self.cow.flush()  # the copies are on disk before the metadata that points at them
                for number, image in full:
                    self._write_chunk(self.area_location(number + 1), self._zero, False)
                    self._write_chunk(self.area_location(number), image, True)
                if current is not None:
                    self._write_chunk(self.area_location(area), current, True)
            except DMError as exc:
                self._failed = exc
                self.valid = False
                raise DMError(errno.EIO, f"snapshot metadata on {self.cow.device.ref} could not be "
                              f"written: {exc}") from None
            self._durable = upto

    def usage(self) -> tuple[int, int, int]:
        metadata = (self.current_area + 1 + NUM_SNAPSHOT_HDR_CHUNKS) * self.chunk_sectors
        return self.cow_sectors, self.next_free * self.chunk_sectors, metadata

    def drop_snapshot(self) -> None:
        self.valid = False
        try:
            self._write_header()
        except DMError as exc:
            log.warning("write header failed: %s", exc)

    def table_args(self) -> str:
        return f"{'PO' if self.overflow_ok else 'P'} {self.chunk_sectors}"

    # ---- merging (only the merging snapshot's thread calls these) ----------------------

    def prepare_merge(self) -> tuple[int, int, int]:
        """(count, last old chunk, last new chunk) of the run of consecutive exceptions at
        the end of the store, or count 0 when the store is empty."""
        if not self.current_committed:
            if not self.current_area:
                return 0, 0, 0
            self.current_area -= 1
            try:
                self._area[:] = self._read_chunk(self.area_location(self.current_area))
            except StoreError as exc:
                raise DMError(exc.errno, str(exc)) from None
            self.current_committed = self.exceptions_per_area
        at = (self.current_committed - 1) * DISK_EXCEPTION.size
        last_old, last_new = DISK_EXCEPTION.unpack_from(self._area, at)
        count = 1
        while count < self.current_committed:
            old, new = DISK_EXCEPTION.unpack_from(self._area, at - count * DISK_EXCEPTION.size)
            if old != last_old - count or new != last_new - count:
                break
            count += 1
        return count, last_old, last_new

    def commit_merge(self, count: int) -> None:
        """Forget the last `count` exceptions (their data is in the origin now)."""
        for i in range(count):
            DISK_EXCEPTION.pack_into(self._area, (self.current_committed - 1 - i) * DISK_EXCEPTION.size, 0, 0)
        self.cow.flush()
        self._write_chunk(self.area_location(self.current_area), self._area, True)
        self.current_committed -= count
        # As the kernel: the value next_free would have if everything had been committed in order.
        self.next_free = self.area_location(self.current_area) + self.current_committed + 1


def create_store(kind: str, chunk_arg: str, cow: BlockOpen, origin_lbs: int) -> ExceptionStore:
    """`dm_exception_store_create`: `kind` is P, PO or N (first letter, any case)."""
    letter = kind[:1].upper()
    if letter not in ("P", "N"):
        raise StoreError(f"Exception store type is not P or N: {kind!r}")
    chunk = parse_chunk_size(chunk_arg)
    if chunk:
        check_chunk_size(chunk, cow.device.logical_block_size, origin_lbs)
    if letter == "N":
        return TransientStore(cow, chunk, origin_lbs, False)
    options = kind[1:]
    if options and options[0].upper() != "O":
        raise StoreError(f"Unsupported persistent store option: {options!r} (only O, for overflow)")
    return PersistentStore(cow, chunk, origin_lbs, bool(options))
