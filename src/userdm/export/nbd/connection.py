"""One NBD client connection: the handshake, then the transmission phase.

The transmission phase has one reader thread and a small worker pool (while two or more
connections are open, the server's event loop serves the small requests of all of them in
one thread instead, see `loop.py` and `loop_pass`; the connection goes back to a thread of
its own for anything else, and its state - the batch buffer, the arena, replies not yet
sent - lives on the object so that either can go on where the other stopped):
- the reader receives requests in batches into one buffer (`recv_into`, many headers per
  system call under load) and runs small READs and WRITEs inline: a WRITE's payload is used
  where it landed in the receive buffer, and the replies of a batch are written one after
  the other into a preallocated arena (a READ's data right after its header), so that they
  leave in one piece (one system call, and one TLS write). A batch borrows the device's
  collapsed table (`MappedDevice.lend_flat`) and does its READs and WRITEs straight on the
  files, past the open and the device's lock; it gives the table back before anything that
  may wait (see `_lent`);
- big requests (over `inline_max`), FUA writes, FLUSH, TRIM, WRITE_ZEROES and BLOCK_STATUS go
  to worker threads with their own preallocated mmap buffers (only touched pages cost memory)
  and are answered as they complete, so requests are in flight concurrently; if inline
  requests turn out slow while the process was idle (a remote or suspended device, not a
  reader that waited for the GIL while other connections ran), the reader dispatches
  everything for a while;
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
the workers share its session under its lock, nothing else changes. With worker processes
(`offload.py`), a worker takes the client's socket at STARTTLS instead, runs the handshake
and relays (`tunnel.py`): the connection goes on over its end of a socketpair as over a
plaintext socket (`tunnel` is set), and is offered to that worker even alone.

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
from ..busypoll import PollWindow
from .catalog import BoundCatalog, ExportSource, MapperCatalog
from .deadline import HandshakeDeadline
from .limits import Budget, NBDLimits
from .loop import ServeLoop
from .tunnel import describe_peer as _peer
from ...nbd.handshake import ServerHandshake
from ...nbd.tls import TLSHandshakeError, TLSStream
from ...nbd.protocol import (DATA_CHUNK, REQUEST, REQUEST_SIZE, SIMPLE_REPLY, Export, ProtocolError,
                       block_status_chunk, clip_extents, error_reply)

log = logging.getLogger("userdm.nbd")

_PAGE = mmap.PAGESIZE
MAX_EXTENTS = 1024
RECV_BUFFER = 80 * 1024  # batch receive buffer
ARENA = 1024 * 1024           # the inline replies of one batch (READ headers and data)
INLINE_MAX = 64 * 1024        # larger requests go to the workers
MAX_BATCH = 64                # replies per send
SEND_BUFFER = 4 * 1024 * 1024  # SO_SNDBUF asked for (the kernel caps it at net.core.wmem_max)
SLOW_REQUEST = 0.0003        # SLOW_STREAK inline requests in a row slower than this ...
SLOW_STREAK = 4
OTHERS_BUSY = 0.5             # ... unless other threads of the process ran, or this one waited
                              # for a CPU, this share of that time
SLOW_BACKOFF = 1000           # ... make the next this many requests go to the workers
FAST_IN_FLIGHT = max(2, os.cpu_count() or 2)  # dispatched requests in flight while the device keeps up
SLOW_WAIT = 0.005             # a reader that waited this long for a free slot: the device is slow
LOOP_AFTER = 256              # inline requests in a row after which a connection may join the loop

_READ, _WRITE, _DISC, _CACHE = C.CMD_READ, C.CMD_WRITE, C.CMD_DISC, C.CMD_CACHE
_REQUEST_MAGIC = C.REQUEST_MAGIC
_SIMPLE_MAGIC = C.SIMPLE_REPLY_MAGIC
_STRUCT_MAGIC = C.STRUCTURED_REPLY_MAGIC
_DONE, _OFFSET_DATA = C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA
_FUA = C.CMD_FLAG_FUA
_WAITALL = socket.MSG_WAITALL
_DONTWAIT = socket.MSG_DONTWAIT
_SIMPLE_SIZE = SIMPLE_REPLY.size


class Connection:
    """Serves one accepted socket until it closes; `on_close` is called once at the end."""

    def __init__(self, sock: socket.socket, mapper: ExportSource | None, *, threads: int = 8,
                 inline_max: int = INLINE_MAX, catalog: MapperCatalog | BoundCatalog | None = None,
                 on_close: Callable[["Connection"], None] = lambda c: None,
                 limits: NBDLimits | None = None, total: Budget | None = None,
                 tls_mode: str = "off", tls_context: ssl.SSLContext | None = None,
                 loop: ServeLoop | None = None) -> None:
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
        self._done = threading.Event()
        #: the server's event loop (None: always a thread of its own), see `loop.py`
        self._loop = loop
        self._in_loop_count = False     # counted in the loop's `active`
        self.fd = -1            # the socket's descriptor, and whether it speaks TLS (set by the loop)
        self.tls = False
        # the transmission state, kept here while the loop serves the connection: the batch
        # receive buffer (requests from `_start` to `_end`), the reply arena, replies a
        # non-blocking send left behind, and how many requests go to the workers next
        self._rbuf = bytearray(0)
        self._rview = memoryview(self._rbuf)
        self._start = self._end = 0
        self._arena: mmap.mmap | None = None
        self._aview: memoryview | None = None
        self._unsent: list = []
        self._dispatch_until = 0
        self._slow = 0
        self._window = (0.0, 0.0, 0.0)
        self._fast: tuple | None = None
        #: when a worker process (`offload.py`) may be offered this connection again
        self.offload_after = 0.0
        #: the worker process holding this connection's TLS session (`offload.start_tls`)
        self.tunnel = None
        #: how long the reader polls before it sleeps, while it serves alone (`busypoll.py`)
        self._poll = PollWindow()

    # ---- lifetime -------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._serve, name="nbd-conn", daemon=True).start()

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
        """Wait until the connection is closed (its workers ended), `timeout` seconds at
        most; True once closed."""
        self._done.wait(timeout)
        return self._closed

    def buffered(self) -> bool:
        """The TLS session holds data that no wait on the socket would announce."""
        sock = self.sock
        return sock.__class__ is TLSStream and sock.buffered()

    def _serve(self) -> None:
        try:
            try:
                ok = self._handshake()
            except (OSError, ProtocolError) as exc:
                log.debug("nbd handshake ended: %s", exc)
                ok = False
            if ok:
                self._begin_transmission()
                if self._transmission(fresh=True):
                    return    # the loop serves it now
        except Exception:
            log.exception("nbd: connection failed")
        self._finish()

    def resume_threaded(self) -> None:
        """Serve the connection in this thread, from where the loop left it (see `loop.py`)."""
        try:
            if self._transmission():
                return
        except Exception:
            log.exception("nbd: connection failed")
        self._finish()

    def take_back(self, left: bytes, unsent: bytes) -> None:
        """Serve the connection here again, from where a worker process (`offload.py`) left
        it: `left` are the request bytes it received but did not serve, `unsent` the replies
        the socket did not take (sent first)."""
        if len(left) > len(self._rbuf):     # a big write's payload, partly received
            self._rbuf = bytearray(len(left) + RECV_BUFFER)
            self._rview = memoryview(self._rbuf)
            self._fast = (self._rbuf, self._rview, *self._fast[2:])
        self._rview[:len(left)] = left
        self._start, self._end = 0, len(left)
        if unsent:
            self._unsent = [unsent]
        self.resume_threaded()

    def end_offloaded(self, abort: bool) -> None:
        """A worker process served the connection to its end (or died: `abort`)."""
        if abort:
            self.abort()
        self._finish()

    def _finish(self) -> None:
        self._closing = True
        try:
            if self._pool is not None:
                self._pool.finish()
                self._pool = None   # no cycle between the connection and its pool
            if self._in_loop_count and self._loop is not None:
                self._in_loop_count = False
                self._loop.entered(-1)
            if getattr(self.catalog, "open_until_eof", False):
                self._wait_for_eof()
            if self.tunnel is not None:
                self.tunnel.release()
            self.catalog.close()
            try:
                self.sock.close()
            except OSError:
                pass
            self._fast = None
            self._unsent = []
            if self._aview is not None:
                try:
                    self._aview.release()
                    self._arena.close()
                except BufferError:   # a view still alive somewhere: the GC unmaps it later
                    pass
        finally:
            self._closed = True
            self.on_close(self)
            self._done.set()

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

    def _start_tls(self, hs: ServerHandshake, deadline: float | None) -> TLSStream | socket.socket:
        """STARTTLS was acknowledged: the TLS handshake, within what is left of the deadline;
        from then on the connection speaks through the TLS stream."""
        assert self.tls_context is not None
        off = self._loop.offload if self._loop is not None else None
        relay = off.start_tls(self, hs.unused_data(), deadline) if off is not None else None
        if relay is not None:     # a worker runs the TLS handshake and relays
            self.sock = relay
            hs.tls_started()
            return relay
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

    def _begin_transmission(self) -> None:
        """The handshake is over: the buffers, socket options and workers of the transmission
        phase (kept until the connection ends, whoever serves it)."""
        export = self.export
        handle = self.catalog.handle
        assert export is not None and handle is not None
        sock = self.sock
        self._pool = _WorkerPool(self, handle, export)
        try:   # room for a whole big reply: its sendmsg then copies once and does not block
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        # a send that makes no progress for reply_timeout fails (EAGAIN): the client reads
        # nothing, and the connection is closed, which frees what its requests hold
        secs = self.reply_timeout
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(secs), int((secs % 1) * 1_000_000)))
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._start, self._end = 0, len(self._pending)
        self._rview[:self._end] = self._pending
        self._pending = b""
        self._arena = mmap.mmap(-1, ARENA)
        self._aview = memoryview(self._arena)
        structured = export.structured
        # what every pass uses, in one tuple (one unpacking per pass of the loop)
        self._fast = (self._rbuf, self._rview, self._arena, self._aview, export, structured,
                      DATA_CHUNK.size if structured else SIMPLE_REPLY.size, export.check,
                      handle.readinto, handle.write, handle.device, export.min_block - 1,
                      not export.read_only, min(self.inline_max, RECV_BUFFER - REQUEST_SIZE),
                      export.max_payload, getattr(handle.device, "lend_flat", None))
        if self._loop is not None:
            self._in_loop_count = True
            self._loop.entered(1)

    def _send_unsent(self) -> None:
        """Send what a non-blocking send of the loop left behind (first, in order)."""
        if self._unsent:
            parts, self._unsent = self._unsent, []
            self._send(parts)
        if self.sock.__class__ is TLSStream and self.sock.backlog:
            self.sock.flush()

    def _transmission(self, fresh: bool = False) -> bool:
        """The reader loop: parse requests from a batch buffer, run small ones inline and
        batch their replies, hand big or slow ones to the worker pool. Returns True when it
        handed the connection to the server's loop, False when the connection ended."""
        (rbuf, rview, arena, aview, export, structured, hlen, check, readinto, write, device,
         block_mask, writable, inline_max, max_payload, lend) = self._fast
        handle = self.catalog.handle
        # the device's collapsed table, lent for a batch of inline requests (see `_lent`)
        flat = None
        lendable = lend is not None
        sock = self.sock
        pool = self._pool
        lp = crowd = self._loop
        poll = self._poll
        if lp is not None and sock.__class__ is TLSStream and not lp.tls:
            lp = None    # TLS stays in its own thread (see loop.py)
        start, end = self._start, self._end
        # the replies of a batch: inline ones are written into the arena one after the other
        # (a READ's header right before its data), so that they leave as one piece; `out`
        # holds what is complete before `run` (arena pieces, error replies)
        apos = run = replies = 0
        out: list = []
        pack_chunk = DATA_CHUNK.pack_into
        pack_simple = SIMPLE_REPLY.pack_into
        unpack = REQUEST.unpack_from
        perf = time.perf_counter
        header_only = False  # receive just the next request header (see below)
        dispatch_until = self._dispatch_until   # while > 0: the device is slow, dispatch everything
        self._dispatch_until = 0
        slow = 0             # inline requests in a row that were slow
        window = (0.0, 0.0, 0.0)  # when the first of them ended, other threads' CPU time, time queued
        last = perf()        # when the last inline request ended (or the reader last waited)
        # inline requests since the last dispatched one: after LOOP_AFTER of them the
        # connection may join the loop (a stream of big requests stays here)
        run_inline = LOOP_AFTER if fresh else 0
        to_loop = False
        try:
            self._send_unsent()
            while not self._closing:
                if end - start < REQUEST_SIZE:
                    if replies:
                        flat = _give_back(device, flat)
                        lendable = lend is not None
                        self._send_batch(out, aview, run, apos)
                        out = []
                        apos = run = replies = 0
                    off = lp.offload if lp is not None else None
                    if off is not None and last >= self.offload_after:
                        if start:
                            rview[:end - start] = rview[start:end]
                            end -= start
                            start = 0
                        self._start, self._end = start, end
                        if off.take(self, handle, rview[:end], pool.wait_idle,
                                    alone=not lp.crowded and self.tunnel is None):
                            to_loop = True
                            return True    # a worker process serves it now
                        self.offload_after = perf() + off.retry
                    if (run_inline >= LOOP_AFTER and lp is not None and lp.crowded and not header_only
                            and not dispatch_until and not pool.busy()):
                        # small requests only, and other connections: the loop serves it now
                        if start:
                            rview[:end - start] = rview[start:end]
                            end -= start
                            start = 0
                        self._start, self._end = start, end
                        if lp.add(self):
                            to_loop = True
                            return True
                    if start:
                        rview[:end - start] = rview[start:end]
                        end -= start
                        start = 0
                    # after a dispatched WRITE the next request is probably one too: take only
                    # its header, so that its payload lands straight in its task buffer
                    want = REQUEST_SIZE - end if header_only else 0
                    n = -1
                    if crowd is None or not crowd.crowded:
                        # alone here: poll a little before sleeping (`busypoll.py`)
                        deadline = poll.deadline()
                        while deadline:
                            try:
                                n = sock.recv_into(rview[end:], want, _DONTWAIT)
                                break
                            except BlockingIOError:
                                if perf() >= deadline or not poll.pause():
                                    break
                    if n < 0:
                        slept = perf()
                        n = sock.recv_into(rview[end:], want)
                        poll.slept(perf() - slept)
                    if n == 0:
                        break
                    end += n
                    last = perf()
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
                            if replies:
                                flat = _give_back(device, flat)
                                lendable = lend is not None
                                self._send_batch(out, aview, run, apos)
                                out = []
                                apos = run = replies = 0
                            rview[:end - start] = rview[start:end]
                            end -= start
                            start = 0
                            end = self._recv_more(rview, end, need)
                            if end < 0:
                                break
                            last = perf()
                        data = rview[start + REQUEST_SIZE:start + need]
                        start += need
                    else:
                        if replies:
                            flat = _give_back(device, flat)
                            lendable = lend is not None
                            self._send_batch(out, aview, run, apos)
                            out = []
                            apos = run = replies = 0
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
                        run_inline = 0
                        last = perf()
                        continue
                    header_only = False
                else:
                    header_only = False
                    start += REQUEST_SIZE
                    if not inline:
                        if replies:
                            flat = _give_back(device, flat)
                            lendable = lend is not None
                            self._send_batch(out, aview, run, apos)
                            out = []
                            apos = run = replies = 0
                        buf = None
                        if cmd == _READ:   # a READ over the maximum is refused unread: no bigger buffer
                            buf = pool.buffer(min(length, max_payload))
                            if buf is None:
                                break
                        pool.submit(flags, cmd, cookie, offset, length, buf)
                        run_inline = 0
                        last = perf()
                        continue
                # an inline READ, WRITE or CACHE: its reply goes into the arena (a READ's data
                # right after its header), or, if refused or failed, into `out` as it is
                # (`loop_pass` has the same steps written out: a call per request would cost
                # a tenth of a 4 KiB request; change both together)
                if apos + (hlen + length if cmd == _READ else _SIMPLE_SIZE) > ARENA:
                    flat = _give_back(device, flat)
                    lendable = lend is not None
                    self._send_batch(out, aview, run, apos)
                    out = []
                    apos = run = replies = 0
                    last = perf()
                reply = None
                if (not flags and length and not (offset | length) & block_mask and offset + length <= device.size
                        and (cmd == _READ and length <= max_payload or cmd == _WRITE and writable)):
                    err = 0   # what `check` says of a plain READ or WRITE inside the device, without the call
                else:
                    err = check(flags, cmd, offset, length, device.size)
                if err:
                    reply = error_reply(cookie, err, _refusal(cmd, err, offset, length, device.size), structured)
                else:
                    try:
                        if flat is None and lendable:
                            flat = lend(_lent)
                            lendable = flat is not None
                        if cmd == _READ:
                            data = aview[apos + hlen:apos + hlen + length]
                            if flat is None or flat.retired or device.dead or not flat.read(offset, data):
                                flat = _give_back(device, flat)
                                lendable = False
                                readinto(offset, data)
                        elif cmd == _WRITE:
                            if flat is None or flat.retired or device.dead or not flat.write(offset, data, False):
                                flat = _give_back(device, flat)
                                lendable = False
                                write(offset, data, False)
                        # CMD_CACHE: a hint; the page cache of the underlying files does the caching
                    except Exception as exc:  # noqa: BLE001 - a bug must not kill the connection
                        reply = _failure(exc, cmd, cookie, structured)
                if reply is not None:
                    if apos > run:
                        out.append(aview[run:apos])
                        run = apos
                    out.append(reply)
                elif cmd == _READ:
                    if structured:
                        pack_chunk(arena, apos, _STRUCT_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, offset)
                    else:
                        pack_simple(arena, apos, _SIMPLE_MAGIC, 0, cookie)
                    apos += hlen + length
                else:
                    pack_simple(arena, apos, _SIMPLE_MAGIC, 0, cookie)
                    apos += _SIMPLE_SIZE
                replies += 1
                run_inline += 1
                now = perf()
                if now - last <= SLOW_REQUEST:
                    slow = 0
                else:
                    if not slow:
                        window = (now, _cpu_of_others(), _queued())
                    slow += 1
                    if slow >= SLOW_STREAK:
                        slow = 0
                        if _waited_for_device(window, now):
                            dispatch_until = SLOW_BACKOFF
                last = now
                if replies >= MAX_BATCH:
                    flat = _give_back(device, flat)
                    lendable = lend is not None
                    self._send_batch(out, aview, run, apos)
                    out = []
                    apos = run = replies = 0
                    last = perf()
            flat = _give_back(device, flat)
            if replies:
                self._send_batch(out, aview, run, apos)
        except ProtocolError as exc:
            log.info("nbd: protocol error from client, disconnecting: %s", exc)
            self.abort()
        except OSError as exc:
            log.debug("nbd: connection ended: %s", exc)
        finally:
            _give_back(device, flat)
            out = data = None
            if not to_loop:
                self._closing = True
        return False

    def _send_batch(self, out: list, aview: memoryview, run: int, end: int) -> None:
        """Send the replies of a batch: `out`, then the arena from `run` to `end`."""
        if end > run:
            out.append(aview[run:end])
        self._send(out)

    def loop_pass(self, lp: ServeLoop, gen: int) -> bool:
        """Serve what has arrived, for the loop (`loop.py`): small READs, WRITEs and CACHEs
        whose bytes are here, their replies in one non-blocking send. True: wait for more
        in the loop; False: a thread of its own must go on (a request for the workers, EOF,
        DISC, a protocol error, a send the socket did not take whole, a slow device, or the
        watchdog took the connection out of the loop); the state is saved either way."""
        (rbuf, rview, arena, aview, export, structured, hlen, check, readinto, write, device,
         block_mask, writable, inline_max, max_payload, lend) = self._fast
        start, end = self._start, self._end
        if self._closing:
            return False
        flat = None          # the device's Flat, lent for this pass (see `_transmission`)
        lendable = lend is not None
        if start:
            rview[:end - start] = rview[start:end]
            end -= start
            start = 0
        try:
            n = self.sock.recv_into(rview[end:], 0, _DONTWAIT)
        except BlockingIOError:
            n = -1      # nothing after all (a TLS record not complete yet)
        except OSError as exc:
            return False    # the thread meets the error again and ends the connection
        if n == 0:
            return False    # EOF: the thread ends the connection
        if n > 0:
            end += n
        perf = time.perf_counter
        last = perf()
        apos = run = replies = 0
        out: list = []
        stay = True
        slow = self._slow
        try:
            while end - start >= REQUEST_SIZE:
                magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(rbuf, start)
                if (magic != _REQUEST_MAGIC or flags & _FUA or length > inline_max
                        or not (cmd == _READ or cmd == _WRITE or cmd == _CACHE)):
                    stay = False     # the thread runs it (or refuses it, or disconnects)
                    break
                if cmd == _WRITE:
                    need = REQUEST_SIZE + length
                    if end - start < need:
                        break        # the rest of its payload has not arrived
                    data = rview[start + REQUEST_SIZE:start + need]
                    start += need
                else:
                    start += REQUEST_SIZE
                if apos + (hlen + length if cmd == _READ else _SIMPLE_SIZE) > ARENA:
                    if not self._send_nowait(out, aview, run, apos):
                        stay = False
                        break
                    out = []
                    apos = run = replies = 0
                # the inline steps of `_transmission`, written out (change both together)
                reply = None
                if (not flags and length and not (offset | length) & block_mask and offset + length <= device.size
                        and (cmd == _READ and length <= max_payload or cmd == _WRITE and writable)):
                    err = 0
                else:
                    err = check(flags, cmd, offset, length, device.size)
                if err:
                    reply = error_reply(cookie, err, _refusal(cmd, err, offset, length, device.size), structured)
                else:
                    try:
                        if flat is None and lendable:
                            flat = lend(_lent)
                            lendable = flat is not None
                        if cmd == _READ:
                            buf = aview[apos + hlen:apos + hlen + length]
                            if flat is None or flat.retired or device.dead or not flat.read(offset, buf):
                                flat = _give_back(device, flat)
                                lendable = False
                                readinto(offset, buf)
                        elif cmd == _WRITE:
                            if flat is None or flat.retired or device.dead or not flat.write(offset, data, False):
                                flat = _give_back(device, flat)
                                lendable = False
                                write(offset, data, False)
                    except Exception as exc:  # noqa: BLE001 - a bug must not kill the connection
                        reply = _failure(exc, cmd, cookie, structured)
                if reply is not None:
                    if apos > run:
                        out.append(aview[run:apos])
                        run = apos
                    out.append(reply)
                elif cmd == _READ:
                    if structured:
                        DATA_CHUNK.pack_into(arena, apos, _STRUCT_MAGIC, _DONE, _OFFSET_DATA, cookie, length + 8, offset)
                    else:
                        SIMPLE_REPLY.pack_into(arena, apos, _SIMPLE_MAGIC, 0, cookie)
                    apos += hlen + length
                else:
                    SIMPLE_REPLY.pack_into(arena, apos, _SIMPLE_MAGIC, 0, cookie)
                    apos += _SIMPLE_SIZE
                replies += 1
                if lp.gen != gen:
                    stay = False     # the watchdog took it out of the loop: this thread goes on with it
                    break
                now = perf()
                lp.since = now
                if now - last <= SLOW_REQUEST:
                    slow = 0
                else:
                    if not slow:
                        self._window = (now, _cpu_of_others(), _queued())
                    slow += 1
                    if slow >= SLOW_STREAK:
                        slow = 0
                        if _waited_for_device(self._window, now):
                            self._dispatch_until = SLOW_BACKOFF   # the thread sends them to the workers
                            stay = False
                            break
                last = now
                if replies >= MAX_BATCH:
                    if not self._send_nowait(out, aview, run, apos):
                        stay = False
                        break
                    out = []
                    apos = run = replies = 0
                    last = perf()
        finally:
            _give_back(device, flat)
        data = buf = None
        self._slow = slow
        self._start, self._end = start, end
        if replies and not self._send_nowait(out, aview, run, apos):
            stay = False
        if stay and not lp.crowded:
            stay = False     # alone again: a thread of its own serves it at less cost
        return stay

    def _send_nowait(self, out: list, aview: memoryview, run: int, end: int) -> bool:
        """Send a batch's replies without waiting (loop); False if the socket did not take
        them whole: the rest is kept (`_unsent`, or the TLS stream's backlog), and the thread
        that goes on sends it first."""
        sock = self.sock
        if not out and sock.__class__ is socket.socket:    # the usual batch: one piece of the arena
            try:
                sent = sock.send(aview[run:end], _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = -1
            if sent == end - run:
                return True
            self._unsent = [aview[run + max(sent, 0):end]]   # an error: the thread meets it again
            return False
        if end > run:
            out.append(aview[run:end])
        try:
            sent = sock.sendmsg(out, (), _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._unsent = out      # the thread meets the error when it sends them
            return False
        if sock.__class__ is TLSStream:
            return not sock.backlog
        total = sum(len(p) for p in out)
        if sent >= total:
            return True
        rest = []
        for p in out:
            n = len(p)
            if sent >= n:
                sent -= n
                continue
            rest.append(memoryview(p)[sent:] if sent else p)
            sent = 0
        self._unsent = rest
        return False

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
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the connection
            return [_failure(exc, cmd, cookie, structured)]
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

    def busy(self) -> bool:
        """Tasks are in flight (a hint, read without the lock)."""
        return self._in_flight > 0

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
                if buf is not None and cmd != _READ:
                    # the payload is spent: the buffer serves the next request, which the client
                    # may send as soon as it has this reply (a second buffer would stay held)
                    data = _release(data)
                    self._recycle(buf)
                    buf = None
                if not conn._aborted:
                    conn._send(parts)
                parts = None
            except OSError as exc:   # the client is gone or broke the socket: hang up
                log.debug("nbd: reply not sent, disconnecting: %s", exc)
                conn.abort()
            except Exception:
                log.exception("nbd: worker failed")
            finally:
                data = _release(data)
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

    def wait_idle(self) -> None:
        """Wait until every task is answered (before the connection moves to a worker)."""
        with self._lock:
            self._wait_idle_locked()

    def _wait_idle_locked(self) -> None:
        while self._in_flight:
            self._waiting += 1
            self._room.wait()
            self._waiting -= 1

    def finish(self) -> None:
        """Wait until every task is answered, end the workers, give every buffer back."""
        with self._lock:
            self._wait_idle_locked()
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


def _lent(*_args) -> None:
    """The watcher of a Flat lent to a connection's batch of inline requests (READ and WRITE
    straight to the files, past the open, the device's lock and its in-flight count: a tenth
    of a 4 KiB request's CPU): nothing to do when the device drops it. The batch gives it back
    before anything that may block (a receive, a send, a request for the workers), and at once
    when it sees it `retired` (a suspend, resume, load or remove here or below: the suspend
    waits for it), the device dead, or a request through it fail; that request and the rest
    of the batch then go through the open (`BlockOpen`: its checks, the device's suspend,
    failure events), as without a Flat."""


def _give_back(device, flat):  # noqa: ANN001, ANN202 - None, for `flat = _give_back(device, flat)`
    """Give a Flat lent to a batch back to its device, if there is one (see `_lent`)."""
    if flat is not None:
        device.return_flat(flat, _lent)


def _release(view: memoryview | None) -> None:
    """Release a view of a task buffer (None); one still exported somewhere stays valid."""
    if view is not None:
        try:
            view.release()
        except BufferError:
            pass
    return None


def _cpu_of_others() -> float:
    """CPU seconds the process's other threads have used (two system calls)."""
    return time.process_time() - time.thread_time()


def _queued() -> float:
    """Seconds this thread has waited for a CPU while runnable (0 where the kernel does not say)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _waited_for_device(window: tuple[float, float, float], now: float) -> bool:
    """Inline requests were slow from window[0] to `now`: was it the device (a remote or
    suspended one: the process was idle meanwhile)? Not if the other threads ran (other
    connections, which take the GIL while this reader waits for it) or this one waited for a
    CPU (a loaded machine): dispatching would only add hand-offs between threads."""
    start, others, queued = window
    limit = OTHERS_BUSY * (now - start)
    return _cpu_of_others() - others < limit and _queued() - queued < limit


def _failure(exc: Exception, cmd: int, cookie: int, structured: bool) -> bytes:
    """The error reply of a request whose device call raised `exc`."""
    if isinstance(exc, DMError):
        return error_reply(cookie, C.errno_to_wire(exc.errno), str(exc), structured)
    if isinstance(exc, OSError):
        return error_reply(cookie, C.errno_to_wire(exc.errno or 5), str(exc), structured)
    log.exception("nbd: %s failed", C.CMD_NAMES.get(cmd, cmd), exc_info=exc)
    return error_reply(cookie, C.NBD_EIO, f"internal error: {exc}", structured)


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
