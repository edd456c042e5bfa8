"""BlockDevices: a kernel block device (a loop device over the FUSE file) per mapped device.

With `userdm daemon --block-devices` every device that has a live table gets one, otherwise
only those created with `--blockdev`. It is attached with direct I/O when the device's table
goes live, appears as `RUNTIME/dev/NAME` (a symlink to `/dev/loopN`), and follows the device:
a resize is passed on with LOOP_SET_CAPACITY, a read-only table gives a read-only loop device,
a rename moves the link. `RUNTIME/dev/by-diskseq/N` links to it too, N being the device's
disk sequence number (never reused, so that link names exactly one device). `remove` detaches it first (`release`): EBUSY while a filesystem is
mounted on it, and with `--deferred` the loop device is marked to detach at its last close
(`umount`), whose release of the FUSE file is the device's last close, which removes it.
The daemon's stop detaches every loop device it attached (a mounted one at its `umount`); the
next start attaches them again, after detaching loop devices that a crashed daemon left over
its FUSE files.

An autoclear device (removed at its last close) with a block device: the loop device's own
open of the FUSE file is the daemon's, not a user's, so it does not keep the device; a mount
on the loop device does. When the device's other opens are all closed, the loop device is
marked LO_FLAGS_AUTOCLEAR: unused, it detaches at once (the mark's own close is its last),
mounted, at the `umount`; either way its release of the FUSE file is the device's last close,
which removes it. An open of the device before that clears the mark again. A device that nobody
opened but through its block device stays, as an autoclear device never opened does.

It is also the core's lockfs (`Mapper.lockfs`): `freeze(device)` freezes the filesystems
mounted on any loop device over the device's FUSE file (`userdm.export.blockdev.lockfs`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import DMError
from . import lockfs, loop

log = logging.getLogger("userdm.blockdev")

#: seconds a detach may take to complete (the loop device's last close, the FUSE release)
DETACH_WAIT = 5.0
#: opens of a mapped device that its loop device holds (its one open of the FUSE file)
LOOP_OPENS = 1


@dataclass
class _Attached:
    number: int
    backing: str
    name: str
    size: int
    read_only: bool
    diskseq: int = 0
    autoclear: bool = False

    @property
    def path(self) -> str:
        return loop.loop_path(self.number)


class BlockDevices:
    """The loop devices of the mapped devices of `mapper`, served from `fuse_dir`."""

    def __init__(self, mapper: Any, fuse_dir: str | os.PathLike[str], dev_dir: str | os.PathLike[str], *,
                 all_devices: bool = False, direct_io: bool = True) -> None:
        self.mapper = mapper
        self.fuse_dir = os.path.abspath(os.fspath(fuse_dir))
        self.dev_dir = os.path.abspath(os.fspath(dev_dir))
        self.all_devices = all_devices
        self.direct_io = direct_io
        self._attached: dict[object, _Attached] = {}
        self._lock = threading.RLock()
        self._mark_lock = threading.Lock()  # LO_FLAGS_AUTOCLEAR changes, one at a time
        self._started = False

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(os.path.join(self.dev_dir, "by-diskseq"), mode=0o755, exist_ok=True)
        self._remove_stale()
        self._started = True
        self.mapper.lockfs = self
        self.mapper.outside_holders = self
        self.mapper.subscribe(self._on_event)
        for name in self.mapper.export_names():
            self._sync(name)

    def stop(self) -> None:
        """Detach every loop device attached here (a mounted one detaches at its umount)."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            self.mapper.unsubscribe(self._on_event)
            self.mapper.lockfs = None
            self.mapper.outside_holders = None
            attached, self._attached = list(self._attached.items()), {}
        for md, rec in attached:
            try:
                loop.detach(rec.number)
            except DMError as exc:
                log.warning("%s", exc)
            self._unlink(rec.name)
            self._unlink_seq(rec)
            md.block_device = None

    def _remove_stale(self) -> None:
        """Links of an earlier run, and loop devices over FUSE files of a crashed daemon."""
        for where in (self.dev_dir, os.path.join(self.dev_dir, "by-diskseq")):
            for entry in os.listdir(where):
                path = os.path.join(where, entry)
                if os.path.islink(path):
                    os.unlink(path)
        prefix = self.fuse_dir + "/"
        for number, backing in loop.backing_files().items():
            if backing.startswith(prefix):
                log.warning("detaching %s: a loop device over %s left by an earlier daemon",
                            loop.loop_path(number), backing)
                try:
                    loop.detach(number)
                except DMError as exc:
                    log.warning("%s", exc)

    # ---- following the devices ------------------------------------------------------------

    def _on_event(self, record: dict[str, Any]) -> None:
        event, name = record.get("event"), record.get("name")
        if not name:
            return
        if event in ("create", "resume"):
            self._sync(name)
        elif event == "rename":
            self._renamed(record.get("old_name"), name)
        elif event == "remove":
            self._forget(name)
        elif event == "cancel_deferred_remove":
            self._cancel_autoclear(name)

    def _wanted(self, md: Any) -> bool:
        return (hasattr(md, "blockdev") and (self.all_devices or md.blockdev) and md.live is not None
                and not md.deleting)

    def _sync(self, name: str) -> None:
        """Attach, resize or re-attach the loop device of `name` as its state asks."""
        md = self.mapper.exported(name)
        if md is None or not self._wanted(md):
            return
        with self._lock:
            if not self._started:
                return
            rec = self._attached.get(md)
            try:
                if rec is not None and rec.read_only != md.read_only and not loop.in_use(rec.number):
                    self._detach(md, rec)  # the table's mode changed: attach again in the new mode
                    rec = None
                if rec is None:
                    self._attach(md)
                elif rec.size != md.size:
                    loop.set_capacity(rec.number)
                    rec.size = md.size
            except DMError as exc:
                log.error("block device of %s: %s", name, exc)

    def _attach(self, md: Any) -> None:
        backing = os.path.join(self.fuse_dir, md.name)
        number = loop.attach(backing, read_only=md.read_only, block_size=md.logical_block_size,
                             direct_io=self.direct_io)
        rec = _Attached(number, backing, md.name, md.size, md.read_only, getattr(md, "diskseq", 0))
        try:
            self._link(md.name, rec.path)
            if rec.diskseq:
                self._link(f"by-diskseq/{rec.diskseq}", rec.path)
        except OSError as exc:
            self._detach(md, rec)  # no loop device without its link: none is leaked
            raise DMError(exc.errno or errno.EIO, f"cannot link {self.dev_dir}/{md.name}: {exc.strerror}") from None
        self._attached[md] = rec
        md.block_device = rec.path
        if getattr(md, "autoclear", False):
            md.on_open_change(self._opens_changed)
        log.info("%s is %s", md.name, rec.path)

    def _detach(self, md: Any, rec: _Attached) -> None:
        """Detach `rec`'s loop device and wait until its FUSE file's open of `md` is closed."""
        opens = md.open_count
        loop.detach(rec.number)
        self._attached.pop(md, None)
        if md.block_device == rec.path:
            md.block_device = None
        self._unlink(rec.name)
        self._unlink_seq(rec)
        if not loop.wait_detached(rec.number, rec.backing, DETACH_WAIT):
            log.warning("%s still holds %s (open elsewhere); it detaches at its last close", rec.path, rec.backing)
            return
        deadline = time.monotonic() + DETACH_WAIT  # the FUSE release arrives after the detach
        while md.open_count >= opens and time.monotonic() < deadline:
            time.sleep(0.01)

    def _renamed(self, old: str | None, new: str) -> None:
        with self._lock:
            for rec in self._attached.values():
                if rec.name == old:
                    self._unlink(old)
                    rec.name = new
                    try:
                        self._link(new, rec.path)
                    except OSError as exc:
                        log.error("cannot link %s/%s: %s", self.dev_dir, new, exc)

    def _forget(self, name: str) -> None:
        """`name` was removed: a loop device still over its file (remove_all, autoclear) goes."""
        with self._lock:
            for md, rec in list(self._attached.items()):
                if rec.name == name and md.deleting:
                    self._attached.pop(md)
                    self._unlink(name)
                    self._unlink_seq(rec)
                    md.block_device = None
                    try:
                        loop.detach(rec.number)
                    except DMError as exc:
                        log.warning("%s", exc)

    def _cancel_autoclear(self, name: str) -> None:
        with self._lock:
            for md, rec in self._attached.items():
                if rec.name == name and rec.autoclear and not (md.autoclear and md.open_count <= LOOP_OPENS):
                    try:
                        loop.set_autoclear(rec.number, False)
                        rec.autoclear = False
                    except DMError as exc:
                        log.error("%s", exc)

    def _opens_changed(self, md: Any) -> None:
        """An open or close of autoclear device `md`: mark its loop device LO_FLAGS_AUTOCLEAR
        when the loop device's is the only open left, clear the mark when another one comes."""
        with self._lock:
            rec = self._attached.get(md)
            if rec is None or md.deleting or md.deferred_remove:
                return  # a deferred removal has marked it itself (`release`)
            unused = md.open_count <= LOOP_OPENS
            if unused == rec.autoclear:
                return
            rec.autoclear = unused
        # not in this thread: it may be one the FUSE release that follows a detach needs
        threading.Thread(target=self._mark, args=(rec,), name="blockdev-autoclear", daemon=True).start()

    def _mark(self, rec: _Attached) -> None:
        with self._mark_lock:  # the latest wish wins, whatever order the threads run in
            try:
                loop.set_autoclear(rec.number, rec.autoclear)
            except (DMError, OSError) as exc:  # detached meanwhile
                log.debug("autoclear of %s: %s", rec.path, exc)

    # ---- the core's hooks -----------------------------------------------------------------

    def release(self, md: Any, deferred: bool) -> None:
        """Before `remove`: detach the block device of `md`, or EBUSY if a filesystem is mounted
        on it (with `deferred`: it detaches at its last close instead, and the removal follows)."""
        with self._lock:
            rec = self._attached.get(md)
            if rec is None:
                return
            if loop.in_use(rec.number):
                if not deferred:
                    raise DMError(errno.EBUSY, f"device {md.name} is in use through its block device {rec.path} "
                                  f"({self.dev_dir}/{md.name}: a filesystem is mounted on it?); unmount it "
                                  "first or use --deferred")
                loop.set_autoclear(rec.number, True)
                rec.autoclear = True
                return
            if md.open_count > 1 and not deferred:
                return  # open elsewhere too: the removal is refused (EBUSY), the block device stays
            self._detach(md, rec)

    def freeze(self, md: Any) -> Callable[[], None] | None:
        """lockfs for `md`'s suspend: freeze what is mounted on its loop devices."""
        with self._lock:
            rec = self._attached.get(md)
        extra = [rec.number] if rec is not None else []
        return lockfs.freeze(md.name, lockfs.loops_over([os.path.join(self.fuse_dir, md.name)], extra))

    # ---- links ------------------------------------------------------------------------------

    def _link(self, name: str, target: str) -> None:
        path = os.path.join(self.dev_dir, name)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(name)}.tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, path)

    def _unlink_seq(self, rec: _Attached) -> None:
        if rec.diskseq:
            self._unlink(f"by-diskseq/{rec.diskseq}")

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dev_dir, name))
        except FileNotFoundError:
            pass
