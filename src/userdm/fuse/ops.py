"""pyfuse3 request handlers for the mount directory: a thin async shell around `DeviceFiles`.

pyfuse3 runs every handler on one trio thread, so a handler that blocks stops the whole
mount. Every call into `DeviceFiles` therefore runs in a worker thread, limited per inode:
I/O to a suspended device waits in its own threads while other devices and the directory
keep working. Worker calls are abandoned (not waited for) when the mount shuts down, so a
device that stays suspended never blocks `FuseExport.stop()`.

Every open uses `direct_io`: the kernel keeps no page cache for the files, so a table
reload is visible to the next read and loop devices see exactly what the device holds.
"""

from __future__ import annotations

import errno
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from ..errors import DMError
from .files import ROOT_INODE, Attr, DeviceFiles

T = TypeVar("T")

#: worker threads per inode (kernel FUSE sends at most max_background=12 async requests anyway)
THREADS_PER_INODE = 32
#: the key of the limiter shared by directory operations
_META = 0

# trio renamed `cancellable` to `abandon_on_cancel` (0.23); Debian 12 has 0.22.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    """pyfuse3's form of `attr`, with zero cache timeouts: sizes and removals show at once."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    entry.entry_timeout = 0
    entry.attr_timeout = 0
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = 0
    entry.st_size = attr.size
    entry.st_blksize = 4096
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.time_ns
    return entry


class DeviceOperations(pyfuse3.Operations):
    """The pyfuse3 `Operations` of the mount directory."""

    def __init__(self, files: DeviceFiles) -> None:
        super().__init__()
        self.files = files
        self._limiters: dict[int, trio.CapacityLimiter] = {}

    async def _call(self, key: int, fn: Callable[..., T], *args: Any) -> T:
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = trio.CapacityLimiter(THREADS_PER_INODE)
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter, **{_ABANDON: True})
        except DMError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def _io(self, fn: Callable[..., T], fh: int, *args: Any) -> T:
        """Run `fn(fh, *args)` in a worker thread of the inode that `fh` opened."""
        try:
            key = self.files.inode_of_handle(fh)
        except DMError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return await self._call(key, fn, fh, *args)

    # ---- directory -------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return entry_attributes(self.files.root_attr())
        attr = await self._call(_META, self.files.lookup, os.fsdecode(name))
        return entry_attributes(attr)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self._call(_META, self.files.getattr, inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size:
            await self._call(_META, self.files.check_size_change, inode, attr.st_size)
        return await self.getattr(inode, ctx)  # times are not kept: touch succeeds and changes nothing

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = await self._call(_META, self.files.listdir)
        for index, (name, attr) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry_attributes(attr), index):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 127  # a dm name has at most 127 characters
        return data

    # ---- files -----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        fh = await self._call(inode, self.files.open, inode, write)
        info = pyfuse3.FileInfo()
        info.fh = fh
        info.direct_io = True
        info.keep_cache = False
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._io(self.files.read, fh, off, size)  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._io(self.files.write, fh, off, buf)

    async def flush(self, fh: int) -> None:
        pass  # close(2) is not a flush of a block device; fsync is

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._io(self.files.fsync, fh)

    async def release(self, fh: int) -> None:
        try:
            await self._io(self.files.release, fh)
        except pyfuse3.FUSEError:
            pass  # already closed by release_all
