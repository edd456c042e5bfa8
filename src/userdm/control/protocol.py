"""The control protocol, sans-IO: framing, requests, responses and dispatch to a Mapper.

A message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Requests
are `{"cmd": NAME, "args": {...}}` where NAME is one of `COMMANDS` (the DM ioctls, named
after the dmsetup verbs); responses are `{"ok": true, "result": ...}` or
`{"ok": false, "errno": "EBUSY", "message": "..."}`. File descriptors travel beside a
message as SCM_RIGHTS ancillary data; a message that carries them says so in `"fds"`.
Nothing here touches a socket, so the protocol is tested and fuzzed with plain bytes.
Every request is checked against `schema.SCHEMA` before it reaches the Mapper.
"""

from __future__ import annotations

import errno
import json
import logging
import struct
from typing import Any

from ..errors import DMError, quoted
from . import schema

log = logging.getLogger("userdm.control")

#: the largest message a Decoder accepts unless told otherwise: the client's limit for responses
#: (a `table` of a million lines is ~40 MiB of JSON); the daemon's limit for requests is its
#: `--max-message-size` (`DEFAULT_MAX_REQUEST`)
MAX_MESSAGE = 512 << 20
#: the daemon's default limit for one request: a 1,000,000-line table (~40 MiB of JSON) fits
DEFAULT_MAX_REQUEST = 64 << 20
#: an error sentence longer than this is cut (inputs are quoted short; this is the backstop)
MAX_ERROR_MESSAGE = 2000
_LEN = struct.Struct(">I")

#: commands a client may call, each a method of `userdm.dm.mapper.Mapper`
COMMANDS = frozenset({
    "version", "targets", "list", "tree", "info", "table", "table_text", "status", "deps",
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


def parse(body: bytes) -> dict[str, Any]:
    """One message body as a JSON object; DMError EINVAL (saying why) if it is not one."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DMError(errno.EINVAL, f"message is not valid UTF-8 JSON: {quoted(str(exc), 200)}") from None
    except RecursionError:
        raise DMError(errno.EINVAL, "message is not valid JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise DMError(errno.EINVAL, f"message is not a JSON object but {type(message).__name__}")
    return message


class Decoder:
    """Accumulates received bytes and returns the complete messages in them.

    It never holds more than one partial message (at most `max_message` bytes plus its
    4-byte length) beyond the bytes of the last `feed`. A message whose declared length is
    beyond `max_message` is refused (E2BIG) and its body skipped without being buffered, so
    the framing, and the connection, carry on."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._skip = 0

    def frames(self, data: bytes) -> list[bytes | DMError]:
        """The complete message bodies in the bytes so far; an oversize one is a DMError."""
        out: list[bytes | DMError] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        self._buf += view
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self.max_message:
                del self._buf[:4]
                dropped = min(size, len(self._buf))
                del self._buf[:dropped]
                self._skip = size - dropped
                out.append(DMError(errno.E2BIG, f"message of {size} bytes exceeds the limit of "
                                   f"{self.max_message} bytes (userdm daemon --max-message-size)"))
                continue
            if len(self._buf) < 4 + size:
                break
            out.append(bytes(self._buf[4:4 + size]))
            del self._buf[:4 + size]
        return out

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The complete messages; ProtocolError on anything that is not one (a client's view
        of its daemon: garbage means the connection is broken)."""
        out = []
        for frame in self.frames(data):
            if isinstance(frame, DMError):
                raise ProtocolError(frame.message)
            try:
                out.append(parse(frame))
            except DMError as exc:
                raise ProtocolError(exc.message) from None
        return out

    def feed_requests(self, data: bytes) -> list[dict[str, Any] | DMError]:
        """The complete requests, each a message or the DMError that refuses it (E2BIG, or
        EINVAL for a body that is not a JSON object): the daemon answers it and carries on."""
        out: list[dict[str, Any] | DMError] = []
        for frame in self.frames(data):
            if isinstance(frame, DMError):
                out.append(frame)
                continue
            try:
                out.append(parse(frame))
            except DMError as exc:
                out.append(exc)
        return out

    @property
    def buffered(self) -> int:
        """Bytes held in memory (never more than one partial message)."""
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held or still to be skipped."""
        return len(self._buf) + self._skip

    def close(self) -> None:
        """Drop what is buffered (the connection closed)."""
        self._buf = bytearray()
        self._skip = 0


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
    message = exc.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = f"{message[:MAX_ERROR_MESSAGE]}... ({len(exc.message)} characters)"
    return {"ok": False, "errno": exc.errno_name, "message": message}


def result_of(response: dict[str, Any]) -> Any:
    """The result of a response, or the DMError it carries."""
    if response.get("ok"):
        return response.get("result")
    raise DMError.from_name(str(response.get("errno", "EIO")), str(response.get("message", "unknown error")))


def dispatch(target: Any, message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Run one request against `target` (a Mapper) and build the response. Never raises:
    the request is checked against `schema.SCHEMA` first, so the Mapper sees only well-typed
    arguments (and `extra`, what the control server adds: a holder's ops); an unexpected
    exception is logged and answered with EIO."""
    cmd = message.get("cmd") if isinstance(message, dict) else None
    label = cmd if isinstance(cmd, str) and cmd in schema.SCHEMA else "request"
    try:
        cmd, args = schema.check_request(message)
        if cmd not in COMMANDS:
            raise DMError(errno.EINVAL, f"{cmd} is answered by the control server, not by the device mapper")
        return ok(getattr(target, cmd)(**{**args, **extra}))
    except DMError as exc:
        return error(exc)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        return error(DMError(errno.EINVAL, f"{label}: invalid argument: {quoted(str(exc), 200)}"))
    except Exception as exc:  # a bug: say so, keep the connection and the daemon
        log.exception("control request %s failed", label)
        return error(DMError(errno.EIO, f"{label}: internal error: {type(exc).__name__}"))
