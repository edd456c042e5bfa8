"""The kernel's FUSE wire protocol (`include/uapi/linux/fuse.h`, 7.x) as pure functions.

Sans-IO, like `nbd/protocol.py`: nothing here touches /dev/fuse. `decode` turns one message
read from the device into a `Request` (its header fields plus the opcode's arguments as a
named tuple); the `reply_*` and `pack_*` functions turn answers into the bytes written back.
It covers what a one-directory filesystem of device files needs: INIT, LOOKUP,
FORGET/BATCH_FORGET, GETATTR, SETATTR, OPEN/RELEASE/FLUSH/FSYNC, READ/WRITE,
OPENDIR/READDIR(PLUS)/RELEASEDIR/FSYNCDIR, STATFS, FALLOCATE, LSEEK, INTERRUPT, DESTROY.
Any other opcode decodes to a `Request` with `args=None`, answered with ENOSYS (the kernel
then stops sending most of them).

Every message is checked against its declared length: a message shorter than its header or
its opcode's fixed arguments, or whose header length disagrees with what was read, raises
`ProtocolError` (the kernel never sends one; the server logs it and drops the message).
READ replies are built in place: `READ_REPLY_HEADER` is packed in front of data read straight
into the reply buffer, and WRITE's payload is a memoryview of the request buffer.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

KERNEL_VERSION = 7
#: the minor version we speak: 7.38 (parallel direct writes, INIT_EXT); the kernel may speak more
MINOR_VERSION = 38
ROOT_ID = 1

# ---- opcodes ------------------------------------------------------------------------------

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 20, 25, 26, 27, 28, 29, 30
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS, LSEEK = 36, 38, 42, 43, 44, 46

OPCODE_NAMES = {LOOKUP: "LOOKUP", FORGET: "FORGET", GETATTR: "GETATTR", SETATTR: "SETATTR",
                OPEN: "OPEN", READ: "READ", WRITE: "WRITE", STATFS: "STATFS", RELEASE: "RELEASE",
                FSYNC: "FSYNC", FLUSH: "FLUSH", INIT: "INIT", OPENDIR: "OPENDIR", READDIR: "READDIR",
                RELEASEDIR: "RELEASEDIR", FSYNCDIR: "FSYNCDIR", INTERRUPT: "INTERRUPT",
                DESTROY: "DESTROY", BATCH_FORGET: "BATCH_FORGET", FALLOCATE: "FALLOCATE",
                READDIRPLUS: "READDIRPLUS", LSEEK: "LSEEK"}

#: requests the kernel expects no reply to
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# ---- flags --------------------------------------------------------------------------------

# INIT flags (flags2 is the upper 32 bits once INIT_EXT is agreed)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37      # opens may name a backing file the kernel does I/O on (7.40)
OVER_IO_URING = 1 << 41    # requests may come through io_uring commands (7.42)

# OPEN reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
NOTIFY_INVAL_INODE = 2

#: the kernel refuses reads from /dev/fuse into smaller buffers than this
MIN_READ_BUFFER = 8192

# ---- wire formats -------------------------------------------------------------------------

#: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32, pid u32, total_extlen u16, padding u16
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: len u32, error i32 (minus an errno; a notification code when unique is 0), unique u64
OUT_HEADER = struct.Struct("<IiQ")
IN_HEADER_SIZE = IN_HEADER.size     # 40
OUT_HEADER_SIZE = OUT_HEADER.size   # 16

INIT_IN = struct.Struct("<IIII")            # major, minor, max_readahead, flags (then flags2 since 7.36)
INIT_IN_FLAGS2 = struct.Struct("<I")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_pages, map_alignment, flags2, max_stack_depth
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")          # getattr_flags, dummy, fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")              # flags, open_flags
RELEASE_IN = struct.Struct("<QIIQ")         # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")           # fh, unused, padding, lock_owner
FSYNC_IN = struct.Struct("<QII")            # fh, fsync_flags, padding
READ_IN = struct.Struct("<QQIIQII")         # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = READ_IN                          # fh, offset, size, write_flags, lock_owner, flags, padding
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")      # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QQII")           # fh, offset, whence, padding

ATTR = struct.Struct("<QQQQQQIIIIIIIIII")   # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")        # nodeid, generation, entry_valid, attr_valid, nsecs (+ attr)
ATTR_OUT = struct.Struct("<QII")            # attr_valid, attr_valid_nsec, dummy (+ attr)
OPEN_OUT = struct.Struct("<QIi")            # fh, open_flags, backing_id
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
LSEEK_OUT = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")             # ino, off, namelen, type (+ name, padded to 8)
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")

#: a whole READ or WRITE request's header and arguments, for the server's hot path
READ_REQUEST = struct.Struct(IN_HEADER.format + READ_IN.format[1:])
WRITE_REQUEST = READ_REQUEST
#: a READ reply: the out header, then the data read into the buffer right after it
READ_REPLY_HEADER = OUT_HEADER
#: where WRITE's payload starts in its request
WRITE_DATA_OFFSET = IN_HEADER_SIZE + WRITE_IN.size


# ---- FUSE over io_uring (`fuse_uring_req_header`, `fuse_uring_cmd_req`) ---------------------

#: a ring entry's header buffer: the in header (the out header on commit) in a 128-byte field,
#: the opcode's first argument in the next 128 bytes, then `fuse_uring_ent_in_out`; every other
#: argument and the data travel in the entry's payload buffer
RING_OP_IN = 128
RING_ENT_IN_OUT = 256
RING_HEADER_SIZE = 288
#: fuse_uring_ent_in_out: flags, commit_id (the request's unique), payload_sz, padding, reserved
RING_ENT = struct.Struct("<QQII8x")
RING_PAYLOAD_SIZE = RING_ENT_IN_OUT + 16     # where payload_sz lies in the header buffer
RING_REGISTER, RING_COMMIT_AND_FETCH = 1, 2
#: a READ or WRITE in a ring entry: the in header's first 16 bytes ... and the op_in argument
RING_RW_IN = struct.Struct("<QQII")        # fh, offset, size, flags (READ_IN / WRITE_IN's start)


class ProtocolError(Exception):
    """A message that no kernel sends: shorter than its header or arguments, or inconsistent."""


# ---- requests -----------------------------------------------------------------------------

class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int          # flags | flags2 << 32


class Name(NamedTuple):
    name: bytes


class Forget(NamedTuple):
    nlookup: int


class BatchForget(NamedTuple):
    forgets: tuple[tuple[int, int], ...]   # (nodeid, nlookup)


class GetattrIn(NamedTuple):
    flags: int
    fh: int


class SetattrIn(NamedTuple):
    valid: int
    fh: int
    size: int
    mode: int
    uid: int
    gid: int


class OpenIn(NamedTuple):
    flags: int
    open_flags: int


class ReleaseIn(NamedTuple):
    fh: int
    flags: int
    release_flags: int


class FlushIn(NamedTuple):
    fh: int


class FsyncIn(NamedTuple):
    fh: int
    fsync_flags: int


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    flags: int


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int
    data: memoryview


class InterruptIn(NamedTuple):
    unique: int


class FallocateIn(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int


class LseekIn(NamedTuple):
    fh: int
    offset: int
    whence: int


class Empty(NamedTuple):
    pass


class Request(NamedTuple):
    """One decoded message; `args` is None for an opcode this module does not know."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    args: Any

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode}")


def _fixed(st: struct.Struct, build: Any) -> Any:
    def decode(body: memoryview) -> Any:
        if len(body) < st.size:
            raise ProtocolError(f"{st.size}-byte arguments expected, {len(body)} bytes given")
        return build(*st.unpack_from(body))
    return decode


def _name(body: memoryview) -> Name:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("a name without its terminating NUL")
    return Name(raw[:end])


def _init(body: memoryview) -> InitIn:
    if len(body) < INIT_IN.size:
        raise ProtocolError(f"INIT: {INIT_IN.size}-byte arguments expected, {len(body)} bytes given")
    major, minor, readahead, flags = INIT_IN.unpack_from(body)
    if len(body) >= INIT_IN.size + 4 and flags & INIT_EXT:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    return InitIn(major, minor, readahead, flags)


def _batch_forget(body: memoryview) -> BatchForget:
    if len(body) < BATCH_FORGET_IN.size:
        raise ProtocolError(f"BATCH_FORGET: {BATCH_FORGET_IN.size}-byte arguments expected")
    count, _ = BATCH_FORGET_IN.unpack_from(body)
    if len(body) < BATCH_FORGET_IN.size + count * FORGET_ONE.size:
        raise ProtocolError(f"BATCH_FORGET of {count} inodes in {len(body)} bytes")
    return BatchForget(tuple(FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size)
                             for i in range(count)))


def _write(body: memoryview) -> WriteIn:
    if len(body) < WRITE_IN.size:
        raise ProtocolError(f"WRITE: {WRITE_IN.size}-byte arguments expected, {len(body)} bytes given")
    fh, offset, size, write_flags, _, _, _ = WRITE_IN.unpack_from(body)
    if len(body) - WRITE_IN.size != size:
        raise ProtocolError(f"WRITE of {size} bytes carries {len(body) - WRITE_IN.size}")
    return WriteIn(fh, offset, size, write_flags, body[WRITE_IN.size:])


def _empty(body: memoryview) -> Empty:
    return Empty()


_DECODERS: dict[int, Any] = {
    INIT: _init,
    LOOKUP: _name,
    FORGET: _fixed(FORGET_IN, Forget),
    BATCH_FORGET: _batch_forget,
    GETATTR: _fixed(GETATTR_IN, lambda flags, _d, fh: GetattrIn(flags, fh)),
    SETATTR: _fixed(SETATTR_IN, lambda valid, _p, fh, size, _lo, _a, _m, _c, _an, _mn, _cn, mode, _u4, uid,
                    gid, _u5: SetattrIn(valid, fh, size, mode, uid, gid)),
    OPEN: _fixed(OPEN_IN, OpenIn),
    OPENDIR: _fixed(OPEN_IN, OpenIn),
    RELEASE: _fixed(RELEASE_IN, lambda fh, flags, rflags, _lo: ReleaseIn(fh, flags, rflags)),
    RELEASEDIR: _fixed(RELEASE_IN, lambda fh, flags, rflags, _lo: ReleaseIn(fh, flags, rflags)),
    FLUSH: _fixed(FLUSH_IN, lambda fh, _u, _p, _lo: FlushIn(fh)),
    FSYNC: _fixed(FSYNC_IN, lambda fh, flags, _p: FsyncIn(fh, flags)),
    FSYNCDIR: _fixed(FSYNC_IN, lambda fh, flags, _p: FsyncIn(fh, flags)),
    READ: _fixed(READ_IN, lambda fh, off, size, _rf, _lo, flags, _p: ReadIn(fh, off, size, flags)),
    READDIR: _fixed(READ_IN, lambda fh, off, size, _rf, _lo, flags, _p: ReadIn(fh, off, size, flags)),
    READDIRPLUS: _fixed(READ_IN, lambda fh, off, size, _rf, _lo, flags, _p: ReadIn(fh, off, size, flags)),
    WRITE: _write,
    STATFS: _empty,
    DESTROY: _empty,
    INTERRUPT: _fixed(INTERRUPT_IN, InterruptIn),
    FALLOCATE: _fixed(FALLOCATE_IN, lambda fh, off, length, mode, _p: FallocateIn(fh, off, length, mode)),
    LSEEK: _fixed(LSEEK_IN, lambda fh, off, whence, _p: LseekIn(fh, off, whence)),
}


def decode(message: bytes | bytearray | memoryview) -> Request:
    """One request as read from /dev/fuse (exactly one message: one read returns one).
    WRITE's data and nothing else refers to `message` afterwards."""
    view = memoryview(message)
    if len(view) < IN_HEADER_SIZE:
        raise ProtocolError(f"a {len(view)}-byte message is shorter than the {IN_HEADER_SIZE}-byte header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(view)
    if length != len(view):
        raise ProtocolError(f"the header says {length} bytes, the message has {len(view)}")
    end = length - extlen * 8      # extensions (security context, groups) follow the arguments
    if end < IN_HEADER_SIZE:
        raise ProtocolError(f"{extlen * 8} bytes of extensions in a {length}-byte message")
    decoder = _DECODERS.get(opcode)
    args = decoder(view[IN_HEADER_SIZE:end]) if decoder is not None else None
    return Request(opcode, unique, nodeid, uid, gid, pid, args)


# ---- replies ------------------------------------------------------------------------------

def reply(unique: int, body: bytes = b"") -> bytes:
    """A successful reply carrying `body`."""
    return OUT_HEADER.pack(OUT_HEADER_SIZE + len(body), 0, unique) + body


def reply_error(unique: int, err: int) -> bytes:
    """A failed reply: `err` is a positive errno."""
    if not 0 < err < 4096:
        err = errno.EIO
    return OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique)


def pack_read_header(buf: bytearray | memoryview, unique: int, length: int) -> None:
    """Write a READ reply's header in front of the `length` bytes of data at buf[16:]."""
    OUT_HEADER.pack_into(buf, 0, OUT_HEADER_SIZE + length, 0, unique)


class AttrFields(NamedTuple):
    """What `fuse_attr` carries for one inode (times in nanoseconds)."""

    ino: int
    size: int
    blocks: int
    time_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    blksize: int = 4096


def pack_attr(a: AttrFields) -> bytes:
    sec, nsec = divmod(a.time_ns, 1_000_000_000)
    return ATTR.pack(a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink,
                     a.uid, a.gid, 0, a.blksize, 0)


def entry_out(a: AttrFields, valid_ns: int = 0) -> bytes:
    """LOOKUP's answer: the inode `a.ino`, cached for `valid_ns` (0: ask again every time)."""
    sec, nsec = divmod(valid_ns, 1_000_000_000)
    return ENTRY_OUT.pack(a.ino, 0, sec, sec, nsec, nsec) + pack_attr(a)


def attr_out(a: AttrFields, valid_ns: int = 0) -> bytes:
    sec, nsec = divmod(valid_ns, 1_000_000_000)
    return ATTR_OUT.pack(sec, nsec, 0) + pack_attr(a)


def open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def statfs_out(*, bsize: int, namelen: int, blocks: int = 0, files: int = 0) -> bytes:
    return STATFS_OUT.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def lseek_out(offset: int) -> bytes:
    return LSEEK_OUT.pack(offset)


def init_out(init: InitIn, *, want: int, max_write: int, max_pages: int, max_background: int,
             congestion_threshold: int) -> bytes:
    """INIT's answer: our version (the lower minor of both), the wanted flags the kernel offers.
    With PASSTHROUGH, backing files are one filesystem deep (max_stack_depth 1)."""
    flags = init.flags & want
    if flags >> 32:
        flags |= INIT_EXT
    return INIT_OUT.pack(KERNEL_VERSION, min(init.minor, MINOR_VERSION), init.max_readahead,
                         flags & 0xFFFFFFFF, max_background, congestion_threshold, max_write, 1,
                         max_pages, 0, flags >> 32, 1 if flags & PASSTHROUGH else 0)


def _dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + bytes(-len(rec) % 8)


def dirents(entries: Iterable[tuple[bytes, int, int]], offset: int, size: int) -> bytes:
    """READDIR's answer: the `entries` (name, inode, d_type) from index `offset` on, as many
    as fit in `size` bytes; each carries the offset of the next one."""
    out = bytearray()
    for i, (name, ino, dtype) in enumerate(entries):
        if i < offset:
            continue
        rec = _dirent(ino, i + 1, name, dtype)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)


def direntplus(entries: Iterable[tuple[bytes, AttrFields | None, int]], offset: int, size: int) -> bytes:
    """READDIRPLUS's answer: as `dirents`, each record preceded by its entry (None for . and ..,
    whose entries the kernel ignores: nodeid 0)."""
    out = bytearray()
    for i, (name, attr, dtype) in enumerate(entries):
        if i < offset:
            continue
        if attr is None:
            head = ENTRY_OUT.pack(0, 0, 0, 0, 0, 0) + bytes(ATTR.size)
            ino = ROOT_ID
        else:
            head = entry_out(attr)
            ino = attr.ino
        rec = head + _dirent(ino, i + 1, name, dtype)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)


def notify_inval_inode(ino: int, offset: int = -1, length: int = 0) -> bytes:
    """Tell the kernel to drop its cached attributes of `ino` (and data, from `offset` >= 0)."""
    body = NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length)
    return OUT_HEADER.pack(OUT_HEADER_SIZE + len(body), NOTIFY_INVAL_INODE, 0) + body
