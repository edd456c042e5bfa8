"""A sparse in-memory disk: 64 KiB chunks allocated on first write, freed by discard."""

from __future__ import annotations

from .device import STATUS_HOLE, STATUS_ZERO, BlockDevice

CHUNK = 64 * 1024


class MemoryDisk(BlockDevice):
    """RAM-backed device of `size` bytes; unwritten areas read as zeroes and report as holes."""

    def __init__(self, size: int, *, name: str = "memory", logical_block_size: int = 512,
                 read_only: bool = False) -> None:
        super().__init__(name, size, logical_block_size, read_only)
        self.chunks: dict[int, bytearray] = {}

    def _spans(self, offset: int, length: int):
        end = offset + length
        pos = offset
        while pos < end:
            idx, off = divmod(pos, CHUNK)
            n = min(CHUNK - off, end - pos)
            yield idx, off, pos - offset, n
            pos += n

    def readinto(self, offset: int, buf: memoryview) -> None:
        for idx, off, at, n in self._spans(offset, len(buf)):
            chunk = self.chunks.get(idx)
            if chunk is None:
                buf[at:at + n] = bytes(n)
            else:
                buf[at:at + n] = memoryview(chunk)[off:off + n]

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        view = memoryview(data)
        for idx, off, at, n in self._spans(offset, len(view)):
            chunk = self.chunks.get(idx)
            if chunk is None:
                chunk = self.chunks.setdefault(idx, bytearray(CHUNK))
            chunk[off:off + n] = view[at:at + n]

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        for idx, off, _at, n in self._spans(offset, length):
            if n == CHUNK:
                self.chunks.pop(idx, None)
            elif idx in self.chunks:
                self.chunks[idx][off:off + n] = bytes(n)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for idx, _off, _at, n in self._spans(offset, length):
            flags = 0 if idx in self.chunks else STATUS_HOLE | STATUS_ZERO
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
        return out
