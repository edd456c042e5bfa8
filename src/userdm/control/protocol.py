"""The control protocol, sans-IO: framing, requests, responses and dispatch to a Mapper.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Requests
are `{"cmd": NAME, "args": {...}}` where NAME is one of `COMMANDS` (the DM ioctls, named
after the dmsetup verbs); responses are `{"ok": true, "result": ...}` or
`{"ok": false, "errno": "EBUSY", "message": "..."}`. File descriptors travel beside a
message as SCM_RIGHTS ancillary data; a message that carries them says so in `"fds"`.
Nothing here touches a socket, so the protocol is tested and fuzzed with plain bytes.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from ..errors import DMError

MAX_MESSAGE = 512 << 20  # a table of a million lines is ~40 MiB of JSON
_LEN = struct.Struct(">I")

#: commands a client may call, each a method of `userdm.dm.mapper.Mapper`
COMMANDS = frozenset({
    "version", "targets", "list", "tree", "info", "table", "status", "deps",
    "create", "load", "clear", "suspend", "resume", "remove", "remove_all", "rename",
    "message", "wait", "wipe_table", "partprobe", "find_name", "open", "era_changed",
    "notify_failure", "recent_events",
})

#: commands the control server answers itself, with file descriptors beside the response
FD_COMMANDS = frozenset({"connect_nbd"})

#: commands that turn the connection into a stream of messages (`control/event_stream.py`)
STREAM_COMMANDS = frozenset({"events"})


class ProtocolError(Exception):
    """The peer sent something that is not a valid message; the connection must close."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE:
        raise DMError(errno.E2BIG, f"message of {len(body)} bytes exceeds the limit of {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


class Decoder:
    """Accumulates received bytes and returns the complete messages in them."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_MESSAGE:
                raise ProtocolError(f"message length {size} exceeds the limit of {MAX_MESSAGE}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            try:
                message = json.loads(body)
            except (UnicodeDecodeError, ValueError) as exc:
                raise ProtocolError(f"message is not valid JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ProtocolError("message is not a JSON object")
            out.append(message)
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def request(cmd: str, **args: Any) -> dict[str, Any]:
    return {"cmd": cmd, "args": args}


def ok(result: Any, fds: int = 0) -> dict[str, Any]:
    response = {"ok": True, "result": result}
    if fds:
        response["fds"] = fds
    return response


def take_fd(response: dict[str, Any]) -> int | None:
    """Take the file descriptor out of a successful result (`create(open_fd=True)`, `open`):
    the result keeps `"fd": null` and the response says that one fd travels beside it."""
    result = response.get("result")
    if not response.get("ok") or not isinstance(result, dict) or not isinstance(result.get("fd"), int):
        return None
    fd, result["fd"] = result["fd"], None
    response["fds"] = 1
    return fd


def error(exc: DMError) -> dict[str, Any]:
    return {"ok": False, "errno": exc.errno_name, "message": exc.message}


def result_of(response: dict[str, Any]) -> Any:
    """The result of a response, or the DMError it carries."""
    if response.get("ok"):
        return response.get("result")
    raise DMError.from_name(str(response.get("errno", "EIO")), str(response.get("message", "unknown error")))


def dispatch(target: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Run one request against `target` (a Mapper) and build the response. Never raises."""
    cmd = message.get("cmd")
    args = message.get("args", {})
    try:
        if cmd not in COMMANDS:
            raise DMError(errno.ENOTTY, f"unknown command {cmd!r}")
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise DMError(errno.EINVAL, f"{cmd}: arguments must be a JSON object")
        method = getattr(target, cmd)
        try:
            return ok(method(**args))
        except TypeError as exc:
            if "argument" in str(exc):
                raise DMError(errno.EINVAL, f"{cmd}: bad arguments: {exc}") from None
            raise
    except DMError as exc:
        return error(exc)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        return error(DMError(errno.EINVAL, f"{cmd}: invalid argument: {exc}"))
