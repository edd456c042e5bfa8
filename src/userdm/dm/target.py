"""The target interface (the kernel's `struct target_type`) and the target registry.

A target is constructed from its table arguments, maps I/O on its range of the device, and
reports `status()`/`table()` lines in the kernel's formats. Offsets given to a target's I/O
methods are byte offsets relative to the start of the target. Targets open underlying devices
only through `TargetContext.get_device`, which applies the device-mapper's claim and records
the areas that the kernel checks at resume (`check_areas`), and raise `TargetError` with the
kernel's `ti->error` text on bad arguments. `get_device` also records the region each device serves in a *role* (era's
metadata and origin, a snapshot's origin and COW, verity's data and hash, each stripe):
one target may not use overlapping regions of one device in two roles (EINVAL naming both;
the kernel would accept it and one role would overwrite the other's data). A new target is a module in `userdm.targets` that calls `register`; the core
never knows what a target does.
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Callable
from typing import ClassVar

from ..block.device import SECTOR, STATUS_HOLE, STATUS_ZERO, BlockDevice, BlockOpen
from ..block.failure import clip
from ..block.partitions import Partition
from ..errors import DMError, clipped


class TargetError(Exception):
    """A constructor refusal; the text is the kernel's `ti->error` string."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class RolesOverlap(TargetError):
    """Two roles of one target use overlapping regions of one device (targets that prefix
    their own context to device errors let this one through as it is)."""


class TableDevice:
    """An underlying device opened by a table: the open plus the name `table` prints."""

    __slots__ = ("ref", "name", "open", "shared")

    def __init__(self, ref: str, name: str, open_: BlockOpen, shared: bool) -> None:
        self.ref = ref
        self.name = name
        self.open = open_
        self.shared = shared

    @property
    def device(self):  # noqa: ANN201 - BlockDevice
        return self.open.device


class TargetContext:
    """What a constructor may use: the table's mode and device lookup with area checks.

    `get_device` is provided by the mapped device that loads the table (it knows the
    registry of mapped devices, the backing stores, and the device-mapper holder).
    """

    def __init__(self, get_device: Callable[[str, bool, bool], TableDevice],
                 put_device: Callable[[TableDevice], None], read_only: bool,
                 device_name: str, event: Callable[[], None]) -> None:
        self._get_device = get_device
        self.put_device = put_device
        self.read_only = read_only
        self.device_name = device_name
        self.event = event
        #: every device opened while building the table; the table releases them
        self.acquired: list[TableDevice] = []
        #: what constructors of one type may remember between the lines of one table
        #: (`Target.quick`), keyed as they like
        self.memo: dict = {}
        #: the regions the target being built uses (see `use_region`)
        self._regions: list[tuple[BlockDevice, int, int, str, str, int, int]] = []
        self._calls = 0
        #: every device area the table's targets map: (device, start, length, table line),
        #: checked against the devices' sizes at resume (`check_areas`)
        self.areas: list[tuple[TableDevice, int, int, int]] = []
        self._lineno = 0

    def begin_target(self, lineno: int = 0) -> None:
        """A new target's constructor (of table line `lineno`) runs next: roles are compared
        within one target only."""
        self._regions = []
        self._lineno = lineno
        self._calls = 0

    def get_device(self, ref: str, start: int, length: int, *, shared: bool = False,
                   write: bool | None = None, role: str | None = None,
                   region: bool = True, lookup_error: str = "Device lookup failed") -> TableDevice:
        """Open `ref` for this table and check that sectors [start, start+length) exist on it.
        The open follows the table's mode unless `write` says otherwise (a snapshot's COW
        device takes copies even in a read-only table, as the kernel's kcopyd writes it).

        The region (the rest of the device from `start` if `length` is 0) is recorded in
        `role` ("device N" by call order if not named): an overlap with a region of the same
        device that the same target uses in another role is refused (`RolesOverlap`). A
        target that learns its region only later passes `region=False` and calls
        `use_region` then. A device that cannot be opened is refused with `lookup_error`, the
        target's `ti->error` for it (verity says "Data device lookup failed")."""
        self._calls += 1
        role = role or f"device {self._calls}"
        try:
            dev = self._get_device(ref, not self.read_only if write is None else write, shared)
        except DMError as exc:
            if getattr(exc, "cycle", None):
                raise  # a dependency cycle (`userdm.dm.cycles`) is reported as it is
            raise TargetError(f"{lookup_error}: {clipped(exc, 400)}", exc.errno) from None
        self.acquired.append(dev)
        self.areas.append((dev, start, length, self._lineno))
        if region:
            self.use_region(dev, start, length, role)
        return dev

    def check_areas(self) -> None:
        """The kernel's device_area_is_invalid, run by dm_calculate_queue_limits when a table
        is swapped in at resume (not at load: a device may grow in between): every area must
        lie on its device and be aligned to its logical block size. EINVAL with the kernel's
        message otherwise. Each device is asked for its size now (`refresh_size`: a file or
        an RBD image grown since it was opened), as the kernel reads the capacity. The kernel
        skips a device of size 0; userdm refuses it (a mapped device without a table, say one
        whose saved table is not restored yet), so that what is built on it waits for it
        (`userdm.dm.restore`) instead of failing every I/O."""
        for device in {id(dev.open.device): dev.open.device for dev, *_ in self.areas}.values():
            device.refresh_size()
        for dev, start, length, line in self.areas:
            size = dev.open.size // SECTOR
            where = f" (table line {line})" if line else ""
            if start + length > size or length and start >= size:
                raise DMError(errno.EINVAL, f"{self.device_name}: {dev.name} too small for target: "
                              f"start={start}, len={length}, dev_size={size}{where}")
            lbs = dev.open.device.logical_block_size // SECTOR
            for what, value in (("start", start), ("len", length)):
                if value % lbs:
                    raise DMError(errno.EINVAL, f"{self.device_name}: {what}={value} not aligned to "
                                  f"h/w logical block size {lbs * SECTOR} of {dev.name}{where}")

    def use_region(self, dev: TableDevice, start: int, length: int, role: str) -> None:
        """Record that the target uses sectors [start, start+length) of `dev` (the rest of the
        device from `start` if `length` is 0) in `role`; EINVAL (`RolesOverlap`) if that
        overlaps a region of the same device that the target uses in another role. Devices are
        compared by identity (two paths of one file, `/dev/mapper/X` and `253:N` are one
        object), a partition as the byte range of its whole disk."""
        if not length:
            length = dev.open.size // SECTOR - start
        if length <= 0:
            return
        base, first = dev.open.device, start * SECTOR
        while isinstance(base, Partition):
            base, first = base.whole, first + base.start
        end = first + length * SECTOR
        for other, o_first, o_end, o_role, o_ref, o_start, o_length in self._regions:
            if other is base and o_role != role and first < o_end and o_first < end:
                same = "" if o_ref == dev.ref else f" (both on {base.ref})"
                raise RolesOverlap(f"{o_role} {o_ref} sectors {o_start}-{o_start + o_length - 1} overlaps "
                                   f"{role} {dev.ref} sectors {start}-{start + length - 1}{same}")
        self._regions.append((base, first, end, role, dev.ref, start, length))


class Target:
    """Base class: a target of `length` sectors starting at sector `begin` of its device."""

    name: ClassVar[str]
    version: ClassVar[tuple[int, int, int]]
    singleton: ClassVar[bool] = False
    immutable: ClassVar[bool] = False
    wildcard: ClassVar[bool] = False
    #: answers `changed(since, metadata_snapshot=...)`: runs of blocks written since an era
    #: (era), for `Mapper.era_changed`
    tracks_changes: ClassVar[bool] = False
    #: its arguments hold a key (crypt): `table(showkeys)` masks it unless asked, the saved
    #: text never has it, and `forget_key()` wipes it
    has_keys: ClassVar[bool] = False
    #: a remap with no state of its own but its opens and no suspend hooks (striped): a
    #: device stacked above may call it directly (`userdm.dm.collapse`)
    stateless_remap: ClassVar[bool] = False
    #: reads are a remap that the target picks per request (`collapsed_read`: a mirror
    #: spreads in-sync regions over its legs), writes are the target's own: when its devices
    #: are files, the collapsed path (`userdm.dm.collapse`) calls it directly
    remaps_reads: ClassVar[bool] = False
    __slots__ = ("begin", "length")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        self.begin = begin
        self.length = length

    @classmethod
    def quick(cls, ctx: TargetContext, begin: int, length: int, args: list[str]) -> "Target | None":
        """The target of a table line built the quick way, or None to run the constructor: a
        type whose lines repeat (a million linear segments on one file) may build the common
        case from what an earlier line of the same table found (`ctx.memo`), without opening
        anything. It must build exactly what the constructor would, and leave every refusal
        to the constructor."""
        return None

    # ---- data path (byte offsets relative to the target start) ----------------------
    def readinto(self, offset: int, buf: memoryview) -> None:
        raise DMError(errno.EIO, f"{self.name} target does not support reads")

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise DMError(errno.EIO, f"{self.name} target does not support writes")

    def flush(self) -> None:
        for dev in self.devices():
            dev.open.flush()

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        zero = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zero))
            self.write(offset, zero[:n], False)
            offset += n

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    # ---- reporting --------------------------------------------------------------------
    def status(self) -> str:
        return ""

    def table(self) -> str:
        return ""

    def message(self, args: list[str]) -> str | None:
        raise DMError(errno.EINVAL, f"{self.name} target does not accept messages")

    def devices(self) -> list[TableDevice]:
        """The underlying devices (the kernel's `iterate_devices`)."""
        return []

    def also_reaches(self) -> list[TableDevice]:
        """Devices of other tables that this target's I/O reaches too (snapshot-origin writes
        copies into the COW devices of its origin's snapshots): edges for `userdm.dm.cycles`."""
        return []

    # ---- failure notification (DESIGN §6, userdm.block.failure) -------------------------
    def failure(self, dev: BlockDevice, offset: int, length: int) -> list[tuple[int, int]]:
        """The byte ranges `(offset, length)` of this target, relative to its start, that map
        onto the failed byte range [offset, offset+length) of the underlying device `dev`
        (compare with `table_device.device is dev`); [] if none of it is mapped here. The
        mapped device reports the ranges to its own holder and to the devices above it.

        The default serves targets that map their whole range one-to-one onto one device
        (see `direct_map`). Others override it: striped cuts the range at chunk boundaries;
        a snapshot reports the chunks whose exceptions live there; verity reports every data
        block whose hash lies in it. A target that cannot say returns [] (the failure stops)."""
        mapped = self.direct_map()
        if mapped is None or mapped[0].device is not dev:
            return []
        return clip(offset, length, mapped[1], self.length * SECTOR)

    def read_error(self, ranges: list[tuple[int, int]], message: str) -> DMError:
        """The EIO for a read that failed on these byte ranges (relative to the target) for a
        reason of the target's own (dust's bad blocks): the failure reported up the stack is
        then exactly those ranges, not the whole read (`failure.read_failed`)."""
        exc = DMError(errno.EIO, message)
        exc.failed_ranges = [(self.begin * SECTOR + off, n) for off, n in ranges]  # type: ignore[attr-defined]
        return exc

    def device_lost(self, dev: BlockDevice) -> bool:
        """The underlying device `dev` died (`mark_dead`): True if this target carries on
        without it (a mirror with handle_errors marks the leg and goes on), False if the
        mapped device dies with it (the default)."""
        return False

    def direct_map(self) -> tuple[TableDevice, int] | None:
        """`(device, byte offset)` if this target maps its range one-to-one onto that device
        from that offset on (linear, dust, flakey); None otherwise. Used by `failure`."""
        return None

    def passthrough(self) -> tuple[TableDevice, int] | None:
        """`(device, byte offset)` if every request to this target goes unchanged to that
        device from that offset on, and nothing else happens (linear; not dust or flakey,
        which map directly but fail requests): `userdm.dm.collapse` follows such targets
        down a stack. None otherwise."""
        return None

    def locate(self, offset: int, length: int) -> tuple[BlockOpen, int] | None:
        """`(open, byte offset)` where a request of `length` bytes at target byte `offset` goes
        whole, if it goes to one place unchanged (striped: a request inside one chunk); None
        otherwise. Only asked of `stateless_remap` targets (`userdm.dm.collapse`)."""
        return None

    def collapsed_read(self, offset: int, buf: memoryview) -> bool:
        """The read of a `remaps_reads` target on the collapsed path (`userdm.dm.collapse`):
        True once `buf` holds it, False if it is better done through the table (an error
        included: the table's path reports it)."""
        return False

    # ---- lifecycle hooks ----------------------------------------------------------------
    def presuspend(self) -> None: ...
    def postsuspend(self) -> None: ...
    def preresume(self) -> None: ...
    def resume(self) -> None: ...
    def destroy(self) -> None: ...


ZERO_EXTENT = STATUS_HOLE | STATUS_ZERO

_REGISTRY: dict[str, type[Target]] = {}


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make a target type available to tables under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def lookup(name: str) -> type[Target] | None:
    _load_builtin_targets()
    return _REGISTRY.get(name)


def registered() -> dict[str, type[Target]]:
    _load_builtin_targets()
    return dict(sorted(_REGISTRY.items()))


_loaded = False


#: the package whose modules register the built-in targets, loaded by name on first lookup as
#: the kernel's dm_get_target_type loads "dm-<name>" with request_module: the core knows
#: targets only through the registry, never by importing them
TARGETS_PACKAGE = "userdm.targets"


def _load_builtin_targets() -> None:
    global _loaded
    if not _loaded:
        # marked loaded only once the import is complete: a concurrent first table build waits
        # for it on the import lock instead of finding no targets
        importlib.import_module(TARGETS_PACKAGE)
        _loaded = True


def parse_sector(text: str, what: str) -> int:
    """Parse a decimal sector count as the kernel's `sscanf("%llu%c")` does."""
    if not text.isdigit() or not text.isascii():
        raise TargetError(what)
    value = int(text)
    if value >= 1 << 64:
        raise TargetError(what)
    return value
