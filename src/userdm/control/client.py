"""The Python client of a running daemon: `userdm.connect()` returns a `Client` whose methods
are the Mapper's (`create`, `load`, `resume`, `info`, ...) and return the same results."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..errors import DMError
from . import paths, protocol
from .dial import dial, refusal
from .event_stream import EventStream


class Client:
    """A connection to the daemon's control socket. Thread-safe; one request at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = dial(path)
        self._decoder = protocol.Decoder()
        self._lock = threading.Lock()

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one command; a file descriptor sent beside the answer (`create(open_fd=True)`,
        `open`) becomes the result's `"fd"`, owned by the caller."""
        result, fd = self._call_with_fd(cmd, args)
        if fd is not None:
            if isinstance(result, dict):
                result["fd"] = fd
            else:
                os.close(fd)
        return result

    def _call_with_fd(self, cmd: str, args: dict[str, Any]) -> tuple[Any, int | None]:
        """The result and the file descriptor that came beside it: exactly one if the response
        says it carries one (`"fds"`), else none (stray ones are closed)."""
        message, fds = self._roundtrip(cmd, args)
        try:
            result = protocol.result_of(message)
            if message.get("fds") and len(fds) != 1:
                raise DMError(errno.EPROTO, f"expected one file descriptor from the daemon, got {len(fds)}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if not message.get("fds"):
            for fd in fds:
                os.close(fd)
            return result, None
        return result, fds[0]

    def _roundtrip(self, cmd: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                self._sock.sendall(protocol.encode(protocol.request(cmd, **args)))
            except OSError as exc:
                # the daemon may have answered and closed (EAGAIN: too many connections)
                raise refusal(self._sock, exc) from None
            fds: list[int] = []
            while True:
                data, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 20, 4, socket.MSG_CMSG_CLOEXEC)
                fds += got
                if not data:
                    for fd in fds:
                        os.close(fd)
                    raise DMError(errno.ECONNRESET, "the userdm daemon closed the connection")
                messages = self._decoder.feed(data)
                if messages:
                    return messages[0], fds

    def connect_nbd(self) -> socket.socket:
        """A new socket connected to the daemon's NBD server, passed over the control socket
        (SCM_RIGHTS). Do the NBD handshake on it, e.g. libnbd's `connect_socket(sock.fileno())`."""
        _, fd = self._call_with_fd("connect_nbd", {})
        if fd is None:
            raise DMError(errno.EPROTO, "the daemon answered connect_nbd without a file descriptor")
        return socket.socket(fileno=fd)

    def events(self, callback: Callable[[dict[str, Any]], None] | None = None, *,
               name: str | None = None, recent: bool = False) -> EventStream:
        """A live stream of event records (failures, deaths, creates, removes, ...), on a
        connection of its own: iterate it, or pass `callback` (called from a thread of the
        stream). Only records concerning device `name` if given; with `recent`, first the
        recent ones. `close()` the stream to end it."""
        stream = EventStream(self.path, name=name, recent=recent)
        return stream.start(callback) if callback is not None else stream

    def __getattr__(self, cmd: str) -> Any:
        if cmd not in protocol.COMMANDS:
            raise AttributeError(cmd)
        return lambda *args, **kwargs: self.call(cmd, **_positional(cmd, args), **kwargs)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Positional parameters of the Mapper methods, so `client.create("v", table)` works as in process.
_POSITIONAL = {
    "create": ("name", "table"), "load": ("name", "table"), "message": ("name", "sector", "message"),
    "rename": ("name", "new_name"), "wait": ("name", "event_nr"),
    "notify_failure": ("dev", "offset", "length", "flags"),
}


def _positional(cmd: str, args: tuple[Any, ...]) -> dict[str, Any]:
    names = _POSITIONAL.get(cmd, ("name",))
    if len(args) > len(names):
        raise TypeError(f"{cmd}() takes at most {len(names)} positional arguments")
    return dict(zip(names, args))


def connect(runtime_dir: str | None = None) -> Client:
    """Connect to the daemon that serves `runtime_dir` (default: see DESIGN §3)."""
    return Client(str(paths.control_socket(paths.runtime_dir(runtime_dir))))
