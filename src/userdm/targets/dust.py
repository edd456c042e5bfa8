"""dust: a linear mapping with emulated bad blocks (`dm-dust.c`).

Table: `<device_path> <offset> <blksz>`, offset in sectors, block size in bytes (a power of two,
at least 512, at most 1 GiB and not larger than the target). Block numbers count from the start
of the underlying device (the offset is part of them), as the kernel computes them; I/O is cut
at every block boundary of the target, like the kernel's `max_io_len`.

Bad blocks only matter while the target is enabled (status `fail_read_on_bad_block`; a new
table starts in `bypass`): a read of a bad block fails with EIO; a write to a bad block
removes it from the list and succeeds, unless the block was added with a write fail count,
which makes that many writes fail with EIO first.

Messages (case-insensitive), with the kernel's result strings and refusals (all EINVAL):
`addbadblock <blk> [<write fail count 0-255>]`, `removebadblock <blk>`,
`queryblock <blk>` -> `dust_query_block: block <blk> [not ]found in badblocklist`,
`countbadblocks` -> `countbadblocks: <n> badblock(s) found`,
`clearbadblocks` -> `dust_clear_badblocks: badblocks cleared` (or `no badblocks found`),
`listbadblocks` -> one block per line (or `No blocks in badblocklist`),
`enable`, `disable`, `quiet` (toggles logging of adds, removes and remaps).
INFO status: `<dev> bypass|fail_read_on_bad_block verbose|quiet`; table: `<dev> <offset> <blksz>`.
"""

from __future__ import annotations

import errno
import logging
import threading

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register
from ..errors import DMError

log = logging.getLogger("userdm.targets.dust")

MAX_BLOCK_SECTORS = 2097152  # DUST_MAX_BLKSZ_SECTORS: 1 GiB


@register
class DustTarget(Target):
    name = "dust"
    version = (1, 0, 0)

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) != 3:
            raise TargetError("Invalid argument count")
        text = args[2]
        if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 1 << 32:
            raise TargetError("Invalid block size parameter")
        blksz = int(text)
        if blksz < 512:
            raise TargetError("Block size must be at least 512")
        if blksz & (blksz - 1):
            raise TargetError("Block size must be a power of 2")
        if blksz // SECTOR > min(length, MAX_BLOCK_SECTORS):
            raise TargetError("Block size is too large")
        self.start = parse_sector(args[1], "Invalid device offset sector")
        self.dev = ctx.get_device(args[0], self.start, length)
        self._open = self.dev.open
        self._base = self.start * SECTOR
        self.blksz = blksz
        self.sect_per_block = blksz // SECTOR
        #: bad block -> how many more writes to it fail before a write remaps it
        self.badblocks: dict[int, int] = {}
        self.fail_read_on_bb = False
        self.quiet = False
        self._lock = threading.Lock()

    # ---- the data path ------------------------------------------------------------------

    def _pieces(self, offset: int, length: int):
        """(block, position in request, length) for each block-sized piece of the request.

        The kernel splits a bio at block boundaries of the target and checks the block of each
        piece's first sector on the underlying device."""
        pos = 0
        while pos < length:
            n = min(length - pos, self.blksz - (offset + pos) % self.blksz)
            yield (self.start + (offset + pos) // SECTOR) // self.sect_per_block, pos, n
            pos += n

    def _check_read(self, offset: int, length: int) -> None:
        if not self.fail_read_on_bb or not self.badblocks:
            return
        with self._lock:
            bad = [(block, offset + pos, n) for block, pos, n in self._pieces(offset, length)
                   if block in self.badblocks]
        if bad:
            raise self.read_error([(off, n) for _block, off, n in bad],
                                  f"I/O error: read of bad block {bad[0][0]} "
                                  f"(sector {self.begin + offset // SECTOR} of the dust target)")

    def _writable_runs(self, offset: int, length: int) -> tuple[list[tuple[int, int]], int | None]:
        """The write path's bad block handling: runs (position, length) that go to the device,
        and the first block whose write fails (a bad block with a write fail count left)."""
        if not self.fail_read_on_bb or not self.badblocks:
            return [(0, length)], None
        runs: list[tuple[int, int]] = []
        failed = None
        with self._lock:
            for block, pos, n in self._pieces(offset, length):
                fails = self.badblocks.get(block)
                if fails:
                    self.badblocks[block] = fails - 1
                    failed = block if failed is None else failed
                    continue
                if fails is not None:
                    del self.badblocks[block]
                    if not self.quiet:
                        log.info("block %d removed from badblocklist by write", block)
                if runs and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((pos, n))
        return runs, failed

    def _write_failed(self, block: int) -> DMError:
        return DMError(errno.EIO, f"I/O error: write to bad block {block} failed (write fail count)")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_read(offset, len(buf))
        self._open.readinto(self._base + offset, buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        runs, failed = self._writable_runs(offset, len(data))
        for pos, n in runs:
            self._open.write(self._base + offset + pos, data[pos:pos + n], fua)
        if failed is not None:
            raise self._write_failed(failed)

    def discard(self, offset: int, length: int) -> None:
        runs, failed = self._writable_runs(offset, length)
        for pos, n in runs:
            self._open.discard(self._base + offset + pos, n)
        if failed is not None:
            raise self._write_failed(failed)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        runs, failed = self._writable_runs(offset, length)
        for pos, n in runs:
            self._open.write_zeroes(self._base + offset + pos, n, may_unmap)
        if failed is not None:
            raise self._write_failed(failed)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._open.block_status(self._base + offset, length)

    # ---- messages -----------------------------------------------------------------------

    def message(self, args: list[str]) -> str | None:
        verb = args[0].lower()
        if len(args) == 1:
            if verb in ("addbadblock", "removebadblock", "queryblock"):
                raise DMError(errno.EINVAL, f"{args[0]} requires an additional argument")
            if verb in ("enable", "disable"):
                self.fail_read_on_bb = verb == "enable"
                log.info("%s read failures on bad sectors", "enabling" if verb == "enable" else "disabling")
                return None
            if verb == "countbadblocks":
                with self._lock:
                    return f"countbadblocks: {len(self.badblocks)} badblock(s) found"
            if verb == "clearbadblocks":
                with self._lock:
                    had, self.badblocks = bool(self.badblocks), {}
                return "dust_clear_badblocks: " + ("badblocks cleared" if had else "no badblocks found")
            if verb == "quiet":
                self.quiet = not self.quiet
                return None
            if verb == "listbadblocks":
                with self._lock:
                    blocks = sorted(self.badblocks)
                return "".join(f"{b}\n" for b in blocks) if blocks else "No blocks in badblocklist"
            raise DMError(errno.EINVAL, f"unrecognized message '{args[0]}' received")
        if len(args) not in (2, 3):
            raise DMError(errno.EINVAL, f"invalid number of arguments '{len(args)}'")
        block = self._block_number(args[1])
        fail_count = 0
        if len(args) == 3:
            if not (args[2].isascii() and args[2].isdigit()) or int(args[2]) >= 1 << 32:
                raise DMError(errno.EINVAL, f"invalid write fail count {args[2]!r}: not a number")
            fail_count = int(args[2])
            if fail_count > 255:
                raise DMError(errno.EINVAL, "selected write fail count out of range")
        last_block = self._open.size // SECTOR // self.sect_per_block
        if block > last_block:
            raise DMError(errno.EINVAL, "selected block value out of range")
        if verb == "addbadblock":
            return self._add_block(block, fail_count)
        if len(args) == 2 and verb == "removebadblock":
            return self._remove_block(block)
        if len(args) == 2 and verb == "queryblock":
            with self._lock:
                found = block in self.badblocks
            return f"dust_query_block: block {block} {'' if found else 'not '}found in badblocklist"
        raise DMError(errno.EINVAL, f"unrecognized message '{args[0]}' received")

    @staticmethod
    def _block_number(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 64:
            raise DMError(errno.EINVAL, f"invalid block number {text!r}: not a decimal number")
        return int(text)

    def _add_block(self, block: int, fail_count: int) -> None:
        with self._lock:
            if block in self.badblocks:
                raise DMError(errno.EINVAL, f"dust_add_block: block {block} already in badblocklist")
            self.badblocks[block] = fail_count
        if not self.quiet:
            log.info("dust_add_block: badblock added at block %d with write fail count %d", block, fail_count)

    def _remove_block(self, block: int) -> None:
        with self._lock:
            if self.badblocks.pop(block, None) is None:
                raise DMError(errno.EINVAL, f"dust_remove_block: block {block} not found in badblocklist")
        if not self.quiet:
            log.info("dust_remove_block: badblock removed at block %d", block)

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> str:
        mode = "fail_read_on_bad_block" if self.fail_read_on_bb else "bypass"
        return f"{self.dev.name} {mode} {'quiet' if self.quiet else 'verbose'}"

    def table(self) -> str:
        return f"{self.dev.name} {self.start} {self.blksz}"

    def devices(self):
        return [self.dev]

    def direct_map(self):
        """One-to-one onto the device from the offset on (failure notification)."""
        return self.dev, self._base
