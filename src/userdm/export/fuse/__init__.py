"""The FUSE export: one regular file per mapped device with a live table, in one directory.

The daemon mounts it at `<runtime_dir>/mapper`. Each open of a file is an open of the device
(it counts in `info`'s open count and blocks removal); reads and writes go straight to the
device without any kernel page cache (`direct_io`), `fsync` flushes the device, and I/O to a
suspended device waits until it is resumed. A read-only table gives a file of mode 0444 whose
write opens fail with EACCES. Put a filesystem on a device with `losetup` on its file.

    from userdm.export.fuse import FuseExport
    export = FuseExport(mapper, "/run/userdm/mapper")
    export.start()      # mounted and serving in a background thread
    ...
    export.stop()       # unmounted (lazily if a loop device still holds a file)

Speaks the kernel's FUSE protocol itself (`protocol.py`, `server.py`): needs /dev/fuse and
root (it mounts with mount(2)); fusermount3 or umount for lazy unmounts.
"""

from .unmount import cleanup_stale

__all__ = ["FuseExport", "cleanup_stale"]


def __getattr__(name: str) -> object:
    # loaded on first use: `cleanup_stale` needs none of the server
    if name == "FuseExport":
        from .export import FuseExport
        return FuseExport
    raise AttributeError(name)
