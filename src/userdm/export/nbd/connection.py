"""One NBD client connection: the handshake, then the transmission phase.

The transmission phase has one reader thread and a small worker pool:
- the reader receives requests in batches into one buffer (`recv_into`, many headers per
  system call under load) and runs small READs and WRITEs inline: a WRITE's payload is used
  where it landed in the receive buffer, a READ's data goes into a preallocated arena, and
  the replies of a batch leave in one `sendmsg` (header + data, no copies);
- big requests (over `inline_max`), FUA writes, FLUSH, TRIM, WRITE_ZEROES and BLOCK_STATUS go
  to worker threads with their own preallocated mmap buffers (only touched pages cost memory)
  and are answered as they complete, so requests are in flight concurrently; if an inline
  request turns out slow (a remote or suspended device), the reader dispatches everything
  for a while;
- a big WRITE's payload is received (`recv_into`, MSG_WAITALL) straight into its task buffer:
  after one, the reader receives only the next request's header, so that a stream of big
  writes is never copied out of the batch buffer;
- a READ's reply leaves in one `sendmsg` of header + data, into a socket send buffer big
  enough (SEND_BUFFER) that the call copies once and does not block in pieces.
Nothing is allocated per request beyond small Python objects. Workers and buffers are reused
most-recent-first (see `_WorkerPool`).

What a connection may cost is bounded (`limits.py`): the handshake has an overall deadline
(not for a socket that carries an existing open), and the payload buffers of dispatched
requests count against the connection's byte budget and the server's total: a request that
does not fit waits, and the reader does not read from the socket meanwhile. Buffers kept for
reuse count too, and are given back (MADV_DONTNEED) when anyone waits for bytes and when the
connection ends, so a closed connection's memory is returned at once, not at the next
garbage collection (the pool and the connection drop their references to each other).

TLS: a connection whose client sends NBD_OPT_STARTTLS (or must: `tls_mode` "require")
runs the TLS handshake within what is left of the handshake deadline, then speaks through
a `TLSStream` (`userdm.nbd.tls`), which offers the socket calls used here; the reader and
the workers share its session under its lock, nothing else changes.

The connection ends on NBD_CMD_DISC or EOF (in-flight requests finish and are answered), on
a protocol error or a reply that cannot be sent, also for want of room for `reply_timeout`
(hard disconnect), or when the server stops
(like EOF). Then the device
open and the socket are closed and `on_close` is called.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from ...errors import DMError
from ...nbd import constants as C
from .catalog import BoundCatalog, ExportSource, MapperCatalog
from .deadline import HandshakeDeadline
from .limits import Budget, NBDLimits
from ...nbd.handshake import ServerHandshake
from ...nbd.tls import TLSHandshakeError, TLSStream
from ...nbd.protocol import (DATA_CHUNK, REQUEST, REQUEST_SIZE, SIMPLE_REPLY, Export, ProtocolError,
                       block_status_chunk, clip_extents, error_reply)

log = logging.getLogger("userdm.nbd")

_PAGE = mmap.PAGESIZE
MAX_EXTENTS = 1024
RECV_BUFFER = 80 * 1024  # batch receive buffer
ARENA = 1024 * 1024           # inline READ data of one reply batch
INLINE_MAX = 64 * 1024        # larger requests go to the workers
MAX_BATCH = 64                # reply parts per sendmsg
SEND_BUFFER = 4 * 1024 * 1024  # SO_SNDBUF asked for (the kernel caps it at net.core.wmem_max)
SLOW_REQUEST = 0.0003        # SLOW_STREAK inline requests in a row slower than this ...
SLOW_STREAK = 4
SLOW_BACKOFF = 1000           # ... make the next this many requests go to the workers
FAST_IN_FLIGHT = max(2, os.cpu_count() or 2)  # dispatched requests in flight while the device keeps up
SLOW_WAIT = 0.005             # a reader that waited this long for a free slot: the device is slow

_READ, _WRITE, _DISC, _CACHE = C.CMD_READ, C.CMD_WRITE, C.CMD_DISC, C.CMD_CACHE
_REQUEST_MAGIC = C.REQUEST_MAGIC
_SIMPLE_MAGIC = C.SIMPLE_REPLY_MAGIC
_STRUCT_MAGIC = C.STRUCTURED_REPLY_MAGIC
_DONE, _OFFSET_DATA = C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA
_FUA = C.CMD_FLAG_FUA
_WAITALL = socket.MSG_WAITALL


class Connection:
    """Serves one accepted socket until it closes; `on_close` is called once at the end."""

    def __init__(self, sock: socket.socket, mapper: ExportSource | None, *, threads: int = 8,
                 inline_max: int = INLINE_MAX, catalog: MapperCatalog | BoundCatalog | None = None,
                 on_close: Callable[["Connection"], None] = lambda c: None,
                 limits: NBDLimits | None = None, total: Budget | None = None,
                 tls_mode: str = "off", tls_context: ssl.SSLContext | None = None) -> None:
        limits = limits or NBDLimits()
        self.sock: socket.socket | TLSStream = sock
        #: nbdkit's --tls mode of this connection, and the server's context (None: off)
        self.tls_mode = tls_mode if tls_context is not None else "off"
        self.tls_context = tls_context
        #: seconds the whole handshake may take (None: a socket that carries an open)
        self.handshake_deadline: float | None = getattr(catalog, "handshake_timeout",
                                                        limits.handshake_deadline)
        #: payload bytes this connection's requests hold, and all connections' (or None)
        self.budget = Budget(limits.connection_bytes)
        self.reply_timeout = limits.reply_timeout
        self.total = total
        #: counted in the server's max_connections (it came from a listener)
        self.counted = False
        self.catalog = catalog if catalog is not None else MapperCatalog(mapper)
        self.max_threads = max(1, threads)
        self.inline_max = inline_max
        self.on_close = on_close
        self.export: Export | None = None
        self._pending = b""
        self._send_lock = threading.Lock()
        self._closing = False
        self._aborted = False
        self._closed = False
        self._pool: _WorkerPool | None = None
        self._workers: list[threading.Thread] = []

    # ---- lifetime -------------------------------------------------------------------

    def start(self) -> None:
        t = threading.Thread(target=self._serve, name="nbd-conn", daemon=True)
        self._workers.append(t)
        t.start()

    def shutdown(self) -> None:
        """Stop reading requests; in-flight ones finish (the server is stopping)."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._wake_waiters()

    def abort(self) -> None:
        """Hard disconnect: nothing more is read or sent."""
        self._closing = True
        self._aborted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """A reader waiting for budget looks at `_closing` now."""
        self.budget.wake()
        if self.total is not None:
            self.total.wake()

    def _is_closing(self) -> bool:
        return self._closing

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader and the workers, `timeout` seconds in all; True once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._workers):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._closed

    def _serve(self) -> None:
        try:
            try:
                ok = self._handshake()
            except (OSError, ProtocolError) as exc:
                log.debug("nbd handshake ended: %s", exc)
                ok = False
            if ok:
                self._transmission()
        except Exception:
            log.exception("nbd: connection failed")
        finally:
            self._closing = True
            if getattr(self.catalog, "open_until_eof", False):
                self._wait_for_eof()
            self.catalog.close()
            try:
                self.sock.close()
            except OSError:
                pass
            self._closed = True
            self.on_close(self)

    def _wait_for_eof(self) -> None:
        """A socket that carries an open (BoundCatalog) keeps it after NBD_CMD_DISC until every
        copy of the client's end is closed: one process may disconnect while another still
        holds the descriptor. Whatever arrives meanwhile is discarded."""
        try:
            self.sock.settimeout(None)
            while not self._aborted and self.sock.recv(65536):
                pass
        except OSError:
            pass

    # ---- handshake ------------------------------------------------------------------

    def _handshake(self) -> bool:
        """The handshake, within `handshake_deadline` in all (each receive and send may take
        only what is left of it, see `HandshakeDeadline`): a client that sends a byte now and
        then is closed too. Each option costs one receive and one send (all the replies of
        what one receive brought), the least a round trip can cost."""
        sock = self.sock
        clock = HandshakeDeadline(sock, self.handshake_deadline)
        try:
            hs = ServerHandshake(self.catalog, self.tls_mode)
            if not clock.arm():
                return False
            sock.sendall(hs.greeting())
            while not hs.done and not self._closing:
                if hs.state == "starttls":
                    clock.clear()
                    sock = self._start_tls(hs, clock.at)
                    clock.follow(sock)
                    continue
                if not clock.arm():
                    log.debug("nbd: handshake not finished within %gs, closing", clock.limit)
                    return False
                data = sock.recv(65536)
                if not data:
                    return False
                out = hs.receive_data(data)
                if out:
                    if not clock.arm():
                        return False
                    sock.sendall(out)
        finally:
            clock.clear()
        if hs.state != "transmission" or self._closing:
            return False
        self.export = hs.export()
        self._pending = hs.unused_data()
        return True

    def _start_tls(self, hs: ServerHandshake, deadline: float | None) -> TLSStream:
        """STARTTLS was acknowledged: the TLS handshake, within what is left of the deadline;
        from then on the connection speaks through the TLS stream."""
        assert self.tls_context is not None
        stream = TLSStream(self.sock, self.tls_context, server_side=True, initial=hs.unused_data())
        try:
            stream.handshake(deadline)
        except TLSHandshakeError as exc:
            log.info("nbd: %s%s, closing the connection", exc.strerror, _peer(self.sock))
            raise
        self.sock = stream
        hs.tls_started()
        return stream

    # ---- transmission ---------------------------------------------------------------

    def _send(self, parts: list) -> None:
        """Send reply parts in one `sendmsg` (looping only on a short send)."""
        with self._send_lock:
            total = 0
            for p in parts:
                total += len(p)
            sent = self.sock.sendmsg(parts)
            while sent < total:   # a signal, or a slow reader and a huge reply: no copies
                rest = []
                for p in parts:
                    n = len(p)
                    if sent >= n:
                        sent -= n
                        continue
                    rest.append(memoryview(p)[sent:] if sent else p)
                    sent = 0
                parts = rest
                total = sum(len(p) for p in parts)
                sent = self.sock.sendmsg(parts)

    def _recv_more(self, rview: memoryview, end: int, need: int) -> int:
        """Receive until `need` bytes are buffered (from 0); returns the new end, -1 on EOF."""
        while end < need:
            n = self.sock.recv_into(rview[end:])
            if n == 0:
                return -1
            end += n
        return end

    def _transmission(self) -> None:
        """The reader loop: parse requests from a batch buffer, run small ones inline and
        batch their replies, hand big or slow ones to the worker pool."""
        export = self.export
        handle = self.catalog.handle
        assert export is not None and handle is not None
        sock = self.sock
        pool = self._pool = _WorkerPool(self, handle, export)
        max_payload = export.max_payload
        try:   # room for a whole big reply: its sendmsg then copies once and does not block
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        # a send that makes no progress for reply_timeout fails (EAGAIN): the client reads
        # nothing, and the connection is closed, which frees what its requests hold
        secs = self.reply_timeout
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(secs), int((secs % 1) * 1_000_000)))
        inline_max = min(self.inline_max, RECV_BUFFER - REQUEST_SIZE)
        rbuf = bytearray(RECV_BUFFER)
        rview = memoryview(rbuf)
        start, end = 0, len(self._pending)
        rview[:end] = self._pending
        self._pending = b""
        arena = mmap.mmap(-1, ARENA)
        aview = memoryview(arena)
        apos = 0
        out: list = []
        check = export.check
        execute = self._execute
        unpack = REQUEST.unpack_from
        perf = time.perf_counter
        header_only = False  # receive just the next request header (see below)
        dispatch_until = 0   # while > 0: the device is slow, dispatch everything
        slow = 0             # inline requests in a row that were slow
        try:
            while not self._closing:
                if end - start < REQUEST_SIZE:
                    if out:
                        self._send(out)
                        out = []
                        apos = 0
                    if start:
                        rview[:end - start] = rview[start:end]
                        end -= start
                        start = 0
                    # after a dispatched WRITE the next request is probably one too: take only
                    # its header, so that its payload lands straight in its task buffer
                    n = sock.recv_into(rview[end:], REQUEST_SIZE - end if header_only else 0)
                    if n == 0:
                        break
                    end += n
                    continue
                magic, flags, cmd, cookie, offset, length = unpack(rbuf, start)
                if magic != _REQUEST_MAGIC:
                    raise ProtocolError(f"bad request magic 0x{magic:08x}")
                if cmd == _DISC:
                    break
                if dispatch_until:
                    dispatch_until -= 1
                    inline = False
                else:
                    inline = (length <= inline_max and not flags & _FUA
                              and (cmd == _READ or cmd == _WRITE or cmd == _CACHE))
                if cmd == _WRITE:
                    if length > max_payload:
                        raise ProtocolError(f"WRITE of {length} bytes exceeds the maximum payload {max_payload}")
                    if inline:
                        need = REQUEST_SIZE + length
                        if end - start < need:
                            if out:
                                self._send(out)
                                out = []
                                apos = 0
                            rview[:end - start] = rview[start:end]
                            end -= start
                            start = 0
                            end = self._recv_more(rview, end, need)
                            if end < 0:
                                break
                        data = rview[start + REQUEST_SIZE:start + need]
                        start += need
                    else:
                        if out:
                            self._send(out)
                            out = []
                            apos = 0
                        buf = pool.buffer(length)   # may wait for budget: nothing is read meanwhile
                        if buf is None:
                            break
                        have = min(end - start - REQUEST_SIZE, length)
                        if have:
                            buf.view[:have] = rview[start + REQUEST_SIZE:start + REQUEST_SIZE + have]
                        start += REQUEST_SIZE + have
                        if have < length:
                            if not self._recv_exact(buf.view[have:length]):
                                pool.release(buf)
                                break
                        pool.submit(flags, cmd, cookie, offset, length, buf)
                        header_only = True
                        continue
                    header_only = False
                else:
                    header_only = False
                    start += REQUEST_SIZE
                    if not inline:
                        if out:
                            self._send(out)
                            out = []
                            apos = 0
                        buf = None
                        if cmd == _READ:   # a READ over the maximum is refused unread: no bigger buffer
                            buf = pool.buffer(min(length, max_payload))
                            if buf is None:
                                break
                        pool.submit(flags, cmd, cookie, offset, length, buf)
                        continue
                    if cmd == _READ:
                        if apos + length > ARENA:
                            self._send(out)
                            out = []
                            apos = 0
                        data = aview[apos:apos + length]
                        apos += length
                    else:
                        data = None
                t0 = perf()
                out += execute(handle, export, check, flags, cmd, cookie, offset, length, data)
                if perf() - t0 <= SLOW_REQUEST:
                    slow = 0
                else:
                    slow += 1
                    if slow >= SLOW_STREAK:
                        dispatch_until, slow = SLOW_BACKOFF, 0
                if len(out) >= MAX_BATCH:
                    self._send(out)
                    out = []
                    apos = 0
            if out:
                self._send(out)
        except ProtocolError as exc:
            log.info("nbd: protocol error from client, disconnecting: %s", exc)
            self.abort()
        except OSError as exc:
            log.debug("nbd: connection ended: %s", exc)
        finally:
            self._closing = True
            pool.finish()
            self._pool = None   # no cycle between the connection and its pool
            out = data = None
            try:
                aview.release()
                arena.close()
            except BufferError:   # a view still alive somewhere: the GC unmaps it later
                pass

    def _recv_exact(self, view: memoryview) -> bool:
        want = len(view)
        got = 0
        while got < want:
            n = self.sock.recv_into(view[got:], want - got, _WAITALL)
            if n == 0:
                return False
            got += n
        return True

    def _execute(self, handle, export: Export, check, flags: int, cmd: int, cookie: int,
                 offset: int, length: int, data: memoryview | None) -> list:
        """Run one request; return its reply parts (header bytes, maybe read data)."""
        structured = export.structured
        err = check(flags, cmd, offset, length, handle.size)
        if err:
            return [error_reply(cookie, err, _refusal(cmd, err, offset, length, handle.size), structured)]
        try:
            if cmd == _READ:
                handle.readinto(offset, data)
                if structured:
                    return [DATA_CHUNK.pack(_STRUCT_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, offset),
                            data]
                return [SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie), data]
            if cmd == _WRITE:
                handle.write(offset, data, bool(flags & _FUA))
            elif cmd == C.CMD_FLUSH:
                handle.flush()
            elif cmd == C.CMD_TRIM:
                handle.discard(offset, length)
                if flags & _FUA:
                    handle.flush()
            elif cmd == C.CMD_WRITE_ZEROES:
                handle.write_zeroes(offset, length, not flags & C.CMD_FLAG_NO_HOLE)
                if flags & _FUA:
                    handle.flush()
            elif cmd == C.CMD_BLOCK_STATUS:
                extents = _block_status(handle, offset, length, bool(flags & C.CMD_FLAG_REQ_ONE))
                return [block_status_chunk(cookie, export.meta_context, extents)]
            # CMD_CACHE: a hint; the page cache of the underlying files does the caching.
        except DMError as exc:
            return [error_reply(cookie, C.errno_to_wire(exc.errno), str(exc), structured)]
        except OSError as exc:
            return [error_reply(cookie, C.errno_to_wire(exc.errno or 5), str(exc), structured)]
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the connection
            log.exception("nbd: %s failed", C.CMD_NAMES.get(cmd, cmd))
            return [error_reply(cookie, C.NBD_EIO, f"internal error: {exc}", structured)]
        return [SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, cookie)]


class _Idle:
    """A parked worker: it sleeps on `wake` (held) until a task is put in `task`."""

    __slots__ = ("wake", "task")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task: tuple | None = None


class _Buffer:
    """A task's payload buffer: an anonymous mapping of the maximum payload, of which only
    touched pages cost memory; `held` bytes of it count in the budgets (the most any request
    used since it was last given back, so at least what is resident)."""

    __slots__ = ("mm", "view", "held")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self.view = memoryview(self.mm)
        self.held = 0


class _WorkerPool:
    """Threads that run dispatched requests, each task with its own payload buffer.

    Idle workers are parked LIFO and the most recently parked one takes the next task, and
    buffers are reused LIFO: under a steady stream of big requests one or two warm threads do
    the work (each task costs one wake-up and few GIL hand-offs, and its buffer is still in
    the CPU cache), while more threads, up to `size`, start only when every one is busy (a
    slow, remote or suspended device). `buffer()` blocks while `size` tasks are in flight,
    and while the request's bytes do not fit in the connection's budget or the server's
    total (backpressure on the reader); `finish()` waits for every task to be answered, then
    ends the threads and gives every buffer back.

    While the device keeps up, at most FAST_IN_FLIGHT tasks (the CPU count, at least 2) are
    in flight: a task is a copy bound by CPU and memory, and more of them than CPUs (next to
    the reader and the client) only adds preemption; on this 2-CPU machine kind 1 MiB writes
    ran ~15% faster so. When the reader has waited SLOW_WAIT for a free slot, the device is
    slow (remote, delayed, suspended) and up to `size` tasks may wait in it at once, for the
    next SLOW_BACKOFF submissions.

    Budgets: a buffer holds `held` bytes in both budgets while it is in flight and while it
    is kept for reuse; a request that needs more takes the difference first. Kept buffers are
    given back (`reclaim`: MADV_DONTNEED, bytes returned) when anyone waits for either budget
    and when the pool finishes."""

    def __init__(self, conn: Connection, handle, export: Export) -> None:
        self.conn: Connection | None = conn
        self.handle = handle
        self.export = export
        self.size = conn.max_threads
        self.budget = conn.budget
        self.total = conn.total
        self._cancelled = conn._is_closing
        self._fast_limit = min(self.size, FAST_IN_FLIGHT)
        self._limit = self._fast_limit   # tasks allowed in flight now
        self._slow_left = 0              # submissions left before going back to the fast limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)   # in_flight dropped below size / to 0
        self._waiting = 0
        self._in_flight = 0
        self._free: list[_Buffer] = []
        self._idle: list[_Idle] = []
        self._queued: collections.deque[tuple] = collections.deque()
        self._stopping = False
        self.threads: list[threading.Thread] = []
        self.budget.register(self)
        if self.total is not None:
            self.total.register(self)

    def _reserve(self) -> None:
        with self._lock:
            while self._in_flight >= self._limit:
                self._waiting += 1
                fast = self._limit < self.size
                room = self._room.wait(SLOW_WAIT if fast else None)
                self._waiting -= 1
                if fast and not room and self._in_flight >= self._limit:
                    self._limit = self.size           # slow device: let more requests wait in it
                    self._slow_left = SLOW_BACKOFF
            self._in_flight += 1
            if self._slow_left:
                self._slow_left -= 1
                if not self._slow_left:
                    self._limit = self._fast_limit

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._waiting:
                self._room.notify_all()

    def buffer(self, length: int) -> _Buffer | None:
        """A payload buffer for one task of `length` bytes (counts as in flight), once they
        fit in the budgets; None if the connection started closing while waiting."""
        self._reserve()
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = _Buffer(self.export.max_payload)
        extra = length - buf.held
        if extra > 0:
            if not self.budget.take(extra, self._cancelled):
                self.release(buf)
                return None
            if self.total is not None and not self.total.take(extra, self._cancelled):
                self.budget.give(extra)
                self.release(buf)
                return None
            buf.held = length
        return buf

    def release(self, buf: _Buffer) -> None:
        """Give back a buffer from `buffer()` that was not submitted."""
        self._recycle(buf)
        self._done()

    def _recycle(self, buf: _Buffer) -> None:
        """Keep a buffer for reuse, or give its bytes back if someone waits for them."""
        with self._lock:
            if self._stopping or self.budget.waiting or (self.total is not None and self.total.waiting):
                self._trim(buf)
            self._free.append(buf)

    def _trim(self, buf: _Buffer) -> None:
        """Drop a kept buffer's pages and give its bytes back (with `_lock` held)."""
        held, buf.held = buf.held, 0
        if held:
            try:
                buf.mm.madvise(mmap.MADV_DONTNEED, 0, min(len(buf.mm), -(-held // _PAGE) * _PAGE))
            except (OSError, ValueError):
                pass
            self.budget.give(held)
            if self.total is not None:
                self.total.give(held)

    def reclaim(self) -> None:
        """Give back the bytes of every buffer kept for reuse (someone waits for bytes)."""
        with self._lock:
            for buf in self._free:
                self._trim(buf)

    def submit(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
               buf: _Buffer | None) -> None:
        if buf is None:
            self._reserve()
        task = (flags, cmd, cookie, offset, length, buf)
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                worker.task = task
                worker.wake.release()
                return
            if len(self.threads) >= self.size:
                self._queued.append(task)   # a worker takes it when it finishes its task
                return
            t = threading.Thread(target=self._run, args=(task,), name="nbd-worker", daemon=True)
            self.threads.append(t)
        self.conn._workers.append(t)
        t.start()

    def _run(self, task: tuple | None) -> None:
        conn, handle, export = self.conn, self.handle, self.export
        check = export.check
        execute = conn._execute
        me = _Idle()
        while task is not None:
            flags, cmd, cookie, offset, length, buf = task
            data = None
            try:
                data = buf.view[:length] if buf is not None else None
                parts = execute(handle, export, check, flags, cmd, cookie, offset, length, data)
                if not conn._aborted:
                    conn._send(parts)
                parts = None
            except OSError as exc:   # the client is gone or broke the socket: hang up
                log.debug("nbd: reply not sent, disconnecting: %s", exc)
                conn.abort()
            except Exception:
                log.exception("nbd: worker failed")
            finally:
                if data is not None:
                    try:
                        data.release()
                    except BufferError:
                        pass
                    data = None
                if buf is not None:
                    self._recycle(buf)
                self._done()
            with self._lock:
                if self._queued:
                    task = self._queued.popleft()
                    continue
                if self._stopping:
                    return
                self._idle.append(me)
            me.wake.acquire()
            task, me.task = me.task, None

    def finish(self) -> None:
        """Wait until every task is answered, end the workers, give every buffer back."""
        with self._lock:
            while self._in_flight:
                self._waiting += 1
                self._room.wait()
                self._waiting -= 1
            self._stopping = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.task = None
            worker.wake.release()
        for t in self.threads:
            t.join()
        with self._lock:
            free, self._free = self._free, []
            for buf in free:
                self._trim(buf)
        for buf in free:
            try:
                buf.view.release()
                buf.mm.close()
            except BufferError:   # still viewed somewhere: unmapped when that view goes
                pass
        self.conn = None
        self.threads = []


def _peer(sock) -> str:
    """` (from HOST:PORT)` for a TCP peer, else nothing."""
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return f" (from {peer[0]}:{peer[1]})" if isinstance(peer, tuple) else ""


def _block_status(handle, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end and len(extents) < MAX_EXTENTS:
        got = handle.block_status(pos, end - pos)
        step = sum(n for n, _ in got if n > 0)
        if step <= 0:
            break
        extents.extend(got)
        pos += step
        if one:
            break
    return clip_extents(extents, length, one)


def _refusal(cmd: int, err: int, offset: int, length: int, size: int) -> str:
    name = C.CMD_NAMES.get(cmd, f"command {cmd}")
    if err == C.NBD_EPERM:
        return f"{name}: the export is read-only"
    if err == C.NBD_ENOTSUP:
        return f"{name}: fast zeroing is not supported"
    if offset + length > size:
        return f"{name}: offset {offset} length {length} is beyond the end of the export ({size} bytes)"
    return f"{name}: invalid request (offset {offset}, length {length})"
