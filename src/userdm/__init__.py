"""userdm: the Linux device-mapper in userspace.

Public API: `Mapper` (in-process device-mapper), `connect()` (client of a running daemon),
`DMError` (every refusal: a kernel errno and a sentence).
"""

from .errors import DMError
from .version import __version__


def __getattr__(name: str):
    # Imported lazily so that `import userdm` stays cheap for the CLI.
    if name == "Mapper":
        from .inprocess import Mapper
        return Mapper
    if name == "connect":
        from .control.client import connect
        return connect
    raise AttributeError(name)


__all__ = ["DMError", "Mapper", "connect", "__version__"]
