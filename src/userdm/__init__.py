"""userdm: the Linux device-mapper in userspace.

Public API: `Mapper` (in-process device-mapper), `connect()` (client of a running daemon),
`DMError` (every refusal: a kernel errno and a sentence).
"""

from typing import TYPE_CHECKING

from .errors import DMError
from .version import __version__

if TYPE_CHECKING:  # what type checkers see; at run time both are imported on first use
    from .control.client import Client, connect
    from .inprocess import Mapper


def __getattr__(name: str) -> object:
    # Imported lazily so that `import userdm` stays cheap for the CLI.
    if name == "Mapper":
        from .inprocess import Mapper
        return Mapper
    if name == "connect":
        from .control.client import connect
        return connect
    if name == "Client":
        from .control.client import Client
        return Client
    raise AttributeError(name)


__all__ = ["Client", "DMError", "Mapper", "connect", "__version__"]
