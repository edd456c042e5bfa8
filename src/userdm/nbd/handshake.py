"""The NBD handshake (fixed newstyle) as a sans-IO state machine, plus client-side encoders.

`ServerHandshake` takes bytes from the client and returns the bytes to send back. It asks an
`ExportCatalog` (a plain object with three methods, no sockets) which exports exist and, on
`NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`, to select one (LIST leaves out names that are not
valid UTF-8 or longer than the protocol allows). Supported options: EXPORT_NAME, ABORT,
LIST, INFO, GO, STARTTLS, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`);
every other option is answered with NBD_REP_ERR_UNSUP and negotiation goes on. INFO/GO always
answer NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, and NAME/DESCRIPTION when asked.

TLS (`tls`, nbdkit's `--tls` modes): "off" answers NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY;
"on" lets the client upgrade when it likes; "require" (the spec's FORCEDTLS) answers every
option but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and hangs up on
EXPORT_NAME, which cannot be refused politely. STARTTLS is acknowledged and the machine
stops in state `starttls`: the caller sends the ACK in plaintext, runs the TLS handshake
(any bytes received meanwhile, `unused_data()`, belong to it) and calls `tls_started()`;
negotiation then starts afresh (structured replies and metadata contexts asked for before
STARTTLS are forgotten, as the spec says).

States: `client_flags` -> `options` (-> `starttls` -> `options`) -> `transmission` (an export
was selected) or `closed` (ABORT, a refused EXPORT_NAME, or a protocol violation raised as
ProtocolError).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from . import constants as C
from .protocol import OPTION, OPTION_REPLY, Export, ProtocolError

SERVER_HANDSHAKE_FLAGS = C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES
_U32 = struct.Struct(">I")
_OPTION_SIZE = OPTION.size
_OPTION_UNPACK = OPTION.unpack_from
#: NBD_INFO_EXPORT in an NBD_REP_INFO reply, then NBD_INFO_BLOCK_SIZE in one and the final ACK
_INFO_EXPORT_REPLY = struct.Struct(">QIIIHQH")
_BLOCK_SIZE_AND_ACK = struct.Struct(">QIIIHIIIQIII")
TLS_MODES = ("off", "on", "require")


@dataclass
class ExportInfo:
    """An export as the handshake describes it."""

    name: str
    size: int
    read_only: bool
    min_block: int = 512
    preferred_block: int = C.PREFERRED_BLOCK
    max_payload: int = C.MAX_PAYLOAD
    description: str = ""
    multi_conn: bool = True


class Refused(Exception):
    """A catalog's refusal of an export: `reply` is an NBD_REP_ERR_* value."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class ExportCatalog(Protocol):
    """What the handshake needs from the server: names, descriptions and selection."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> ExportInfo: ...       # may raise Refused

    def select(self, name: str) -> ExportInfo: ...     # GO/EXPORT_NAME; may raise Refused


def transmission_flags(info: ExportInfo, structured: bool) -> int:
    """The 16-bit transmission flags for an export."""
    flags = C.TFLAG_HAS_FLAGS | C.TFLAG_SEND_FLUSH | C.TFLAG_SEND_CACHE
    if info.read_only:
        flags |= C.TFLAG_READ_ONLY
    else:
        flags |= (C.TFLAG_SEND_FUA | C.TFLAG_SEND_TRIM | C.TFLAG_SEND_WRITE_ZEROES
                  | C.TFLAG_SEND_FAST_ZERO)
    if info.multi_conn:
        flags |= C.TFLAG_CAN_MULTI_CONN
    if structured:
        flags |= C.TFLAG_SEND_DF
    return flags


def option_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(C.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def wire_name(name: str) -> bytes | None:
    """An export name as the protocol carries it (UTF-8, at most MAX_STRING bytes), or None
    for a name that cannot be sent: LIST leaves such a name out instead of failing for every
    client (a Python str may hold lone surrogates that no UTF-8 encodes)."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return raw if len(raw) <= C.MAX_STRING else None


def _string(data: bytes, at: int, length: int) -> str:
    if length > C.MAX_STRING or at + length > len(data):
        raise ValueError("string too long")
    return data[at:at + length].decode("utf-8")


class ServerHandshake:
    """Server side of the fixed newstyle handshake."""

    def __init__(self, catalog: ExportCatalog, tls: str = "off") -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"TLS mode {tls!r} is not one of {', '.join(TLS_MODES)}")
        self.catalog = catalog
        self.tls = tls
        #: TLS is up (`tls_started()` was called)
        self.tls_active = False
        self.state = "client_flags"
        self.no_zeroes = False
        self.structured = False
        self.export_info: ExportInfo | None = None
        self._meta: tuple[str, bool] | None = None   # SET_META_CONTEXT: (export, selected)
        self._buf = bytearray()

    def greeting(self) -> bytes:
        return struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    @property
    def done(self) -> bool:
        return self.state in ("transmission", "closed")

    def unused_data(self) -> bytes:
        """Bytes received after the handshake ended (early transmission requests)."""
        return bytes(self._buf)

    def export(self) -> Export:
        """The transmission-phase view of the selected export."""
        info = self.export_info
        assert info is not None
        meta = 1 if self._meta is not None and self._meta == (info.name, True) else 0
        return Export(name=info.name, size=info.size, read_only=info.read_only,
                      structured=self.structured, meta_context=meta,
                      min_block=info.min_block, max_payload=info.max_payload)

    def receive_data(self, data: bytes) -> bytes:
        """Consume client bytes; return the bytes to send. ProtocolError: hang up.

        Every whole option that `data` completes is answered, in order, in the returned bytes;
        the options are read where they lie (one cut of the buffer at the end, not one per
        option)."""
        if self.state == "starttls":
            raise ProtocolError("data received while the TLS handshake is due")
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        try:
            while self.state == "options" or self.state == "client_flags":
                if self.state == "client_flags":
                    if end - pos < 4:
                        break
                    flags = _U32.unpack_from(buf, pos)[0]
                    pos += 4
                    if flags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES):
                        self.state = "closed"
                        raise ProtocolError(f"unknown client flags 0x{flags:x}")
                    self.no_zeroes = bool(flags & C.FLAG_C_NO_ZEROES)
                    self.state = "options"
                    continue
                if end - pos < _OPTION_SIZE:
                    break
                magic, opt, length = _OPTION_UNPACK(buf, pos)
                if magic != C.IHAVEOPT:
                    self.state = "closed"
                    raise ProtocolError(f"bad option magic 0x{magic:016x}")
                if length > C.MAX_OPTION_LENGTH:
                    self.state = "closed"
                    raise ProtocolError(f"option {opt} with {length} bytes of data is too long")
                at = pos + _OPTION_SIZE
                if end - at < length:
                    break
                pos = at + length
                out.append(self._option(opt, bytes(buf[at:pos])))
        finally:
            del buf[:pos]   # what is left: a part of the next option, or bytes after the handshake
        return b"".join(out)

    def tls_started(self) -> None:
        """The TLS handshake that followed STARTTLS succeeded: negotiate afresh over it."""
        if self.state != "starttls":
            raise ProtocolError("tls_started() without NBD_OPT_STARTTLS")
        self.tls_active = True
        self._buf.clear()          # those bytes went to the TLS handshake
        self.structured = False
        self._meta = None
        self.state = "options"

    # ---- options --------------------------------------------------------------------

    def _option(self, opt: int, data: bytes) -> bytes:
        if opt == C.OPT_STARTTLS:
            return self._starttls(data)
        if self.tls == "require" and not self.tls_active and opt != C.OPT_ABORT:
            if opt == C.OPT_EXPORT_NAME:
                self.state = "closed"    # cannot be refused politely: hang up (FORCEDTLS)
                return b""
            return self._error(opt, C.REP_ERR_TLS_REQD,
                               "TLS is required: send NBD_OPT_STARTTLS first")
        if opt == C.OPT_EXPORT_NAME:
            return self._export_name(data)
        if opt == C.OPT_ABORT:
            self.state = "closed"
            return option_reply(opt, C.REP_ACK)
        if opt == C.OPT_LIST:
            if data:
                return self._error(opt, C.REP_ERR_INVALID, "LIST takes no data")
            out = []
            for name in self.catalog.names():   # one pass over the names, each encoded once
                raw = wire_name(name)
                if raw is not None:
                    out.append(option_reply(opt, C.REP_SERVER, _U32.pack(len(raw)) + raw))
            out.append(option_reply(opt, C.REP_ACK))
            return b"".join(out)
        if opt in (C.OPT_INFO, C.OPT_GO):
            return self._info_go(opt, data)
        if opt == C.OPT_STRUCTURED_REPLY:
            if data:
                return self._error(opt, C.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.structured = True
            return option_reply(opt, C.REP_ACK)
        if opt in (C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT):
            return self._meta_context(opt, data)
        return self._error(opt, C.REP_ERR_UNSUP, f"option {opt} is not supported")

    def _starttls(self, data: bytes) -> bytes:
        opt = C.OPT_STARTTLS
        if self.tls == "off":
            return self._error(opt, C.REP_ERR_POLICY, "TLS is not enabled on this server")
        if data:
            return self._error(opt, C.REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_active:
            return self._error(opt, C.REP_ERR_INVALID, "TLS is already active")
        self.state = "starttls"
        return option_reply(opt, C.REP_ACK)

    def _error(self, opt: int, rtype: int, message: str) -> bytes:
        return option_reply(opt, rtype, message.encode("utf-8", "replace")[:C.MAX_STRING])

    def _export_name(self, data: bytes) -> bytes:
        try:
            name = data.decode("utf-8")
            info = self.catalog.select(name)
        except (UnicodeDecodeError, Refused):
            self.state = "closed"    # EXPORT_NAME cannot be refused politely
            return b""
        self.export_info = info
        self.state = "transmission"
        reply = struct.pack(">QH", info.size, transmission_flags(info, self.structured))
        return reply if self.no_zeroes else reply + bytes(124)

    def _info_go(self, opt: int, data: bytes) -> bytes:
        try:
            if len(data) < 6:
                raise ValueError("too short")
            nlen = _U32.unpack_from(data)[0]
            name = _string(data, 4, nlen)
            at = 4 + nlen
            if at + 2 > len(data):
                raise ValueError("too short")
            count = struct.unpack_from(">H", data, at)[0]
            if at + 2 + 2 * count != len(data):
                raise ValueError("bad information request count")
            requests = set(struct.unpack_from(f">{count}H", data, at + 2))
        except (ValueError, UnicodeDecodeError):
            return self._error(opt, C.REP_ERR_INVALID, "malformed INFO/GO request")
        try:
            info = self.catalog.select(name) if opt == C.OPT_GO else self.catalog.info(name)
        except Refused as exc:
            return self._error(opt, exc.reply, exc.message)
        magic = C.OPT_REPLY_MAGIC
        out = [_INFO_EXPORT_REPLY.pack(magic, opt, C.REP_INFO, 12, C.INFO_EXPORT, info.size,
                                       transmission_flags(info, self.structured))]
        raw_name = wire_name(info.name) if C.INFO_NAME in requests else None
        if raw_name is not None:
            out.append(option_reply(opt, C.REP_INFO, struct.pack(">H", C.INFO_NAME) + raw_name))
        if C.INFO_DESCRIPTION in requests and info.description:
            out.append(option_reply(opt, C.REP_INFO, struct.pack(">H", C.INFO_DESCRIPTION)
                                    + info.description.encode()))
        out.append(_BLOCK_SIZE_AND_ACK.pack(magic, opt, C.REP_INFO, 14, C.INFO_BLOCK_SIZE, info.min_block,
                                            info.preferred_block, info.max_payload, magic, opt, C.REP_ACK, 0))
        if opt == C.OPT_GO:
            self.export_info = info
            self.state = "transmission"
        return b"".join(out)

    def _meta_context(self, opt: int, data: bytes) -> bytes:
        if not self.structured:
            return self._error(opt, C.REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
        try:
            nlen = _U32.unpack_from(data)[0]
            name = _string(data, 4, nlen)
            at = 4 + nlen
            count = _U32.unpack_from(data, at)[0]
            at += 4
            queries = []
            for _ in range(count):
                qlen = _U32.unpack_from(data, at)[0]
                queries.append(_string(data, at + 4, qlen))
                at += 4 + qlen
            if at != len(data):
                raise ValueError("trailing bytes")
        except (ValueError, UnicodeDecodeError, struct.error):
            return self._error(opt, C.REP_ERR_INVALID, "malformed metadata context request")
        try:
            self.catalog.info(name)
        except Refused as exc:
            return self._error(opt, exc.reply, exc.message)
        listing = opt == C.OPT_LIST_META_CONTEXT
        selected = any(q == C.BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        if listing and not queries:
            selected = True
        if not listing:
            self._meta = (name, selected)
        out = []
        if selected:
            ctx_id = 0 if listing else 1
            out.append(option_reply(opt, C.REP_META_CONTEXT,
                                    _U32.pack(ctx_id) + C.BASE_ALLOCATION.encode()))
        out.append(option_reply(opt, C.REP_ACK))
        return b"".join(out)


# ---- client side encoders ---------------------------------------------------------------

def client_flags(server_flags: int) -> int:
    """The client flags to answer a server's handshake flags with."""
    if not server_flags & C.FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("server does not support fixed newstyle negotiation")
    return C.FLAG_C_FIXED_NEWSTYLE | (server_flags & C.FLAG_NO_ZEROES and C.FLAG_C_NO_ZEROES)


def encode_option(opt: int, data: bytes = b"") -> bytes:
    return OPTION.pack(C.IHAVEOPT, opt, len(data)) + data


def encode_go(name: str, requests: tuple[int, ...] = (C.INFO_BLOCK_SIZE,), opt: int = C.OPT_GO) -> bytes:
    raw = name.encode()
    return encode_option(opt, _U32.pack(len(raw)) + raw + struct.pack(f">H{len(requests)}H",
                                                                      len(requests), *requests))


def encode_meta_context(name: str, queries: list[str], opt: int = C.OPT_SET_META_CONTEXT) -> bytes:
    raw = name.encode()
    body = _U32.pack(len(raw)) + raw + _U32.pack(len(queries))
    for q in queries:
        body += _U32.pack(len(q.encode())) + q.encode()
    return encode_option(opt, body)


def decode_info(payload: bytes, into: dict[str, int]) -> None:
    """Merge one NBD_REP_INFO payload into `into` (size, flags, min/pref/max block)."""
    if len(payload) < 2:
        raise ProtocolError("empty NBD_REP_INFO")
    kind = struct.unpack_from(">H", payload)[0]
    if kind == C.INFO_EXPORT:
        if len(payload) != 12:
            raise ProtocolError("bad NBD_INFO_EXPORT length")
        _, into["size"], into["flags"] = struct.unpack(">HQH", payload)
    elif kind == C.INFO_BLOCK_SIZE:
        if len(payload) != 14:
            raise ProtocolError("bad NBD_INFO_BLOCK_SIZE length")
        _, into["min_block"], into["preferred_block"], into["max_payload"] = struct.unpack(">HIII", payload)
