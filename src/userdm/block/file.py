"""File-backed disks: regular files (like a loop device) and real block device nodes.

The data path is zero-copy: reads go straight into the caller's buffer with `os.preadv`,
writes leave from it with `os.pwritev`. Discard punches holes (`fallocate`) in regular files
and issues BLKDISCARD on block nodes; `block_status` uses SEEK_DATA/SEEK_HOLE. With
`direct=True` the file is opened with O_DIRECT and unaligned requests go through an aligned
bounce buffer. A regular file that is deleted while in use marks its disk dead (`watch.py`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

from ..errors import DMError
from .device import STATUS_HOLE, STATUS_ZERO, BlockDevice
from .watch import WATCH

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKROGET = 0x125E
BLKFLSBUF = 0x1261
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

DIRECT_ALIGN = 4096


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileDisk(BlockDevice):
    """A regular file or a block device node, opened read-write unless `read_only`."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS) and not read_only:
                fd = os.open(path, (flags & ~os.O_RDWR) | os.O_RDONLY)
                read_only = True
            else:
                raise DMError.from_os(exc, f"cannot open {path}") from None
        st = os.fstat(fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        lbs = 512
        if self.is_block:
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            lbs = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            if struct.unpack("i", fcntl.ioctl(fd, BLKROGET, b"\0" * 4))[0]:
                read_only = True
            self._rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
            self._rdev = None
        else:
            os.close(fd)
            raise DMError(errno.ENOTBLK, f"{path} is neither a regular file nor a block device")
        self.fd = fd
        self.path = path
        self.direct = direct
        self._bounce = threading.local()
        # A file's size is rounded down to whole sectors, as the loop driver does.
        super().__init__(path, size - size % 512, lbs if lbs in (512, 4096) else 512, read_only)
        if not self.is_block:
            WATCH.add(self)  # a deleted file is a gone disk: mark_dead (block/watch.py)

    @property
    def devno(self) -> tuple[int, int] | None:
        return self._rdev

    def refresh_size(self) -> None:
        try:
            if self.is_block:
                size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
            else:
                size = os.fstat(self.fd).st_size
        except OSError:
            return                  # closed or gone: its I/O says so
        self.size = size - size % 512

    # ---- data path ------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        if self.direct:  # Python buffers are not page-aligned: bounce
            self._direct_read(offset, buf)
            return
        want = len(buf)
        done = 0
        try:
            while done < want:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:  # past the end of a file that shrank: reads as zeroes
                    buf[done:] = bytes(want - done)
                    return
                done += n
        except OSError as exc:
            raise DMError.from_os(exc, f"read from {self.path} at byte {offset + done}") from None

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        if self.direct:
            self._direct_write(offset, memoryview(data))
        else:
            view = memoryview(data)
            done = 0
            try:
                while done < len(view):
                    done += os.pwritev(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise DMError.from_os(exc, f"write to {self.path} at byte {offset + done}") from None
        if fua:
            self.flush()

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise DMError.from_os(exc, f"flush of {self.path}") from None

    def discard(self, offset: int, length: int) -> None:
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise DMError.from_os(exc, f"discard on {self.path}") from None

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            elif may_unmap:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise DMError.from_os(exc, f"write_zeroes on {self.path}") from None
        super().write_zeroes(offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self.is_block:
            return [(length, 0)]
        end = offset + length
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                return [(length, STATUS_HOLE | STATUS_ZERO)]
            return [(length, 0)]
        if data > offset:
            return [(min(data, end) - offset, STATUS_HOLE | STATUS_ZERO)]
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return [(length, 0)]
        return [(min(hole, end) - offset, 0)]

    def close_backing(self) -> None:
        if not self.is_block:
            WATCH.remove(self)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- O_DIRECT bounce path -------------------------------------------------------

    def _load_aligned(self, offset: int, length: int, *, partial_only: bool = False) -> tuple[int, memoryview]:
        """Read the aligned span around [offset, offset+length) into this thread's bounce
        buffer; returns (span start, span view). With `partial_only`, skip the read when the
        request covers the span exactly (a write that replaces every byte)."""
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None or len(bounce) < end - start:
            bounce = self._bounce.buf = mmap.mmap(-1, max(end - start, 1 << 20))
        view = memoryview(bounce)[: end - start]
        if not (partial_only and start == offset and end == offset + length):
            n = os.preadv(self.fd, [view], start)
            if n < end - start:
                view[n:] = bytes(end - start - n)
        return start, view

    def _direct_read(self, offset: int, buf: memoryview) -> None:
        try:
            start, view = self._load_aligned(offset, len(buf))
        except OSError as exc:
            raise DMError.from_os(exc, f"read from {self.path} at byte {offset}") from None
        buf[:] = view[offset - start: offset - start + len(buf)]

    def _direct_write(self, offset: int, data: memoryview) -> None:
        try:
            start, view = self._load_aligned(offset, len(data), partial_only=True)
            view[offset - start: offset - start + len(data)] = data
            os.pwritev(self.fd, [view], start)
        except OSError as exc:
            raise DMError.from_os(exc, f"write to {self.path} at byte {offset}") from None
