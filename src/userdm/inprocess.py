"""`userdm.Mapper`: the device-mapper in process, with the export that carries its opens.

The core's `userdm.dm.mapper.Mapper` knows nothing of exports. A user of the public API gets
this subclass, which hands out `create(..., open_fd=True)` and `open` as NBD client sockets
served by connections of their own (in the daemon, its NBD server serves them instead).
"""

from __future__ import annotations

from typing import Any

from .dm.mapper import Mapper as CoreMapper
from .export.nbd.server import OpenSockets


class Mapper(CoreMapper):
    """All mapped devices of this process (see `userdm.dm.mapper.Mapper`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets = OpenSockets()
