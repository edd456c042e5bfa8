"""NBD transmission phase as pure functions: wire formats, request checks, reply encoders.

Sans-IO, in the style of h11: nothing here touches a socket. The server's hot path uses the
`struct.Struct` objects and `Export.check` directly on its preallocated buffers;
`RequestParser` wraps the same functions as a bytes-in, requests-out state machine for
tests, fuzzing and simple callers. The handshake lives in `handshake.py`.

Command rules (what `Export.check` returns, as NBD wire errnos):
- unknown command, unknown flag bit, a flag that does not apply to the command: EINVAL;
- zero length, or an offset/length not a multiple of the minimum block size: EINVAL;
- READ longer than the maximum payload, READ/CACHE/BLOCK_STATUS past the end: EINVAL;
- WRITE/TRIM/WRITE_ZEROES on a read-only export: EPERM; past the end: ENOSPC;
- WRITE_ZEROES with FAST_ZERO: ENOTSUP (we cannot promise that zeroing is fast);
- BLOCK_STATUS without a negotiated metadata context: EINVAL;
- FLUSH/DISC with a nonzero offset or length: EINVAL.
A WRITE whose payload is longer than the maximum is a protocol error (hang up): its payload
cannot be trusted to be followed by a request header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from . import constants as C


class ProtocolError(Exception):
    """The peer broke the protocol; the only safe answer is to hang up."""


# ---- wire formats -----------------------------------------------------------------------

#: request: magic u32, flags u16, type u16, cookie u64, offset u64, length u32
REQUEST = struct.Struct(">IHHQQI")
#: simple reply: magic u32, error u32, cookie u64
SIMPLE_REPLY = struct.Struct(">IIQ")
#: structured reply chunk header: magic u32, flags u16, type u16, cookie u64, length u32
CHUNK = struct.Struct(">IHHQI")
#: OFFSET_DATA chunk header including its 64-bit offset
DATA_CHUNK = struct.Struct(">IHHQIQ")
#: error chunk header including error u32 and message length u16
ERROR_CHUNK = struct.Struct(">IHHQIIH")
#: option request header: IHAVEOPT u64, option u32, length u32
OPTION = struct.Struct(">QII")
#: option reply header: magic u64, option u32, reply type u32, length u32
OPTION_REPLY = struct.Struct(">QIII")
EXTENT = struct.Struct(">II")

REQUEST_SIZE = REQUEST.size            # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
CHUNK_SIZE = CHUNK.size                # 20
DATA_CHUNK_SIZE = DATA_CHUNK.size      # 28

KNOWN_CMD_FLAGS = (C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_DF | C.CMD_FLAG_REQ_ONE
                   | C.CMD_FLAG_FAST_ZERO)
#: flags besides FUA that each command accepts (FUA is accepted on every command)
_CMD_FLAGS = {C.CMD_READ: C.CMD_FLAG_DF, C.CMD_WRITE: 0, C.CMD_DISC: 0, C.CMD_FLUSH: 0,
              C.CMD_TRIM: 0, C.CMD_CACHE: 0,
              C.CMD_WRITE_ZEROES: C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO,
              C.CMD_BLOCK_STATUS: C.CMD_FLAG_REQ_ONE}


class Request(NamedTuple):
    """One decoded request; `payload` is the WRITE data (empty for other commands)."""

    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""


def decode_request_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """(flags, cmd, cookie, offset, length) from a 28-byte header; bad magic: ProtocolError."""
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf)
    if magic != C.REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return flags, cmd, cookie, offset, length


def encode_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(C.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def payload_length(cmd: int, length: int, max_payload: int) -> int:
    """Bytes of payload that follow a request header; ProtocolError if too long to accept."""
    if cmd != C.CMD_WRITE:
        return 0
    if length > max_payload:
        raise ProtocolError(f"WRITE of {length} bytes exceeds the maximum payload {max_payload}")
    return length


@dataclass
class Export:
    """What the transmission phase knows about the export a connection selected."""

    name: str
    size: int
    read_only: bool
    structured: bool = False
    meta_context: int = 0        # id of base:allocation, 0 if not negotiated
    min_block: int = 1
    max_payload: int = C.MAX_PAYLOAD

    def check(self, flags: int, cmd: int, offset: int, length: int, size: int) -> int:
        """Wire errno for a request that must be refused, 0 if it may run. `size` is live."""
        if flags & ~KNOWN_CMD_FLAGS:
            return C.NBD_EINVAL
        allowed = _CMD_FLAGS.get(cmd)
        if allowed is None or flags & ~(allowed | C.CMD_FLAG_FUA):
            return C.NBD_EINVAL
        if cmd == C.CMD_FLUSH or cmd == C.CMD_DISC:
            return C.NBD_EINVAL if offset or length else 0
        if length == 0 or (offset | length) & (self.min_block - 1):
            return C.NBD_EINVAL
        end = offset + length
        if cmd == C.CMD_READ:
            if length > self.max_payload or end > size:
                return C.NBD_EINVAL
            if flags & C.CMD_FLAG_DF and not self.structured:
                return C.NBD_EINVAL
            return 0
        if cmd == C.CMD_WRITE or cmd == C.CMD_TRIM or cmd == C.CMD_WRITE_ZEROES:
            if self.read_only:
                return C.NBD_EPERM
            if end > size:
                return C.NBD_ENOSPC
            if flags & C.CMD_FLAG_FAST_ZERO:
                return C.NBD_ENOTSUP
            return 0
        if cmd == C.CMD_BLOCK_STATUS:
            if not self.meta_context:
                return C.NBD_EINVAL
            return C.NBD_EINVAL if end > size else 0
        # CACHE
        return C.NBD_EINVAL if end > size else 0


# ---- replies ----------------------------------------------------------------------------

def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk carrying `length` bytes read at `offset`."""
    return DATA_CHUNK.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE if done else 0,
                           C.REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)


def none_chunk(cookie: int) -> bytes:
    return CHUNK.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """A final ERROR chunk with a human-readable message (truncated to fit)."""
    msg = message.encode("utf-8", "replace")[:1024]
    return ERROR_CHUNK.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR,
                            cookie, 6 + len(msg), error, len(msg)) + msg


def error_reply(cookie: int, error: int, message: str, structured: bool) -> bytes:
    """The reply to a refused request: an error chunk if structured replies are on."""
    return error_chunk(cookie, error, message) if structured else simple_reply(cookie, error)


def block_status_chunk(cookie: int, context: int, extents: list[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk; `extents` is a non-empty list of (length, flags)."""
    body = b"".join(EXTENT.pack(length, flags) for length, flags in extents)
    return CHUNK.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE, C.REPLY_TYPE_BLOCK_STATUS,
                      cookie, 4 + len(body), ) + struct.pack(">I", context) + body


def clip_extents(extents: list[tuple[int, int]], length: int, one: bool) -> list[tuple[int, int]]:
    """Extents for a BLOCK_STATUS reply: merged, nonzero, summing to at most `length`,
    flags limited to HOLE|ZERO, each under 2^32, only the first if `one` (REQ_ONE)."""
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in extents:
        flags &= C.STATE_HOLE | C.STATE_ZERO
        ext_len = min(ext_len, left)
        if ext_len <= 0:
            continue
        if out and out[-1][1] == flags and out[-1][0] + ext_len < 1 << 32:
            out[-1] = (out[-1][0] + ext_len, flags)
        else:
            out.append((ext_len, flags))
        left -= ext_len
        if left == 0:
            break
    if not out:
        out = [(length, 0)]
    return out[:1] if one else out


# ---- a bytes-in, requests-out parser ----------------------------------------------------

class RequestParser:
    """Incremental request decoder: `receive_data(bytes)`, then `next_request()` until None."""

    def __init__(self, max_payload: int = C.MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload
        self.closed = False

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_request(self) -> Request | None:
        """The next complete request, None if more bytes are needed; ProtocolError on garbage."""
        if self.closed or len(self._buf) < REQUEST_SIZE:
            return None
        flags, cmd, cookie, offset, length = decode_request_header(self._buf)
        need = payload_length(cmd, length, self.max_payload)
        if len(self._buf) < REQUEST_SIZE + need:
            return None
        payload = bytes(self._buf[REQUEST_SIZE:REQUEST_SIZE + need])
        del self._buf[:REQUEST_SIZE + need]
        if cmd == C.CMD_DISC:
            self.closed = True
        return Request(flags, cmd, cookie, offset, length, payload)


# ---- client side: decoding replies ------------------------------------------------------

class ReplyHeader(NamedTuple):
    """A decoded reply header: simple (`structured` False) or one structured chunk."""

    structured: bool
    cookie: int
    error: int          # simple replies only
    flags: int          # chunk flags (structured)
    type: int           # chunk type (structured)
    length: int         # chunk payload length (structured)


def reply_header_size(first4: bytes | memoryview) -> int:
    """Total header size given the first 4 bytes (the magic): 16 simple, 20 structured."""
    magic = struct.unpack_from(">I", first4)[0]
    if magic == C.SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if magic == C.STRUCTURED_REPLY_MAGIC:
        return CHUNK_SIZE
    raise ProtocolError(f"bad reply magic 0x{magic:08x}")


def decode_reply_header(buf: bytes | bytearray | memoryview) -> ReplyHeader:
    magic = struct.unpack_from(">I", buf)[0]
    if magic == C.SIMPLE_REPLY_MAGIC:
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf)
        return ReplyHeader(False, cookie, error, C.REPLY_FLAG_DONE, 0, 0)
    if magic == C.STRUCTURED_REPLY_MAGIC:
        _, flags, rtype, cookie, length = CHUNK.unpack_from(buf)
        return ReplyHeader(True, cookie, 0, flags, rtype, length)
    raise ProtocolError(f"bad reply magic 0x{magic:08x}")


def decode_error_payload(payload: bytes) -> tuple[int, str]:
    """(wire errno, message) from an error chunk's payload."""
    if len(payload) < 6:
        raise ProtocolError("error chunk shorter than 6 bytes")
    error, msglen = struct.unpack_from(">IH", payload)
    if 6 + msglen > len(payload):
        raise ProtocolError("error chunk message longer than the chunk")
    return error or C.NBD_EIO, payload[6:6 + msglen].decode("utf-8", "replace")


def decode_block_status_payload(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) from a BLOCK_STATUS chunk's payload."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError(f"BLOCK_STATUS chunk of bad length {len(payload)}")
    context = struct.unpack_from(">I", payload)[0]
    extents = [EXTENT.unpack_from(payload, at) for at in range(4, len(payload), 8)]
    return context, extents
