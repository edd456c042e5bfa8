"""linear: map a range onto a range of another device (`dm-linear.c`).

Table: `<dev> <offset> [no_exclusive]`, offset in sectors. No INFO status; the table line
prints the device as MAJOR:MINOR (or its path/URL when it has no device number) and the
offset. userdm's `no_exclusive` (seed 000, never merged) opens the device without the
device-mapper's claim, so it may be mapped while someone else holds it exclusively, as
`create --shared` does for every device of a table.
"""

from __future__ import annotations

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register


@register
class LinearTarget(Target):
    name = "linear"
    version = (1, 5, 0)
    stateless_remap = True
    __slots__ = ("dev", "start", "no_exclusive", "_open", "_base")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) not in (2, 3):
            raise TargetError("Invalid argument count")
        if len(args) == 3 and args[2] != "no_exclusive":
            raise TargetError(f"Invalid optional argument {args[2]!r}: only no_exclusive is accepted")
        self.no_exclusive = len(args) == 3
        self.start = parse_sector(args[1], "Invalid device sector")
        self.dev = ctx.get_device(args[0], self.start, length, shared=self.no_exclusive)
        self._open = self.dev.open
        self._base = self.start * SECTOR
        if not self.no_exclusive:
            device = self.dev.open.device
            ctx.memo[(LinearTarget, args[0])] = (self.dev, device.size // SECTOR,
                                                 device.logical_block_size // SECTOR)

    @classmethod
    def quick(cls, ctx: TargetContext, begin: int, length: int, args: list[str]):
        """`<dev> <offset>` on a device an earlier line of this table opened: the same open
        (the table holds it once; the kernel's dm_get_device also shares one per table),
        checked against its size and block size here."""
        if len(args) != 2:
            return None
        known = ctx.memo.get((LinearTarget, args[0]))
        offset = args[1]
        if known is None or not (offset.isdigit() and offset.isascii()):
            return None
        dev, size, lbs = known
        start = int(offset)
        if start + length > size or start % lbs or length % lbs:
            return None
        self = cls.__new__(cls)
        self.begin = begin
        self.length = length
        self.no_exclusive = False
        self.start = start
        self.dev = dev
        self._open = dev.open
        self._base = start * SECTOR
        return self

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._open.readinto(self._base + offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._open.write(self._base + offset, data, fua)

    def discard(self, offset: int, length: int) -> None:
        self._open.discard(self._base + offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._open.write_zeroes(self._base + offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._open.block_status(self._base + offset, length)

    def table(self) -> str:
        return f"{self.dev.name} {self.start}" + (" no_exclusive" if self.no_exclusive else "")

    def devices(self):
        return [self.dev]

    def direct_map(self):
        return self.dev, self._base

    def passthrough(self):
        return self.dev, self._base
