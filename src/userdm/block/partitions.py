"""Partition tables (MBR with logical partitions, GPT) and partition devices.

`read_partition_table` reads a device's partition table the way the kernel's
`block/partitions/msdos.c` and `efi.c` do, in the order of the kernel's `check_part[]` list:

- GPT is tried first. It needs a valid protective (or hybrid) MBR: signature 0x55AA and an
  entry of type 0xEE that starts at LBA 1. The primary header at LBA 1 is checked
  (signature, header size between 92 bytes and one logical block, header CRC32, `my_lba`,
  usable range inside the disk, 128-byte entries, the entry array's CRC32) and if it is valid
  the partitions come from it. If it is not, the backup header at the last LBA is checked the
  same way and used. (The kernel only reads the backup when booted with `gpt`; libfdisk, parted
  and userdm always do, because a corrupt primary header otherwise loses every partition.)
  Partition N is entry N-1; unused entries (zero type GUID) and entries outside the disk are
  skipped.
- MBR: signature 0x55AA, every boot indicator 0x00 or 0x80 (else it is a boot sector, not a
  partition table); a disk with a 0xEE entry whose GPT is invalid has no partitions, as msdos.c
  ignores EFI disks. Primary entries are partitions 1-4. An extended entry (0x05, 0x0F, 0x85)
  appears as a tiny partition (two sectors, or one logical block if larger) and its chain of
  EBRs gives the logical partitions 5, 6, ..., each EBR's data entry relative to that EBR and
  its link entry relative to the extended partition; at most 100 EBRs without a partition.

MBR and GPT addresses are in logical blocks (512 or 4096 bytes). As in `blk_add_partitions`,
empty partitions and partitions starting beyond the end are dropped and those extending beyond
it are truncated; numbers stop at 255 (DISK_MAX_PARTS - 1).

`Partition` is the device of one partition: a byte range of its whole device with its own
opens and holder. Every open of a partition is also an open of the whole device (the kernel's
`blkdev_get_part` opens the whole disk too), so a disk with an open partition counts as open.
Claims follow `bd_may_claim` (see `BlockDevice.whole`): a claimed partition makes the whole disk
unclaimable, a claimed whole disk makes its partitions unclaimable.
"""

from __future__ import annotations

import errno
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import DMError
from .device import SECTOR, BlockDevice, BlockOpen, HolderOps

MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES_AT = 0x1BE
EFI_PMBR_OSTYPE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_MIN = 92
GPT_ENTRY_SIZE = 128
GPT_MAX_ENTRY_ARRAY = 4 << 20   # the kernel's kmalloc limit, roughly: refuse absurd arrays
MAX_PARTITION_NUMBER = 255      # DISK_MAX_PARTS - 1
MAX_EBR_WITHOUT_PARTITION = 100

_MBR_ENTRY = struct.Struct("<B3sB3sII")  # boot, chs start, type, chs end, start lba, sectors
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")


@dataclass(frozen=True)
class PartitionEntry:
    """One partition as the table describes it; `start` and `size` are in bytes."""

    number: int
    start: int
    size: int
    type: str           # MBR: "0x83"; GPT: the type GUID
    name: str = ""      # GPT partition name
    uuid: str = ""      # GPT unique partition GUID

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class PartitionTable:
    """A parsed table: `scheme` is "dos" or "gpt"; `notes` says what was repaired or skipped."""

    scheme: str
    entries: tuple[PartitionEntry, ...]
    disk_id: str = ""
    notes: tuple[str, ...] = ()


class Readable(Protocol):
    """What the reader needs: a size and `readinto` (a `BlockOpen`, or a `BlockDevice` read
    directly when an open would have side effects, as in a device-mapper rescan)."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...


class _Reader:
    """Reads whole logical blocks; reads outside the device return None (an invalid table)."""

    def __init__(self, source: Readable | BlockOpen | BlockDevice) -> None:
        self.source = source
        device = source.device if isinstance(source, BlockOpen) else source
        self.block = getattr(device, "logical_block_size", SECTOR)
        self.size = source.size
        self.last_lba = self.size // self.block - 1

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or length < 0 or offset + length > self.size:
            return None
        buf = bytearray(length)
        self.source.readinto(offset, memoryview(buf))
        return bytes(buf)

    def lba(self, lba: int, count: int = 1) -> bytes | None:
        return self.read(lba * self.block, count * self.block)


def read_partition_table(source: Readable | BlockOpen | BlockDevice) -> PartitionTable | None:
    """The partition table of `source`, or None if it has none. I/O errors raise `DMError`."""
    reader = _Reader(source)
    if reader.last_lba < 1:
        return None
    mbr = reader.lba(0)
    if mbr is None or mbr[510:512] != MBR_SIGNATURE:
        return None
    table = _read_gpt(reader, mbr)
    if table is None:
        table = _read_mbr(reader, mbr)
    if table is None:
        return None
    return _fit_to_disk(table, reader.size)


def _fit_to_disk(table: PartitionTable, size: int) -> PartitionTable:
    """`blk_add_partitions`: drop empty partitions and those starting beyond the end of the
    disk, truncate those that extend beyond it."""
    entries, notes = [], list(table.notes)
    for e in table.entries:
        if e.number > MAX_PARTITION_NUMBER or e.size <= 0:
            continue
        if e.start >= size:
            notes.append(f"partition {e.number} starts beyond the end of the disk; ignored")
            continue
        if e.end > size:
            notes.append(f"partition {e.number} extends beyond the end of the disk; truncated")
            e = PartitionEntry(e.number, e.start, size - e.start, e.type, e.name, e.uuid)
        entries.append(e)
    return PartitionTable(table.scheme, tuple(entries), table.disk_id, tuple(notes))


# ---- MBR -----------------------------------------------------------------------------------

def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(boot indicator, type, start lba, sectors) of the four entries of an MBR or EBR."""
    return [(boot, ptype, start, count) for boot, _, ptype, _, start, count in
            (_MBR_ENTRY.unpack_from(sector, MBR_ENTRIES_AT + 16 * i) for i in range(4))]


def _read_mbr(reader: _Reader, mbr: bytes) -> PartitionTable | None:
    entries = _mbr_entries(mbr)
    if any(boot not in (0, 0x80) for boot, _, _, _ in entries):
        return None  # a boot sector (FAT, NTFS ...), not a partition table
    if any(ptype == EFI_PMBR_OSTYPE for _, ptype, _, _ in entries):
        return None  # an EFI disk whose GPT is invalid: msdos.c ignores it
    unit = reader.block
    out: list[PartitionEntry] = []
    next_logical = 5
    for slot, (_, ptype, start, count) in enumerate(entries, 1):
        if not count:
            continue
        if ptype in EXTENDED_TYPES:
            # leave room for a boot loader but keep mkfs off the extended partition
            tiny = min(count * unit, max(unit, 2 * SECTOR))
            out.append(PartitionEntry(slot, start * unit, tiny, f"0x{ptype:02x}"))
            logical = _logical_partitions(reader, start * unit, count * unit, next_logical)
            next_logical += len(logical)
            out += logical
        else:
            out.append(PartitionEntry(slot, start * unit, count * unit, f"0x{ptype:02x}"))
    out.sort(key=lambda e: e.number)
    disk_id = f"{struct.unpack_from('<I', mbr, 440)[0]:08x}"
    return PartitionTable("dos", tuple(out), disk_id)


def _logical_partitions(reader: _Reader, first: int, first_size: int,
                        number: int) -> list[PartitionEntry]:
    """Walk the EBR chain of the extended partition at byte `first` (msdos.c parse_extended),
    numbering its logical partitions from `number` (5, or after an earlier extended one's)."""
    unit = reader.block
    out: list[PartitionEntry] = []
    this, this_size = first, first_size
    without_partition = 0
    seen: set[int] = set()
    while number <= MAX_PARTITION_NUMBER:
        without_partition += 1
        if without_partition > MAX_EBR_WITHOUT_PARTITION or this in seen:
            break
        seen.add(this)
        ebr = reader.read(this, SECTOR)
        if ebr is None or ebr[510:512] != MBR_SIGNATURE:
            break
        entries = _mbr_entries(ebr)
        for i, (_, ptype, start, count) in enumerate(entries):
            if not count or ptype in EXTENDED_TYPES:
                continue
            offset, size = start * unit, count * unit
            at = this + offset
            if i >= 2 and (offset + size > this_size or at < first or at + size > first + first_size):
                continue  # the 3rd and 4th entries of an EBR sometimes hold garbage
            out.append(PartitionEntry(number, at, size, f"0x{ptype:02x}"))
            number += 1
            without_partition = 0
            if number > MAX_PARTITION_NUMBER:
                return out
        link = next(((start, count) for _, ptype, start, count in entries
                     if count and ptype in EXTENDED_TYPES), None)
        if link is None:
            break
        this, this_size = first + link[0] * unit, link[1] * unit
    return out


# ---- GPT -----------------------------------------------------------------------------------

def _protective_mbr(mbr: bytes) -> bool:
    """is_pmbr_valid: an 0xEE entry starting at LBA 1 (a protective or a hybrid MBR)."""
    return any(ptype == EFI_PMBR_OSTYPE and start == 1 for _, ptype, start, _ in _mbr_entries(mbr))


@dataclass(frozen=True)
class _GPTHeader:
    my_lba: int
    alternate_lba: int
    disk_guid: str
    entries_lba: int
    count: int
    entries: bytes


def _gpt_header(reader: _Reader, lba: int) -> tuple[_GPTHeader | None, str]:
    """is_gpt_valid: the header at `lba` and its entry array, or None and why not."""
    raw = reader.lba(lba)
    if raw is None:
        return None, f"LBA {lba} is beyond the end of the disk"
    (signature, _revision, header_size, header_crc, _reserved, my_lba, alternate, first_usable,
     last_usable, disk_guid, entries_lba, count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
    if signature != GPT_SIGNATURE:
        return None, "no GPT signature"
    if not GPT_HEADER_MIN <= header_size <= reader.block:
        return None, f"header size {header_size} is not between {GPT_HEADER_MIN} and {reader.block}"
    zeroed = raw[:16] + b"\0\0\0\0" + raw[20:header_size]
    if zlib.crc32(zeroed) != header_crc:
        return None, "header CRC32 mismatch"
    if my_lba != lba:
        return None, f"header says it is at LBA {my_lba}"
    if first_usable > reader.last_lba or last_usable > reader.last_lba or last_usable < first_usable:
        return None, f"usable LBAs {first_usable}-{last_usable} do not fit the disk (last LBA {reader.last_lba})"
    if entry_size != GPT_ENTRY_SIZE:
        return None, f"partition entry size {entry_size} is not {GPT_ENTRY_SIZE}"
    if count * entry_size > GPT_MAX_ENTRY_ARRAY:
        return None, f"{count} partition entries are too many"
    entries = reader.read(entries_lba * reader.block, count * entry_size)
    if entries is None:
        return None, "the partition entry array is beyond the end of the disk"
    if zlib.crc32(entries) != entries_crc:
        return None, "partition entry array CRC32 mismatch"
    guid = str(uuid.UUID(bytes_le=disk_guid))
    return _GPTHeader(my_lba, alternate, guid, entries_lba, count, entries), ""


def _read_gpt(reader: _Reader, mbr: bytes) -> PartitionTable | None:
    if not _protective_mbr(mbr):
        return None
    notes: list[str] = []
    header, why = _gpt_header(reader, 1)
    if header is None:
        backup, backup_why = _gpt_header(reader, reader.last_lba)
        if backup is None:
            return None
        notes.append(f"primary GPT header is invalid ({why}); using the backup at LBA {reader.last_lba}")
        header = backup
    return PartitionTable("gpt", tuple(_gpt_entries(reader, header)), header.disk_guid, tuple(notes))


def _gpt_entries(reader: _Reader, header: _GPTHeader) -> Iterator[PartitionEntry]:
    unit = reader.block
    for i in range(min(header.count, MAX_PARTITION_NUMBER)):
        type_guid, part_guid, first, last, _attrs, name = _GPT_ENTRY.unpack_from(header.entries, i * GPT_ENTRY_SIZE)
        if type_guid == bytes(16) or first > reader.last_lba or last > reader.last_lba or last < first:
            continue  # unused or not on this disk (is_pte_valid)
        label = name.decode("utf-16-le", "replace").split("\0", 1)[0]
        yield PartitionEntry(i + 1, first * unit, (last - first + 1) * unit,
                             str(uuid.UUID(bytes_le=type_guid)), label, str(uuid.UUID(bytes_le=part_guid)))


# ---- partition devices ---------------------------------------------------------------------

def partition_name(disk: str, number: int) -> str:
    """The kernel's name for partition `number` of `disk`: `sda1`, but `nvme0n1p1`."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


class Partition(BlockDevice):
    """Partition `entry.number` of `whole`: its bytes [entry.start, entry.end)."""

    def __init__(self, whole: BlockDevice, entry: PartitionEntry, *, name: str,
                 ref: str | None = None, devno: tuple[int, int] | None = None,
                 scheme: str = "") -> None:
        self.whole = whole
        super().__init__(ref or name, entry.size, whole.logical_block_size)
        self.name = name
        self.entry = entry
        self.number = entry.number
        self.start = entry.start
        self.scheme = scheme
        self._devno = devno
        #: set when the partition is dropped (its disk was removed or its table re-read)
        self.removed = False

    @property
    def devno(self) -> tuple[int, int] | None:
        return self._devno

    @property
    def read_only(self) -> bool:  # type: ignore[override]
        return self._read_only or self.whole.read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self._read_only = value

    # ---- opens: every partition open is also an open of the whole device -------------------

    def check_open(self, write: bool) -> None:
        if self.removed:
            raise DMError(errno.ENXIO, f"partition {self.name} no longer exists "
                          "(its disk was removed or its partition table re-read)")

    def open(self, *, write: bool = False, holder: object | None = None,
             holder_ops: HolderOps | None = None) -> BlockOpen:
        whole_open = self.whole.open(write=write)
        try:
            handle = super().open(write=write, holder=holder, holder_ops=holder_ops)
        except BaseException:
            whole_open.close()
            raise
        handle.info["whole"] = whole_open
        return handle

    def closed(self, handle: BlockOpen) -> None:
        whole_open = handle.info.pop("whole", None)
        if whole_open is not None:
            whole_open.close()

    def lock_for_removal(self) -> bool:
        """Atomically with respect to opens: mark the partition removed (True), or return
        False if it is open (BLKRRPART's EBUSY)."""
        with self._opens_lock:
            if self.opens:
                return False
            self.removed = True
            return True

    # ---- I/O: offsets move by `start`; the whole device may have shrunk since the scan -------

    def _on_whole(self, offset: int, length: int) -> int:
        at = self.start + offset
        if at + length > self.whole.size:
            raise DMError(errno.EIO, f"{self.name}: bytes {offset} to {offset + length} lie beyond "
                          f"the end of {self.whole.ref} ({self.whole.size} bytes)")
        return at

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.whole.readinto(self._on_whole(offset, len(buf)), buf)

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        self.whole.write(self._on_whole(offset, len(data)), data, fua)

    def flush(self) -> None:
        self.whole.flush()

    def discard(self, offset: int, length: int) -> None:
        self.whole.discard(self._on_whole(offset, length), length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self.whole.write_zeroes(self._on_whole(offset, length), length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.whole.block_status(self._on_whole(offset, length), length)

    def overlap(self, offset: int, length: int) -> tuple[int, int] | None:
        """The part of the whole device's byte range [offset, offset+length) that lies in this
        partition, in partition-relative bytes, or None."""
        lo, hi = max(offset, self.start), min(offset + length, self.start + self.size)
        return (lo - self.start, hi - lo) if lo < hi else None


def partitions_of(whole: BlockDevice, table: PartitionTable, name: str) -> list[Partition]:
    """Partition devices for every entry of `table` (block-layer use, e.g. tests and files);
    named like the kernel's partitions of a disk called `name`."""
    return [Partition(whole, e, name=partition_name(name, e.number), scheme=table.scheme)
            for e in table.entries]
