"""The TLS end of an NBD connection, in a worker process (`worker.py`): handshake and relay.

A TLS session cannot move between processes (Python's `ssl` cannot export one, and this
kernel has no kTLS), and in the daemon every session's encryption shares one GIL. So at
NBD_OPT_STARTTLS the daemon (`offload.py`) hands the client's socket to a worker with the
server's certificate directory, and keeps one end of a new Unix socketpair for itself; the
worker holds the other end (`outer`) and the session:

- HANDSHAKE: the TLS handshake without blocking (the worker serves other connections
  meanwhile), within what was left of the daemon's handshake deadline. A failure closes
  the client and `outer` (the daemon sees EOF) and is reported (`tls_failed`) for the
  daemon's log.
- RELAY: decrypted client bytes go into `outer`, the bytes the daemon writes into its end
  come out of `outer` encrypted to the client. The daemon's `Connection` speaks over its end
  as over a plaintext socket after STARTTLS: the options, refusals, opens, deadlines and
  errors are its own, unchanged. Backpressure both ways: plaintext `outer` does not take
  stops the reading of the client, ciphertext the client does not take stops the reading
  of `outer` (so the daemon's send waits and its --nbd-reply-timeout applies).
- DIRECT: the daemon lends the connection as it lends a plain one (`Offloader.take`), and
  the worker serves READ/WRITE/FLUSH itself over the session (`worker._Served` with this
  stream); handed back, it relays again (`relay_again`). The bytes in flight at the switch
  are the worker's to order: see `Worker._serve_tunnel`.

The end: EOF from the client shuts `outer` for writing (the daemon answers what it has and
closes); EOF on `outer` sends what is left to the client (within `reply_timeout`), then
close_notify and close. A worker that dies takes its tunnels: the client and the daemon
both see their connection closed.
"""

from __future__ import annotations

import select
import socket
import time

from ...nbd.tls import TLSHandshakeError, TLSStream

_DONTWAIT = int(socket.MSG_DONTWAIT)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
_RDHUP = select.EPOLLRDHUP
#: plaintext moved per receive each way, and receives per event before others get a turn
CHUNK = 256 * 1024
ROUNDS = 8
#: socket buffers asked for (the kernel caps them at wmem_max / rmem_max)
BUFFER = 4 * 1024 * 1024

HANDSHAKE, RELAY, DIRECT, CLOSED = "handshake", "relay", "direct", "closed"


class Tunnel:
    """One TLS connection held by a worker. `host` is the worker: its epoll (`ep`), its
    `report(msg)` to the daemon, its `ready` set (tunnels whose session holds bytes no wait
    announces) and `forget(tunnel)`."""

    def __init__(self, ident: int, host, client: socket.socket, outer: socket.socket, ctx,  # noqa: ANN001
                 initial: bytes, left: float | None, reply_timeout: float) -> None:
        self.id = ident
        self.host = host
        for s in (client, outer):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            except OSError:
                pass
        self.stream = TLSStream(client, ctx, server_side=True, initial=initial)
        self.peer = describe_peer(client)     # for the daemon's log of a failed handshake
        self.client_fd = client.fileno()
        self.outer = outer
        self.outer_fd = outer.fileno()
        self.state = HANDSHAKE
        self.to_daemon = b""           # plaintext `outer` did not take yet
        self.client_eof = False
        self.daemon_gone = False       # `outer` hung up while replies waited for the client
        self.reply_timeout = reply_timeout
        #: when the handshake, or the last replies after the daemon closed, must be done
        self.expires: float | None = None
        self._masks = {self.client_fd: 0, self.outer_fd: 0}
        if left is not None:
            self._expire_at(time.monotonic() + left)

    def _expire_at(self, when: float | None) -> None:
        """Set `expires` (None: never); the host looks only at tunnels in its `timed` set."""
        self.expires = when
        if when is None:
            self.host.timed.discard(self)
        else:
            self.host.timed.add(self)

    # ---- epoll ------------------------------------------------------------------------

    def arm(self) -> None:
        """Watch what the state allows (an fd with nothing to watch is not registered)."""
        client = outer = 0
        stream = self.stream
        if self.state == HANDSHAKE:
            client = _IN | (_OUT if stream.backlog else 0)
        elif self.state == RELAY:
            if stream.backlog:
                client = _OUT
            elif not self.daemon_gone:
                outer = _IN | _RDHUP
            if not self.to_daemon and not self.client_eof:
                client |= _IN
            elif self.to_daemon:
                outer |= _OUT
            if stream.backlog and not self.daemon_gone:
                outer |= _RDHUP       # the daemon hanging up while the client reads nothing
        self._set(self.client_fd, client)
        self._set(self.outer_fd, outer)

    def _set(self, fd: int, mask: int) -> None:
        old = self._masks[fd]
        if mask == old:
            return
        ep = self.host.ep
        if not mask:
            ep.unregister(fd)
        elif not old:
            ep.register(fd, mask)
        else:
            ep.modify(fd, mask)
        self._masks[fd] = mask

    # ---- events -----------------------------------------------------------------------

    def start(self) -> None:
        self.host.tunnel_fds[self.client_fd] = self
        self.host.tunnel_fds[self.outer_fd] = self
        self._handshake()
        if self.state != CLOSED:
            self.arm()

    def event(self, fd: int, ev: int) -> None:
        if self.state == HANDSHAKE:
            self._handshake()
        elif self.state == RELAY:
            if fd == self.client_fd:
                if ev & _OUT or self.stream.backlog:
                    self._flush_client()
                if self.state == RELAY and ev & (_IN | _GONE) and not self.to_daemon:
                    self.from_client()
                elif self.state == RELAY and ev & _GONE:
                    self.close(False)      # the client is gone while we could not read it
            else:
                if ev & _OUT and self.to_daemon:
                    self._to_outer()
                if self.state == RELAY and ev & (_IN | _GONE | _RDHUP):
                    if self.stream.backlog:
                        self._daemon_hung_up()
                    else:
                        self.from_daemon()
        if self.state == RELAY:
            self.arm()

    def expire(self) -> None:
        """`expires` passed: a handshake not finished in time, or a client that did not read
        the last replies."""
        if self.state == HANDSHAKE:
            self._failed("TLS handshake not finished in time")
        else:
            self.close(False)

    def _handshake(self) -> None:
        try:
            done = self.stream.handshake_nowait()
        except TLSHandshakeError as exc:
            self._failed(exc.strerror)
            return
        except OSError as exc:
            self._failed(f"TLS handshake failed: {exc.strerror or exc}")
            return
        if done:
            self.state = RELAY
            self._expire_at(None)
            self.from_client()     # the client may have sent its first option already
            if self.state == RELAY:
                self.arm()
        else:
            self.arm()

    def _failed(self, why: str) -> None:
        self.host.report({"op": "tls_failed", "tunnel": self.id, "why": why + self.peer})
        self.close(False)

    # ---- relay ------------------------------------------------------------------------

    def from_client(self) -> None:
        """Decrypted client bytes into `outer` (what it does not take waits in to_daemon)."""
        buf = self.host.relay_buffer
        for _ in range(ROUNDS):
            try:
                n = self.stream.recv_into(buf, 0, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.close(False)
                return
            if n == 0:
                self.client_eof = True
                try:
                    self.outer.shutdown(socket.SHUT_WR)    # the daemon sees EOF, answers, closes
                except OSError:
                    pass
                return
            view = memoryview(buf)[:n]
            try:
                sent = self.outer.send(view, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:              # the daemon stopped reading (it is stopping): its
                view.release()           # replies still come out of `outer`
                self.client_eof = True
                return
            if sent < n:
                self.to_daemon = bytes(view[sent:])
                view.release()
                return
            view.release()
        if self.stream.buffered():
            self.host.ready.add(self)

    def _to_outer(self) -> None:
        try:
            sent = self.outer.send(self.to_daemon, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self.to_daemon = b""
            self.client_eof = True
            return
        self.to_daemon = self.to_daemon[sent:]
        if not self.to_daemon and self.stream.buffered():
            self.host.ready.add(self)

    def from_daemon(self) -> None:
        """The daemon's bytes, encrypted to the client (what it does not take is the
        stream's backlog, sent on EPOLLOUT)."""
        for _ in range(ROUNDS):
            try:
                data = self.outer.recv(CHUNK, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:                       # the daemon closed the connection
                self.close(True)
                return
            try:
                self.stream.send_nowait(data)
            except OSError:
                self.close(False)
                return
            if self.stream.backlog:
                return

    def _flush_client(self) -> None:
        try:
            left = self.stream.flush_nowait()
        except OSError:
            self.close(False)
            return
        if not left and self.daemon_gone:
            self.daemon_gone = False
            self._expire_at(None)
            self.from_daemon()         # the rest of the replies, then EOF: close

    def _daemon_hung_up(self) -> None:
        """`outer` hung up while the client does not take the replies before: give it
        `reply_timeout` more to read them."""
        if not self.daemon_gone:
            self.daemon_gone = True
            self._expire_at(time.monotonic() + self.reply_timeout)

    # ---- direct mode and the end --------------------------------------------------------

    def take_replies(self) -> bool:
        """Before serving directly: every reply the daemon wrote goes to the client first
        (encrypted, in order). False if the connection broke."""
        while True:
            try:
                data = self.outer.recv(CHUNK, _DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            try:
                self.stream.send_nowait(data)
            except OSError:
                return False

    def go_direct(self) -> bytes:
        """Stop relaying: the plaintext received and not yet given to the daemon (to serve
        after what the daemon holds)."""
        self.state = DIRECT
        self.arm()
        self.host.ready.discard(self)
        rest, self.to_daemon = self.to_daemon, b""
        return rest

    def relay_again(self) -> None:
        """Handed back to the daemon: relay from where direct mode stopped."""
        self.state = RELAY
        self.arm()
        if self.stream.buffered():
            self.host.ready.add(self)

    def close(self, graceful: bool) -> None:
        """Close the client (with close_notify if `graceful`) and `outer` (the daemon sees EOF)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        for fd in (self.client_fd, self.outer_fd):
            self._set(fd, 0)
        self.host.ready.discard(self)
        self._expire_at(None)
        self.host.forget(self)
        try:
            if graceful:
                self.stream.close()
            else:
                self.stream.raw.close()
        except OSError:
            pass
        self.outer.close()


def describe_peer(sock) -> str:  # noqa: ANN001
    """` (from HOST:PORT)` for a TCP peer, else nothing."""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return f" (from {peer[0]}:{peer[1]})" if isinstance(peer, tuple) else ""
