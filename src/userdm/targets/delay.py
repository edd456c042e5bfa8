"""delay: hold reads, writes and flushes for a while, optionally on other devices (`dm-delay.c`).

Table: `<device> <offset> <delay> [<write_device> <write_offset> <write_delay>
[<flush_device> <flush_offset> <flush_delay>]]` (exactly 3, 6 or 9 arguments), offsets in
sectors, delays in milliseconds. With 3 arguments reads, writes and flushes use the one
device; with 6 the second group serves writes and flushes; with 9 the third serves flushes.
Writes include discards and write-zeroes; a flush is the flush of the flush device.

Each request waits in the thread that submitted it (the exports run I/O in worker threads, so
other requests and other devices go on), then goes to its device. As in the kernel, presuspend
stops delaying and releases every held request at once, so a suspend drains promptly and
nothing waits for a delay while the device is suspended; resume delays again.
INFO status: `<reads held> <writes held> <flushes held>`; table: the read group, then the write
group if there were 6 or 9 arguments, then the flush group if there were 9.
"""

from __future__ import annotations

import threading
import time

from ..block.device import SECTOR
from ..block.failure import clip, merge_ranges
from ..dm.target import TableDevice, Target, TargetContext, TargetError, parse_sector, register

UINT_MAX = (1 << 32) - 1


class DelayClass:
    """One group of the table: a device, an offset on it, a delay, and how many wait now."""

    __slots__ = ("dev", "start", "delay", "ops", "base")

    def __init__(self, ctx: TargetContext, length: int, args: list[str]) -> None:
        self.start = parse_sector(args[1], "Invalid device sector")
        text = args[2]
        if not (text.isascii() and text.isdigit()) or int(text) > UINT_MAX:
            raise TargetError("Invalid delay")
        self.delay = int(text)
        # one role for every group: reads, writes and flushes may well use the same region
        self.dev: TableDevice = ctx.get_device(args[0], self.start, length, role="delayed device")
        self.base = self.start * SECTOR
        self.ops = 0

    def __str__(self) -> str:
        return f"{self.dev.name} {self.start} {self.delay}"


@register
class DelayTarget(Target):
    name = "delay"
    version = (1, 5, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) not in (3, 6, 9):
            raise TargetError("Requires exactly 3, 6 or 9 arguments")
        self.argc = len(args)
        self.reads = DelayClass(ctx, length, args[0:3])
        self.writes = DelayClass(ctx, length, args[0:3] if self.argc == 3 else args[3:6])
        self.flushes = DelayClass(ctx, length, args[6:9] if self.argc == 9 else
                                  args[0:3] if self.argc == 3 else args[3:6])
        self._cond = threading.Condition()
        self._may_delay = True

    def _hold(self, group: DelayClass) -> None:
        """Wait out the group's delay, unless (or until) a suspend stops delaying."""
        if not group.delay:
            return
        deadline = time.monotonic() + group.delay / 1000
        with self._cond:
            if not self._may_delay:
                return
            group.ops += 1
            try:
                while self._may_delay:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                group.ops -= 1

    def _release_all(self, may_delay: bool) -> None:
        with self._cond:
            self._may_delay = may_delay
            self._cond.notify_all()

    # ---- the data path ------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._hold(self.reads)
        self.reads.dev.open.readinto(self.reads.base + offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._hold(self.writes)
        self.writes.dev.open.write(self.writes.base + offset, data, fua)

    def discard(self, offset: int, length: int) -> None:
        self._hold(self.writes)
        self.writes.dev.open.discard(self.writes.base + offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._hold(self.writes)
        self.writes.dev.open.write_zeroes(self.writes.base + offset, length, may_unmap)

    def flush(self) -> None:
        self._hold(self.flushes)
        self.flushes.dev.open.flush()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.reads.dev.open.block_status(self.reads.base + offset, length)

    # ---- lifecycle ----------------------------------------------------------------------

    def presuspend(self) -> None:
        self._release_all(False)

    def resume(self) -> None:
        self._release_all(True)

    def destroy(self) -> None:
        self._release_all(False)

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> str:
        with self._cond:
            return f"{self.reads.ops} {self.writes.ops} {self.flushes.ops}"

    def table(self) -> str:
        groups = [self.reads] + ([self.writes] if self.argc >= 6 else []) + \
            ([self.flushes] if self.argc == 9 else [])
        return " ".join(str(g) for g in groups)

    def failure(self, dev, offset: int, length: int) -> list[tuple[int, int]]:
        """Data is read from the read group's device and written to the write group's."""
        size = self.length * SECTOR
        return merge_ranges(piece for group in {id(g): g for g in (self.reads, self.writes)}.values()
                            if group.dev.device is dev for piece in clip(offset, length, group.base, size))

    def devices(self):
        unique: dict[int, TableDevice] = {}
        for group in (self.reads, self.writes, self.flushes):
            unique.setdefault(id(group.dev.open), group.dev)
        return list(unique.values())

    def direct_map(self):
        """One-to-one onto one device only when reads, writes and flushes all go to the same place."""
        places = {(id(g.dev.open), g.base) for g in (self.reads, self.writes, self.flushes)}
        return (self.reads.dev, self.reads.base) if len(places) == 1 else None
