"""Name and uuid rules of the device-mapper registry (`check_name`, DM_NAME_LEN, DM_UUID_LEN).

Names and uuids are valid UTF-8 (a name travels as an NBD export name and a FUSE file name);
JSON can carry a lone surrogate (`"\\udcff"`, how a non-UTF-8 byte arrives), which is refused.
Every sentence quotes at most a short prefix of the input (`userdm.errors.quoted`).
"""

from __future__ import annotations

import errno

from ..errors import DMError, quoted

NAME_MAX = 127
UUID_MAX = 128
MINOR_LIMIT = 1 << 20


def _printable(value: str) -> bool:
    return all(ord(c) >= 0x20 and ord(c) != 0x7F for c in value)


def _utf8_size(what: str, value: str) -> int:
    """The length of `value` in UTF-8; EINVAL if it is not valid UTF-8 (a lone surrogate)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise DMError(errno.EINVAL, f"{what} {quoted(value)} is not valid UTF-8 "
                      f"(character {exc.start} is a lone surrogate)") from None


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise DMError(errno.EINVAL, "device name not supplied")
    size = _utf8_size("device name", name)
    if size > NAME_MAX:
        raise DMError(errno.EINVAL, f"device name {quoted(name)} is {size} bytes long; the limit is {NAME_MAX}")
    if "/" in name:
        raise DMError(errno.EINVAL, f"device name {quoted(name)} contains '/': slashes are not supported")
    if name in ("control", ".", ".."):
        raise DMError(errno.EINVAL, f"device name {name!r} is reserved")
    if not _printable(name):
        raise DMError(errno.EINVAL, f"device name {quoted(name)} contains a control character")
    return name


def check_uuid(uuid: object) -> str:
    if uuid is None or uuid == "":
        return ""
    if not isinstance(uuid, str):
        raise DMError(errno.EINVAL, f"uuid {quoted(uuid)} is not a string")
    size = _utf8_size("uuid", uuid)
    if size > UUID_MAX:
        raise DMError(errno.EINVAL, f"uuid {quoted(uuid)} is {size} bytes long; the limit is {UUID_MAX}")
    if not _printable(uuid):
        raise DMError(errno.EINVAL, f"uuid {quoted(uuid)} contains a control character")
    return uuid
