"""The control socket server: a thin loop that moves bytes between clients and the protocol.

The socket is created with mode 0600 and every peer's credentials (SO_PEERCRED) are checked:
only root and the daemon's own user may talk to it. One thread per connection, so a client
blocked in `wait` or `remove --retry` never holds up the others.

What a client can cost the daemon is bounded (`ControlLimits`, options of `userdm daemon`):
- at most `max_connections` connections at once; one more is accepted, answered with EAGAIN
  and a sentence, and closed (the Python client raises that DMError);
- a request of at most `max_message` bytes; a longer one is answered with E2BIG and its body
  is skipped unread, and the connection carries on;
- a request that has begun must arrive within `message_timeout` seconds, and a reply must be
  taken within as long; otherwise ETIMEDOUT (if it can still be sent) and the connection closes.
  An idle connection (between requests) may stay as long as it likes;
- a closed connection's buffers are freed at once (nothing keeps a reference to them).
The accept loop survives running out of file descriptors or memory (EMFILE, ENFILE, ENOBUFS,
ENOMEM): it logs once per burst, backs off (up to a second) and keeps accepting; connections
wait in the listen backlog (SOMAXCONN) meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DMError
from . import protocol, schema
from .event_stream import serve_events
from .holder_channel import serve_holder

log = logging.getLogger("userdm.control")


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def claim_socket_path(path: Path) -> None:
    """Refuse if a live daemon answers on `path`; remove a stale socket left by a dead one."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise DMError(errno.EBUSY, f"another userdm daemon is already listening on {path}")


#: accept() errors that mean "not now" (descriptors or memory exhausted): back off and retry
RETRY_LATER = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that concern one connection only
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM})
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


@dataclass(frozen=True)
class ControlLimits:
    """What one client may cost the daemon (see the module docstring). The defaults suit a
    small machine (2 cores, 24 GiB): 64 connections, each with at most one 64 MiB request
    buffered (a 1,000,000-line table is ~40 MiB of JSON)."""

    max_connections: int = 64
    max_message: int = protocol.DEFAULT_MAX_REQUEST
    message_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            raise DMError(errno.EINVAL, f"--max-control-connections {self.max_connections!r}: "
                          "at least 1 connection")
        if not (isinstance(self.max_message, int) and 4096 <= self.max_message <= protocol.MAX_MESSAGE):
            raise DMError(errno.EINVAL, f"--max-message-size {self.max_message!r}: from 4096 bytes "
                          f"to {protocol.MAX_MESSAGE >> 20} MiB")
        if not (isinstance(self.message_timeout, (int, float)) and 0 < self.message_timeout <= 86400):
            raise DMError(errno.EINVAL, f"--control-message-timeout {self.message_timeout!r}: "
                          "more than 0 and at most 86400 seconds")


class ControlServer:
    """Serves `protocol.dispatch(target, request)` on a Unix socket."""

    def __init__(self, target: Any, path: Path, *, nbd: Any = None,
                 limits: ControlLimits | None = None) -> None:
        self.target = target
        #: the NBD server that serves sockets handed out by `connect_nbd`
        self.nbd = nbd
        self.path = path
        self.limits = limits or ControlLimits()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._full_logged = False

    def start(self) -> None:
        claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(socket.SOMAXCONN)
        self._sock = sock
        t = threading.Thread(target=self._accept_loop, args=(sock,), name="control-accept", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # ---- accepting -------------------------------------------------------------------------

    def _accept_loop(self, sock: socket.socket) -> None:
        failures = 0
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    break
                if exc.errno in TRANSIENT:
                    continue
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    log.error("control socket %s failed: %s; no longer accepting", self.path, exc)
                    break
                if failures == 0:  # once per burst
                    log.warning("cannot accept control connections: %s; retrying every %g s at most "
                                "(logged once until it recovers)", exc.strerror or exc, BACKOFF_MAX)
                failures += 1
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if failures:
                log.warning("accepting control connections again, after %d failed attempts", failures)
                failures, backoff = 0, BACKOFF_FIRST
            try:
                self._admit(conn)
            except Exception:  # never let one connection end the accept loop
                log.exception("control connection could not be set up")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
        except OSError:
            conn.close()
            return
        if uid not in (0, os.geteuid()):
            log.warning("refused control connection from uid %d", uid)
            conn.close()
            return
        with self._lock:
            full = len(self._conns) >= self.limits.max_connections
            if not full:
                self._conns.add(conn)
                self._full_logged = False
        if full:
            if not self._full_logged:
                self._full_logged = True
                log.warning("refusing control connections: %d are open (--max-control-connections)",
                            self.limits.max_connections)
            self._refuse(conn, DMError(errno.EAGAIN, f"the daemon already serves "
                                       f"{self.limits.max_connections} control connections "
                                       "(userdm daemon --max-control-connections); try again later"))
            return
        try:
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()
        except RuntimeError as exc:  # no memory for another thread
            with self._lock:
                self._conns.discard(conn)
            self._refuse(conn, DMError(errno.EAGAIN, f"cannot serve another control connection: {exc}"))

    @staticmethod
    def _refuse(conn: socket.socket, exc: DMError) -> None:
        """Answer a connection we will not serve with `exc`, without waiting, and close it."""
        try:
            conn.send(protocol.encode(protocol.error(exc)), socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()

    # ---- serving -----------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        decoder = protocol.Decoder(self.limits.max_message)
        timeout = self.limits.message_timeout
        started: float | None = None  # when the request being received began to arrive
        try:
            while True:
                if decoder.pending:
                    conn.settimeout(max(0.001, started + timeout - time.monotonic()))  # type: ignore[operator]
                else:
                    conn.settimeout(None)  # idle between requests: no limit
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    self._send(conn, protocol.error(DMError(
                        errno.ETIMEDOUT, f"a request did not arrive in full within {timeout:g} seconds "
                        f"({decoder.pending} bytes pending; userdm daemon --control-message-timeout); "
                        "closing the connection")))
                    return
                if not data:
                    return
                if not decoder.pending:
                    started = time.monotonic()
                items = decoder.feed_requests(data)
                for item in items:
                    if isinstance(item, DMError):
                        self._send(conn, protocol.error(item))
                    elif not self._handle(conn, item):
                        return
                if items:
                    started = time.monotonic()  # the rest of the next request may come from now
        except OSError as exc:
            log.debug("control connection closed: %s", exc)
        except Exception:  # never let one connection take the daemon down
            log.exception("control connection failed")
        finally:
            decoder.close()
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(self, conn: socket.socket, message: dict[str, Any]) -> bool:
        """Answer one request; False when the connection is done (an event stream ended)."""
        try:
            cmd, args = schema.check_request(message)
        except DMError as exc:
            self._send(conn, protocol.error(exc))
            return True
        if cmd in protocol.FD_COMMANDS:
            self._connect_nbd(conn)
        elif cmd == "open" and args.get("ops") is not None:
            # a holder outside the daemon: the connection carries its ops from now on
            serve_holder(conn, self.target, args, lambda response: self._reply(conn, response))
            return False
        elif cmd in protocol.STREAM_COMMANDS:
            conn.settimeout(self.limits.message_timeout)  # a reader that stops reading is dropped
            serve_events(conn, self.target, args)
            return False  # the stream ends when the client closes the connection
        else:
            self._reply(conn, protocol.dispatch(self.target, message))
        return True

    def _send(self, conn: socket.socket, response: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send one response; the client must take it within the message timeout."""
        try:
            data = protocol.encode(response)
        except DMError as exc:  # a result too large to send
            data, fds = protocol.encode(protocol.error(exc)), None
        conn.settimeout(self.limits.message_timeout)
        if fds:
            socket.send_fds(conn, [data], fds)
        else:
            conn.sendall(data)

    def _reply(self, conn: socket.socket, response: dict[str, Any]) -> None:
        """Send a response; a file descriptor in its result travels beside it (SCM_RIGHTS)
        and the daemon's copy is closed, so the client's copy is the only one."""
        fd = protocol.take_fd(response)
        try:
            self._send(conn, response, None if fd is None else [fd])
        finally:
            if fd is not None:
                os.close(fd)

    def _connect_nbd(self, conn: socket.socket) -> None:
        """Answer with a new NBD client socket (SCM_RIGHTS) that the NBD server already serves:
        the client then does the NBD handshake on it, choosing the export by name."""
        if self.nbd is None:
            self._send(conn, protocol.error(
                DMError(errno.EOPNOTSUPP, "this daemon runs without its NBD export (--no-nbd)")))
            return
        try:
            theirs = self.nbd.client_socket()
        except DMError as exc:
            self._send(conn, protocol.error(exc))
            return
        except OSError as exc:  # e.g. EMFILE
            self._send(conn, protocol.error(DMError.from_os(exc, "connect_nbd: cannot make a socket")))
            return
        try:
            self._send(conn, protocol.ok(None, fds=1), [theirs.fileno()])
        finally:
            theirs.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
