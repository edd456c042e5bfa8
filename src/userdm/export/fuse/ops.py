"""libfuse high-level callbacks for the mount directory: a thin ctypes shell around `DeviceFiles`.

Every callback runs on one of the session's serving threads (`libfuse.Session`), so it may
block: I/O to a suspended device waits in its thread while other threads serve the rest of
the mount. `DMError`s become negative errnos. Reads go straight into libfuse's reply buffer
and writes are taken straight from its request buffer (memoryviews over the C memory): the
only copies are the kernel's and the device's own.

Every open uses `direct_io`: the kernel keeps no page cache for the files, so a table reload
is visible to the next read and loop devices see exactly what the device holds. Attribute
and entry timeouts are zero, so sizes and removals show at once. `nullpath_ok` spares libfuse
building a path for I/O on open files.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import mfusepy

from ...errors import DMError
from .files import Attr, DeviceFiles

log = logging.getLogger("userdm.fuse")

#: libfuse options that go with these callbacks (parsed by fuse_new)
LIB_OPTIONS = ["entry_timeout=0", "negative_timeout=0", "attr_timeout=0"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_PyBUF_READ, _PyBUF_WRITE = 0x100, 0x200
_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memory.restype, _memory.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)

_fi_p = ctypes.POINTER(mfusepy.fuse_file_info)
#: read/write with the buffer as a plain address (ABI-identical to mfusepy's `char *`)
_IO = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, _fi_p)


def _errno_of(name: str, exc: BaseException) -> int:
    if isinstance(exc, (DMError, OSError)) and exc.errno:
        return exc.errno
    log.error("FUSE %s failed", name, exc_info=exc)
    return errno.EIO


def _guard(name: str, fn: Callable[..., int]) -> Callable[..., int]:
    """A callback that turns exceptions into -errno (ctypes would print and return 0)."""
    @functools.wraps(fn)
    def call(*args: Any) -> int:
        try:
            return fn(*args)
        except BaseException as exc:  # noqa: BLE001 - nothing may escape into C
            return -_errno_of(name, exc)
    return call


def _fill_stat(st: Any, attr: Attr) -> None:
    st.st_ino = attr.ino
    st.st_mode = attr.mode
    st.st_nlink = attr.nlink
    st.st_uid = attr.uid
    st.st_gid = attr.gid
    st.st_size = attr.size
    st.st_blksize = 4096
    st.st_blocks = attr.blocks
    sec, nsec = divmod(attr.time_ns, 1_000_000_000)
    for ts in (st.st_atimespec, st.st_mtimespec, st.st_ctimespec):
        ts.tv_sec, ts.tv_nsec = sec, nsec


class DeviceOperations:
    """The callbacks of the mount directory, as a filled `mfusepy.fuse_operations`
    (`struct`; the callback objects are kept alive by this object)."""

    def __init__(self, files: DeviceFiles) -> None:
        self.files = files
        self.struct = mfusepy.fuse_operations()
        self._keep: list[Any] = []
        fields = dict((f[0], f[1]) for f in mfusepy.fuse_operations._fields_)
        for name in ("getattr", "readdir", "open", "read", "write", "flush", "release", "fsync",
                     "truncate", "chmod", "chown", "utimens", "statfs", "init", "fallocate", "lseek"):
            fn = _guard(name, getattr(self, "_" + name))
            if name in ("read", "write"):
                cb = _IO(fn)
                self._keep.append(cb)
                cb = ctypes.cast(cb, fields[name])
            elif name == "init":   # returns the session's private data pointer, not an errno
                cb = fields[name](self._init)
            else:
                cb = fields[name](fn)
            self._keep.append(cb)
            setattr(self.struct, name, cb)

    # ---- helpers -----------------------------------------------------------------------

    def _attr_of(self, path: bytes | None, fi: Any) -> Attr:
        if fi:
            return self.files.getattr(self.files.inode_of_handle(fi.contents.fh))
        if path in (b"/", None):
            return self.files.root_attr()
        return self.files.lookup(os.fsdecode(path[1:]))

    # ---- directory ---------------------------------------------------------------------

    def _init(self, conn: Any, cfg: Any) -> None:
        try:
            if cfg:
                cfg.contents.use_ino = 1        # stat shows the inode numbers of DeviceFiles
                cfg.contents.nullpath_ok = 1
        except Exception:  # noqa: BLE001
            log.exception("FUSE init failed")
        return None

    def _getattr(self, path: bytes | None, st: Any, fi: Any) -> int:
        _fill_stat(st.contents, self._attr_of(path, fi))
        return 0

    def _readdir(self, path: bytes | None, buf: int, filler: Any, offset: int, fi: Any, flags: int) -> int:
        if path not in (b"/", None):
            return -errno.ENOTDIR
        for name in (".", ".."):
            filler(buf, name.encode(), None, 0, 0)
        for name, _attr in self.files.listdir():
            if filler(buf, os.fsencode(name), None, 0, 0):
                break
        return 0

    def _statfs(self, path: bytes | None, stv: Any) -> int:
        s = stv.contents
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 127  # a dm name has at most 127 characters
        return 0

    def _chmod(self, path: bytes | None, mode: int, fi: Any) -> int:
        return -errno.EPERM

    def _chown(self, path: bytes | None, uid: int, gid: int, fi: Any) -> int:
        return -errno.EPERM

    def _utimens(self, path: bytes | None, times: Any, fi: Any) -> int:
        self._attr_of(path, fi)   # ENOENT for a name that went away
        return 0                  # times are not kept: touch succeeds and changes nothing

    def _truncate(self, path: bytes | None, size: int, fi: Any) -> int:
        self.files.check_size_change(self._attr_of(path, fi).ino, size)
        return 0

    # ---- files -------------------------------------------------------------------------

    def _open(self, path: bytes | None, fi: Any) -> int:
        info = fi.contents
        if path in (b"/", None):
            return -errno.EISDIR
        ino = self.files.lookup(os.fsdecode(path[1:])).ino
        info.fh = self.files.open(ino, (info.flags & os.O_ACCMODE) != os.O_RDONLY)
        info.direct_io = 1
        info.keep_cache = 0
        return 0

    def _read(self, path: bytes | None, buf: int, size: int, offset: int, fi: Any) -> int:
        return self.files.readinto(fi.contents.fh, offset, _memory(buf, size, _PyBUF_WRITE))

    def _write(self, path: bytes | None, buf: int, size: int, offset: int, fi: Any) -> int:
        return self.files.write(fi.contents.fh, offset, _memory(buf, size, _PyBUF_READ))

    def _flush(self, path: bytes | None, fi: Any) -> int:
        return 0  # close(2) is not a flush of a block device; fsync is

    def _fsync(self, path: bytes | None, datasync: int, fi: Any) -> int:
        self.files.fsync(fi.contents.fh)
        return 0

    def _release(self, path: bytes | None, fi: Any) -> int:
        self.files.release(fi.contents.fh)   # a no-op after release_all
        return 0

    def _fallocate(self, path: bytes | None, mode: int, offset: int, length: int, fi: Any) -> int:
        if not fi:
            return -errno.EBADF
        fh = fi.contents.fh
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self.files.zero(fh, offset, length, may_unmap=True)
        elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            self.files.zero(fh, offset, length, may_unmap=False)
        elif mode & ~FALLOC_FL_KEEP_SIZE == 0:
            # allocation: every byte of a device exists already; past the end it cannot grow
            if offset + length > self.files.getattr(self.files.inode_of_handle(fh)).size:
                return -errno.EFBIG
        else:
            return -errno.EOPNOTSUPP
        return 0

    def _lseek(self, path: bytes | None, offset: int, whence: int, fi: Any) -> int:
        if not fi:
            return -errno.EBADF
        return self.files.seek(fi.contents.fh, offset, whence)
