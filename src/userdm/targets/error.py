"""error: every read and write fails with EIO (`dm-target.c`'s io_err). Takes no arguments.

It is a wildcard target: it may replace any table, which is how `remove --force` and
`wipe_table` release a device's underlying devices while it is still open.
"""

from __future__ import annotations

import errno

from ..dm.target import Target, TargetContext, TargetError, register
from ..errors import DMError


@register
class ErrorTarget(Target):
    name = "error"
    version = (1, 7, 0)
    wildcard = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if args:
            raise TargetError("Invalid argument count: error takes no arguments")

    def _fail(self, offset: int) -> None:
        raise DMError(errno.EIO, f"I/O error: sector {self.begin + offset // 512} is mapped to the error target")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._fail(offset)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._fail(offset)

    def discard(self, offset: int, length: int) -> None:
        self._fail(offset)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._fail(offset)

    def flush(self) -> None:
        pass  # the kernel sends no flush to an error target
