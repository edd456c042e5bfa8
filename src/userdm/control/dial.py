"""Connecting to the daemon's control socket, as every client connection does (requests and
event streams alike).

`dial` first refuses (EPERM) a socket whose directory is owned by anyone but the caller or root,
or is writable by group or others (`paths.check_socket_dir`). A daemon that already serves its
maximum of connections answers EAGAIN and closes at once; `refusal` turns a send that failed
because of that close into the daemon's own sentence.
"""

from __future__ import annotations

import errno
import os
import socket

from ..errors import DMError
from . import paths, protocol


def dial(path: str) -> socket.socket:
    """A socket connected to the control socket at `path`; ENOENT (or the connect's errno)
    with a sentence if no daemon answers there."""
    paths.check_socket_dir(os.path.dirname(path) or ".")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DMError(errno.ENOENT if isinstance(exc, FileNotFoundError) else exc.errno or errno.EIO,
                      f"cannot reach the userdm daemon at {path}: {exc.strerror}; "
                      "is `userdm daemon` running?") from None
    return sock


def refusal(sock: socket.socket, exc: OSError) -> DMError:
    """After a send on `sock` failed with `exc`: what the daemon said before it closed the
    connection (EAGAIN: too many connections), else `exc` as a DMError."""
    try:
        sock.settimeout(0)
        data = sock.recv(1 << 16)
        messages = protocol.Decoder().feed(data) if data else []
    except (OSError, protocol.ProtocolError):
        messages = []
    if messages and not messages[0].get("ok"):
        try:
            protocol.result_of(messages[0])
        except DMError as said:
            return said
    return DMError(exc.errno or errno.EIO, f"the userdm daemon closed the connection: {exc.strerror}")
