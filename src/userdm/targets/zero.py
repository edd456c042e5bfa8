"""zero: reads return zeroes, writes are discarded (`dm-zero.c`). Takes no arguments."""

from __future__ import annotations

from ..dm.target import ZERO_EXTENT, Target, TargetContext, TargetError, register


@register
class ZeroTarget(Target):
    name = "zero"
    version = (1, 2, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if args:
            raise TargetError("No arguments required")

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, ZERO_EXTENT)]
