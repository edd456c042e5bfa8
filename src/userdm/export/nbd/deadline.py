"""The handshake's overall deadline, kept by the kernel (SO_RCVTIMEO, SO_SNDTIMEO).

Python's own socket timeouts cost two more system calls for each receive and send: a poll()
before each call, and an ioctl() for every `settimeout`. `nbdinfo --list` at 10,000 exports
is 20,000 option round trips over one connection, each a receive and a send, so they were
four of the six system calls per round trip. A blocking socket whose kernel timeouts are what
is left of the deadline makes each receive and send one system call; a call that would go on
past the deadline fails with EAGAIN (an OSError, which ends the handshake).

The kernel timeouts are re-armed to what is left only when `slack` seconds have gone by since
they were last set, not before every call, so a call may end at most `slack` after the
deadline (`SLACK`, or a twentieth of a short deadline).

After STARTTLS the connection speaks through a `TLSStream`, which has no kernel timeouts of
its own: the deadline is then applied with its `settimeout` before each call, as before.
"""

from __future__ import annotations

import socket
import struct
import time

#: how late after the deadline a receive or send may end, at most (seconds)
SLACK = 0.1


def _set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO (0: none)."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class HandshakeDeadline:
    """`limit` seconds from now for every receive and send on `sock` (None: no limit).
    Call `arm()` before each call and `clear()` when the handshake is over."""

    def __init__(self, sock, limit: float | None) -> None:
        self.sock = sock
        self.limit = limit
        self.at = None if limit is None else time.monotonic() + limit
        self.slack = SLACK if limit is None else min(SLACK, limit / 20)
        self._armed_at: float | None = None    # when the kernel timeouts were last set
        self._kernel = isinstance(sock, socket.socket)
        sock.settimeout(None)   # blocking: each call is one system call

    def arm(self) -> bool:
        """Before a receive or send: limit it to what is left; False once nothing is."""
        if self.at is None:
            return True
        now = time.monotonic()
        left = self.at - now
        if left <= 0:
            return False
        if not self._kernel:
            self.sock.settimeout(left)
        elif self._armed_at is None or now - self._armed_at >= self.slack:
            _set_kernel_timeouts(self.sock, max(left, 0.001))
            self._armed_at = now
        return True

    def follow(self, stream) -> None:
        """The connection speaks through `stream` (a TLSStream over the socket) from now on
        (`clear()` came first: the TLS handshake keeps the deadline its own way)."""
        self.sock = stream
        self._kernel = isinstance(stream, socket.socket)

    def clear(self) -> None:
        """No timeouts any more on the socket (the handshake is over)."""
        try:
            if self._armed_at is not None:
                self._armed_at = None
                _set_kernel_timeouts(self.sock, 0)
            self.sock.settimeout(None)
        except OSError:
            pass   # the socket is broken: the connection is closing anyway
