"""NBD client: remote exports as `BlockDevice`s, for `nbd://` and `nbd+unix://` table references.

    nbd://HOST[:PORT]/EXPORT               TCP (port 10809 by default)
    nbd+unix:///EXPORT?socket=PATH         Unix socket
    nbds://HOST[:PORT]/EXPORT[?tls-certificates=DIR]            the same over TLS
    nbds+unix:///EXPORT?socket=PATH[&tls-certificates=DIR]

TLS (`nbds`, `nbds+unix`) takes libnbd's query parameters: `tls-certificates=DIR` holds
`ca-cert.pem` and optional `client-cert.pem`/`client-key.pem` (without it, the system's
trusted CAs); `tls-hostname=NAME` is the name the server's certificate must carry (by default
the URL's host; over a Unix socket no name is checked unless it is given);
`tls-verify-peer=false` accepts any server certificate. `tls-psk-file` is refused (EINVAL):
Python 3.11's `ssl` module has no pre-shared keys. TLS is required: a server that does not
acknowledge NBD_OPT_STARTTLS, sent as the first option, or whose certificate does not verify,
is not used (ENXIO, with the reason).

`register(backing_stores)` makes all four schemes usable in tables. A `RemoteDevice` keeps a pool
of connections, each running one request at a time (send header + payload in one
`sendmsg`, receive data straight into the caller's buffer with `recv_into`); concurrent
callers use different connections, up to `max_connections` when the server advertises
CAN_MULTI_CONN and one otherwise. Each connection negotiates structured replies,
`base:allocation` (for `block_status`) and NBD_OPT_GO with block sizes, falling back to
NBD_OPT_EXPORT_NAME for old servers.

Reconnection: when a connection breaks (EOF, reset, a protocol error), the request is
retried on a fresh connection (a new handshake, TLS included), a few times with a short backoff. Every NBD command is
retried, writes included: a WRITE, TRIM or WRITE_ZEROES re-sent with the same offset and
data has the same effect, and a request that has not been answered is in flight, with no
ordering promised against other in-flight requests. A retried FLUSH only covers writes the
server still has; a server that restarted and lost its cache loses acknowledged but
unflushed writes, as with any disk whose cache is lost. Errors the server reports are not
retried: they become `DMError` with the server's errno and message. When the retries are
used up the export is gone: the device is marked dead (`BlockDevice.mark_dead`), the mapped
devices above it and their holders are told, and its I/O fails with EIO from then on.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..block.device import BlockDevice
from ..errors import DMError
from . import constants as C
from .handshake import client_flags, decode_info, encode_go, encode_meta_context, encode_option
from .tls import TLSHandshakeError, TLSStream, client_context
from .protocol import (CHUNK_SIZE, OPTION_REPLY, SIMPLE_REPLY_SIZE, ProtocolError, decode_block_status_payload,
                       decode_error_payload, decode_reply_header, encode_request)

DEFAULT_PORT = 10809
CONNECT_TIMEOUT = 10.0
RETRY_DELAYS = (0.0, 0.1, 0.5, 1.0)
DEFAULT_MAX_CONNECTIONS = 4
_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class TLSOptions:
    """libnbd's TLS query parameters of an `nbds` URL."""

    certificates: str | None = None
    hostname: str | None = None      # checked against the server's certificate (None: not checked)
    verify_peer: bool = True

    def context(self, url: str) -> ssl.SSLContext:
        return client_context(self.certificates, verify_peer=self.verify_peer,
                              check_hostname=self.hostname is not None,
                              what=f"{url}: tls-certificates")


@dataclass(frozen=True)
class Address:
    """Where an export lives: `family` AF_UNIX (path) or AF_INET/AF_INET6 (host, port);
    `tls` for the `nbds` schemes."""

    family: int
    target: str | tuple[str, int]
    export: str
    tls: TLSOptions | None = None


_TLS_PARAMS = {"tls-certificates", "tls-hostname", "tls-verify-peer"}
_PSK_PARAMS = {"tls-psk-file", "tls-username"}


def _tls_options(url: str, query: dict[str, list[str]], host: str | None) -> TLSOptions:
    for key in query:
        if key in _PSK_PARAMS:
            raise DMError(errno.EINVAL, f"{url}: {key}: TLS with pre-shared keys is not supported: "
                          "Python 3.11's ssl module has no PSK API; use tls-certificates=DIR "
                          "(X.509 certificates)")
        if key.startswith("tls-") and key not in _TLS_PARAMS:
            raise DMError(errno.EINVAL, f"{url}: unknown TLS parameter {key!r} (known: "
                          f"{', '.join(sorted(_TLS_PARAMS))})")
    verify = query.get("tls-verify-peer", ["true"])[-1].lower()
    if verify not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise DMError(errno.EINVAL, f"{url}: tls-verify-peer={verify!r} is not a boolean")
    return TLSOptions(certificates=query.get("tls-certificates", [None])[-1],
                      hostname=query.get("tls-hostname", [host])[-1],
                      verify_peer=verify in ("true", "1", "yes", "on"))


def parse_url(url: str) -> Address:
    """Parse `nbd[s]://HOST[:PORT]/EXPORT` or `nbd[s]+unix:///EXPORT?socket=PATH`; EINVAL if bad."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DMError(errno.EINVAL, f"{url}: bad NBD URL: {exc}") from None
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    scheme = parts.scheme
    secure = scheme in ("nbds", "nbds+unix")
    if scheme in ("nbd", "nbds"):
        if not parts.hostname:
            raise DMError(errno.EINVAL, f"{url}: an {scheme}:// URL needs a host")
        family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
        tls = _tls_options(url, query, parts.hostname) if secure else None
        return Address(family, (parts.hostname, port or DEFAULT_PORT), export, tls)
    if scheme in ("nbd+unix", "nbds+unix"):
        sockets = query.get("socket")
        if parts.netloc or not sockets:
            raise DMError(errno.EINVAL, f"{url}: an {scheme} URL is {scheme}:///EXPORT?socket=PATH")
        tls = _tls_options(url, query, None) if secure else None
        return Address(socket.AF_UNIX, sockets[0], export, tls)
    raise DMError(errno.EINVAL, f"{url}: unsupported NBD URL scheme {parts.scheme!r}")


class Broken(Exception):
    """The connection is unusable (closed, reset, protocol violation): retry elsewhere."""


class NBDConnection:
    """One negotiated connection running one request at a time."""

    def __init__(self, address: Address, url: str, tls: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.address = address
        self.tls = tls
        self.sock: socket.socket | TLSStream = socket.socket(address.family, socket.SOCK_STREAM)
        self.cookie = 0
        self.meta_id = 0
        self.structured = False
        self.info: dict[str, int] = {"min_block": 1, "preferred_block": 4096, "max_payload": C.MAX_PAYLOAD}
        try:
            self.sock.settimeout(CONNECT_TIMEOUT)
            self.sock.connect(address.target)
            if address.family != socket.AF_UNIX:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(address.export)
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise

    # ---- handshake ------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got, want = 0, len(view)
        while got < want:
            n = self.sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
            if n == 0:
                raise Broken("the server closed the connection")
            got += n

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = OPTION_REPLY.unpack(self._recv(OPTION_REPLY.size))
        if magic != C.OPT_REPLY_MAGIC or ropt != opt or length > C.MAX_OPTION_LENGTH:
            raise ProtocolError(f"bad option reply (magic 0x{magic:x}, option {ropt}, length {length})")
        return rtype, self._recv(length)

    def _refused(self, what: str, rtype: int, data: bytes) -> DMError:
        err = errno.ENXIO if rtype in (C.REP_ERR_UNKNOWN, C.REP_ERR_SHUTDOWN, C.REP_ERR_TLS_REQD) else errno.EIO
        msg = data.decode("utf-8", "replace") or f"reply type 0x{rtype:x}"
        if rtype == C.REP_ERR_TLS_REQD:
            msg = f"the server requires TLS (use nbds:// or nbds+unix://): {msg}"
        return DMError(err, f"{self.url}: {what} refused: {msg}")

    def _handshake(self, export: str) -> None:
        magic, opt_magic, sflags = struct.unpack(">QQH", self._recv(18))
        if magic != C.NBDMAGIC or opt_magic != C.IHAVEOPT:
            raise ProtocolError("not an NBD server speaking the newstyle handshake")
        cflags = client_flags(sflags)
        no_zeroes = bool(cflags & C.FLAG_C_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))
        if self.tls is None:
            self._options(export, no_zeroes)
            return
        self._starttls()
        try:
            self._options(export, no_zeroes)
        except (OSError, Broken) as exc:
            opts = self.address.tls
            if opts is not None and not _has_client_cert(opts):
                raise Broken(f"{exc}; the server ended the TLS session: it may require a client "
                             "certificate (client-cert.pem and client-key.pem in the "
                             "tls-certificates directory)") from None
            raise

    def _options(self, export: str, no_zeroes: bool) -> None:
        """Structured replies, base:allocation, then GO (or EXPORT_NAME for old servers)."""
        self.sock.sendall(encode_option(C.OPT_STRUCTURED_REPLY))
        rtype, _ = self._option_reply(C.OPT_STRUCTURED_REPLY)
        self.structured = rtype == C.REP_ACK
        if self.structured:
            self.sock.sendall(encode_meta_context(export, [C.BASE_ALLOCATION]))
            while True:
                rtype, data = self._option_reply(C.OPT_SET_META_CONTEXT)
                if rtype == C.REP_META_CONTEXT and len(data) >= 4 and data[4:].decode() == C.BASE_ALLOCATION:
                    self.meta_id = struct.unpack_from(">I", data)[0]
                elif rtype != C.REP_META_CONTEXT:
                    break          # ACK, or an error: no block status then
        self.sock.sendall(encode_go(export, (C.INFO_BLOCK_SIZE,)))
        while True:
            rtype, data = self._option_reply(C.OPT_GO)
            if rtype == C.REP_INFO:
                decode_info(data, self.info)
            elif rtype == C.REP_ACK:
                break
            elif rtype == C.REP_ERR_UNSUP:
                self._export_name(export, no_zeroes)
                return
            else:
                raise self._refused(f"export {export!r}", rtype, data)
        if "size" not in self.info:
            raise ProtocolError("GO succeeded without NBD_INFO_EXPORT")

    def _starttls(self) -> None:
        """NBD_OPT_STARTTLS as the first option, then the TLS handshake: TLS is required."""
        assert self.tls is not None and self.address.tls is not None
        self.sock.sendall(encode_option(C.OPT_STARTTLS))
        rtype, data = self._option_reply(C.OPT_STARTTLS)
        if rtype != C.REP_ACK:
            msg = data.decode("utf-8", "replace") or f"reply type 0x{rtype:x}"
            raise DMError(errno.ENXIO, f"{self.url}: the server does not do TLS (NBD_OPT_STARTTLS "
                          f"refused: {msg})")
        hostname = self.address.tls.hostname
        stream = TLSStream(self.sock, self.tls, server_side=False, server_hostname=hostname)
        try:
            stream.handshake(time.monotonic() + CONNECT_TIMEOUT)
        except TLSHandshakeError as exc:
            raise DMError(errno.ENXIO, f"{self.url}: {exc.strerror}") from None
        self.sock = stream

    def _export_name(self, export: str, no_zeroes: bool) -> None:
        self.sock.sendall(encode_option(C.OPT_EXPORT_NAME, export.encode()))
        try:
            reply = self._recv(10 if no_zeroes else 134)
        except Broken:
            raise DMError(errno.ENXIO, f"{self.url}: export {export!r} refused") from None
        self.info["size"], self.info["flags"] = struct.unpack_from(">QH", reply)
        self.meta_id = 0     # metadata contexts need NBD_OPT_GO

    # ---- transmission ---------------------------------------------------------------

    @property
    def flags(self) -> int:
        return self.info.get("flags", 0)

    def request(self, cmd: int, offset: int, length: int, *, flags: int = 0,
                payload: memoryview | bytes | None = None, into: memoryview | None = None,
                ) -> list[tuple[int, int]] | None:
        """Run one request; READ fills `into`; BLOCK_STATUS returns extents.

        Raises DMError for an error reply, Broken if the connection failed."""
        self.cookie = cookie = (self.cookie + 1) & 0xFFFFFFFFFFFFFFFF
        header = encode_request(cmd, cookie, offset, length, flags)
        try:
            if payload is not None:
                parts: list = [header, payload]
                total = len(header) + len(payload)
                sent = self.sock.sendmsg(parts)
                if sent < total:
                    self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])
            else:
                self.sock.sendall(header)
            return self._reply(cmd, cookie, offset, length, into)
        except DMError:
            raise   # the server's error reply (a DMError is an OSError: not a broken connection)
        except (OSError, ProtocolError) as exc:
            raise Broken(str(exc)) from exc

    def _reply(self, cmd: int, cookie: int, offset: int, length: int,
               into: memoryview | None) -> list[tuple[int, int]] | None:
        head = bytearray(CHUNK_SIZE)
        hview = memoryview(head)
        error: tuple[int, str] | None = None
        extents = None
        while True:
            self._recv_into(hview[:4])
            size = SIMPLE_REPLY_SIZE if head[:4] == b"\x67\x44\x66\x98" else CHUNK_SIZE
            self._recv_into(hview[4:size])
            rep = decode_reply_header(hview[:size])
            if rep.cookie != cookie:
                raise ProtocolError(f"reply for unknown cookie {rep.cookie}")
            if not rep.structured:
                if rep.error:
                    error = (rep.error, "")
                elif cmd == C.CMD_READ and into is not None:
                    self._recv_into(into)
                break
            if rep.type == C.REPLY_TYPE_OFFSET_DATA and into is not None and rep.length > 8:
                at = _U64.unpack(self._recv(8))[0] - offset
                n = rep.length - 8
                if at < 0 or at + n > length:
                    raise ProtocolError("OFFSET_DATA chunk outside the request")
                self._recv_into(into[at:at + n])
            elif rep.type == C.REPLY_TYPE_OFFSET_HOLE and into is not None and rep.length == 12:
                hoff, hlen = struct.unpack(">QI", self._recv(12))
                at = hoff - offset
                if at < 0 or at + hlen > length:
                    raise ProtocolError("OFFSET_HOLE chunk outside the request")
                into[at:at + hlen] = bytes(hlen)
            elif rep.type == C.REPLY_TYPE_BLOCK_STATUS:
                ctx, got = decode_block_status_payload(self._recv(rep.length))
                if ctx == self.meta_id:
                    extents = got
            elif rep.type & 0x8000:
                error = decode_error_payload(self._recv(rep.length))
            elif rep.type == C.REPLY_TYPE_NONE and rep.length == 0:
                pass
            else:
                raise ProtocolError(f"unexpected reply chunk type {rep.type} length {rep.length}")
            if rep.flags & C.REPLY_FLAG_DONE:
                break
        if error is not None:
            err, msg = error
            name = C.CMD_NAMES.get(cmd, str(cmd))
            raise DMError(C.wire_to_errno(err),
                          f"{self.url}: {name} at byte {offset} length {length} failed"
                          + (f": {msg}" if msg else ""))
        return extents

    def close(self, wait: bool = False) -> None:
        """Disconnect; with `wait`, return only once the server has closed its end (it has
        released its open of the export by then)."""
        try:
            self.sock.sendall(encode_request(C.CMD_DISC, 0))
            if wait:
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.settimeout(None)
                while self.sock.recv(65536):
                    pass
        except OSError:
            pass
        self.sock.close()


class RemoteDevice(BlockDevice):
    """A remote NBD export used as an underlying device of tables."""

    def __init__(self, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.address = parse_url(url)
        self.url = url
        #: the TLS context of every connection (`nbds` schemes), loaded once
        self.tls = self.address.tls.context(url) if self.address.tls is not None else None
        self._cond = threading.Condition()
        self._idle: list[NBDConnection] = []
        self._count = 0
        self._closed = False
        first = self._connect()
        info = first.info
        self.tflags = first.flags
        self.meta = first.meta_id != 0
        self.max_payload = max(4096, min(info.get("max_payload", C.MAX_PAYLOAD), C.MAX_PAYLOAD))
        self.max_connections = max_connections if self.tflags & C.TFLAG_CAN_MULTI_CONN else 1
        lbs = 4096 if info.get("min_block") == 4096 else 512
        size = info["size"] - info["size"] % 512
        super().__init__(url, size, lbs, read_only=bool(self.tflags & C.TFLAG_READ_ONLY))
        self._count = 1
        self._idle.append(first)
        self.min_block = max(1, min(info.get("min_block", 1), 65536))
        self._rmw_lock = threading.Lock()

    def _connect(self) -> NBDConnection:
        try:
            return NBDConnection(self.address, self.url, self.tls)
        except DMError:
            raise
        except (OSError, ProtocolError, Broken) as exc:
            raise DMError(errno.ENXIO, f"{self.url}: cannot connect to the NBD server: {exc}") from None

    # ---- the pool -------------------------------------------------------------------

    def _acquire(self) -> NBDConnection:
        with self._cond:
            while True:
                if self._closed:
                    raise DMError(errno.ENXIO, f"{self.url}: the device is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_connections:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, conn: NBDConnection, broken: bool = False) -> None:
        with self._cond:
            if broken or self._closed:
                self._count -= 1
                conn.sock.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    def _run(self, cmd: int, offset: int, length: int, **kw) -> list[tuple[int, int]] | None:
        last: Exception | None = None
        for delay in RETRY_DELAYS:
            if delay:
                time.sleep(delay)
            try:
                conn = self._acquire()
            except DMError as exc:
                if self._closed:
                    raise
                last = exc
                continue
            try:
                result = conn.request(cmd, offset, length, **kw)
            except Broken as exc:
                self._release(conn, broken=True)
                last = exc
                continue
            except BaseException:
                self._release(conn)
                raise
            self._release(conn)
            return result
        name = C.CMD_NAMES.get(cmd, str(cmd))
        gone = DMError(errno.EIO, f"{self.url}: {name} at byte {offset} failed, the server is unreachable: {last}")
        if not self._closed:
            self.mark_dead(True)  # the export is gone: tell the holders up the stack (DESIGN §6)
        raise gone

    # ---- BlockDevice I/O ------------------------------------------------------------

    def _chunks(self, offset: int, length: int):
        step = self.max_payload
        pos = 0
        while pos < length:
            n = min(step, length - pos)
            yield offset + pos, pos, n
            pos += n

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range aligned to the server's minimum block size covering a range."""
        bs = self.min_block
        start = offset - offset % bs
        end = -(-(offset + length) // bs) * bs
        return start, end - start

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = memoryview(buf)
        start, span = self._span(offset, len(view))
        if (start, span) != (offset, len(view)):      # unaligned: bounce
            tmp = bytearray(span)
            self._read(start, memoryview(tmp))
            view[:] = memoryview(tmp)[offset - start:offset - start + len(view)]
            return
        self._read(offset, view)

    def _read(self, offset: int, view: memoryview) -> None:
        for off, at, n in self._chunks(offset, len(view)):
            self._run(C.CMD_READ, off, n, into=view[at:at + n])

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        view = memoryview(data)
        start, span = self._span(offset, len(view))
        if (start, span) != (offset, len(view)):      # unaligned: read, modify, write
            with self._rmw_lock:
                tmp = bytearray(span)
                self._read(start, memoryview(tmp))
                tmp[offset - start:offset - start + len(view)] = view
                self._write(start, memoryview(tmp), fua)
            return
        self._write(offset, view, fua)

    def _write(self, offset: int, view: memoryview, fua: bool) -> None:
        native_fua = bool(self.tflags & C.TFLAG_SEND_FUA)
        flags = C.CMD_FLAG_FUA if fua and native_fua else 0
        for off, at, n in self._chunks(offset, len(view)):
            self._run(C.CMD_WRITE, off, n, flags=flags, payload=view[at:at + n])
        if fua and not native_fua:
            self.flush()

    def flush(self) -> None:
        if self.tflags & C.TFLAG_SEND_FLUSH:
            self._run(C.CMD_FLUSH, 0, 0)

    def _inner(self, offset: int, length: int) -> tuple[int, int]:
        """The largest aligned range inside a range (length may be <= 0)."""
        bs = self.min_block
        start = -(-offset // bs) * bs
        end = (offset + length) // bs * bs
        return start, end - start

    def discard(self, offset: int, length: int) -> None:
        start, n = self._inner(offset, length)     # a hint: the unaligned edges are dropped
        if self.tflags & C.TFLAG_SEND_TRIM and n > 0:
            for off, _at, k in self._big_chunks(start, n):
                self._run(C.CMD_TRIM, off, k)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        start, n = self._inner(offset, length)
        if not self.tflags & C.TFLAG_SEND_WRITE_ZEROES or n <= 0:
            super().write_zeroes(offset, length, may_unmap)
            return
        if start > offset:
            self.write(offset, bytes(start - offset))
        flags = 0 if may_unmap else C.CMD_FLAG_NO_HOLE
        for off, _at, k in self._big_chunks(start, n):
            self._run(C.CMD_WRITE_ZEROES, off, k, flags=flags)
        if start + n < offset + length:
            self.write(start + n, bytes(offset + length - start - n))

    def _big_chunks(self, offset: int, length: int):
        step = 1 << 30          # requests without payload may be long, but under 2^32
        for pos in range(0, length, step):
            yield offset + pos, pos, min(step, length - pos)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        if not self.meta:
            return [(length, 0)]
        start, span = self._span(offset, min(length, 1 << 30))
        extents = self._run(C.CMD_BLOCK_STATUS, start, span) or []
        out: list[tuple[int, int]] = []
        skip = offset - start                   # drop the part before `offset`
        for ln, fl in extents:
            if ln <= skip:
                skip -= ln
                continue
            out.append((ln - skip, fl & (C.STATE_HOLE | C.STATE_ZERO)))
            skip = 0
        return out or [(min(length, 1 << 30), 0)]

    def close_backing(self, wait: bool = False) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn in idle:
            conn.close(wait)


def _has_client_cert(opts: TLSOptions) -> bool:
    return opts.certificates is not None and os.path.isfile(os.path.join(opts.certificates, "client-cert.pem"))


def open_url(url: str) -> RemoteDevice:
    """The backing-store factory for `nbd[s]://` and `nbd[s]+unix://` references."""
    return RemoteDevice(url)


def register(backing_stores) -> None:
    """Make `nbd://`, `nbd+unix://` and their TLS forms usable as device references in tables."""
    for scheme in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        backing_stores.register_scheme(scheme, open_url)
