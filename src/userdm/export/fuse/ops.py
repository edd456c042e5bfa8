"""The answers of the mount directory to FUSE requests: decoded requests in, reply bytes out.

`DeviceOperations.handle` maps each `protocol.Request` onto `DeviceFiles` and returns what the
server writes back (or None when the kernel expects no reply). It never touches /dev/fuse, so
it is driven by the server's threads and by tests alike. A READ is served into the caller's
reply buffer (the data right after the 16-byte header: one write of the buffer answers it);
a WRITE takes its data as a memoryview of the request buffer. With a serving thread's
`LentTables` (`lent.py`), plain READs and WRITEs go straight to the files below the device.
`DMError`/`OSError` become the reply's errno; anything else is logged and answered with EIO.

Every open uses `direct_io` (with parallel direct writes): the kernel keeps no page cache for
the files, so a table reload is visible to the next read and loop devices see exactly what the
device holds. Entry and attribute timeouts are zero, so sizes and removals show at once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Protocol

from ...errors import DMError
from . import protocol as P
from .files import ROOT_INODE, Attr, DeviceFiles
from .lent import LentTables, Revocations

log = logging.getLogger("userdm.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: the largest READ/WRITE the kernel is allowed to send (max_pages of 4 KiB pages)
MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * 4096
#: the request buffer: the largest WRITE with its headers (and room for extensions)
REQUEST_BUFFER = MAX_WRITE + 4096
#: the reply buffer: the largest READ after its out header
REPLY_BUFFER = P.OUT_HEADER_SIZE + MAX_WRITE

#: READs this big are spliced from the file into the reply when they can (`splice_read`)
SPLICE_MIN = 64 * 1024

#: what we take of what the kernel offers at INIT (not ASYNC_READ: it is for readahead, which
#: direct_io files do not do; it measured slower for loop devices); ATOMIC_O_TRUNC: O_TRUNC comes with OPEN,
#: which ignores it as a block device does (else the kernel would send a SETATTR of size 0)
WANT = P.ATOMIC_O_TRUNC | P.BIG_WRITES | P.ASYNC_DIO | P.MAX_PAGES | P.PARALLEL_DIROPS
MAX_BACKGROUND = 128         # async direct I/O in flight (loop devices queue up to 128 requests)
CONGESTION_THRESHOLD = 96


class BackingFiles(Protocol):
    """What registers backing files with the kernel's FUSE connection (`server.Session`)."""

    def open_backing(self, fd: int) -> int: ...

    def close_backing(self, backing_id: int) -> None: ...


_RING_IN = struct.Struct("<IIQ")    # an entry's in header: len, opcode, unique
_U32 = struct.Struct("<I")


def _ring_error(header: memoryview, unique: int, err: int) -> int:
    """An error reply in a ring entry (no payload); returns `unique`."""
    P.OUT_HEADER.pack_into(header, 0, P.OUT_HEADER_SIZE, -(err if 0 < err < 4096 else errno.EIO), unique)
    _U32.pack_into(header, P.RING_PAYLOAD_SIZE, 0)
    return unique


def drain(fd: int) -> None:
    """Empty the pipe whose (nonblocking) read end is `fd`."""
    while True:
        try:
            if not os.read(fd, 1 << 20):
                return
        except BlockingIOError:
            return


def attr_fields(a: Attr) -> P.AttrFields:
    return P.AttrFields(a.ino, a.size, a.blocks, a.time_ns, a.mode, a.nlink, a.uid, a.gid)


class DeviceOperations:
    """The mount directory's FUSE requests answered from `files`."""

    def __init__(self, files: DeviceFiles) -> None:
        self.files = files
        self.interrupts = 0          # INTERRUPTs received (answered by finishing the request)
        #: the watcher of the tables lent to the serving threads (`lent.py`)
        self.revocations = Revocations()
        self.spliced = 0             # READs answered by splice (`_splice_read`)
        #: registers backing files with the kernel for passthrough opens (the `Session`); None:
        #: every open's I/O comes here
        self.backing: BackingFiles | None = None
        self.passthrough_opens = 0   # opens answered with FOPEN_PASSTHROUGH
        #: take FUSE over io_uring when the kernel offers it (the server then registers ring
        #: entries); `ring` says whether the last INIT agreed to it
        self.want_ring = False
        self.ring = False
        self._backing_ids: dict[int, list[int]] = {}   # inode -> [backing id, passthrough opens]
        self._lock = threading.Lock()
        self.destroyed = False
        self._ops: dict[int, Callable[[P.Request], bytes | None]] = {
            P.INIT: self._init, P.LOOKUP: self._lookup, P.GETATTR: self._getattr,
            P.SETATTR: self._setattr, P.OPEN: self._open, P.WRITE: self._write,
            P.STATFS: self._statfs, P.RELEASE: self._release, P.FSYNC: self._fsync,
            P.FLUSH: self._ok, P.OPENDIR: self._opendir, P.READDIR: self._readdir,
            P.READDIRPLUS: self._readdirplus, P.RELEASEDIR: self._ok, P.FSYNCDIR: self._ok,
            P.FALLOCATE: self._fallocate, P.LSEEK: self._lseek, P.DESTROY: self._destroy,
            P.FORGET: self._forget, P.BATCH_FORGET: self._forget, P.INTERRUPT: self._interrupt,
        }

    def lent_tables(self, before_wait: Callable[[], None] | None = None) -> LentTables:
        """What one serving thread borrows for `serve` and `serve_entry` (see `lent.py`);
        `before_wait` runs whenever the thread gives the tables back."""
        return LentTables(self.files, self.revocations, before_wait)

    def serve(self, message: memoryview, reply_buf: memoryview,
              pipe: tuple[int, int, int] | None = None,
              lent: LentTables | None = None) -> tuple[int, bytes | memoryview | int | None]:
        """(opcode, reply) for one message read from the device (see `handle`). READ and WRITE
        take a short cut past `decode`: one unpack of header and arguments, no objects built,
        and, with the thread's `lent` tables, straight on the files.
        With a `pipe` (read end, write end, room; empty), a big READ that fits may be answered
        in the pipe: the reply is then the number of bytes waiting there, to splice to the device.
        Raises `protocol.ProtocolError` for a malformed message."""
        n = len(message)
        if n >= P.READ_REQUEST.size:
            length, opcode, unique, _, _, _, _, extlen, _, fh, offset, size, _, _, _, _ = \
                P.READ_REQUEST.unpack_from(message)
            if length == n and not extlen:
                try:
                    if opcode == P.READ:
                        size = min(size, len(reply_buf) - P.OUT_HEADER_SIZE)
                        if pipe is not None and SPLICE_MIN <= size <= pipe[2]:
                            if lent is not None:
                                lent.give_back()
                            spliced = self._splice_read(unique, fh, offset, size, pipe)
                            if spliced:
                                return opcode, spliced
                        data = reply_buf[P.OUT_HEADER_SIZE:P.OUT_HEADER_SIZE + size]
                        if lent is not None and lent.read(fh, offset, data):
                            P.pack_read_header(reply_buf, unique, size)
                            return opcode, reply_buf[:P.OUT_HEADER_SIZE + size]
                        got = self.files.readinto(fh, offset, data)
                        P.pack_read_header(reply_buf, unique, got)
                        return opcode, reply_buf[:P.OUT_HEADER_SIZE + got]
                    if opcode == P.WRITE and n - P.WRITE_DATA_OFFSET == size:
                        data = message[P.WRITE_DATA_OFFSET:]
                        if lent is not None and lent.write(fh, offset, data):
                            return opcode, P.reply(unique, P.write_out(size))
                        return opcode, P.reply(unique, P.write_out(self.files.write(fh, offset, data)))
                except (DMError, OSError) as exc:
                    return opcode, P.reply_error(unique, exc.errno or errno.EIO)
                except Exception:  # noqa: BLE001 - one bad request must not end the serving thread
                    log.exception("FUSE %s failed", P.OPCODE_NAMES[opcode])
                    return opcode, P.reply_error(unique, errno.EIO)
        if lent is not None:
            lent.give_back()
        req = P.decode(message)
        return req.opcode, self.handle(req, reply_buf)

    def serve_entry(self, header: memoryview, payload: memoryview, reply_buf: memoryview,
                    lent: LentTables | None = None) -> int:
        """Answer the request in a FUSE-over-io_uring entry in place, as `serve` answers one read
        from the device: the out header goes into `header`, the reply's arguments or data into
        `payload`, their length into the entry's payload_sz. READ reads straight into the
        payload and WRITE writes from it; anything else is put together as the device would
        carry it and goes through `decode` and `handle` (a malformed one gets EIO: an entry
        must always be answered). With the thread's `lent` tables, READ and WRITE go straight
        to the files (`lent.py`). Returns the request's unique (the commit names it)."""
        length, opcode, unique = _RING_IN.unpack_from(header)
        psz = _U32.unpack_from(header, P.RING_PAYLOAD_SIZE)[0]
        try:
            if opcode == P.READ:
                fh, offset, size, _ = P.RING_RW_IN.unpack_from(header, P.RING_OP_IN)
                data = payload[:size]
                if lent is not None and lent.read(fh, offset, data):
                    got = len(data)
                else:
                    got = self.files.readinto(fh, offset, data)
                P.OUT_HEADER.pack_into(header, 0, P.OUT_HEADER_SIZE + got, 0, unique)
                _U32.pack_into(header, P.RING_PAYLOAD_SIZE, got)
                return unique
            if opcode == P.WRITE:
                fh, offset, size, _ = P.RING_RW_IN.unpack_from(header, P.RING_OP_IN)
                if size == psz:
                    data = payload[:psz]
                    if lent is not None and lent.write(fh, offset, data):
                        done = len(data)
                    else:
                        done = self.files.write(fh, offset, data)
                    P.WRITE_OUT.pack_into(payload, 0, done, 0)
                    P.OUT_HEADER.pack_into(header, 0, P.OUT_HEADER_SIZE + P.WRITE_OUT.size, 0, unique)
                    _U32.pack_into(header, P.RING_PAYLOAD_SIZE, P.WRITE_OUT.size)
                    return unique
        except (DMError, OSError) as exc:
            return _ring_error(header, unique, exc.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - one bad request must not end the serving thread
            log.exception("FUSE %s failed", P.OPCODE_NAMES.get(opcode, opcode))
            return _ring_error(header, unique, errno.EIO)
        if lent is not None:
            lent.give_back()
        arg = length - P.IN_HEADER_SIZE - psz
        if not 0 <= arg <= P.RING_ENT_IN_OUT - P.RING_OP_IN or psz > len(payload):
            log.error("FUSE: dropped a malformed io_uring request (opcode %d, length %d, payload %d)",
                      opcode, length, psz)
            return _ring_error(header, unique, errno.EIO)
        message = b"".join((header[:P.IN_HEADER_SIZE], header[P.RING_OP_IN:P.RING_OP_IN + arg], payload[:psz]))
        try:
            req = P.decode(memoryview(message))
        except P.ProtocolError as exc:
            log.error("FUSE: dropped a malformed io_uring request: %s", exc)
            return _ring_error(header, unique, errno.EIO)
        out = self.handle(req, reply_buf)
        if out is None:
            return _ring_error(header, unique, errno.EIO)
        body = len(out) - P.OUT_HEADER_SIZE
        header[:P.OUT_HEADER_SIZE] = out[:P.OUT_HEADER_SIZE]
        payload[:body] = out[P.OUT_HEADER_SIZE:]
        _U32.pack_into(header, P.RING_PAYLOAD_SIZE, body)
        return unique

    def _splice_read(self, unique: int, fh: int, offset: int, size: int, pipe: tuple[int, int, int]) -> int:
        """Answer a READ in `pipe`: the reply header, then the data by reference (one copy in
        all, the kernel's into the reader's pages, where `readinto` + write make two). Returns
        the reply's length, or 0 with the pipe empty: the device cannot splice it, read it."""
        n = self.files.read_length(fh, offset, size)
        header = bytearray(P.OUT_HEADER_SIZE)
        P.pack_read_header(header, unique, n)
        os.write(pipe[1], header)
        try:
            if not n or self.files.splice_into(fh, offset, n, pipe[1]):
                self.spliced += 1
                return P.OUT_HEADER_SIZE + n
        except BaseException:
            drain(pipe[0])
            raise
        drain(pipe[0])
        return 0

    def handle(self, req: P.Request, reply_buf: memoryview) -> bytes | memoryview | None:
        """The reply to `req` (None: none is due). A READ's reply is a view of `reply_buf`."""
        try:
            if req.opcode == P.READ:
                return self._read(req, reply_buf)
            op = self._ops.get(req.opcode)
            if op is None or req.args is None:
                return P.reply_error(req.unique, errno.ENOSYS)
            return op(req)
        except (DMError, OSError) as exc:
            if req.opcode in P.NO_REPLY:
                return None
            return P.reply_error(req.unique, exc.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - one bad request must not end the serving thread
            log.exception("FUSE %s failed", req.name)
            return None if req.opcode in P.NO_REPLY else P.reply_error(req.unique, errno.EIO)

    # ---- session -----------------------------------------------------------------------

    def _init(self, req: P.Request) -> bytes:
        init: P.InitIn = req.args
        if init.major != P.KERNEL_VERSION:
            # a newer major: answer with ours and let the kernel send INIT again (or give up)
            return P.reply(req.unique, P.INIT_OUT.pack(P.KERNEL_VERSION, P.MINOR_VERSION,
                                                       *([0] * 10)))
        with self._lock:
            self._backing_ids.clear()     # a new connection: the old one's ids died with it
        want = WANT | (P.PASSTHROUGH if self.backing is not None else 0) | (P.OVER_IO_URING if self.want_ring else 0)
        self.ring = bool(init.flags & want & P.OVER_IO_URING)
        return P.reply(req.unique, P.init_out(init, want=want, max_write=MAX_WRITE, max_pages=MAX_PAGES,
                                              max_background=MAX_BACKGROUND,
                                              congestion_threshold=CONGESTION_THRESHOLD))

    def _destroy(self, req: P.Request) -> bytes:
        self.destroyed = True
        return P.reply(req.unique)

    def _forget(self, req: P.Request) -> None:
        return None   # inodes live as long as their devices (DeviceFiles); no lookup counts kept

    def _interrupt(self, req: P.Request) -> None:
        # Device I/O cannot be abandoned halfway: the interrupted request completes (or waits
        # for its suspended device) and is answered then, which the protocol allows.
        self.interrupts += 1
        return None

    @staticmethod
    def _ok(req: P.Request) -> bytes:
        return P.reply(req.unique)

    # ---- directory ---------------------------------------------------------------------

    def _attr(self, nodeid: int) -> Attr:
        return self.files.getattr(nodeid)

    def _lookup(self, req: P.Request) -> bytes:
        if req.nodeid != ROOT_INODE:
            raise DMError(errno.ENOTDIR, f"inode {req.nodeid} is not the mount directory")
        name = os.fsdecode(req.args.name)
        if name in (".", ".."):
            attr = self.files.root_attr()
        else:
            attr = self.files.lookup(name)
        return P.reply(req.unique, P.entry_out(attr_fields(attr)))

    def _getattr(self, req: P.Request) -> bytes:
        args: P.GetattrIn = req.args
        ino = self.files.inode_of_handle(args.fh) if args.flags & P.GETATTR_FH else req.nodeid
        return P.reply(req.unique, P.attr_out(attr_fields(self._attr(ino))))

    def _setattr(self, req: P.Request) -> bytes:
        args: P.SetattrIn = req.args
        ino = self.files.inode_of_handle(args.fh) if args.valid & P.FATTR_FH else req.nodeid
        attr = self._attr(ino)     # ENOENT for a name that went away
        if args.valid & (P.FATTR_MODE | P.FATTR_UID | P.FATTR_GID):
            raise DMError(errno.EPERM, "the mode and owner of a device file are fixed")
        if args.valid & P.FATTR_SIZE:
            self.files.check_size_change(ino, args.size)
        # times are not kept: touch succeeds and changes nothing
        return P.reply(req.unique, P.attr_out(attr_fields(attr)))

    def _statfs(self, req: P.Request) -> bytes:
        return P.reply(req.unique, P.statfs_out(bsize=4096, namelen=127))   # dm names: 127 characters

    def _opendir(self, req: P.Request) -> bytes:
        if req.nodeid != ROOT_INODE:
            raise DMError(errno.ENOTDIR, f"inode {req.nodeid} is not a directory")
        return P.reply(req.unique, P.open_out(0, 0))

    def _entries(self) -> list[tuple[bytes, Attr | None]]:
        return [(b".", None), (b"..", None)] + [(os.fsencode(n), a) for n, a in self.files.listdir()]

    def _readdir(self, req: P.Request) -> bytes:
        args: P.ReadIn = req.args
        entries = [(name, a.ino if a else ROOT_INODE, (stat.S_IFREG if a else stat.S_IFDIR) >> 12)
                   for name, a in self._entries()]
        return P.reply(req.unique, P.dirents(entries, args.offset, args.size))

    def _readdirplus(self, req: P.Request) -> bytes:
        args: P.ReadIn = req.args
        entries = [(name, attr_fields(a) if a else None, (stat.S_IFREG if a else stat.S_IFDIR) >> 12)
                   for name, a in self._entries()]
        return P.reply(req.unique, P.direntplus(entries, args.offset, args.size))

    # ---- files -------------------------------------------------------------------------

    def _open(self, req: P.Request) -> bytes:
        if req.nodeid == ROOT_INODE:
            raise DMError(errno.EISDIR, "the mount directory is not a device")
        write = (req.args.flags & os.O_ACCMODE) != os.O_RDONLY
        fh = self.files.open(req.nodeid, write)
        backing_id = self._passthrough(req.nodeid, fh, write) if self.backing is not None else 0
        if backing_id:
            return P.reply(req.unique, P.open_out(fh, P.FOPEN_PASSTHROUGH, backing_id))
        return P.reply(req.unique, P.open_out(fh, P.FOPEN_DIRECT_IO | P.FOPEN_PARALLEL_DIRECT_WRITES))

    def _passthrough(self, ino: int, fh: int, write: bool) -> int:
        """The backing id for open `fh` to do its I/O in the kernel, straight on the file its
        device maps byte for byte (pinned: `MappedDevice.pin_kernel_io`), or 0. Every
        passthrough open of an inode shares one id (the kernel wants one backing file per
        inode); it is closed with the inode's last passthrough open."""
        fd = self.files.pin_kernel_io(fh, write)
        if fd is None:
            return 0
        assert self.backing is not None
        with self._lock:
            entry = self._backing_ids.get(ino)
            if entry is None:
                try:
                    entry = self._backing_ids[ino] = [self.backing.open_backing(fd), 0]
                except OSError as exc:
                    self.files.unpin_kernel_io(fh)
                    log.warning("FUSE passthrough of inode %d refused by the kernel (%s); its I/O "
                                "comes through userdm", ino, exc)
                    return 0
            entry[1] += 1
            self.passthrough_opens += 1
            return entry[0]

    def _read(self, req: P.Request, reply_buf: memoryview) -> memoryview:
        args: P.ReadIn = req.args
        size = min(args.size, len(reply_buf) - P.OUT_HEADER_SIZE)
        n = self.files.readinto(args.fh, args.offset, reply_buf[P.OUT_HEADER_SIZE:P.OUT_HEADER_SIZE + size])
        P.pack_read_header(reply_buf, req.unique, n)
        return reply_buf[:P.OUT_HEADER_SIZE + n]

    def _write(self, req: P.Request) -> bytes:
        args: P.WriteIn = req.args
        return P.reply(req.unique, P.write_out(self.files.write(args.fh, args.offset, args.data)))

    def _fsync(self, req: P.Request) -> bytes:
        self.files.fsync(req.args.fh)
        return P.reply(req.unique)

    def _release(self, req: P.Request) -> bytes:
        if self.files.release(req.args.fh):   # a no-op after release_all
            self._drop_backing(req.nodeid)
        return P.reply(req.unique)

    def _drop_backing(self, ino: int) -> None:
        """One passthrough open of `ino` closed: its last closes the backing id."""
        with self._lock:
            entry = self._backing_ids.get(ino)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1]:
                return
            del self._backing_ids[ino]
        if self.backing is not None:
            try:
                self.backing.close_backing(entry[0])
            except OSError as exc:
                log.debug("closing FUSE backing id %d: %s", entry[0], exc)

    def _fallocate(self, req: P.Request) -> bytes:
        args: P.FallocateIn = req.args
        fh, mode, offset, length = args.fh, args.mode, args.offset, args.length
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self.files.zero(fh, offset, length, may_unmap=True)
        elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            self.files.zero(fh, offset, length, may_unmap=False)
        elif mode & ~FALLOC_FL_KEEP_SIZE == 0:
            # allocation: every byte of a device exists already; past the end it cannot grow
            if offset + length > self.files.getattr(self.files.inode_of_handle(fh)).size:
                raise DMError(errno.EFBIG, f"fallocate up to byte {offset + length} is past the end "
                              "of the device")
        else:
            raise DMError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        return P.reply(req.unique)

    def _lseek(self, req: P.Request) -> bytes:
        args: P.LseekIn = req.args
        return P.reply(req.unique, P.lseek_out(self.files.seek(args.fh, args.offset, args.whence)))
