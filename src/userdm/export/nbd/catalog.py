"""The NBD server's view of the mapper: exports are mapped devices with a live table.

One `MapperCatalog` per connection: `select` (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) opens the
device with `mapper.open_device`, so the connection counts in the device's open count until
it closes. A device whose table is read-only is opened read-only and exported with
NBD_FLAG_READ_ONLY. `info` (NBD_OPT_INFO, metadata context queries) never opens the device:
an open and close would fire a deferred or autoclear removal. Both look the name up with
`mapper.exported(name)`, whose cost does not depend on the number of devices; `names`
(NBD_OPT_LIST) builds the list once per LIST.

A `BoundCatalog` serves a socket made for one open that already exists (`create(...,
open_fd=True)`, `open`): the open was made before the socket existed, so the client's
handshake can only select that device (by its name or the default name "").
"""

from __future__ import annotations

import errno

from ...block.device import BlockOpen
from ...errors import DMError
from ...nbd import constants as C
from ...nbd.handshake import ExportInfo, Refused
from ..source import ExportSource


class MapperCatalog:
    """Export catalog for one connection; `handle` is its open once `select` succeeded."""

    def __init__(self, mapper: ExportSource) -> None:
        self.mapper = mapper
        self.handle: BlockOpen | None = None

    def names(self) -> list[str]:
        return self.mapper.export_names()

    def _refuse(self, name: str) -> Refused:
        """UNKNOWN for a device that does not exist or has no live table; SHUTDOWN for one
        that has a live table but is being removed."""
        try:
            live = bool(self.mapper.info(name).get("live"))
        except DMError:
            live = False
        if live:
            return Refused(C.REP_ERR_SHUTDOWN, f"export {name!r} is being removed")
        return Refused(C.REP_ERR_UNKNOWN, f"no export named {name!r} (no such device, or it has no live table)")

    def info(self, name: str) -> ExportInfo:
        device = self.mapper.exported(name)
        if device is None:
            raise self._refuse(name)
        # read off the device itself, not `mapper.info` (a dict of every field: most of the
        # daemon's time in `nbdinfo --list`); a device's size and read-only flag are its live
        # table's, set together when the table is swapped in
        return ExportInfo(name=name, size=device.size, read_only=bool(device.read_only),
                          min_block=_block_size(device))

    def select(self, name: str) -> ExportInfo:
        if self.handle is not None:
            raise Refused(C.REP_ERR_INVALID, "an export is already selected")
        if self.mapper.exported(name) is None:
            raise self._refuse(name)
        try:
            readonly = bool(self.mapper.info(name).get("readonly"))
            try:
                handle = self.mapper.open_device(name, write=not readonly)
            except DMError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or readonly:
                    raise
                handle = self.mapper.open_device(name, write=False)
        except DMError as exc:
            if exc.errno == errno.ENXIO:
                raise self._refuse(name) from None
            raise Refused(C.REP_ERR_POLICY, str(exc)) from None
        self.handle = handle
        return ExportInfo(name=name, size=handle.size, read_only=handle.read_only,
                          min_block=_logical_block_size(handle))

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.close()


class BoundCatalog:
    """The catalog of a socket that carries one existing open of device `name`."""

    #: the holder of such a socket may keep it without speaking for as long as it likes
    handshake_timeout = None
    #: the open lasts until every copy of the client's socket is closed, even after NBD_CMD_DISC
    open_until_eof = True

    def __init__(self, handle: BlockOpen, name: str) -> None:
        self.handle: BlockOpen | None = None
        self._bound: BlockOpen | None = handle
        self.name = name

    def names(self) -> list[str]:
        return [self.name]

    def _check(self, name: str) -> BlockOpen:
        if name not in ("", self.name):
            raise Refused(C.REP_ERR_UNKNOWN, f"this connection carries an open of {self.name!r}, "
                          f"not of {name!r}")
        handle = self._bound or self.handle
        if handle is None or handle.closed:
            raise Refused(C.REP_ERR_SHUTDOWN, f"the open of {self.name!r} is closed")
        return handle

    def info(self, name: str) -> ExportInfo:
        handle = self._check(name)
        return ExportInfo(name=self.name, size=handle.size, read_only=handle.read_only,
                          min_block=_logical_block_size(handle))

    def select(self, name: str) -> ExportInfo:
        if self.handle is not None:
            raise Refused(C.REP_ERR_INVALID, "an export is already selected")
        info = self.info(name)
        self.handle, self._bound = self._bound, None
        return info

    def close(self) -> None:
        handle = self.handle or self._bound
        self.handle = self._bound = None
        if handle is not None:
            handle.close()


def _logical_block_size(handle: BlockOpen) -> int:
    return _block_size(handle.device)


def _block_size(device: object) -> int:
    lbs = getattr(device, "logical_block_size", 512)
    return lbs if lbs in (512, 4096) else 512
