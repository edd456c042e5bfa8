"""error: every read and write fails with EIO (`dm-target.c`'s io_err).

No arguments, or (Linux 6.10+, error 1.7) exactly two, `<device> <offset>` as linear takes
them: the device is opened and held (so it shows in `deps`) for the limits of a zoned device
the error target replaces; I/O still fails. Any other number of arguments is ignored, as the
kernel's constructor ignores them. The table line is empty either way.

It is a wildcard target: it may replace any table, which is how `remove --force` and
`wipe_table` release a device's underlying devices while it is still open.
"""

from __future__ import annotations

import errno

from ..dm.target import Target, TargetContext, parse_sector, register
from ..errors import DMError


@register
class ErrorTarget(Target):
    name = "error"
    version = (1, 7, 0)
    wildcard = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) == 2:   # io_err_get_args: the sector is checked before the device is looked up
            start = parse_sector(args[1], "Invalid device sector")
            ctx.get_device(args[0], start, length)

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
