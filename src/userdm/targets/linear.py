"""linear: map a range onto a range of another device (`dm-linear.c`).

Table: `<dev> <offset>`, offset in sectors. No INFO status; the table line prints the
device as MAJOR:MINOR (or its path/URL when it has no device number) and the offset.
"""

from __future__ import annotations

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register


@register
class LinearTarget(Target):
    name = "linear"
    version = (1, 5, 0)
    __slots__ = ("dev", "start", "_open", "_base")

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) != 2:
            raise TargetError("Invalid argument count")
        self.start = parse_sector(args[1], "Invalid device sector")
        self.dev = ctx.get_device(args[0], self.start, length)
        self._open = self.dev.open
        self._base = self.start * SECTOR

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
        return f"{self.dev.name} {self.start}"

    def devices(self):
        return [self.dev]
