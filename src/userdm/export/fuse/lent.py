"""Collapsed tables lent to a FUSE serving thread: its READs and WRITEs straight on the files.

A READ or WRITE through `DeviceFiles` passes the handle table's lock, the open's checks, the
device's lock and its in-flight count before the one `preadv`/`pwritev` that does it. Each
serving thread keeps a `LentTables` instead: per file handle it served, the device's
collapsed table (`MappedDevice.lend_flat`, as NBD connections and worker processes borrow
it), counted as one user of it, so that the next request on that handle is one call into the
table (`ops.DeviceOperations.serve`; 4 KiB reads through a loop device on the FUSE file:
79k -> 95k IOPS in one run).

The rules that keep the devices' contracts:
- a thread gives back every table it holds (`give_back`) before anything that may wait:
  before it sleeps for the next request, before it follows another leader, and before any
  request that goes through the open (anything but a plain READ or WRITE, and every
  fallback below), which may wait for a suspended device;
- a device that drops its table (a suspend, resume, load or remove of it or of a device
  below) calls the watcher, `Revocations`, which every thread compares at each request with
  what it saw: the tables found retired are given back then, and the suspend, which waits
  for them, goes on. A thread that polls for the next request gives them back when its poll
  ends (at most the poll window, `busypoll.LIMIT`);
- a request whose table is retired or fails, whose device died, a WRITE through a read-only
  open, or a handle whose device lends no table (suspended, interposed, a passthrough open)
  goes through the open as before (its errors, failure events, the suspend's hold).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .files import DeviceFiles


class Revocations:
    """The watcher of every table lent to the threads of one mount: `count` changes (to a
    value it never had) each time a device drops one."""

    __slots__ = ("count", "_next")

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self.count = 0

    def __call__(self) -> None:
        self.count = next(self._next)


#: the entry of a handle whose device lent nothing (until the thread next gives back)
NOT_LENT = (None, None, False)


class LentTables:
    """The tables one serving thread borrowed, by file handle (not thread-safe)."""

    __slots__ = ("files", "revoked", "seen", "by_fh", "before_wait")

    def __init__(self, files: DeviceFiles, revoked: Revocations,
                 before_wait: Callable[[], None] | None = None) -> None:
        self.files = files
        self.revoked = revoked
        #: what else the thread must do before it may wait: send the replies it holds
        #: (`replies.py`); called first by every `give_back`
        self.before_wait = before_wait
        self.seen = revoked.count
        #: fh -> (Flat, its MappedDevice, the open may write), or NOT_LENT
        self.by_fh: dict[int, tuple] = {}

    def read(self, fh: int, offset: int, buf: memoryview) -> bool:
        """Fill `buf` from `offset` of `fh`'s device straight from its files. False: the
        request goes through the open (every table given back first)."""
        flat, device, _ = self._get(fh)
        if (flat is not None and offset + len(buf) <= flat.starts[-1] and not flat.retired
                and not device.dead and flat.read(offset, buf)):
            return True
        self.give_back()
        return False

    def write(self, fh: int, offset: int, data: memoryview) -> bool:
        """Write `data` at `offset` of `fh`'s device straight to its files. False: the
        request goes through the open (every table given back first)."""
        flat, device, writable = self._get(fh)
        if (flat is not None and writable and offset + len(data) <= flat.starts[-1] and not flat.retired
                and not device.dead and flat.write(offset, data, False)):
            return True
        self.give_back()
        return False

    def _get(self, fh: int) -> tuple:
        """(Flat or None, device, writable) for a READ or WRITE on `fh` now."""
        if self.revoked.count != self.seen:
            self._sweep()
        entry = self.by_fh.get(fh)
        return entry if entry is not None else self._borrow(fh)

    def _borrow(self, fh: int) -> tuple:
        h = self.files.handle_or_none(fh)
        lend = getattr(h.device, "lend_flat", None) if h is not None and not h.kernel_io else None
        flat = lend(self.revoked) if lend is not None and not h.open.closed else None
        entry = (flat, h.device, h.open.write_mode) if flat is not None else NOT_LENT
        self.by_fh[fh] = entry
        return entry

    def _sweep(self) -> None:
        """Give back the tables their devices dropped (and forget handles that lent none)."""
        self.seen = self.revoked.count
        for fh, (flat, device, _) in list(self.by_fh.items()):
            if flat is None or flat.retired:
                del self.by_fh[fh]
                if flat is not None:
                    device.return_flat(flat, self.revoked)

    def give_back(self) -> None:
        """Give back every table (before the thread may wait), after `before_wait`."""
        if self.before_wait is not None:
            self.before_wait()
        if self.by_fh:
            entries = list(self.by_fh.values())
            self.by_fh.clear()
            for flat, device, _ in entries:
                if flat is not None:
                    device.return_flat(flat, self.revoked)
