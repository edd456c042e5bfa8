"""The block layer's device and open model: sizes, I/O methods, opens, claims and holders.

A `BlockDevice` is anything with a size and byte-addressed I/O (files, block device nodes,
memory, remote NBD exports, mapped devices). Nothing uses a device directly: every user
opens it (`BlockDevice.open`) and does I/O through the returned `BlockOpen`, which checks
the open mode and the bounds. Exclusive claims follow the kernel's `bd_may_claim` rules: a
device has at most one holder; the same holder may claim again (nested, counted); any other
holder gets EBUSY; non-exclusive opens are never blocked by claims.

Holder ops and failures (DESIGN §6; the walk itself is in `userdm.block.failure`): an exclusive
open may register `HolderOps`, one registration per device (another one is EBUSY).
`notify_failure(offset, length, flags)` reports a failed byte range: the holder's
`notify_failure` is called, then every device stacked on this one (the users in `holder_links`)
translates the range with its `failure_below` and reports its own ranges, up to the top; EOPNOTSUPP
if no holder took it. `mark_dead(surprise)` makes the device refuse opens (ENXIO) and fail I/O
(EIO), calls the holder's `mark_dead`, and kills every stacked device whose `dies_with` says so.
A device stacked on others (a mapped device, a partition) links itself with `link_holder` and
overrides `failure_below` and `dies_with`; that is the whole contract.

`block_status` extents use NBD's flag bits (1 = hole, 2 = reads as zeroes), so that the
exports can pass them through unchanged.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DMError
from . import failure

STATUS_HOLE = 1
STATUS_ZERO = 2

SECTOR = 512

#: One zero-filled buffer shared by every default `write_zeroes`.
_ZEROES = bytes(1 << 20)


@dataclass
class HolderOps:
    """Callbacks a holder registers with its exclusive open (the kernel's `blk_holder_ops`)."""

    mark_dead: Callable[[bool], None] | None = None
    sync: Callable[[], None] | None = None
    freeze: Callable[[], None] | None = None
    thaw: Callable[[], None] | None = None
    notify_failure: Callable[[int, int, int], None] | None = None


class BlockDevice:
    """Base class of every device. Subclasses implement the `_`-less I/O methods.

    I/O methods take byte offsets that the caller (`BlockOpen`) has already checked to lie
    inside the device. They raise `DMError` (EIO, ENOSPC ...) on failure.
    """

    #: what `table` prints for this device when a table references it
    ref: str
    #: the whole disk, if this device is one of its partitions (see `_claim_for_partition`)
    whole: "BlockDevice | None" = None

    def __init__(self, ref: str, size: int, logical_block_size: int = SECTOR,
                 read_only: bool = False) -> None:
        if logical_block_size not in (512, 4096):
            raise DMError(errno.EINVAL, f"{ref}: logical block size {logical_block_size} is not 512 or 4096")
        self.ref = ref
        self.size = size
        self.logical_block_size = logical_block_size
        self.read_only = read_only
        self._opens_lock = threading.Lock()
        #: the open handles, in no particular order: each knows its place (`BlockOpen.slot`) and a
        #: close moves the last one there, so a close costs the same however many opens there
        #: are (one file under 10,000 linear devices has 10,000; a list's remove scanned them,
        #: and a dict would rehash a million handles at a time for a 1M-segment table)
        self.opens: list[BlockOpen] = []
        self.holder: object | None = None
        self.holder_count = 0
        self.holder_ops: HolderOps | None = None
        #: sysfs-like holders/ graph: the mapped devices whose tables use this device -> count
        self.holder_links: dict[object, int] = {}
        self._last_close_hooks: list[Callable[[BlockDevice], None]] = []
        self._open_change_hooks: list[Callable[[BlockDevice], None]] = []
        #: set by `mark_dead`: opens fail with ENXIO and I/O with EIO from then on
        self.dead = False
        #: told about every `failure` and `dead` event record that reaches this device
        self.event_observer: Callable[[dict[str, Any]], None] | None = None

    # ---- identity ------------------------------------------------------------------

    @property
    def devno(self) -> tuple[int, int] | None:
        """(major, minor) for devices that have one (block nodes, mapped devices)."""
        return None

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    # ---- I/O, implemented by subclasses --------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        """Default: discard is a hint; doing nothing is correct."""

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZEROES))
            self.write(offset, memoryview(_ZEROES)[:n])
            offset += n

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents `(length, flags)` covering at least the first byte of the range."""
        return [(length, 0)]

    def close_backing(self) -> None:
        """Called when the last open closes and nobody caches the device any more."""

    def refresh_size(self) -> None:
        """Take the size the backing store has now (a file or an RBD image grown or shrunk
        behind the device's back), as the kernel reads a disk's capacity when a table is
        swapped in: `TargetContext.check_areas` asks at every resume. Devices whose size
        cannot change under them (a mapped device, an NBD export) keep it."""

    # ---- opens and claims ----------------------------------------------------------

    def check_open(self, write: bool) -> None:
        """Hook for subclasses to refuse opens (a mapped device being removed: ENXIO)."""

    def open(self, *, write: bool = False, holder: object | None = None,
             holder_ops: HolderOps | None = None) -> "BlockOpen":
        """Open the device; with `holder`, claim it exclusively (kernel `bdev_open`)."""
        if write and self.read_only:
            raise DMError(errno.EACCES, f"{self.ref} is read-only and cannot be opened for writing")
        if holder_ops is not None and holder is None:
            raise DMError(errno.EINVAL, f"{self.ref}: holder operations need an exclusive open (a holder)")
        with self._opens_lock:
            if self.dead:
                raise DMError(errno.ENXIO, f"{self.ref} is dead (gone or marked dead) and cannot be opened")
            self.check_open(write)
            if holder is not None:
                if self.holder is not None and self.holder is not holder:
                    raise DMError(errno.EBUSY, f"{self.ref} is claimed exclusively by {describe_holder(self.holder)}")
                if self.holder is holder and holder_ops is not None and self.holder_ops is not None \
                        and holder_ops is not self.holder_ops:
                    raise DMError(errno.EBUSY, f"{self.ref} already has holder operations registered")
                if self.whole is not None:
                    self.whole._claim_for_partition(self)
                self.holder = holder
                self.holder_count += 1
                if holder_ops is not None:
                    self.holder_ops = holder_ops
            handle = BlockOpen(self, write, holder)
            handle.slot = len(self.opens)
            self.opens.append(handle)
        self.opened(handle)
        for hook in list(self._open_change_hooks):
            hook(self)
        return handle

    def drop_holder_ops(self, ops: HolderOps) -> None:
        """End the registration of `ops` (its holder is gone), if they are this device's."""
        with self._opens_lock:
            if self.holder_ops is ops:
                self.holder_ops = None

    def _claim_for_partition(self, partition: "BlockDevice") -> None:
        """bd_may_claim/bd_finish_claiming for a partition of this whole disk: refused while
        anyone holds the whole disk; otherwise the whole disk is held by the PARTITION_CLAIM
        sentinel, which no real holder is, so nobody can claim the whole disk meanwhile."""
        with self._opens_lock:
            if self.holder is not None and self.holder is not PARTITION_CLAIM:
                raise DMError(errno.EBUSY, f"{partition.ref} cannot be claimed: its whole disk {self.ref} "
                              f"is claimed exclusively by {describe_holder(self.holder)}")
            self.holder = PARTITION_CLAIM
            self.holder_count += 1

    def _end_partition_claim(self) -> None:
        with self._opens_lock:
            self.holder_count -= 1
            if self.holder_count == 0:
                self.holder = None

    def opened(self, handle: "BlockOpen") -> None:
        """Hook: an open succeeded (mapped devices count it)."""

    def _close(self, handle: "BlockOpen") -> None:
        with self._opens_lock:
            slot = handle.slot
            if not 0 <= slot < len(self.opens) or self.opens[slot] is not handle:
                return   # closed already (by two threads at once)
            moved = self.opens.pop()
            if moved is not handle:
                self.opens[slot] = moved
                moved.slot = slot
            handle.slot = -1
            if handle.holder is not None:
                self.holder_count -= 1
                if self.holder_count == 0:
                    self.holder = None
                    self.holder_ops = None
                if self.whole is not None:
                    self.whole._end_partition_claim()
            last = not self.opens
            hooks = list(self._last_close_hooks) if last else []
        self.closed(handle)
        for hook in [*self._open_change_hooks, *hooks]:
            hook(self)

    def closed(self, handle: "BlockOpen") -> None:
        """Hook: an open was closed."""

    @property
    def open_count(self) -> int:
        return len(self.opens)

    def on_last_close(self, hook: Callable[["BlockDevice"], None]) -> None:
        self._last_close_hooks.append(hook)

    def on_open_change(self, hook: Callable[["BlockDevice"], None]) -> None:
        """Call `hook(device)` after every open and close (once, however often it is given)."""
        if hook not in self._open_change_hooks:
            self._open_change_hooks.append(hook)

    # ---- failures and death (userdm.block.failure) ---------------------------------

    def notify_failure(self, offset: int, length: int, flags: int = 0, *,
                       path: tuple[str, ...] = ()) -> list[failure.Delivery]:
        """Report the failed byte range [offset, offset+length) to the holder and up the stack.

        Returns one `Delivery` per device reached; EOPNOTSUPP if no holder took it, ENXIO if
        this device is dead, EINVAL if the range is not inside the device."""
        return failure.notify(self, offset, length, flags, path)

    def mark_dead(self, surprise: bool = True, *, path: tuple[str, ...] = ()) -> list[str]:
        """The device is gone: refuse opens and I/O from now on, tell the holder and the devices
        stacked on it. Returns the names of the devices that died (none if already dead)."""
        return failure.mark_dead(self, surprise, path)

    def failure_below(self, lower: "BlockDevice", offset: int, length: int) -> list[tuple[int, int]]:
        """For a device stacked on `lower`: its own byte ranges `(offset, length)` that map onto the
        failed range [offset, offset+length) of `lower`. A plain device maps nothing."""
        return []

    def dies_with(self, lower: "BlockDevice") -> bool:
        """For a device stacked on `lower`: whether it dies when `lower` dies."""
        return False

    # ---- holders/slaves graph ------------------------------------------------------

    def link_holder(self, user: object) -> None:
        with self._opens_lock:
            self.holder_links[user] = self.holder_links.get(user, 0) + 1

    def unlink_holder(self, user: object) -> None:
        with self._opens_lock:
            n = self.holder_links.get(user, 0) - 1
            if n <= 0:
                self.holder_links.pop(user, None)
            else:
                self.holder_links[user] = n


class _PartitionClaim:
    """The holder of a whole disk while partitions of it are claimed (the kernel's
    `whole->bd_holder = bd_may_claim`)."""

    holder_name = "the holder of one of its partitions"

    def __repr__(self) -> str:
        return self.holder_name


PARTITION_CLAIM = _PartitionClaim()


def describe_holder(holder: object) -> str:
    return holder if isinstance(holder, str) else getattr(holder, "holder_name", repr(holder))


@dataclass(eq=False)
class BlockOpen:
    """One open of a device. All I/O goes through it; `close()` ends it (idempotent)."""

    device: BlockDevice
    write_mode: bool
    holder: object | None
    closed: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: a table's open of an underlying device: its read errors become failures (block/failure.py)
    reports_failures: bool = False
    #: its index in `device.opens` while it is open
    slot: int = field(default=-1, repr=False)

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def read_only(self) -> bool:
        return not self.write_mode or self.device.read_only

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self.closed:
            raise DMError(errno.EBADF, f"{self.device.ref}: I/O on a closed open")
        if self.device.dead:
            raise DMError(errno.EIO, f"{self.device.ref} is dead (gone or marked dead)")
        if write and not self.write_mode:
            raise DMError(errno.EPERM, f"{self.device.ref} is open read-only")
        if offset < 0 or length < 0 or offset + length > self.device.size:
            raise DMError(errno.ENOSPC if write else errno.EINVAL,
                          f"{self.device.ref}: I/O at byte {offset} length {length} "
                          f"is beyond the end of the device ({self.device.size} bytes)")

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        buf = memoryview(buf)
        self._check(offset, len(buf), False)
        try:
            self.device.readinto(offset, buf)
        except DMError as exc:
            if self.reports_failures:
                failure.read_failed(self.device, offset, len(buf), exc)
            raise

    def splice_into(self, offset: int, length: int, pipe: int) -> bool:
        """Move the bytes into a pipe by reference, if the device can (see
        `MappedDevice.splice_into`); False: read them instead (drain the pipe first)."""
        self._check(offset, length, False)
        splice = getattr(self.device, "splice_into", None)
        return splice is not None and splice(offset, length, pipe)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: memoryview | bytes | bytearray, fua: bool = False) -> None:
        self._check(offset, len(data), True)
        self.device.write(offset, data, fua)

    def flush(self) -> None:
        self._check(0, 0, False)
        self.device.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        self.device.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._check(offset, length, True)
        self.device.write_zeroes(offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length, False)
        return self.device.block_status(offset, length)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.device._close(self)

    def __enter__(self) -> "BlockOpen":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring extents with equal flags."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out
