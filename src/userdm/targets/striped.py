"""striped: RAID0 over N devices in chunks (`dm-stripe.c`).

Table: `<#stripes> <chunk_size> (<dev> <offset>){#stripes}`, sizes in sectors. The target
length must divide by the number of stripes, and each stripe's share by the chunk size.
Mapping, as the kernel computes it: chunk = offset / chunk_size; stripe = chunk % stripes;
device sector = (chunk / stripes) * chunk_size + offset % chunk_size + stripe offset.
INFO status: `<#stripes> <dev>... 1 <A|D per stripe>`; table: `<#stripes> <chunk> (<dev> <offset>)...`.
"""

from __future__ import annotations

from ..block.device import SECTOR, merge_extents
from ..block.failure import MAX_RANGES, clip, merge_ranges
from ..dm.target import Target, TargetContext, TargetError, parse_sector, register
from ..errors import DMError

ERROR_THRESHOLD = 15  # DM_IO_ERROR_THRESHOLD: a stripe is shown as D(ead) after this many errors


@register
class StripedTarget(Target):
    name = "striped"
    version = (1, 7, 0)
    stateless_remap = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 2:
            raise TargetError("Not enough arguments")
        if not args[0].isdigit() or int(args[0]) == 0 or int(args[0]) >= 1 << 32:
            raise TargetError("Invalid stripe count")
        self.stripes = int(args[0])
        if not args[1].isdigit() or int(args[1]) == 0 or int(args[1]) >= 1 << 32:
            raise TargetError("Invalid chunk_size")
        self.chunk_sectors = int(args[1])
        if length % self.stripes:
            raise TargetError("Target length not divisible by number of stripes")
        width = length // self.stripes
        if width % self.chunk_sectors:
            raise TargetError("Target length not divisible by chunk size")
        if len(args) != 2 + 2 * self.stripes:
            raise TargetError("Not enough destinations specified")
        self.devs = []
        self.starts = []
        for i in range(self.stripes):
            ref, off = args[2 + 2 * i], args[3 + 2 * i]
            try:
                start = parse_sector(off, "Invalid device sector")
            except TargetError:
                raise TargetError("Couldn't parse stripe destination") from None
            self.devs.append(ctx.get_device(ref, start, width, role=f"stripe {i}"))
            self.starts.append(start)
        self.opens = [d.open for d in self.devs]
        self.bases = [s * SECTOR for s in self.starts]
        self.chunk = self.chunk_sectors * SECTOR
        self.errors = [0] * self.stripes

    def _map(self, offset: int) -> tuple[int, int, int]:
        """(stripe, device byte offset, bytes left in this chunk) for a target byte offset."""
        chunk, in_chunk = divmod(offset, self.chunk)
        row, stripe = divmod(chunk, self.stripes)
        return stripe, self.bases[stripe] + row * self.chunk + in_chunk, self.chunk - in_chunk

    def locate(self, offset: int, length: int):
        chunk, in_chunk = divmod(offset, self.chunk)
        if in_chunk + length > self.chunk:
            return None
        row, stripe = divmod(chunk, self.stripes)
        return self.opens[stripe], self.bases[stripe] + row * self.chunk + in_chunk

    def _pieces(self, offset: int, length: int):
        pos = 0
        while pos < length:
            stripe, dev_off, left = self._map(offset + pos)
            n = min(left, length - pos)
            yield stripe, dev_off, pos, n
            pos += n

    def _count(self, stripe: int, exc: DMError) -> DMError:
        self.errors[stripe] += 1
        return exc

    def readinto(self, offset: int, buf: memoryview) -> None:
        for stripe, dev_off, pos, n in self._pieces(offset, len(buf)):
            try:
                self.opens[stripe].readinto(dev_off, buf[pos:pos + n])
            except DMError as exc:
                raise self._count(stripe, exc) from None

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        for stripe, dev_off, pos, n in self._pieces(offset, len(data)):
            try:
                self.opens[stripe].write(dev_off, data[pos:pos + n], fua)
            except DMError as exc:
                raise self._count(stripe, exc) from None

    def discard(self, offset: int, length: int) -> None:
        for stripe, dev_off, _pos, n in self._pieces(offset, length):
            self.opens[stripe].discard(dev_off, n)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        for stripe, dev_off, _pos, n in self._pieces(offset, length):
            self.opens[stripe].write_zeroes(dev_off, n, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        out = []
        for stripe, dev_off, _pos, n in self._pieces(offset, min(length, 64 * self.chunk)):
            ext_len, flags = self.opens[stripe].block_status(dev_off, n)[0]
            out.append((min(ext_len, n), flags))
            if ext_len < n:
                break
        return merge_extents(out)

    def failure(self, dev, offset: int, length: int) -> list[tuple[int, int]]:
        """Each chunk of a stripe on `dev` inside the failed range is its own target range
        (stripe `s`, row `r` is target chunk `r * stripes + s`), past MAX_RANGES pieces the
        one range from the first to the last."""
        width = self.length // self.stripes * SECTOR
        out = []
        for stripe, tdev in enumerate(self.devs):
            if tdev.device is not dev:
                continue
            for pos, n in clip(offset, length, self.bases[stripe], width):
                end = pos + n
                if -(-end // self.chunk) - pos // self.chunk > MAX_RANGES:
                    first = self._target_offset(stripe, pos)
                    out.append((first, self._target_offset(stripe, end - 1) + 1 - first))
                    continue
                while pos < end:
                    n = min(self.chunk - pos % self.chunk, end - pos)
                    out.append((self._target_offset(stripe, pos), n))
                    pos += n
        return merge_ranges(out)

    def _target_offset(self, stripe: int, pos: int) -> int:
        """The target byte offset of byte `pos` of a stripe's area (the inverse of `_map`)."""
        row, in_chunk = divmod(pos, self.chunk)
        return (row * self.stripes + stripe) * self.chunk + in_chunk

    def status(self) -> str:
        names = " ".join(d.name for d in self.devs)
        health = "".join("D" if e >= ERROR_THRESHOLD else "A" for e in self.errors)
        return f"{self.stripes} {names} 1 {health}"

    def table(self) -> str:
        legs = "".join(f" {d.name} {s}" for d, s in zip(self.devs, self.starts))
        return f"{self.stripes} {self.chunk_sectors}{legs}"

    def devices(self):
        return list(self.devs)
