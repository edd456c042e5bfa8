"""The FUSE directory as plain synchronous calls, independent of any FUSE binding.

`DeviceFiles` decides what the mount directory shows and what each request does: one regular
file per device in `Mapper.export_names()`, with the device's size and a mode that says
whether its live table is read-only (0644 or 0444). Inode numbers are handed out per mapped
device object and never reused, so a device that is removed and created again under the same
name gets a new inode and stale kernel references fail with ENOENT instead of reaching the new
device. Every `open` is one `Mapper.open_device` kept until `release`: the file's opens are the
device's opens (open count, EBUSY on remove, deferred removal on the last close).

All methods may block (device I/O waits while a device is suspended) and raise `DMError`; the
binding adapter runs them in worker threads and turns `DMError.errno` into the FUSE reply.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
import weakref
from dataclasses import dataclass

from ...block.device import SECTOR, STATUS_HOLE, BlockOpen
from ...dm.mapped import MappedDevice
from ...errors import DMError
from ..source import ExportSource

ROOT_INODE = 1


@dataclass(frozen=True)
class Attr:
    """What `stat` shows for one entry of the mount directory."""

    ino: int
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    time_ns: int

    @property
    def blocks(self) -> int:
        return (self.size + SECTOR - 1) // SECTOR


@dataclass(eq=False)
class _Handle:
    ino: int
    device: MappedDevice
    open: BlockOpen
    kernel_io: bool = False      # pinned: the kernel does this open's I/O (FUSE passthrough)


class DeviceFiles:
    """The mount directory of one `Mapper`: lookups, attributes, opens and I/O by file handle."""

    def __init__(self, mapper: ExportSource) -> None:
        self.mapper = mapper
        self._lock = threading.Lock()
        self._next_ino = itertools.count(ROOT_INODE + 1)
        self._ino_of: weakref.WeakKeyDictionary[MappedDevice, int] = weakref.WeakKeyDictionary()
        self._device_of: dict[int, weakref.ref[MappedDevice]] = {}
        self._next_fh = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._uid, self._gid = os.getuid(), os.getgid()
        self._started_ns = time.time_ns()

    # ---- names and attributes ----------------------------------------------------------

    def _inode(self, md: MappedDevice) -> int:
        with self._lock:
            ino = self._ino_of.get(md)
            if ino is None:
                ino = next(self._next_ino)
                self._ino_of[md] = ino
                self._device_of[ino] = weakref.ref(md)
            return ino

    def _exported(self, md: MappedDevice | None) -> bool:
        """True if `md` is (still) a device the directory shows under its current name."""
        if md is None or md.live is None or md.deleting:
            return False
        try:
            return self.mapper.device(md.name) is md
        except DMError:
            return False

    def _device(self, ino: int) -> MappedDevice:
        with self._lock:
            ref = self._device_of.get(ino)
        md = ref() if ref is not None else None
        if not self._exported(md):
            raise DMError(errno.ENOENT, f"inode {ino} is no longer a mapped device")
        assert md is not None
        return md

    def inode_of(self, name: str) -> int | None:
        """The inode already handed out for device `name`, if any (for cache invalidation)."""
        try:
            md = self.mapper.device(name)
        except DMError:
            return None
        with self._lock:
            return self._ino_of.get(md)

    def root_attr(self) -> Attr:
        return Attr(ROOT_INODE, stat.S_IFDIR | 0o755, 0, 2, self._uid, self._gid, self._started_ns)

    def _attr(self, md: MappedDevice) -> Attr:
        live = md.live
        perm = 0o444 if live is None or live.read_only else 0o644
        return Attr(self._inode(md), stat.S_IFREG | perm, md.size, 1, self._uid, self._gid, self._started_ns)

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INODE:
            return self.root_attr()
        return self._attr(self._device(ino))

    def lookup(self, name: str) -> Attr:
        """The attributes of the file `name` in the mount directory (ENOENT if not exported)."""
        try:
            md = self.mapper.device(name)
        except DMError:
            md = None
        if md is None or not self._exported(md):
            raise DMError(errno.ENOENT, f"no exported device named {name!r}")
        return self._attr(md)

    def listdir(self) -> list[tuple[str, Attr]]:
        """Every file of the directory, sorted by name."""
        out = []
        for name in self.mapper.export_names():
            try:
                out.append((name, self.lookup(name)))
            except DMError:
                continue  # removed meanwhile
        return out

    def check_size_change(self, ino: int, size: int) -> None:
        """truncate/ftruncate: a device's size comes from its table; only its own size is accepted."""
        md = self._device(ino)
        if size != md.size:
            raise DMError(errno.EINVAL, f"{md.name}: the size of a mapped device is set by its table "
                          f"({md.size} bytes), not by truncate ({size})")

    # ---- opens ---------------------------------------------------------------------------

    def open(self, ino: int, write: bool) -> int:
        """Open the device behind `ino`; returns a file handle number for the other calls."""
        md = self._device(ino)
        handle = self.mapper.open_device(md.name, write=write)
        if handle.device is not md:  # renamed and replaced between the lookup and the open
            handle.close()
            raise DMError(errno.ENOENT, f"device {md.name} was replaced")
        fh = next(self._next_fh)
        with self._lock:
            self._handles[fh] = _Handle(ino, md, handle)
        return fh

    def _handle(self, fh: int) -> _Handle:
        with self._lock:
            h = self._handles.get(fh)
        if h is None:
            raise DMError(errno.EBADF, f"file handle {fh} is not open")
        return h

    def handle_or_none(self, fh: int) -> _Handle | None:
        with self._lock:
            return self._handles.get(fh)

    def inode_of_handle(self, fh: int) -> int:
        return self._handle(fh).ino

    def pin_kernel_io(self, fh: int, write: bool) -> int | None:
        """Let the kernel do the I/O of open `fh` on the file its device maps byte for byte:
        that file's fd, with the device pinned (`MappedDevice.pin_kernel_io`), or None."""
        h = self._handle(fh)
        fd = h.device.pin_kernel_io(write)
        h.kernel_io = fd is not None
        return fd

    def unpin_kernel_io(self, fh: int) -> None:
        h = self._handle(fh)
        if h.kernel_io:
            h.kernel_io = False
            h.device.unpin_kernel_io()

    def release(self, fh: int) -> bool:
        """Close the device open behind `fh` (this may complete a deferred removal). True if
        it was a pinned one (`pin_kernel_io`)."""
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is None:
            return False
        self._close(h)
        return h.kernel_io

    def release_all(self) -> int:
        """Close every open (when the mount goes away without release requests). Returns how many."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            self._close(h)
        return len(handles)

    @staticmethod
    def _close(h: _Handle) -> None:
        if h.kernel_io:
            h.device.unpin_kernel_io()
        h.open.close()

    @property
    def open_handles(self) -> int:
        with self._lock:
            return len(self._handles)

    # ---- I/O -----------------------------------------------------------------------------

    def read(self, fh: int, offset: int, size: int) -> bytearray:
        """Up to `size` bytes at `offset`; short at the end of the device, empty past it."""
        h = self._handle(fh).open
        n = max(0, min(size, h.size - offset))
        buf = bytearray(n)
        if n:
            h.readinto(offset, memoryview(buf))
        return buf

    def readinto(self, fh: int, offset: int, buf: memoryview) -> int:
        """Read into `buf` from `offset`; returns the bytes read (short at the end, 0 past it)."""
        h = self._handle(fh).open
        n = max(0, min(len(buf), h.size - offset))
        if n:
            h.readinto(offset, buf if n == len(buf) else buf[:n])
        return n

    def read_length(self, fh: int, offset: int, size: int) -> int:
        """How many of `size` bytes at `offset` a read returns (short at the end, 0 past it)."""
        return max(0, min(size, self._handle(fh).open.size - offset))

    def splice_into(self, fh: int, offset: int, n: int, pipe: int) -> bool:
        """Move `n` bytes (a `read_length`) into a pipe by reference if the device can; False:
        read them instead, after draining the pipe."""
        return self._handle(fh).open.splice_into(offset, n, pipe)

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """Write what fits before the end of the device (a block device's short write); ENOSPC past it."""
        h = self._handle(fh).open
        n = max(0, min(len(data), h.size - offset))
        if n == 0 and len(data):
            raise DMError(errno.ENOSPC, f"write at byte {offset} is at or past the end of the device "
                          f"({h.size} bytes)")
        h.write(offset, memoryview(data)[:n])
        return n

    def fsync(self, fh: int) -> None:
        self._handle(fh).open.flush()

    def zero(self, fh: int, offset: int, length: int, may_unmap: bool) -> None:
        """fallocate PUNCH_HOLE (`may_unmap`) or ZERO_RANGE: the range reads back as zeroes,
        as on a file (a discard alone may leave old data on some targets)."""
        h = self._handle(fh).open
        if offset < 0 or length <= 0 or offset >= h.size:
            raise DMError(errno.EINVAL, f"zeroing {length} bytes at byte {offset} is outside the device "
                          f"({h.size} bytes)")
        h.write_zeroes(offset, min(length, h.size - offset), may_unmap)

    def seek(self, fh: int, offset: int, whence: int) -> int:
        """lseek SEEK_DATA / SEEK_HOLE from the device's block status (ENXIO at or past the end)."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise DMError(errno.EINVAL, f"lseek whence {whence} is not SEEK_DATA or SEEK_HOLE")
        h = self._handle(fh).open
        size = h.size
        if offset < 0 or offset >= size:
            raise DMError(errno.ENXIO, f"lseek to byte {offset}: outside the device ({size} bytes)")
        pos = offset
        while pos < size:
            extents = h.block_status(pos, size - pos)
            step = 0
            for length, flags in extents:
                if length <= 0 or pos + step >= size:
                    break
                hole = bool(flags & STATUS_HOLE)
                if hole == (whence == os.SEEK_HOLE):
                    return pos + step
                step += length
            if step <= 0:
                break
            pos += step
        if whence == os.SEEK_HOLE:
            return size          # the end of a file is a hole
        raise DMError(errno.ENXIO, f"lseek SEEK_DATA from byte {offset}: no data up to the end of the device")
