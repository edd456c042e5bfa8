"""FuseExport: mount the device directory of a `Mapper` and serve it from a background thread.

`start()` mounts (after clearing a stale mount of a crashed daemon) and returns once the
kernel has been answered; `stop()` ends serving, closes the FUSE connection and detaches the
mount lazily, so it works while loop devices are still attached to the files (they get EIO
from then on, as after a daemon crash), and it closes every device open that the files held.

pyfuse3 keeps one FUSE session per process, so at most one `FuseExport` runs at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

import pyfuse3
import trio

from ..dm.mapper import Mapper
from ..errors import DMError
from .files import DeviceFiles
from .ops import DeviceOperations
from .unmount import cleanup_stale, is_fuse_mount, lazy_unmount

log = logging.getLogger("userdm.fuse")

#: pyfuse3's concurrent request tasks (requests that wait on suspended devices hold one each)
MAX_TASKS = 512

_session_lock = threading.Lock()
_session_owner: FuseExport | None = None


class FuseExport:
    """One file per exported device of `mapper` in `mountpoint`, served until `stop()`."""

    def __init__(self, mapper: Mapper, mountpoint: str | os.PathLike[str], *,
                 allow_other: bool = False) -> None:
        self.mapper = mapper
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.allow_other = allow_other
        self.files = DeviceFiles(mapper)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope = trio.CancelScope()
        self._loop_started = threading.Event()
        self._serving = False
        self._error: BaseException | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Mount and serve in a background thread; returns when the mount answers."""
        global _session_owner
        with _session_lock:
            if _session_owner is not None:
                raise DMError(errno.EBUSY, f"a FUSE export is already mounted at {_session_owner.mountpoint} "
                              "(pyfuse3 serves one mount per process)")
            cleanup_stale(self.mountpoint)
            os.makedirs(self.mountpoint, exist_ok=True)
            if is_fuse_mount(self.mountpoint):
                raise DMError(errno.EBUSY, f"{self.mountpoint} is already a FUSE mount in use "
                              "(is another userdm daemon running?)")
            options = {"default_permissions", "fsname=userdm", "subtype=userdm"}
            if self.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(DeviceOperations(self.files), self.mountpoint, options)
            except RuntimeError as exc:  # pyfuse3 reports a failed mount as RuntimeError
                raise DMError(errno.EIO, f"cannot mount FUSE at {self.mountpoint}: {exc}") from None
            _session_owner = self
            self.mapper.subscribe(self._on_event)
        self._serving = True
        self._thread = threading.Thread(target=self._serve, name="userdm-fuse", daemon=True)
        self._thread.start()
        self._loop_started.wait()
        problem: BaseException | None = self._error
        if problem is None:
            try:
                os.stat(self.mountpoint)  # the first request completes the kernel's INIT handshake
            except OSError as exc:
                problem = exc
        if problem is not None:
            self.stop()
            raise DMError(errno.EIO, f"the FUSE export at {self.mountpoint} does not answer: {problem}")
        log.info("FUSE export mounted at %s", self.mountpoint)

    def _serve(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start() or logged; the thread must not die silently
            self._error = exc
            log.exception("FUSE loop at %s failed", self.mountpoint)
        finally:
            self._loop_started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_started.set()
        with self._scope:
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)

    def _shutdown(self) -> None:
        """On the trio thread: end the loop without waiting for requests that wait on suspended
        devices (their worker threads are abandoned; the closed connection fails their callers)."""
        pyfuse3.terminate()
        self._scope.cancel()

    def stop(self) -> None:
        """Stop serving, unmount (lazily if busy) and close the devices' opens. Idempotent."""
        global _session_owner
        with _session_lock:
            if _session_owner is not self:
                return
            self._serving = False
            self.mapper.unsubscribe(self._on_event)
            thread, token = self._thread, self._token
            if thread is not None and thread.is_alive() and token is not None:
                try:
                    trio.from_thread.run_sync(self._shutdown, trio_token=token)
                except trio.RunFinishedError:
                    pass  # the loop already ended (the mount was unmounted from outside)
            if thread is not None:
                thread.join()
            # closes the connection first (attached loop devices get EIO), then detaches lazily
            pyfuse3.close(unmount=True)
            _session_owner = None
            if is_fuse_mount(self.mountpoint):
                lazy_unmount(self.mountpoint)
            closed = self.files.release_all()
            if closed:
                log.info("closed %d device opens held by FUSE files at %s", closed, self.mountpoint)
            log.info("FUSE export at %s unmounted", self.mountpoint)

    def __enter__(self) -> FuseExport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def serving(self) -> bool:
        return self._serving

    # ---- kernel cache invalidation -----------------------------------------------------

    def _on_event(self, record: dict[str, Any]) -> None:
        """A resize changes the file size: drop the kernel's cached attributes of that inode."""
        if not self._serving or record.get("event") != "resume" or not record.get("resized"):
            return
        ino = self.files.inode_of(record.get("name", ""))
        if ino is None:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has not looked the inode up
                log.warning("cannot invalidate the FUSE attributes of %s: %s", record.get("name"), exc)
