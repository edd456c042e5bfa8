"""The NBD server: listens on a Unix socket (and TCP only when asked) and exports mapped devices.

    srv = NBDServer(mapper, unix_path=runtime_dir / "nbd.sock", tcp=None)  # or ("127.0.0.1", 10809)
    srv.start()   # returns once listening; serves in background threads
    srv.stop()    # closes the listeners and every connection

TLS (`tls.py`): connections from the TCP listener use the configured mode (`--tls`), those
from the Unix socket may upgrade when certificates are configured, handed-in sockets never.

The export name is the device name; NBD_OPT_LIST lists the devices that have a live table.
Each connection holds one open of its device (see `catalog.py`) and is served by a small
thread pool (see `connection.py`); while several connections are open, their small
requests are served by one event loop thread (see `loop.py`). CAN_MULTI_CONN is
advertised: every connection to a device goes to the same in-process device object, so a
flush on one covers writes that completed on all of them.

What clients may cost is bounded by `NBDLimits` (see `limits.py`): connections from the
listeners beyond `max_connections` are closed at once, handshakes have a deadline, and the
request buffers of all connections share one byte budget (`total_bytes`). The listeners
have the kernel's maximum backlog (SOMAXCONN), so that hundreds of simultaneous connects
succeed at once. An accept that fails for lack of descriptors or memory (EMFILE, ENFILE,
ENOBUFS, ENOMEM) is retried with a growing back-off: the loop never exits for it. Both
refusals are logged once per burst, with the count when the burst ends.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from pathlib import Path

from ...errors import DMError
from ...block.device import BlockOpen
from ..source import ExportSource
from .catalog import BoundCatalog
from .connection import Connection
from .limits import Budget, NBDLimits
from .loop import ServeLoop
from .offload import Offloader
from .tls import ServerTLS

log = logging.getLogger("userdm.nbd")

DEFAULT_THREADS = 8
STOP_GRACE = 5.0
ACCEPT_BACKOFF = (0.01, 0.5)   # first and longest wait after an accept failed for lack of resources


class NBDServer:
    """Serves `mapper`'s devices over NBD until `stop()`."""

    def __init__(self, mapper: ExportSource, unix_path: str | os.PathLike[str] | None = None,
                 tcp: tuple[str, int] | None = None, *, threads_per_connection: int = DEFAULT_THREADS,
                 unix_mode: int = 0o600, limits: NBDLimits | None = None,
                 tls: ServerTLS | None = None, offload_workers: int | None = None) -> None:
        if unix_path is None and tcp is None:
            raise ValueError("NBDServer needs a unix_path or a tcp address")
        self.mapper = mapper
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.tcp = tcp
        self.threads_per_connection = threads_per_connection
        self.unix_mode = unix_mode
        self.limits = limits or NBDLimits()
        #: TLS of the listeners' connections (`tls.py`: TCP as configured, Unix optional)
        self.tls = tls or ServerTLS()
        #: request buffer bytes of every connection together
        self.budget = Budget(self.limits.total_bytes)
        self._accepted = 0              # connections from the listeners (counted in max_connections)
        self._refused_over_cap = 0      # in the current burst
        self._accept_failures = 0       # in the current burst
        self._listeners: list[socket.socket] = []
        self._accept_threads: list[threading.Thread] = []
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopping = False
        #: one thread serving the small requests of every connection while there are several
        self.loop = ServeLoop()
        #: worker processes that serve connections' READs and WRITEs (`offload.py`)
        workers = self.limits.workers if offload_workers is None else offload_workers
        self.loop.offload = Offloader(workers, self.tls) if workers > 0 else None
        #: the TCP address actually bound (port 0 picks a free port)
        self.tcp_address: tuple[str, int] | None = None

    # ---- start/stop -----------------------------------------------------------------

    def start(self) -> None:
        try:
            if self.unix_path is not None:
                self._listeners.append(self._listen_unix(self.unix_path))
            if self.tcp is not None:
                sock = socket.create_server(self.tcp, reuse_port=False, backlog=socket.SOMAXCONN)
                self.tcp_address = sock.getsockname()[:2]
                self._listeners.append(sock)
        except BaseException:
            self._close_listeners()
            raise
        for sock in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock,), name="nbd-accept", daemon=True)
            self._accept_threads.append(t)
            t.start()
        log.info("nbd server listening on %s", ", ".join(self.addresses()))

    def addresses(self) -> list[str]:
        out = []
        if self.unix_path is not None:
            out.append(f"nbd+unix:///?socket={self.unix_path}")
        if self.tcp_address is not None:
            scheme = "nbds" if self.tls.mode == "require" else "nbd"
            out.append(f"{scheme}://{self.tcp_address[0]}:{self.tcp_address[1]}/")
        return out

    def _listen_unix(self, path: Path) -> socket.socket:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(os.fspath(path))
                except OSError:
                    os.unlink(path)     # stale socket of a dead server
                else:
                    raise DMError(errno.EADDRINUSE, f"{path}: another NBD server is listening there")
                finally:
                    probe.close()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o777 & ~self.unix_mode)
            try:
                sock.bind(os.fspath(path))
            finally:
                os.umask(old)
            os.chmod(path, self.unix_mode)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            raise DMError.from_os(exc, f"cannot listen on {path}") from None
        return sock

    def stop(self) -> None:
        """Close the listeners, let in-flight requests finish, close every connection."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = list(self._connections)
        self._close_listeners()
        for t in self._accept_threads:
            t.join(STOP_GRACE)
        if self.loop.offload is not None:
            self.loop.offload.stop()     # the workers' connections come back first
        for conn in conns:
            conn.shutdown()
        for conn in conns:
            if not conn.join(STOP_GRACE):
                conn.abort()
                conn.join(STOP_GRACE)
        if self.loop.offload is not None:
            self.loop.offload.close()    # TLS connections' workers relayed until now
        self.loop.stop()
        if self.unix_path is not None:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> "NBDServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- connections ----------------------------------------------------------------

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def _accept_loop(self, listener: socket.socket) -> None:
        backoff = ACCEPT_BACKOFF[0]
        pause = threading.Event()   # never set: a sleep that is not a busy loop
        while True:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._stopping or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._accept_failures:
                        log.warning("nbd: cannot accept connections (%s); retrying, and saying "
                                    "nothing more until one is accepted", exc.strerror or exc)
                    self._accept_failures += 1
                    pause.wait(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                continue
            backoff = ACCEPT_BACKOFF[0]
            if self._accept_failures:
                log.warning("nbd: accepting connections again after %d failed accepts",
                            self._accept_failures)
                self._accept_failures = 0
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._admit(sock):
                continue
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            if not self.serve_socket(sock, counted=True, tls_mode=self.tls.mode_for(tcp)):
                return

    def _admit(self, sock: socket.socket) -> bool:
        """Below `max_connections`: count the connection in. Otherwise close it at once."""
        cap = self.limits.max_connections
        with self._lock:
            if self._accepted < cap:
                self._accepted += 1
                refused, self._refused_over_cap = self._refused_over_cap, 0
                admitted = True
            else:
                refused = self._refused_over_cap
                self._refused_over_cap += 1
                admitted = False
        if admitted:
            if refused:
                log.warning("nbd: below the connection limit again; %d connections were refused", refused)
            return True
        if not refused:
            log.warning("nbd: %d connections are open (--nbd-max-connections): closing new ones "
                        "until one ends", cap)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        return False

    def serve_socket(self, sock: socket.socket, catalog: BoundCatalog | None = None, *,
                     counted: bool = False, tls_mode: str = "off") -> bool:
        """Serve one connected socket, from a listener (`counted` in max_connections; TLS
        as `tls_mode` says) or handed in (the server end of a socketpair whose other end the
        control socket passes to a client: no TLS). False if stopping."""
        conn = Connection(sock, self.mapper, threads=self.threads_per_connection, catalog=catalog,
                          on_close=self._forget, limits=self.limits, total=self.budget,
                          tls_mode=tls_mode, tls_context=self.tls.context if tls_mode != "off" else None,
                          loop=self.loop)
        conn.counted = counted
        with self._lock:
            if self._stopping:
                if counted:
                    self._accepted -= 1
                sock.close()
                return False
            self._connections.add(conn)
        conn.start()
        return True

    def client_socket(self, catalog: BoundCatalog | None = None) -> socket.socket:
        """The client end of a new socketpair whose server end this server serves (for
        `connect_nbd`, or with a BoundCatalog for a socket that carries an existing open)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if not self.serve_socket(ours, catalog):
            theirs.close()
            raise DMError(errno.ESHUTDOWN, "the NBD server is shutting down")
        return theirs

    def socket_for_open(self, handle: BlockOpen, name: str) -> socket.socket:
        """`Mapper.open_sockets`: an open of device `name` handed out as an NBD client socket
        that this server serves (`create(open_fd=True)`, `open`)."""
        return socket_for_open(handle, name, self)

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections.discard(conn)
                if conn.counted:
                    self._accepted -= 1


def socket_for_open(handle: BlockOpen, name: str, server: NBDServer | None = None) -> socket.socket:
    """A new NBD client socket that carries `handle`, an open that already exists: the server
    end is served by `server` (or by a connection of its own), the client end is returned.
    The open ends when every copy of the client socket is closed and the connection with it;
    if serving fails, the open is closed here."""
    catalog = BoundCatalog(handle, name)
    try:
        if server is not None:
            return server.client_socket(catalog)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        Connection(ours, None, threads=DEFAULT_THREADS, catalog=catalog).start()
        return theirs
    except BaseException:
        catalog.close()
        raise


class OpenSockets:
    """The `Mapper.open_sockets` of a process without an NBD server (in-process use of
    `userdm.Mapper`): each open handed out as a socket gets a connection of its own."""

    def socket_for_open(self, handle: BlockOpen, name: str) -> socket.socket:
        return socket_for_open(handle, name)
