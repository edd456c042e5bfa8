"""What an export needs from the device-mapper core: the one interface between the two.

`userdm.dm.mapper.Mapper` provides it; the NBD server and the FUSE export use nothing else
of the core (besides the `BlockOpen` handles that `open_device` returns and the mapped
device objects that `device` returns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..block.device import BlockDevice, BlockOpen


class ExportSource(Protocol):
    """The devices to export, their state, and opens of them."""

    def export_names(self) -> list[str]:
        """Devices that have a live table and are not being removed, partitions included
        (built and sorted on each call: for listing, never for looking up one name)."""
        ...

    def exported(self, name: str) -> BlockDevice | None:
        """The device `name` if `export_names()` lists it, else None: a lookup of one name,
        lock-free, whose cost does not grow with the number of devices (the NBD server asks
        it on every INFO, GO and metadata-context query)."""
        ...

    def info(self, name: str) -> dict[str, Any]:
        """`Mapper.info`: size, read-only, live ... (lock-free: a snapshot)."""
        ...

    def device(self, name: str) -> BlockDevice:
        """The device object named `name` (a mapped device or a partition of one)."""
        ...

    def open_device(self, name: str, *, write: bool, holder: object | None = None) -> BlockOpen:
        """An open that counts in the device's open count until it is closed."""
        ...

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Call `listener(record)` for every event (creates, removes, resizes ...)."""
        ...

    def unsubscribe(self, listener: Callable[[dict[str, Any]], None]) -> None: ...
