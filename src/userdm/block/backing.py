"""Backing stores: turn a device reference from a table into one shared `BlockDevice`.

The same file, block node or remote export named by several tables (or twice in one table)
must be one device object, so that claims and the holders graph see one device. Devices are
cached by inode (files), by device number (block nodes) or by URL (remote schemes, which the
layers above register, e.g. `nbd://`; an *opaque* scheme is spelled without `//`, as qemu spells
`rbd:POOL/IMAGE`). A device leaves the cache, and its file descriptor is
closed, when its last open closes.

A remote device that died (its server went away: `mark_dead`) leaves the cache when the
reference is opened again, and the new open connects afresh (a mirror reloaded with its leg
back); the dead one is closed when its last open closes.

The cache lock is never held while a device is being created (connecting to a slow NBD
server takes seconds): a reference being opened is marked in `_opening`, and a second open of
the same reference waits for that one, while opens of other references go ahead.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

from ..errors import DMError, clipped, quoted
from .device import BlockDevice, BlockOpen, HolderOps
from .file import FileDisk

SchemeFactory = Callable[[str], BlockDevice]


class BackingStores:
    """Opens underlying devices by reference, one object per device."""

    def __init__(self, *, direct: bool = False) -> None:
        self._lock = threading.Lock()
        self._devices: dict[object, BlockDevice] = {}
        #: keys whose device is being created outside the lock -> set when that is done
        self._opening: dict[object, threading.Event] = {}
        self._schemes: dict[str, SchemeFactory] = {}
        #: schemes spelled `scheme:rest` (no `//`), like qemu's `rbd:`
        self._opaque: set[str] = set()
        #: dead remote devices taken out of the cache while still open
        self._retired: set[BlockDevice] = set()
        self.direct = direct

    def register_scheme(self, scheme: str, factory: SchemeFactory, *, opaque: bool = False) -> None:
        """References `scheme://...` (or, `opaque`, `scheme:...`) are opened by `factory(ref)`."""
        self._schemes[scheme] = factory
        if opaque:
            self._opaque.add(scheme)

    def scheme_of(self, ref: str) -> str | None:
        """The scheme `ref` is spelled with (registered or not), None for a path."""
        if "://" in ref:
            return ref.split("://", 1)[0]
        head, colon, _ = ref.partition(":")
        return head if colon and head in self._opaque else None

    def is_scheme(self, ref: str) -> bool:
        return self.scheme_of(ref) in self._schemes

    def open(self, ref: str, *, write: bool, holder: object | None = None,
             holder_ops: HolderOps | None = None) -> BlockOpen:
        """Open the device named by `ref` (absolute path or registered URL)."""
        while True:
            with self._lock:
                key, device = self._lookup(ref)
                if device is not None and device.dead and isinstance(key, str):
                    if device.opens:                # a dead export: connect afresh
                        del self._devices[key]
                        self._retired.add(device)
                    else:
                        self._evict_locked(key, device)
                    device = None
                if device is not None:
                    try:
                        return device.open(write=write, holder=holder, holder_ops=holder_ops)
                    except DMError:
                        if not device.opens:
                            self._evict_locked(key, device)
                        raise
                busy = self._opening.get(key)
                if busy is None:
                    done = self._opening[key] = threading.Event()
                    break
            busy.wait()  # someone else is creating this device: use theirs
        try:
            device = self._create(ref)
        except BaseException:
            with self._lock:
                del self._opening[key]
            done.set()
            raise
        with self._lock:
            del self._opening[key]
            device.on_last_close(lambda dev, key=key: self._evict(key, dev))
            self._devices[key] = device
            try:
                return device.open(write=write, holder=holder, holder_ops=holder_ops)
            except DMError:
                if not device.opens:
                    self._evict_locked(key, device)
                raise
            finally:
                done.set()

    def _lookup(self, ref: str) -> tuple[object, BlockDevice | None]:
        scheme = self.scheme_of(ref)
        if scheme is not None:
            if scheme not in self._schemes:
                raise DMError(errno.EINVAL, f"{clipped(ref)}: unknown device reference scheme {quoted(scheme)}")
            key: object = ref
        else:
            if not ref.startswith("/"):
                raise DMError(errno.EINVAL, f"{quoted(ref)} is not an absolute path, MAJOR:MINOR, or a URL")
            try:
                st = os.stat(ref)
            except OSError as exc:
                raise DMError.from_os(exc, f"cannot use {clipped(ref)}") from None
            if stat.S_ISBLK(st.st_mode):
                key = ("blk", st.st_rdev)
            elif stat.S_ISREG(st.st_mode):
                key = ("file", st.st_dev, st.st_ino)
            else:
                raise DMError(errno.ENOTBLK, f"{clipped(ref)} is neither a regular file nor a block device")
        return key, self._devices.get(key)

    def _create(self, ref: str) -> BlockDevice:
        scheme = self.scheme_of(ref)
        if scheme is not None:
            return self._schemes[scheme](ref)
        return FileDisk(ref, direct=self.direct)

    def _evict(self, key: object, device: BlockDevice) -> None:
        with self._lock:
            if device.opens:
                return
            if self._devices.get(key) is device:
                del self._devices[key]
            elif device in self._retired:
                self._retired.discard(device)
            else:
                return
        device.close_backing()  # outside the lock: closing a remote export may take a while

    def _evict_locked(self, key: object, device: BlockDevice) -> None:
        if not device.opens and self._devices.get(key) is device:
            del self._devices[key]
            device.close_backing()

    def devices(self) -> list[BlockDevice]:
        with self._lock:
            return list(self._devices.values())
