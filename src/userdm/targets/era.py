"""era: linear to the origin, recording in which era each block was last written (`dm-era-target.c`).

Table: `<metadata dev> <origin dev> <block size>`, block size in sectors, > 0 and a multiple
of 8 (need not be a power of two). Both devices are opened read-write. The origin is mapped
as the kernel maps it: a device sector goes to the same origin sector. Era blocks count from
the start of the target (the kernel assumes the target starts at sector 0).

A write, discard or write-zeroes marks its blocks in the current era's writeset; the mark is
durable on the metadata device before the I/O reaches the origin. Eras roll over (archive
the writeset into the era array, start an empty one, era + 1) at every resume, at
`checkpoint` and at `take_metadata_snap`; suspend archives the writeset. The metadata format
is in `_era_metadata.py`.

Messages (exactly one word, any case): `checkpoint`, `take_metadata_snap` (EINVAL if one is
held), `drop_metadata_snap` (EINVAL if none). INFO status: `<metadata block size> <#used
metadata blocks>/<#total metadata blocks> <current era> <held metadata root | ->`, or
`Error`. Table: `<metadata dev> <origin dev> <block size>`.

`changed` (`Mapper.era_changed`) answers "which blocks were written since era E" (era >= E in the era array,
plus the current writeset when the current era >= E; E = 0 means every block), as runs of
era blocks and of device sectors: the data for incremental backups (`userdm era changed`).
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from ..block.device import SECTOR
from ..dm.target import RolesOverlap, Target, TargetContext, TargetError, register
from ..errors import DMError
from ._era_metadata import BLOCK_SECTORS, EraMetadata

MIN_BLOCK_SIZE = 8  # sectors


@register
class EraTarget(Target):
    name = "era"
    version = (1, 0, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) != 3:
            raise TargetError("Invalid argument count")
        if ctx.read_only:
            raise TargetError("Error opening metadata device: era writes its metadata, "
                              "so its table cannot be read-only")
        try:
            self.metadata_dev = ctx.get_device(args[0], 0, 0, role="metadata device")
        except TargetError as exc:
            raise TargetError(f"Error opening metadata device: {exc}") from None
        try:
            self.origin_dev = ctx.get_device(args[1], begin, length, role="origin device")
        except RolesOverlap:
            raise
        except TargetError as exc:
            raise TargetError(f"Error opening data device: {exc}") from None
        text = args[2]
        if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 32:
            raise TargetError(f"Error parsing block size: {text!r} is not a number of sectors")
        self.sectors_per_block = int(text)
        if self.sectors_per_block == 0 or self.sectors_per_block % MIN_BLOCK_SIZE:
            raise TargetError(f"Invalid block size: {text} sectors is not a positive multiple "
                              f"of {MIN_BLOCK_SIZE}")
        try:
            self.md = EraMetadata(self.metadata_dev.open, self.sectors_per_block)
        except DMError as exc:
            raise TargetError(f"Error reading metadata: {exc.message}", exc.errno) from None
        self.nr_blocks = -(-length // self.sectors_per_block)
        self._origin = self.origin_dev.open
        self._base = begin * SECTOR  # the origin sector is the device sector, as in the kernel
        self._block_bytes = self.sectors_per_block * SECTOR
        # marking writes hold the current era; an era change waits for them and holds new ones
        self._cond = threading.Condition()
        self._marking = 0
        self._rolling = False

    # ---- the data path -----------------------------------------------------------------------

    def _mark(self, offset: int, length: int) -> None:
        """Make the marks of the blocks of [offset, offset+length) in the current era durable
        (the kernel's era_map: the era of a write is the one in which it is mapped). Only the
        marking holds the era: waiting for the origin under it could deadlock a checkpoint
        with the resume of a suspended origin."""
        if not length:
            return
        with self._cond:
            while self._rolling:
                self._cond.wait()
            self._marking += 1
        try:
            first = offset // self._block_bytes
            self.md.mark(range(first, (offset + length - 1) // self._block_bytes + 1))
        finally:
            with self._cond:
                self._marking -= 1
                if not self._marking:
                    self._cond.notify_all()

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._origin.readinto(self._base + offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._mark(offset, len(data))
        self._origin.write(self._base + offset, data, fua)

    def discard(self, offset: int, length: int) -> None:
        self._mark(offset, length)
        self._origin.discard(self._base + offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._mark(offset, length)
        self._origin.write_zeroes(self._base + offset, length, may_unmap)

    def flush(self) -> None:
        self._origin.flush()  # the metadata is flushed by every commit and every new mark

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._origin.block_status(self._base + offset, length)

    def direct_map(self):  # noqa: ANN201 - (TableDevice, byte offset): failures map 1:1
        return self.origin_dev, self._base

    # ---- eras ----------------------------------------------------------------------------------

    def _exclusive(self, change: Any) -> None:  # noqa: ANN401 - a metadata method
        """Run an era change while no write is being marked, so each write has one era."""
        with self._cond:
            while self._rolling:
                self._cond.wait()
            self._rolling = True
            while self._marking:
                self._cond.wait()
        try:
            change()
        finally:
            with self._cond:
                self._rolling = False
                self._cond.notify_all()

    def postsuspend(self) -> None:
        try:
            self._exclusive(self.md.archive)
        except DMError:
            pass  # the kernel logs it; the writeset stays on disk and the next resume archives it

    def preresume(self) -> None:
        # Re-read: the table this one replaces may have committed since this one was loaded.
        self._exclusive(lambda: (self.md.load(), self.md.rollover(self.nr_blocks)))

    def message(self, args: list[str]) -> str | None:
        if len(args) != 1:
            raise DMError(errno.EINVAL, f"era messages take no arguments: {' '.join(args)!r}")
        word = args[0].lower()
        if word == "checkpoint":
            self._exclusive(self.md.rollover)
        elif word == "take_metadata_snap":
            self._exclusive(self.md.take_snapshot)
        elif word == "drop_metadata_snap":
            self._exclusive(self.md.drop_snapshot)
        else:
            raise DMError(errno.EINVAL, f"unsupported message {args[0]!r} (era accepts "
                          "checkpoint, take_metadata_snap, drop_metadata_snap)")
        return None

    # ---- reporting -------------------------------------------------------------------------------

    def status(self) -> str:
        try:
            used, total, era, snap = self.md.stats()
        except DMError:
            return "Error"
        return f"{BLOCK_SECTORS} {used}/{total} {era} {snap if snap else '-'}"

    def table(self) -> str:
        return f"{self.metadata_dev.name} {self.origin_dev.name} {self.sectors_per_block}"

    def devices(self):
        return [self.metadata_dev, self.origin_dev]

    tracks_changes = True

    def changed(self, since: int, *, metadata_snapshot: bool = False) -> list[dict[str, int]]:
        """Runs of blocks written in era `since` or later (see the module docstring)."""
        out = []
        for first, end in self.md.written_since(since, snapshot=metadata_snapshot):
            begin = first * self.sectors_per_block
            stop = min(end * self.sectors_per_block, self.length)
            out.append({"begin": self.begin + begin, "length": stop - begin,
                        "block_begin": first, "block_end": end})
        return out
