"""The interposer (DESIGN.md §5; seed 003's blk_interposer): a mapped device that takes over
the I/O of another mapped device while that device stays open and in use.

A device created with `interpose=True` names one device of its table as `[interpose]DEV`. Its
table opens an `InterposedView` of DEV: the I/O path that was in front of DEV when the
interposer attached (DEV's own table, or the interposer attached before it, so interposers
stack). On the interposer's resume, `attach` freezes DEV's holder, holds DEV's new I/O, drains
what is in flight, and from then on every I/O that DEV's users submit goes through the
interposer's table; then DEV is thawed and released. `detach` (at the interposer's removal)
undoes it the same way. No open of DEV is closed and no request fails: requests that arrive
during the switch wait and then take the new path.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Protocol

from ..block.device import BlockDevice, BlockOpen
from ..errors import DMError


class MappedDevice(Protocol):
    """What the interposer needs of a mapped device (`userdm.dm.mapped.MappedDevice`)."""

    name: str
    ref: str
    size: int
    logical_block_size: int
    read_only: bool
    live: Any
    interposers: list[MappedDevice]

    def enter_below(self, front: MappedDevice) -> Any: ...

    def leave_below(self) -> None: ...

    def switch(self, change: Callable[[], object]) -> None: ...

PREFIX = "[interpose]"


class InterposedView(BlockDevice):
    """DEV as its interposer `front` sees it: the path below `front` in DEV's stack."""

    def __init__(self, dev: MappedDevice, front: MappedDevice) -> None:
        super().__init__(f"{PREFIX}{dev.ref}", dev.size, dev.logical_block_size, dev.read_only)
        self.dev = dev
        self.front = front
        #: the device whose data this view shows (a snapshot of DEV is a snapshot of this view)
        self.origin_identity = dev

    def _io(self, method: str, *args):  # noqa: ANN202
        below = self.dev.enter_below(self.front)
        try:
            return getattr(below, method)(*args)
        finally:
            self.dev.leave_below()

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._io("readinto", offset, buf)

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        self._io("write", offset, memoryview(data), fua)

    def flush(self) -> None:
        self._io("flush")

    def discard(self, offset: int, length: int) -> None:
        self._io("discard", offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        self._io("write_zeroes", offset, length, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._io("block_status", offset, length)


def open_view(dev: MappedDevice, front: MappedDevice, write: bool) -> BlockOpen:
    """The open that `front`'s table holds on `[interpose]DEV`."""
    if dev is front:
        raise DMError(errno.EINVAL, f"device {front.name} cannot interpose itself")
    if dev.live is None:
        raise DMError(errno.ENXIO, f"device {dev.name} has no live table to interpose")
    if front in dev.interposers:
        raise DMError(errno.EBUSY, f"device {front.name} already interposes {dev.name}")
    return InterposedView(dev, front).open(write=write)


def attach(dev: MappedDevice, front: MappedDevice) -> None:
    """Put `front` in front of `dev`: freeze, hold and drain `dev`, switch, release, thaw."""
    if front.size != dev.size:
        raise DMError(errno.EINVAL, f"device {front.name} has {front.size} bytes but the device it "
                      f"interposes, {dev.name}, has {dev.size}: they must be the same size")
    dev.switch(lambda: dev.interposers.append(front))


def detach(dev: MappedDevice, front: MappedDevice) -> None:
    """Take `front` out of `dev`'s path again, the same way."""
    if not dev.interposers or dev.interposers[-1] is not front:
        above = dev.interposers[-1].name if dev.interposers else "nothing"
        raise DMError(errno.EBUSY, f"device {front.name} is not the last interposer of {dev.name} "
                      f"({above} is in front of it); remove that one first")
    dev.switch(dev.interposers.pop)


def interposed_device(front: MappedDevice) -> MappedDevice | None:
    """The device that `front`'s live table interposes, if any."""
    table = front.live
    if table is None:
        return None
    for tdev in table.devices():
        device = tdev.open.device
        if isinstance(device, InterposedView) and device.front is front:
            return device.dev
    return None
