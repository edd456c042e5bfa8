"""TLS for NBD connections: certificate directories as nbdkit and libnbd lay them out, and a
TLS stream over a connected socket that one reader and several writers may use at once.

Certificate directories (X.509, PEM):
- server (nbdkit's `--tls-certificates DIR`): `ca-cert.pem`, `server-cert.pem`,
  `server-key.pem`, optional `ca-crl.pem`; with `verify_peer` a client must present a
  certificate signed by the CA (and not revoked by the CRL);
- client (libnbd's `?tls-certificates=DIR`): `ca-cert.pem`, optional `client-cert.pem` with
  `client-key.pem`.

`TLSStream` runs the TLS session of one socket through memory BIOs (`ssl.SSLObject`), with
the socket I/O done here. OpenSSL forbids using one session from two threads at once, and
an NBD connection has a reader thread and worker threads that send replies: every use of
the session holds one lock, but the socket I/O happens outside it, so a reader waiting for
the client never blocks a writer and the other way round. Writers are serialised among
themselves (what one encrypts is sent before the next encrypts). The stream offers the
socket methods the NBD code uses (`recv_into` with an optional length, `recv`, `sendall`,
`sendmsg`, `settimeout`, `setsockopt`, `shutdown`, `close`), so the plaintext and the TLS
paths are the same code above it.

An event loop uses the stream without blocking: `recv_into(..., MSG_DONTWAIT)` raises
BlockingIOError when neither the session nor the socket has a byte, `sendmsg(parts,
MSG_DONTWAIT)` encrypts every part and keeps the ciphertext the socket did not take (the
next send, or `flush()`, sends it first), and `buffered()` says whether the session holds
data that a wait on the socket would not announce; `handshake_nowait()`,
`send_nowait()` and `flush_nowait()` run the handshake, send, and send the backlog without
waiting (a worker process's event loop, `export/nbd/tunnel.py`).

PSK: Python 3.11's `ssl` module has no pre-shared key API (3.13 adds one); only X.509
certificates are supported here.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time
from pathlib import Path

from ..errors import DMError

#: ciphertext received from the socket at once, and plaintext encrypted per round of sending
RAW_CHUNK = 256 * 1024
SEND_CHUNK = 256 * 1024
#: parts of a `sendmsg` smaller than this (a TLS record) are joined before they are encrypted
RECORD = 16 * 1024
#: socket.MSG_DONTWAIT as a plain int: `&` with an IntFlag runs Python code in enum.py
_DONTWAIT = int(socket.MSG_DONTWAIT)


def _need(directory: Path, name: str, what: str) -> str:
    path = directory / name
    if not path.is_file():
        raise DMError(errno.ENOENT, f"{what}: {name} is missing")
    return os.fspath(path)


def server_context(directory: str | os.PathLike[str], verify_peer: bool = False) -> ssl.SSLContext:
    """The server's context from nbdkit's certificate directory (ENOENT, EINVAL if unusable)."""
    where = Path(directory)
    what = f"--tls-certificates {where}"
    if not where.is_dir():
        raise DMError(errno.ENOENT, f"{what}: no such directory")
    ca = _need(where, "ca-cert.pem", what)
    cert = _need(where, "server-cert.pem", what)
    key = _need(where, "server-key.pem", what)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2     # the NBD spec: 1.2 at least
    ctx.num_tickets = 0        # NBD clients do not resume sessions: send no session tickets
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise DMError(errno.EINVAL, f"{what}: cannot use server-cert.pem with "
                      f"server-key.pem: {_reason(exc)}") from None
    if verify_peer:
        try:
            ctx.load_verify_locations(cafile=ca)
            crl = where / "ca-crl.pem"
            if crl.is_file():
                ctx.load_verify_locations(cafile=os.fspath(crl))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as exc:
            raise DMError(errno.EINVAL, f"{what}: cannot load ca-cert.pem or "
                          f"ca-crl.pem: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(directory: str | os.PathLike[str] | None, *, verify_peer: bool = True,
                   check_hostname: bool = True, what: str = "tls-certificates") -> ssl.SSLContext:
    """A client's context from libnbd's certificate directory (None: the system's trusted
    CAs); ENOENT or EINVAL if the directory is unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if directory is None:
        ctx.load_default_certs()
    else:
        where = Path(directory)
        if not where.is_dir():
            raise DMError(errno.ENOENT, f"{what}={where}: no such directory")
        try:
            ctx.load_verify_locations(cafile=_need(where, "ca-cert.pem", f"{what}={where}"))
            cert, key = where / "client-cert.pem", where / "client-key.pem"
            if cert.is_file():
                if not key.is_file():
                    raise DMError(errno.ENOENT, f"{what}={where}: client-cert.pem without client-key.pem")
                ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (ssl.SSLError, OSError) as exc:
            raise DMError(errno.EINVAL, f"{what}={where}: cannot load the certificates: "
                          f"{_reason(exc)}") from None
    ctx.check_hostname = check_hostname and verify_peer
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"the certificate does not verify: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class TLSHandshakeError(OSError):
    """The TLS handshake failed (bad certificate, garbage, the peer left, the deadline)."""


class TLSStream:
    """A TLS session over a connected socket (see the module docstring).

    `initial` holds bytes already received from the peer that belong to the TLS session
    (whatever followed NBD_OPT_STARTTLS in the same read)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"") -> None:
        self.raw = sock
        self.family = sock.family
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        if initial:
            self._in.write(initial)
        # the C object under ssl.SSLObject: its read/write/pending without the Python
        # wrapper's frame, which is a measurable part of a 4 KiB request's cost
        self._c = getattr(self._tls, "_sslobj", self._tls)
        self._lock = threading.Lock()        # the session (OpenSSL: one thread at a time)
        self._wlock = threading.Lock()       # writers: encrypt and send in one order
        self._rbuf = bytearray(RAW_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._eof = False
        self._closed = False
        #: ciphertext a non-blocking send left behind (sent first by the next send)
        self._backlog = b""
        #: the last read found only part of a record in `_in` (cleared when more arrives)
        self._starved = False

    # ---- handshake -------------------------------------------------------------------

    def handshake(self, deadline: float | None = None) -> None:
        """Run the TLS handshake, all of it before `deadline` (time.monotonic()); raises
        TLSHandshakeError with the reason."""
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush_out(deadline)
                return
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._flush_quietly()     # the alert tells the peer why
                raise TLSHandshakeError(errno.ECONNABORTED, f"TLS handshake failed: {_reason(exc)}") from None
            self._flush_out(deadline)
            if not self._fill(deadline):
                raise TLSHandshakeError(errno.ECONNRESET, "TLS handshake failed: the peer closed the connection")

    def handshake_nowait(self) -> bool:
        """One step of the TLS handshake for an event loop: True once it is done, False
        while it waits for the peer (what the session made is sent, or kept in the backlog
        for `flush_nowait`). Raises TLSHandshakeError with the reason (OSError if the socket
        fails)."""
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                self._flush_quietly()     # the alert tells the peer why
                raise TLSHandshakeError(errno.ECONNABORTED, f"TLS handshake failed: {_reason(exc)}") from None
            self.flush_nowait()
            if done:
                return True
            try:
                if not self._fill(None, _DONTWAIT):
                    raise TLSHandshakeError(errno.ECONNRESET, "TLS handshake failed: the peer closed the connection")
            except BlockingIOError:
                return False

    def _left(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TLSHandshakeError(errno.ETIMEDOUT, "TLS handshake not finished in time")
        return left

    def _fill(self, deadline: float | None = None, flags: int = 0) -> bool:
        """Receive ciphertext into the session; False at EOF (BlockingIOError with
        MSG_DONTWAIT when the socket has nothing)."""
        if deadline is not None:
            self.raw.settimeout(self._left(deadline))
        n = self.raw.recv_into(self._rbuf, 0, flags)
        if n == 0:
            with self._lock:
                self._in.write_eof()
            self._eof = True
            return False
        with self._lock:
            self._in.write(self._rview[:n])
            self._starved = False
        return True

    def _flush_out(self, deadline: float | None = None) -> None:
        with self._wlock:
            with self._lock:
                data = self._out.read()
            if data:
                if deadline is not None:
                    self.raw.settimeout(self._left(deadline))
                self.raw.sendall(data)

    def _flush_quietly(self) -> None:
        try:
            with self._lock:
                data = self._out.read()
            if data:
                self.raw.send(data, _DONTWAIT)
        except OSError:
            pass

    def version(self) -> str | None:
        return self._tls.version()

    def peer_certificate(self) -> dict | None:
        return self._tls.getpeercert()

    # ---- receiving -------------------------------------------------------------------

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypted bytes into `buffer` (at most `nbytes` if given), at least one unless
        at EOF (0). MSG_WAITALL is accepted and ignored (the callers loop); with
        MSG_DONTWAIT, BlockingIOError when no byte can be had without waiting.

        The path of a small request is one lock hold to find the session empty, one
        `recv_into` of whatever ciphertext arrived, one lock hold to feed and decrypt it:
        no helper calls, no enum arithmetic (socket.MSG_* are IntFlags, whose `&` costs
        a microsecond in Python 3.11)."""
        view = buffer if type(buffer) is memoryview and buffer.format == "B" else memoryview(buffer).cast("B")
        want = nbytes or len(view)
        if want <= 0:
            return 0
        dontwait = int(flags) & _DONTWAIT
        read, pending, incoming, lock = self._c.read, self._c.pending, self._in, self._lock
        got = 0
        arrived = 0     # ciphertext received by the last round, fed in under the lock below
        while True:
            try:
                with lock:
                    if arrived:
                        incoming.write(self._rview[:arrived])
                        self._starved = False
                        arrived = 0
                    # decrypt what has arrived; with nothing left in the session, go to the
                    # socket without a read that would only raise SSLWantReadError
                    while got < want and (incoming.pending or pending() or self._eof):
                        n = read(want - got, view[got:want] if got else view)
                        if n == 0:
                            return got      # the peer's close_notify: end of stream
                        got += n
            except ssl.SSLWantReadError:
                self._starved = True
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            except ssl.SSLError as exc:
                if got:
                    return got
                raise OSError(errno.EPROTO, f"TLS: {_reason(exc)}") from None
            # the session wants to answer something (TLS 1.3 key update); a caller that must
            # not wait leaves it in the session: the next send takes it along
            if self._out.pending and not dontwait and self._wlock.acquire(blocking=False):
                try:
                    self._send_out()
                finally:
                    self._wlock.release()
            if got or self._eof:
                return got
            arrived = self.raw.recv_into(self._rbuf, 0, dontwait)
            if not arrived:      # EOF: the next round says what it means (close_notify or not)
                with lock:
                    incoming.write_eof()
                self._eof = True

    def buffered(self) -> bool:
        """Whether the session holds plaintext, or whole records not yet decrypted, that
        no wait on the socket would announce."""
        return bool(self._c.pending() or (self._in.pending and not self._starved))

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf, n)
        return bytes(buf[:got])

    # ---- sending ---------------------------------------------------------------------

    def sendall(self, data) -> None:
        self.sendmsg([data])

    def sendmsg(self, parts, ancdata=(), flags: int = 0) -> int:
        """Encrypt and send every part (in order, nothing interleaved); the total length.
        Parts under RECORD bytes are joined (a batch of small replies: one record, one
        system call); the ciphertext of big parts leaves every SEND_CHUNK bytes. With
        MSG_DONTWAIT (and parts under SEND_CHUNK in all), what the socket does not take
        at once stays in the backlog: `backlog` says how much."""
        if flags and int(flags) & _DONTWAIT:
            if len(parts) == 1:
                self.send_nowait(parts[0])
                return len(parts[0])
            self.send_nowait(b"".join(parts))
            return sum(len(p) for p in parts)
        if len(parts) == 1 and len(parts[0]) <= SEND_CHUNK:
            # one batch of replies (the reader's usual send): encrypt and take the
            # ciphertext in one lock hold, one send
            data = parts[0]
            with self._wlock:
                out = self._seal(data)
                if self._backlog:
                    out, self._backlog = self._backlog + out, b""
                self.raw.sendall(out)
            return len(data)
        total = 0
        with self._wlock:
            small: list = []
            for part in parts:
                n = len(part)       # parts are bytes or byte-format memoryviews
                total += n
                if n < RECORD:
                    small.append(part)
                    continue
                if small:
                    self._encrypt(b"".join(small))
                    small = []
                view = memoryview(part)
                for at in range(0, n, SEND_CHUNK):
                    self._encrypt(view[at:at + SEND_CHUNK])
                    if self._out.pending >= SEND_CHUNK:
                        self._send_out()
            if small:
                self._encrypt(small[0] if len(small) == 1 else b"".join(small))
            self._send_out()
        return total

    def send_nowait(self, data) -> int:
        """Encrypt `data` and send it after the backlog, as much as the socket takes at
        once; the bytes left in the backlog (0: all sent). Raises OSError."""
        with self._wlock:
            return self._push(self._seal(data))

    def _push(self, out: bytes) -> int:
        """With `_wlock` held: send `out` after the backlog, as much as the socket takes at
        once; the bytes left in the backlog."""
        if self._backlog:
            out = self._backlog + out
        if not out:
            return 0
        try:
            sent = self.raw.send(out, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        self._backlog = out[sent:] if sent < len(out) else b""
        return len(self._backlog)

    def _seal(self, data) -> bytes:
        """With `_wlock` held: encrypt `data` and take its ciphertext, in one lock hold."""
        with self._lock:
            try:
                done = self._c.write(data)
                while done < len(data):
                    done += self._c.write(memoryview(data)[done:])
            except ssl.SSLError as exc:
                raise OSError(errno.EPROTO, f"TLS: {_reason(exc)}") from None
            return self._out.read()

    def _encrypt(self, data) -> None:
        """With `_wlock` held: encrypt `data` into the outgoing buffer."""
        write = self._c.write
        with self._lock:
            try:
                done = write(data)
                if done < len(data):
                    view = memoryview(data)
                    while done < len(view):
                        done += write(view[done:])
            except ssl.SSLError as exc:
                raise OSError(errno.EPROTO, f"TLS: {_reason(exc)}") from None

    def _send_out(self) -> None:
        """With `_wlock` held: send the ciphertext made so far (after the backlog)."""
        with self._lock:
            out = self._out.read()
        if self._backlog:
            out, self._backlog = self._backlog + out, b""
        if out:
            self.raw.sendall(out)

    @property
    def backlog(self) -> int:
        """Bytes of ciphertext a non-blocking send left behind."""
        return len(self._backlog)

    def flush_nowait(self) -> int:
        """Send the backlog and what the session made without waiting; the bytes still in
        the backlog (0: all sent). Raises OSError if the socket fails."""
        with self._wlock:
            with self._lock:
                out = self._out.read()
            return self._push(out)

    def flush(self) -> None:
        """Send the backlog, waiting for the socket (its send timeout applies)."""
        with self._wlock:
            self._send_out()

    # ---- the socket ------------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)

    def setsockopt(self, *args) -> None:
        self.raw.setsockopt(*args)

    def getsockopt(self, *args):
        return self.raw.getsockopt(*args)

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        """Send close_notify if the socket takes it at once, then close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._wlock.acquire(timeout=0.1):
            try:
                with self._lock:
                    try:
                        self._tls.unwrap()
                    except ssl.SSLError:
                        pass      # WantRead: the peer's close_notify is not awaited
                self._flush_quietly()
            finally:
                self._wlock.release()
        self.raw.close()
