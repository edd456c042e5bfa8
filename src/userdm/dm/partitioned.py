"""Partition devices of mapped devices: `NAME1`, `NAME2` ... (`NAMEp1` if NAME ends in a digit).

The Mapper keeps them in this side table, not in its registry of mapped devices: a partition
has no table, no uuid, no state of its own to save; it is a byte range of its disk that is
found again by reading the disk. They are devices all the same: `info`, `ls`, the FUSE
directory and NBD show them, tables use them as `/dev/mapper/NAME1` (or `259:MINOR`), each has
its own opens and holder, and the claim rules between a disk and its partitions are the
kernel's (`userdm.block.partitions`). An open of a partition is also an open of its disk, so a
disk with an open partition cannot be removed (EBUSY); removing the disk removes its partitions.

When a table is resumed into a mapped device, its partition table is read on a worker thread,
as udev probes a changed disk, and the resume waits up to `SCAN_WAIT` seconds for it: long
enough that the partitions are there when `resume` returns, without ever hanging a resume (or a
create) whose disk's I/O waits on a suspended device below it. If a partition of the device is
open at that moment the old partitions stay. `partprobe` (BLKRRPART) reads the table in the
caller's thread and is EBUSY while a partition is open. Reads go straight to the device, not
through an open, so that a scan never counts as an open (no autoclear, no deferred removal).
A device with a fault-injection target in its stack (`NO_SCAN_TARGETS`) is not read after a
resume, because there a read is not free: delay holds it and counts it in its status, dust and
flakey fail it and report a failure to the holders; `partprobe` still reads it on request. (The
kernel never scans device-mapper disks at all, GENHD_FL_NO_PART: kpartx maps partitions on
request; udev probes them, and test suites for these targets keep udev away.)

Device numbers: major 259 (blkext), the lowest free minor, as the kernel numbers partitions
of disks that have no minors of their own (device-mapper disks have one). A partition name
that is already a mapped device's name is skipped (and logged); creating or renaming a mapped
device to a partition's name is EBUSY.

A failure on a disk reaches the holder of each partition it overlaps, in partition-relative
bytes: a partition is linked in its disk's `holder_links` and answers `failure_below`; it dies
with its disk.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..block.device import BlockDevice, describe_holder
from ..block.partitions import Partition, PartitionEntry, PartitionTable, partition_name, read_partition_table
from ..errors import DMError
from .table import Table
from .mapped import MappedDevice

log = logging.getLogger("userdm.dm.partitions")

BLKEXT_MAJOR = 259
#: how long a resume waits for the partition scan it started (see the module docstring)
SCAN_WAIT = 2.0
#: targets whose reads have effects that a partition scan after resume must not cause
NO_SCAN_TARGETS = frozenset({"delay", "dust", "flakey"})


def scan_is_harmless(md: MappedDevice, above: tuple[MappedDevice, ...] = ()) -> bool:
    """False if a read of `md` may reach a target of NO_SCAN_TARGETS, in its table or in the
    tables of the mapped devices (or their partitions) below it."""
    table = md.live
    if table is None:
        return True
    if table.type_names & NO_SCAN_TARGETS:
        return False
    for dev in table.devices():
        below = dev.open.device
        below = below.whole if below.whole is not None else below
        if isinstance(below, MappedDevice) and below not in above and below is not md \
                and not scan_is_harmless(below, (*above, md)):
            return False
    return True


class MappedPartition(Partition):
    """A partition of a mapped device, with the attributes the exports read from a device."""

    whole: MappedDevice

    @property
    def live(self) -> Table | None:
        """The disk's live table while the partition exists (the exports show it then)."""
        return None if self.removed else self.whole.live

    @property
    def deleting(self) -> bool:
        return self.removed or self.whole.deleting

    def failure_below(self, lower: BlockDevice, offset: int, length: int) -> list[tuple[int, int]]:
        if lower is not self.whole or self.removed:
            return []
        part = self.overlap(offset, length)
        return [part] if part else []

    def dies_with(self, lower: BlockDevice) -> bool:
        return lower is self.whole


class MappedPartitions:
    """The partitions of every mapped device of one Mapper.

    `lookup(name)` is the Mapper's registry (the mapped device of that name, or None); `lock`
    is the registry lock, held while partitions are added or dropped; `emit` sends an event
    record. Lookups (`get`, `export_names`, `info`) take no lock, like the Mapper's."""

    def __init__(self, lock: threading.RLock, lookup: Callable[[str], MappedDevice | None],
                 emit: Callable[[dict[str, Any]], None],
                 observer: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = lock
        self._lookup = lookup
        self._emit = emit
        self._observer = observer
        self._by_name: dict[str, MappedPartition] = {}
        self._by_minor: dict[int, MappedPartition] = {}
        #: every minor below this is taken (makes `_free_minor` O(1) amortized)
        self._minor_hint = 0
        self._of: dict[MappedDevice, list[MappedPartition]] = {}
        #: scan generation per device: a scan installs its result only if none started after it
        self._generation: dict[MappedDevice, int] = {}
        self._generation_lock = threading.Lock()
        self._closed = False

    # ---- lookups ---------------------------------------------------------------------------

    def get(self, name: str) -> MappedPartition | None:
        return self._by_name.get(name)

    def by_minor(self, minor: int) -> MappedPartition | None:
        return self._by_minor.get(minor)

    def of(self, md: MappedDevice) -> list[MappedPartition]:
        return list(self._of.get(md, ()))

    def export_names(self) -> list[str]:
        return sorted(name for name, part in list(self._by_name.items()) if part.live is not None)

    def info(self, part: MappedPartition) -> dict[str, Any]:
        """The partition in the shape of `Mapper.info`, plus a `partition` entry."""
        whole, entry = part.whole, part.entry
        return {
            "name": part.name, "uuid": "", "major": BLKEXT_MAJOR, "minor": part.devno[1] if part.devno else 0,
            "live": part.live is not None, "inactive": False, "suspended": whole.suspended,
            "readonly": part.read_only, "inactive_readonly": False,
            "open_count": part.open_count, "event_nr": 0, "target_count": 0, "inactive_target_count": 0,
            "size": part.size, "deferred_remove": False, "shared": False,
            "holder": describe_holder(part.holder) if part.holder is not None else "-",
            "holders": sorted(getattr(user, "name", str(user)) for user in part.holder_links),
            "partition": {"disk": whole.name, "number": part.number, "start": part.start,
                          "scheme": part.scheme, "type": entry.type, "label": entry.name, "uuid": entry.uuid},
        }

    def infos(self) -> list[dict[str, Any]]:
        return [self.info(part) for part in list(self._by_name.values())]

    # ---- scanning --------------------------------------------------------------------------

    def _next_generation(self, md: MappedDevice) -> int:
        with self._generation_lock:
            generation = self._generation[md] = self._generation.get(md, 0) + 1
            return generation

    def scan_after_resume(self, md: MappedDevice, wait: float = SCAN_WAIT) -> None:
        """Read `md`'s partition table on a worker thread; wait for it up to `wait` seconds."""
        if not scan_is_harmless(md):
            log.info("%s: a fault-injection target is in its stack; its partitions are read only "
                     "by partprobe", md.name)
            return
        generation = self._next_generation(md)
        done = threading.Event()
        threading.Thread(target=self._scan, args=(md, generation, done), daemon=True,
                         name=f"partscan-{md.name}").start()
        done.wait(wait)

    def _scan(self, md: MappedDevice, generation: int, done: threading.Event) -> None:
        try:
            table = self._read(md, strict=False)
            with self._lock:
                if self._generation.get(md) == generation:
                    self._install(md, table, strict=False)
        except Exception:  # a worker must never die silently
            log.exception("partition scan of %s failed", md.name)
        finally:
            done.set()

    def partprobe(self, md: MappedDevice) -> list[dict[str, Any]]:
        """BLKRRPART: drop `md`'s partitions and read its table again. EBUSY while one of its
        partitions is open; ENXIO without a live table; read errors are returned."""
        if md.live is None:
            raise DMError(errno.ENXIO, f"device {md.name} has no live table; there is no disk to read")
        self._refuse_if_open(md)
        generation = self._next_generation(md)
        table = self._read(md, strict=True)
        with self._lock:
            if self._generation.get(md) == generation:  # else a resume's newer scan won
                self._install(md, table, strict=True)
            return [self.info(part) for part in self.of(md)]

    def _refuse_if_open(self, md: MappedDevice) -> None:
        for part in self.of(md):
            if part.open_count:
                raise DMError(errno.EBUSY, f"partition {part.name} of {md.name} is open (open count "
                              f"{part.open_count}); close it before re-reading the partition table")

    def _read(self, md: MappedDevice, *, strict: bool) -> PartitionTable | None:
        if md.live is None or md.size == 0:
            return None
        try:
            table = read_partition_table(md)
        except DMError as exc:
            if strict:
                raise DMError(exc.errno, f"cannot read the partition table of {md.name}: {exc.message}") from None
            log.warning("cannot read the partition table of %s: %s", md.name, exc)
            return None
        for note in table.notes if table else ():
            log.warning("%s: %s", md.name, note)
        return table

    def _install(self, md: MappedDevice, table: PartitionTable | None, *, strict: bool) -> None:
        """Replace `md`'s partitions by those of `table` (under the registry lock). The old ones
        are dropped atomically with respect to their opens, or none is if one is open."""
        if self._closed or md.deleting or self._lookup(md.name) is not md:
            return
        old = self.of(md)
        dropped: list[MappedPartition] = []
        for part in old:
            if not part.lock_for_removal():
                for undo in dropped:
                    undo.removed = False
                if strict:
                    self._refuse_if_open(md)
                log.info("%s: partition %s is open; its partitions stay as they were", md.name, part.name)
                return
            dropped.append(part)
        for part in old:
            self._forget(part)
        new = [part for entry in (table.entries if table else ())
               if (part := self._add(md, entry, table.scheme if table else "")) is not None]
        if new:
            self._of[md] = new
        else:
            self._of.pop(md, None)
        if old or new:
            self._emit({"event": "partitions", "name": md.name,
                        "scheme": table.scheme if table else None, "partitions": [p.name for p in new]})

    def _add(self, md: MappedDevice, entry: PartitionEntry, scheme: str) -> MappedPartition | None:
        name = partition_name(md.name, entry.number)
        if self._lookup(name) is not None or name in self._by_name:
            log.warning("%s: partition %d is not created: the name %s is taken", md.name, entry.number, name)
            return None
        part = MappedPartition(md, entry, name=name, ref=f"/dev/mapper/{name}",
                               devno=(BLKEXT_MAJOR, self._free_minor()), scheme=scheme)
        part.event_observer = self._observer
        md.link_holder(part)
        self._by_name[name] = part
        self._by_minor[part.devno[1]] = part
        return part

    def _free_minor(self) -> int:
        minor = self._minor_hint
        while minor in self._by_minor:
            minor += 1
        self._minor_hint = minor
        return minor

    def _forget(self, part: MappedPartition) -> None:
        part.removed = True
        if self._by_name.get(part.name) is part:
            del self._by_name[part.name]
        minor = part.devno[1] if part.devno else None
        if minor is not None and self._by_minor.get(minor) is part:
            del self._by_minor[minor]
            self._minor_hint = min(self._minor_hint, minor)
        part.whole.unlink_holder(part)

    # ---- the disk's lifecycle ------------------------------------------------------------------

    def drop(self, md: MappedDevice) -> None:
        """`md` is being removed: its partitions go with it (under the registry lock)."""
        for part in self._of.pop(md, []):
            self._forget(part)
        with self._generation_lock:
            self._generation.pop(md, None)

    def check_rename(self, md: MappedDevice, new_name: str) -> None:
        """EBUSY if a partition of `md` would be renamed to the name of a mapped device."""
        for part in self.of(md):
            name = partition_name(new_name, part.number)
            mapped, part_there = self._lookup(name), self._by_name.get(name)
            if (mapped is not None and mapped is not md) or (part_there is not None and part_there.whole is not md):
                raise DMError(errno.EBUSY, f"renaming {md.name} to {new_name} would name its partition "
                              f"{part.number} {name}, which is taken")

    def renamed(self, md: MappedDevice) -> None:
        """`md` has its new name: so have its partitions (`check_rename` was called first)."""
        parts = self.of(md)
        for part in parts:
            if self._by_name.get(part.name) is part:
                del self._by_name[part.name]
        for part in parts:
            part.name = partition_name(md.name, part.number)
            part.ref = f"/dev/mapper/{part.name}"
            self._by_name[part.name] = part

    def close(self) -> None:
        """Drop every partition (the Mapper is closing)."""
        self._closed = True
        for md in list(self._of):
            self.drop(md)
