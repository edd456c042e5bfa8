"""The control socket server: a thin loop that moves bytes between clients and the protocol.

The socket is created with mode 0600 and every peer's credentials (SO_PEERCRED) are checked:
only root and the daemon's own user may talk to it. One thread per connection, so a client
blocked in `wait` or `remove --retry` never holds up the others.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from ..errors import DMError
from . import protocol
from .event_stream import serve_events

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


class ControlServer:
    """Serves `protocol.dispatch(target, request)` on a Unix socket."""

    def __init__(self, target: Any, path: Path, *, nbd: Any = None) -> None:
        self.target = target
        #: the NBD server that serves sockets handed out by `connect_nbd`
        self.nbd = nbd
        self.path = path
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        t = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                break
            uid = peer_uid(conn)
            if uid not in (0, os.geteuid()):
                log.warning("refused control connection from uid %d", uid)
                conn.close()
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = protocol.Decoder()
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                for message in decoder.feed(data):
                    if message.get("cmd") in protocol.FD_COMMANDS:
                        self._connect_nbd(conn)
                    elif message.get("cmd") in protocol.STREAM_COMMANDS:
                        serve_events(conn, self.target, message.get("args", {}))
                        return  # the stream ends when the client closes the connection
                    else:
                        self._reply(conn, protocol.dispatch(self.target, message))
        except protocol.ProtocolError as exc:
            log.warning("closing control connection: %s", exc)
            try:
                conn.sendall(protocol.encode(protocol.error(DMError(errno.EPROTO, str(exc)))))
            except OSError:
                pass
        except OSError:
            pass
        except Exception:  # never let one connection take the daemon down
            log.exception("control connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _reply(self, conn: socket.socket, response: dict[str, Any]) -> None:
        """Send a response; a file descriptor in its result travels beside it (SCM_RIGHTS)
        and the daemon's copy is closed, so the client's copy is the only one."""
        fd = protocol.take_fd(response)
        if fd is None:
            conn.sendall(protocol.encode(response))
            return
        try:
            socket.send_fds(conn, [protocol.encode(response)], [fd])
        finally:
            os.close(fd)

    def _connect_nbd(self, conn: socket.socket) -> None:
        """Answer with a new NBD client socket (SCM_RIGHTS) that the NBD server already serves:
        the client then does the NBD handshake on it, choosing the export by name."""
        if self.nbd is None:
            conn.sendall(protocol.encode(protocol.error(
                DMError(errno.EOPNOTSUPP, "this daemon runs without its NBD export (--no-nbd)"))))
            return
        try:
            theirs = self.nbd.client_socket()
        except DMError as exc:
            conn.sendall(protocol.encode(protocol.error(exc)))
            return
        try:
            socket.send_fds(conn, [protocol.encode(protocol.ok(None, fds=1))], [theirs.fileno()])
        finally:
            theirs.close()

    def stop(self) -> None:
        self._stopping = True
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
