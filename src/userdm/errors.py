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


#: how much of a user's input an error sentence quotes
QUOTE_LIMIT = 64


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as an error sentence quotes it: its repr, cut to a short prefix if long (with
    its full length), so that a 100 MB name or table is never echoed back."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    text = repr(value)
    if len(text) > limit + 2:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text


def clipped(value: object, limit: int = 256) -> str:
    """`value` as a sentence shows it unquoted (a path, a URL): whole if short, else a prefix
    and its full length."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
