"""flakey: a linear mapping that is unreliable periodically (`dm-flakey.c`).

Table: `<dev> <offset> <up interval> <down interval> [<num_features> [<feature arguments>]]`,
offset in sectors, intervals in whole seconds counted from the table load: the device works
for <up> seconds, then misbehaves for <down> seconds, and so on. Features (case-insensitive):
`error_reads`, `drop_writes`, `error_writes` (drop_writes and error_writes exclude each other),
`corrupt_bio_byte <Nth_byte> <r|w> <value> <flags>` (Nth byte counted from 1, value 0-255,
applied only to requests whose `bi_opf` has all of `flags`), `random_read_corrupt <p>` and
`random_write_corrupt <p>` (probability p out of 1000000000 that one random byte of a request
gets a random value). Without features, every read and write fails with EIO while down.

While down, writes cover discards, write-zeroes and flushes too (a flush is an empty write
bio with REQ_PREFLUSH in the kernel), so drop_writes drops them and error_writes fails them.
A request's `bi_opf` is REQ_OP_READ (0) for reads and REQ_OP_WRITE (1), plus REQ_FUA for FUA
writes; write corruption goes to a copy, never into the caller's buffer.

No INFO status; table: `<dev> <offset> <up> <down> <#features> <features...>`, as the kernel
prints it (so a table without features shows `2 error_reads error_writes`).
The time source is the `clock` attribute (seconds, monotonic), so tests can drive it.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register
from ..errors import DMError

PROBABILITY_BASE = 1_000_000_000
UINT_MAX = (1 << 32) - 1
MAX_FEATURE_ARGS = 11

REQ_OP_READ = 0
REQ_OP_WRITE = 1
REQ_FUA = 1 << 17  # __REQ_FUA in include/linux/blk_types.h (REQ_OP_BITS = 8)


def read_arg(text: str | None, low: int, high: int, error: str) -> int:
    """The kernel's `dm_read_arg`: an unsigned decimal within [low, high], else `error`."""
    if text is None or not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise TargetError(error)
    return int(text)


@register
class FlakeyTarget(Target):
    name = "flakey"
    version = (1, 5, 0)
    #: seconds on a monotonic clock; replace (on the class or an instance) to drive the intervals
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        self.start_time = self.clock()
        self.start = parse_sector(args[1], "Invalid device sector")
        self.up_interval = read_arg(args[2], 0, UINT_MAX, "Invalid up interval")
        self.down_interval = read_arg(args[3], 0, UINT_MAX, "Invalid down interval")
        total = (self.up_interval + self.down_interval) & UINT_MAX  # unsigned int arithmetic
        if not total:
            raise TargetError("Total (up + down) interval is zero")
        if total < self.up_interval:
            raise TargetError("Interval overflow")
        self.error_reads = self.drop_writes = self.error_writes = False
        self.corrupt_bio_byte = 0
        self.corrupt_bio_rw = REQ_OP_READ
        self.corrupt_bio_value = 0
        self.corrupt_bio_flags = 0
        self.random_read_corrupt = 0
        self.random_write_corrupt = 0
        self._parse_features(args[4:])
        self.dev = ctx.get_device(args[0], self.start, length)
        self._open = self.dev.open
        self._base = self.start * SECTOR
        #: the source of random corruption; replace with a seeded `random.Random` for tests
        self.random = random.Random()

    def _parse_features(self, args: list[str]) -> None:
        if not args:
            self.error_reads = self.error_writes = True
            return
        count = read_arg(args[0], 0, MAX_FEATURE_ARGS, "Invalid number of feature args")
        if count > len(args) - 1:
            raise TargetError("Invalid number of feature args")
        words = iter(args[1:1 + count])
        left = count
        for word in words:
            left -= 1
            feature = word.lower()
            if feature in ("error_reads", "drop_writes", "error_writes"):
                if getattr(self, feature):
                    raise TargetError(f"Feature {feature} duplicated")
                if feature == "drop_writes" and self.error_writes:
                    raise TargetError("Feature drop_writes conflicts with feature error_writes")
                if feature == "error_writes" and self.drop_writes:
                    raise TargetError("Feature error_writes conflicts with feature drop_writes")
                setattr(self, feature, True)
            elif feature == "corrupt_bio_byte":
                if self.corrupt_bio_byte:
                    raise TargetError("Feature corrupt_bio_byte duplicated")
                if left < 4:
                    raise TargetError("Feature corrupt_bio_byte requires 4 parameters")
                self.corrupt_bio_byte = read_arg(next(words), 1, UINT_MAX, "Invalid corrupt bio byte")
                direction = next(words).lower()
                if direction not in ("r", "w"):
                    raise TargetError("Invalid corrupt bio direction (r or w)")
                self.corrupt_bio_rw = REQ_OP_WRITE if direction == "w" else REQ_OP_READ
                self.corrupt_bio_value = read_arg(next(words), 0, 255,
                                                  "Invalid corrupt value to write into bio byte (0-255)")
                self.corrupt_bio_flags = read_arg(next(words), 0, UINT_MAX, "Invalid corrupt bio flags mask")
                left -= 4
            elif feature in ("random_read_corrupt", "random_write_corrupt"):
                if getattr(self, feature):
                    raise TargetError(f"Feature {feature} duplicated")
                if not left:
                    raise TargetError(f"Feature {feature} requires a parameter")
                setattr(self, feature, read_arg(next(words), 0, PROBABILITY_BASE,
                                                "Invalid random corrupt argument"))
                left -= 1
            else:
                raise TargetError("Unrecognised flakey feature requested")
        corrupts_writes = (self.corrupt_bio_byte and self.corrupt_bio_rw == REQ_OP_WRITE) \
            or self.random_write_corrupt
        corrupts_reads = (self.corrupt_bio_byte and self.corrupt_bio_rw == REQ_OP_READ) \
            or self.random_read_corrupt
        if self.drop_writes and corrupts_writes:
            raise TargetError("drop_writes is incompatible with random_write_corrupt or "
                              "corrupt_bio_byte with the WRITE flag set")
        if self.error_writes and corrupts_writes:
            raise TargetError("error_writes is incompatible with random_write_corrupt or "
                              "corrupt_bio_byte with the WRITE flag set")
        if self.error_reads and corrupts_reads:
            raise TargetError("error_reads is incompatible with random_read_corrupt or "
                              "corrupt_bio_byte with the READ flag set")
        if not (self.corrupt_bio_byte or self.error_reads or self.drop_writes or self.error_writes
                or self.random_read_corrupt or self.random_write_corrupt):
            self.error_reads = self.error_writes = True

    # ---- the up/down cycle ----------------------------------------------------------------

    def is_down(self) -> bool:
        """Whether the device misbehaves now (whole seconds since the load, as jiffies / HZ)."""
        elapsed = int((self.clock() - self.start_time) // 1)
        return elapsed % (self.up_interval + self.down_interval) >= self.up_interval

    def _error(self, what: str, offset: int) -> DMError:
        return DMError(errno.EIO, f"I/O error: {what} at sector {self.begin + offset // SECTOR} "
                       "failed: the flakey target is in its down interval")

    def _down_write(self, what: str, offset: int) -> bool:
        """Apply drop_writes/error_writes to a write while down; True if it was dropped."""
        if self.drop_writes:
            return True
        if self.error_writes:
            raise self._error(what, offset)
        return False

    # ---- corruption ------------------------------------------------------------------------

    def _chance(self, probability: int) -> bool:
        return probability > 0 and self.random.getrandbits(64) % PROBABILITY_BASE < probability

    def _corrupt(self, buf: memoryview | bytearray, rw: int, bi_opf: int) -> None:
        """Overwrite the Nth byte (if the request matches) and maybe a random byte."""
        if self.corrupt_bio_byte and self.corrupt_bio_rw == rw \
                and bi_opf & self.corrupt_bio_flags == self.corrupt_bio_flags \
                and self.corrupt_bio_byte <= len(buf):
            buf[self.corrupt_bio_byte - 1] = self.corrupt_bio_value
        if len(buf) and self._chance(self.random_read_corrupt if rw == REQ_OP_READ else self.random_write_corrupt):
            buf[self.random.getrandbits(32) % len(buf)] = self.random.getrandbits(8)

    def _corrupts(self, rw: int) -> bool:
        return bool(self.corrupt_bio_byte and self.corrupt_bio_rw == rw) or bool(
            self.random_read_corrupt if rw == REQ_OP_READ else self.random_write_corrupt)

    # ---- the data path --------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        if not self.is_down():
            self._open.readinto(self._base + offset, buf)
            return
        if self.error_reads:
            raise self._error("read", offset)
        self._open.readinto(self._base + offset, buf)
        if self._corrupts(REQ_OP_READ):
            self._corrupt(buf, REQ_OP_READ, REQ_OP_READ)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.is_down():
            if self._down_write("write", offset):
                return
            if self._corrupts(REQ_OP_WRITE):
                copy = bytearray(data)
                self._corrupt(copy, REQ_OP_WRITE, REQ_OP_WRITE | (REQ_FUA if fua else 0))
                data = memoryview(copy)
        self._open.write(self._base + offset, data, fua)

    def discard(self, offset: int, length: int) -> None:
        if self.is_down() and self._down_write("discard", offset):
            return
        self._open.discard(self._base + offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if self.is_down() and self._down_write("write zeroes", offset):
            return
        self._open.write_zeroes(self._base + offset, length, may_unmap)

    def flush(self) -> None:
        if self.is_down() and self._down_write("flush", 0):
            return
        self._open.flush()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._open.block_status(self._base + offset, length)

    # ---- reporting ------------------------------------------------------------------------

    def table(self) -> str:
        features = []
        if self.error_reads:
            features.append("error_reads")
        if self.drop_writes:
            features.append("drop_writes")
        elif self.error_writes:
            features.append("error_writes")
        if self.corrupt_bio_byte:
            rw = "w" if self.corrupt_bio_rw == REQ_OP_WRITE else "r"
            features.append(f"corrupt_bio_byte {self.corrupt_bio_byte} {rw} "
                            f"{self.corrupt_bio_value} {self.corrupt_bio_flags}")
        if self.random_read_corrupt:
            features.append(f"random_read_corrupt {self.random_read_corrupt}")
        if self.random_write_corrupt:
            features.append(f"random_write_corrupt {self.random_write_corrupt}")
        count = (self.error_reads + self.drop_writes + self.error_writes + 5 * bool(self.corrupt_bio_byte)
                 + 2 * bool(self.random_read_corrupt) + 2 * bool(self.random_write_corrupt))
        return " ".join([self.dev.name, str(self.start), str(self.up_interval), str(self.down_interval),
                         str(count), *features])

    def devices(self):
        return [self.dev]

    def direct_map(self):
        """One-to-one onto the device from the offset on (failure notification)."""
        return self.dev, self._base
