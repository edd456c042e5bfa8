"""Connecting to the daemon's control socket, as every client connection does (requests and
event streams alike)."""

from __future__ import annotations

import errno
import socket

from ..errors import DMError


def dial(path: str) -> socket.socket:
    """A socket connected to the control socket at `path`; ENOENT (or the connect's errno)
    with a sentence if no daemon answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DMError(errno.ENOENT if isinstance(exc, FileNotFoundError) else exc.errno or errno.EIO,
                      f"cannot reach the userdm daemon at {path}: {exc.strerror}; "
                      "is `userdm daemon` running?") from None
    return sock
