"""FuseExport: mount the device directory of a `Mapper` and serve it from background threads.

`start()` mounts (after clearing a stale mount of a crashed daemon) and returns once the
kernel has been answered; `stop()` ends serving, severs the FUSE connection and detaches the
mount lazily, so it works while loop devices are still attached to the files (they get EIO
from then on, as after a daemon crash) and while requests wait on suspended devices (their
callers get an error), and it closes every device open that the files held.

The kernel's FUSE protocol is spoken directly (`protocol.py`, sans-IO), by threads of our
own on clones of the /dev/fuse fd (`server.Session`); `ops.DeviceOperations` answers the
requests from `files.DeviceFiles`. No libfuse is involved. Several exports may run in one
process.

`passthrough=True` (`userdm daemon --fuse-passthrough`) lets the kernel do the reads and
writes of an open itself, on the backing file, when the device maps one regular file byte for
byte (one linear target at offset 0 of a file of the device's size): loop devices and qemu on
such a file run at the file's speed. The price, while such an open exists: suspends (and so
table reloads and interposers) of that device are refused with EBUSY, since they could not
hold its I/O; and a write past the end of the file would extend it (the kernel does not
check the device's size). Other devices, and opens made while a device is suspended, go
through userdm as always.

A process that serves an export and also opens its files must not start subprocesses with
`close_fds=True` while such a file is open: Python 3.11 forks with vfork and keeps the GIL
until the child execs, and the child's close of its copy of the file waits for a FLUSH that
only this process's serving threads could answer. The daemon never opens its own files.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

from ...errors import DMError
from ..source import ExportSource
from .files import DeviceFiles
from .ops import DeviceOperations
from .server import Session
from .uring import FUSE_PARAMETER
from .unmount import cleanup_stale, is_fuse_mount

log = logging.getLogger("userdm.fuse")


class FuseExport:
    """One file per exported device of `mapper` in `mountpoint`, served until `stop()`."""

    def __init__(self, mapper: ExportSource, mountpoint: str | os.PathLike[str], *,
                 allow_other: bool = False, passthrough: bool = False, uring: bool = False) -> None:
        self.mapper = mapper
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.allow_other = allow_other
        self.passthrough = passthrough
        self.uring = uring
        self.files = DeviceFiles(mapper)
        self._ops = DeviceOperations(self.files)
        self._session: Session | None = None
        self._lock = threading.Lock()

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Mount and serve in background threads; returns when the mount answers."""
        with self._lock:
            if self._session is not None:
                raise DMError(errno.EBUSY, f"the FUSE export at {self.mountpoint} is already started")
            cleanup_stale(self.mountpoint)
            os.makedirs(self.mountpoint, exist_ok=True)
            if is_fuse_mount(self.mountpoint):
                raise DMError(errno.EBUSY, f"{self.mountpoint} is already a FUSE mount in use "
                              "(is another userdm daemon running?)")
            session = Session(self._ops, self.mountpoint, allow_other=self.allow_other, on_end=self._ended,
                              ring=self.uring)
            self._ops.backing = session if self.passthrough else None
            session.mount()
            self._session = session
            self.mapper.subscribe(self._on_event)
        try:
            os.stat(self.mountpoint)  # the first request completes the kernel's INIT handshake
        except OSError as exc:
            self.stop()
            raise DMError(errno.EIO, f"the FUSE export at {self.mountpoint} does not answer: {exc}") from None
        log.info("FUSE export mounted at %s", self.mountpoint)
        if self.uring and not self._ops.ring:
            log.warning("FUSE at %s: requests come through /dev/fuse: the kernel offers no FUSE over "
                        "io_uring (where it has it, root turns it on with: echo Y > %s)",
                        self.mountpoint, FUSE_PARAMETER)

    def stop(self) -> None:
        """Stop serving, unmount (lazily if busy) and close the devices' opens. Idempotent;
        never waits for requests held by suspended devices."""
        with self._lock:
            session, self._session = self._session, None
            if session is None:
                return
            self.mapper.unsubscribe(self._on_event)
        session.stop()
        closed = self.files.release_all()
        if closed:
            log.info("closed %d device opens held by FUSE files at %s", closed, self.mountpoint)
        log.info("FUSE export at %s unmounted", self.mountpoint)

    def _ended(self) -> None:
        """The mount went away from outside (fusermount -u, umount): its files' opens end with
        it (the kernel sends no release for them), so that deferred removals can fire."""
        closed = self.files.release_all()
        log.warning("the FUSE export at %s was unmounted from outside; closed %d device opens",
                    self.mountpoint, closed)

    def __enter__(self) -> FuseExport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def serving(self) -> bool:
        session = self._session
        return session is not None and session.serving

    # ---- kernel cache invalidation -----------------------------------------------------

    def _on_event(self, record: dict[str, Any]) -> None:
        """A resize changes the file size: drop the kernel's cached attributes of that file."""
        if record.get("event") != "resume" or not record.get("resized"):
            return
        session = self._session
        ino = self.files.inode_of(record["name"]) if record.get("name") else None
        if session is not None and ino is not None:
            session.invalidate(ino)
