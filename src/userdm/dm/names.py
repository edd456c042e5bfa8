"""Name and uuid rules of the device-mapper registry (`check_name`, DM_NAME_LEN, DM_UUID_LEN)."""

from __future__ import annotations

import errno

from ..errors import DMError

NAME_MAX = 127
UUID_MAX = 128
MINOR_LIMIT = 1 << 20


def _printable(value: str) -> bool:
    return all(ord(c) >= 0x20 and ord(c) != 0x7F for c in value)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise DMError(errno.EINVAL, "device name not supplied")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise DMError(errno.EINVAL, f"device name {name[:40]!r}... is {size} bytes long; the limit is {NAME_MAX}")
    if "/" in name:
        raise DMError(errno.EINVAL, f"device name {name!r} contains '/': slashes are not supported")
    if name in ("control", ".", ".."):
        raise DMError(errno.EINVAL, f"device name {name!r} is reserved")
    if not _printable(name):
        raise DMError(errno.EINVAL, f"device name {name!r} contains a control character")
    return name


def check_uuid(uuid: object) -> str:
    if uuid is None or uuid == "":
        return ""
    if not isinstance(uuid, str):
        raise DMError(errno.EINVAL, f"uuid {uuid!r} is not a string")
    size = len(uuid.encode("utf-8", "surrogateescape"))
    if size > UUID_MAX:
        raise DMError(errno.EINVAL, f"uuid {uuid[:40]!r}... is {size} bytes long; the limit is {UUID_MAX}")
    if not _printable(uuid):
        raise DMError(errno.EINVAL, f"uuid {uuid!r} contains a control character")
    return uuid
