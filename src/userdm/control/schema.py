"""The schema of control requests: every argument of every command, typed and checked before
the Mapper (or the control server, for `connect_nbd` and `events`) sees it.

A request is `{"cmd": NAME, "args": {...}}` and nothing else. `check_request` returns the
command and its arguments, or raises DMError: ENOTTY for an unknown command, EINVAL naming the
field for anything else (a field of the wrong type, out of range, unknown or missing). Its
sentences quote at most a short prefix of the input (`userdm.errors.quoted`).

| kind      | accepts                                                                        |
|-----------|--------------------------------------------------------------------------------|
| `DEVICE`  | an existing device's name: a non-empty string of at most 255 bytes            |
| `NEW_NAME`| a name for a device: `check_name` (valid UTF-8, at most 127 bytes, printable)  |
| `UUID`    | a uuid: `check_uuid` (valid UTF-8, at most 128 bytes, printable)               |
| `REF`     | a device reference (name, path, URL, MAJOR:MINOR): a string of at most 4096 bytes |
| `TEXT`    | any string (a table, a target message: bounded by the message size)           |
| `HOLDER`  | a holder id: a string of at most 255 bytes                                    |
| `BOOL`    | `true` or `false` (never `"no"`, `0` or `null`)                                |
| `U64`     | an integer from 0 to 2**64-1 (never a float or a boolean)                     |
| `INT`     | an integer from -2**63 to 2**64-1 (a minor: its range is the registry's rule) |
| `SECONDS` | a finite number of seconds from 0 to `threading.TIMEOUT_MAX`                  |
| `OPS`     | holder operations a client serves: a non-empty list of distinct names of `hooks.OPS` |

`X | None` is written `optional(X)`: the field may also be `null`.
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Callable
from typing import Any

from ..dm.hooks import OPS as HOLDER_OPS
from ..dm.names import UUID_MAX, check_name, check_uuid
from ..errors import DMError, quoted

#: no device has a longer name (a FUSE file name; partitions add a suffix to a disk's name)
DEVICE_NAME_MAX = 255
#: a device reference: PATH_MAX
REF_MAX = 4096
HOLDER_MAX = 255
U64_MAX = (1 << 64) - 1


class Mismatch(Exception):
    """A field does not fit its kind; the message completes `argument 'F' ...`."""


Kind = Callable[[Any], Any]


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _string(value: object, limit: int | None, what: str) -> str:
    if not isinstance(value, str):
        raise Mismatch(f"must be {what}, not {_type_name(value)} {quoted(value)}")
    if limit is not None:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise Mismatch(f"must be {what} of at most {limit} bytes, not {size} bytes ({quoted(value)})")
    return value


def DEVICE(value: object) -> str:
    _string(value, DEVICE_NAME_MAX, "a device name")
    if not value:
        raise Mismatch("must be a device name, not an empty string")
    return value  # type: ignore[return-value]


def NEW_NAME(value: object) -> str:
    _string(value, None, "a device name")
    return check_name(value)


def UUID(value: object) -> str:
    _string(value, None, "a uuid")
    check_uuid(value)
    return value  # type: ignore[return-value]


def LOOKUP_UUID(value: object) -> str:
    return _string(value, UUID_MAX, "a uuid")


def REF(value: object) -> str:
    _string(value, REF_MAX, "a device (a name, a path, a URL or MAJOR:MINOR)")
    if not value:
        raise Mismatch("must name a device, not an empty string")
    return value  # type: ignore[return-value]


def TEXT(value: object) -> str:
    return _string(value, None, "a string")


def HOLDER(value: object) -> str:
    return _string(value, HOLDER_MAX, "a holder id (a string)")


def BOOL(value: object) -> bool:
    if not isinstance(value, bool):
        raise Mismatch(f"must be true or false, not {_type_name(value)} {quoted(value)}")
    return value


def _integer(value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Mismatch(f"must be an integer, not {_type_name(value)} {quoted(value)}")
    if not low <= value <= high:
        raise Mismatch(f"must be an integer from {low} to {high}, not {quoted(value)}")
    return value


def U64(value: object) -> int:
    return _integer(value, 0, U64_MAX)


def INT(value: object) -> int:
    return _integer(value, -(1 << 63), U64_MAX)


def SECONDS(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Mismatch(f"must be a number of seconds, not {_type_name(value)} {quoted(value)}")
    if not (math.isfinite(value) and 0 <= value <= threading.TIMEOUT_MAX):
        raise Mismatch(f"must be a number of seconds from 0 to {threading.TIMEOUT_MAX:g}, not {quoted(value)}")
    return value


def OPS(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise Mismatch(f"must be a non-empty list of holder operations ({', '.join(HOLDER_OPS)}), "
                       f"not {_type_name(value)} {quoted(value)}")
    for op in value:
        if op not in HOLDER_OPS or not isinstance(op, str):
            raise Mismatch(f"must list holder operations ({', '.join(HOLDER_OPS)}), not {quoted(op)}")
    if len(set(value)) != len(value):
        raise Mismatch(f"must list each holder operation once, not {quoted(value)}")
    return value


def optional(kind: Kind) -> Kind:
    def check(value: object) -> Any:
        return None if value is None else kind(value)
    return check


class Field:
    def __init__(self, kind: Kind, required: bool = False) -> None:
        self.kind = kind
        self.required = required


def required(kind: Kind) -> Field:
    return Field(kind, True)


def _named(**extra: Any) -> dict[str, Field]:
    """The fields of a command about one device: `name`, then `extra` (optional unless `required`)."""
    fields = {"name": required(DEVICE)}
    fields.update({k: v if isinstance(v, Field) else Field(v) for k, v in extra.items()})
    return fields


#: every command's fields, named as the Mapper's parameters (tests check that they match)
SCHEMA: dict[str, dict[str, Field]] = {
    "version": {}, "targets": {}, "list": {}, "tree": {}, "remove_all": {"force": Field(BOOL),
                                                                           "deferred": Field(BOOL)},
    "info": _named(), "clear": _named(), "resume": _named(), "wipe_table": _named(),
    "partprobe": _named(),
    "table": _named(inactive=BOOL, showkeys=BOOL), "table_text": _named(inactive=BOOL, showkeys=BOOL),
    "status": _named(inactive=BOOL), "deps": _named(inactive=BOOL),
    "create": {"name": required(optional(NEW_NAME)), "table": Field(optional(TEXT)),
               "uuid": Field(optional(UUID)), "readonly": Field(BOOL), "minor": Field(optional(INT)),
               "shared": Field(BOOL), "autoclear": Field(BOOL), "max_opens": Field(optional(INT)),
               "open_fd": Field(BOOL), "holder": Field(optional(HOLDER)), "interpose": Field(BOOL),
               "blockdev": Field(BOOL)},
    "load": _named(table=required(TEXT), readonly=BOOL),
    "suspend": _named(noflush=BOOL, nolockfs=BOOL),
    "remove": _named(force=BOOL, deferred=BOOL, retry=BOOL, no_open=BOOL),
    "rename": _named(new_name=optional(NEW_NAME), uuid=optional(UUID)),
    "message": _named(sector=required(U64), message=required(TEXT)),
    "wait": _named(event_nr=U64, timeout=optional(SECONDS)),
    "find_name": {"uuid": Field(optional(LOOKUP_UUID)), "major": Field(optional(U64)),
                  "minor": Field(optional(U64))},
    "open": _named(readonly=BOOL, exclusive=BOOL, holder=optional(HOLDER), diskseq=optional(U64),
                   hook=optional(REF), hook_timeout=optional(SECONDS), ops=optional(OPS)),
    "era_changed": _named(since=required(U64), metadata_snapshot=BOOL),
    "notify_failure": {"dev": required(REF), "offset": required(U64), "length": required(U64),
                       "flags": Field(U64)},
    "recent_events": {"name": Field(optional(DEVICE))},
    # answered by the control server itself
    "connect_nbd": {},
    "events": {"name": Field(optional(DEVICE)), "recent": Field(BOOL)},
}


def check_request(message: object) -> tuple[str, dict[str, Any]]:
    """The command and arguments of a request, each field checked; DMError otherwise."""
    if not isinstance(message, dict):
        raise DMError(errno.EINVAL, f"a request must be a JSON object, not {_type_name(message)}")
    cmd = message.get("cmd")
    if "cmd" not in message:
        raise DMError(errno.EINVAL, "the request has no field 'cmd' naming a command")
    if not isinstance(cmd, str):
        raise DMError(errno.EINVAL, f"the request's field 'cmd' must be a string naming a command, "
                      f"not {_type_name(cmd)} {quoted(cmd)}")
    fields = SCHEMA.get(cmd)
    if fields is None:
        raise DMError(errno.ENOTTY, f"unknown command {quoted(cmd)}")
    extra = [key for key in message if key not in ("cmd", "args")]
    if extra:
        raise DMError(errno.EINVAL, f"{cmd}: the request has an unknown field {quoted(extra[0])} "
                      "(a request is {\"cmd\": ..., \"args\": {...}})")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise DMError(errno.EINVAL, f"{cmd}: the request's field 'args' must be a JSON object, "
                      f"not {_type_name(args)} {quoted(args)}")
    for key in args:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise DMError(errno.EINVAL, f"{cmd}: unknown argument {quoted(key)} (arguments: {known})")
    for key, field in fields.items():
        if key not in args:
            if field.required:
                raise DMError(errno.EINVAL, f"{cmd}: argument {key!r} is missing")
            continue
        try:
            field.kind(args[key])
        except Mismatch as exc:
            raise DMError(errno.EINVAL, f"{cmd}: argument {key!r} {exc}") from None
        # a DMError (from check_name, check_uuid) passes as it is: its sentence names the input,
        # exactly as the Mapper in process says it
    return cmd, args
