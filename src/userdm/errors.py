"""The one exception type of userdm: a kernel errno plus a sentence naming the bad input.

Every refusal in every layer raises `DMError`. Its string form is what the CLI prints
(`EBUSY: device vol0 is open (open count 2)`) and what travels over the control socket.
"""

from __future__ import annotations

import errno as _errno


#: where Python's errorcode picks another name for the same number than the kernel uses
_KERNEL_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP"}


class DMError(Exception):
    """A refusal: `errno` is the kernel's error number, `message` says what was wrong."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message

    @property
    def errno_name(self) -> str:
        return _KERNEL_NAMES.get(self.errno) or _errno.errorcode.get(self.errno, f"E{self.errno}")

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.message}"

    @classmethod
    def from_name(cls, name: str, message: str) -> "DMError":
        return cls(getattr(_errno, name, _errno.EIO), message)

    @classmethod
    def from_os(cls, exc: OSError, what: str) -> "DMError":
        err = exc.errno or _errno.EIO
        return cls(err, f"{what}: {exc.strerror or _errno.errorcode.get(err, err)}")
