"""An NBD worker process: serves the data path of connections the daemon hands it (issue 18).

Python runs one thread at a time per process, so the daemon's event loop serves all its NBD
connections on one CPU. A worker is a second process (`python -m userdm.export.nbd.worker
FD`, started by `offload.py`, never a fork of the threaded daemon) that serves connections
whose device maps onto files only: the daemon passes, over the control socket FD (a Unix
SOCK_SEQPACKET pair, descriptors by SCM_RIGHTS), the connection's socket, the files of the
device's collapsed table (`userdm.dm.collapse`) with their segments, and the request bytes it
had already received. The worker does READ, WRITE and FLUSH with preadv/pwritev/fdatasync
(READs and WRITEs of 64 KiB or more on files in the page cache by splice, `splice.py`: a
payload the client has sent only part of waits in `_Served.payload`, and a hand-back then
returns the whole request, the part already in the file read back) and nothing else: any
other request, flag or refusal, any error, hands the connection back *before* that request,
unserved, and the daemon serves it as it always does (its errno, its failure events, its
protocol errors).

TLS connections: the worker also holds TLS sessions (`tunnel.py`): it runs the handshake
and relays plaintext to and from the daemon over a socketpair, and a `serve` of such a
connection serves it over its session (DIRECT mode), a hand-back returns it to relaying.

Messages (JSON; bulk bytes in a memfd passed along, so no message is big):
- daemon -> worker: `serve` (id, export facts, segments; descriptors: socket, files, and a
  memfd of the bytes already received; with `tunnel`, the socket is the daemon's end of that
  tunnel's socketpair, whose unread bytes come after those), `revoke` (id: hand it back
  now), `tls` (tunnel, certificate directory, verify_peer, seconds left of the handshake
  deadline, reply timeout; descriptors: the client's socket, the worker's end of the
  socketpair, and a memfd of the bytes that followed STARTTLS).
- worker -> daemon: `back` (id, why; a memfd of the request bytes received but not served,
  then the reply bytes the socket did not take; none over TLS: the session keeps them),
  `ended` (id; EOF, NBD_CMD_DISC, or an error on the socket: the daemon closes the
  connection), `tls_failed` (tunnel, why: for the daemon's log).
The worker is single-threaded: it handles a control message only between requests, so a
connection handed back has no request in flight. A reply the socket does not take at once
waits (EPOLLOUT) while that connection reads nothing more, as the daemon's loop does; after
SLOW_READER seconds the connection goes back to the daemon, whose send closes it when the
client has read nothing for --nbd-reply-timeout. The
worker exits when the control socket closes (the daemon stopped or died). Before it sleeps
in epoll it polls for up to the daemon's `--poll-us` (`busypoll.py`, passed as an argument).
"""

from __future__ import annotations

import fcntl
import functools
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from bisect import bisect_right

from ...nbd import constants as C
from ...nbd.tls import server_context
from .. import busypoll
from ..busypoll import PollWindow
from . import splice
from . import tunnel as tls_tunnel

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQIQ")   # structured OFFSET_DATA chunk header with its offset
_DONTWAIT = socket.MSG_DONTWAIT
_READ, _WRITE, _FLUSH, _DISC = C.CMD_READ, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_DISC
#: the largest READ or WRITE a worker serves (bigger ones go back to the daemon)
MAX_REQUEST = 4 << 20
RECV_BUFFER = 128 * 1024
BIG_READ = splice.MIN                # a READ this big is sent alone, not batched
#: seconds replies may wait for a client that reads nothing before the connection goes back
#: to the daemon (whose send waits --nbd-reply-timeout, then closes it)
SLOW_READER = 1.0
ARENA = MAX_REQUEST + 64 * 1024
MAX_FDS = 253                        # SCM_RIGHTS carries at most this many per message


def blob(data: bytes | memoryview) -> int:
    """A memfd holding `data`, to pass along a message."""
    fd = os.memfd_create("userdm-nbd", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def read_blob(fd: int, length: int) -> bytes:
    """The `length` bytes of a memfd from `blob`; closes it."""
    try:
        return os.pread(fd, length, 0) if length else b""
    finally:
        os.close(fd)


def send(ctl: socket.socket, msg: dict, fds: list[int] = ()) -> None:
    socket.send_fds(ctl, [json.dumps(msg).encode()], list(fds))


def receive(ctl: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and its descriptors; (None, []) when the other side is gone."""
    data, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


class _Served:
    """One connection this worker serves: over its socket, or over a tunnel's TLS stream."""

    def __init__(self, ident: int, msg: dict, fds: list[int], sock=None, received: bytes = b"",  # noqa: ANN001
                 tunnel: tls_tunnel.Tunnel | None = None) -> None:
        self.id = ident
        # never O_NONBLOCK: the daemon shares the open file description (MSG_DONTWAIT here)
        self.sock = sock if sock is not None else socket.socket(fileno=fds[0])
        self.fd = self.sock.fileno()
        #: the TLS tunnel this connection is served over (None: a plain socket)
        self.tunnel = tunnel
        self.ended: str | None = None     # why the worker ended it (None: served, or handed back)
        files = fds[1:1 + msg["files"]]
        self.files = files
        segs = msg["segments"]            # [start, end, file index, delta, writable]
        self.starts = [s[0] for s in segs] + [segs[-1][1]]
        self.seg_fd = [files[s[2]] for s in segs]
        self.deltas = [s[3] for s in segs]
        self.writable = [bool(s[4]) and not msg["read_only"] for s in segs]
        #: segments whose big READs and WRITEs go by splice (`splice.py`)
        cached = [tunnel is None and splice.cached(fd) for fd in files]
        self.spliced = [cached[s[2]] for s in segs]
        self.sock_flags = 0 if tunnel is not None else fcntl.fcntl(self.fd, fcntl.F_GETFL)
        self.payload: splice.Payload | None = None     # a big WRITE's, on its way to the file
        self.size = msg["size"]
        self.mask = msg["min_block"] - 1
        self.max = min(msg["max_payload"], MAX_REQUEST)
        self.structured = msg["structured"]
        #: the daemon's only connection: its big READs are the daemon's (`offload.py`)
        self.alone = bool(msg.get("alone"))
        pending = read_blob(fds[-1], msg["pending"]) if msg["pending"] else b""
        pending += received
        self.rbuf = bytearray(max(RECV_BUFFER, len(pending) + RECV_BUFFER))
        self.rview = memoryview(self.rbuf)
        self.rview[:len(pending)] = pending
        self.start, self.end = 0, len(pending)
        self.arena = mmap.mmap(-1, ARENA)
        self.aview = memoryview(self.arena)
        self.backlog = b""                # reply bytes the socket did not take (plain)
        self.stalled = False              # replies wait for the socket (backlog or TLS), since when
        self.backlog_since = 0.0

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []
        self.aview.release()
        self.arena.close()
        if self.tunnel is None:
            self.sock.close()


class Worker:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.ep = select.epoll()
        self.ep.register(ctl.fileno(), select.EPOLLIN)
        self.conns: dict[int, _Served] = {}     # by socket fd
        self.by_id: dict[int, _Served] = {}
        self.backlogged: set[_Served] = set()   # connections with replies not sent
        #: TLS tunnels by their two fds and by id; tunnels and connections served over one
        #: whose session holds bytes that no wait announces (served before the next wait)
        self.tunnel_fds: dict[int, tls_tunnel.Tunnel] = {}
        self.tunnels: dict[int, tls_tunnel.Tunnel] = {}
        self.ready: set = set()
        self.timed: set[tls_tunnel.Tunnel] = set()      # tunnels with an `expires`
        self.relay_buffer = bytearray(tls_tunnel.CHUNK)
        self._contexts: dict = {}
        self.pipe = splice.Pipe()

    def run(self) -> None:
        ctl_fd = self.ctl.fileno()
        wait = self.ep.poll
        poll = PollWindow()
        look = functools.partial(wait, 0)
        while True:
            for c in list(self.backlogged):   # a client that reads slowly: the daemon applies its reply timeout
                if time.monotonic() - c.backlog_since > SLOW_READER:
                    self._give_back(c, "the client does not read its replies", True)
            timeout = SLOW_READER / 4 if self.backlogged else None
            if self.timed:       # TLS handshakes under way, replies the client must take in time
                now = time.monotonic()
                for t in [t for t in self.timed if t.expires <= now]:
                    t.expire()
                if self.timed:
                    soon = min(t.expires for t in self.timed) - now
                    timeout = max(0.0, soon if timeout is None else min(soon, timeout))
            if self.ready:
                timeout = 0
            if timeout is not None:
                events = wait(timeout)
            else:            # poll a little before sleeping (`busypoll.py`)
                events = poll.wait(look, wait)
            for fd, ev in events:
                if fd == ctl_fd:
                    if not self._control():
                        return
                    continue
                c = self.conns.get(fd)
                if c is None:
                    t = self.tunnel_fds.get(fd)
                    if t is not None:
                        t.event(fd, ev)
                    continue
                if c.stalled:
                    self._drain(c)
                else:
                    self._pump(c, True)
            if self.ready:      # TLS records already in a session: no wait announces them
                ready, self.ready = self.ready, set()
                for x in ready:
                    if isinstance(x, _Served):
                        if x.id in self.by_id and not x.stalled:
                            self._pump(x, True)
                    elif x.state == tls_tunnel.RELAY:
                        x.from_client()
                        if x.state == tls_tunnel.RELAY:
                            x.arm()

    # ---- control ----------------------------------------------------------------------

    def _control(self) -> bool:
        msg, fds = receive(self.ctl)
        if msg is None:
            return False
        if msg["op"] == "serve" and msg.get("tunnel") is not None:
            self._serve_tunnel(msg, fds)
        elif msg["op"] == "serve":
            c = _Served(msg["id"], msg, fds)
            self.conns[c.fd] = c
            self.by_id[c.id] = c
            self.ep.register(c.fd, select.EPOLLIN)
            self._pump(c, False)
        elif msg["op"] == "revoke":
            c = self.by_id.get(msg["id"])
            if c is not None:
                self._give_back(c, "revoked")
        elif msg["op"] == "tls":
            self._start_tunnel(msg, fds)
        return True

    def _start_tunnel(self, msg: dict, fds: list[int]) -> None:
        """A client socket right after STARTTLS: its handshake, then relaying."""
        client, outer = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        initial = read_blob(fds[2], msg["initial"]) if msg["initial"] else b""
        key = (msg["certs"], bool(msg["verify_peer"]))
        try:
            ctx = self._contexts.get(key)
            if ctx is None:
                ctx = self._contexts[key] = server_context(*key)
        except Exception as exc:  # noqa: BLE001 - the certificates changed under the daemon
            self.report({"op": "tls_failed", "tunnel": msg["tunnel"], "why": f"TLS handshake failed: {exc}"})
            client.close()
            outer.close()
            return
        t = tls_tunnel.Tunnel(msg["tunnel"], self, client, outer, ctx, initial, msg["left"], msg["reply_timeout"])
        self.tunnels[t.id] = t
        t.start()

    def _serve_tunnel(self, msg: dict, fds: list[int]) -> None:
        """Serve a TLS connection directly. The request bytes in flight, in order: those the
        daemon received and did not serve (the memfd), those still unread in the daemon's end
        of the socketpair (`fds[0]`: read here), those the tunnel decrypted but `outer` did not
        take; then the session's. The replies the daemon wrote and the tunnel did not relay
        yet go to the client first."""
        t = self.tunnels.get(msg["tunnel"])
        inner = socket.socket(fileno=fds[0])
        unread = []
        try:
            while True:
                try:
                    data = inner.recv(1 << 20, _DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    break
                unread.append(data)
        except OSError:
            t = None
        finally:
            inner.close()
        behind = t is not None and t.state == tls_tunnel.RELAY and t.stream.backlog
        if t is None or t.state != tls_tunnel.RELAY or not behind and not t.take_replies():
            for fd in fds[1:]:
                os.close(fd)
            if t is not None:
                t.close(False)
            send(self.ctl, {"op": "ended", "id": msg["id"], "abort": True, "why": "its TLS tunnel is gone"})
            return
        received = b"".join(unread) + t.go_direct()
        c = _Served(msg["id"], msg, [-1, *fds[1:]], t.stream, received, t)
        self.conns[c.fd] = c
        self.by_id[c.id] = c
        self.ep.register(c.fd, select.EPOLLIN)
        if behind:       # the client reads nothing: the daemon keeps it (its reply timeout applies)
            self._give_back(c, "the client does not read its replies", True)
        elif t.stream.backlog:          # the daemon's last replies wait for the client
            self._stall(c)
            self.ep.modify(c.fd, select.EPOLLOUT)
        else:
            self._pump(c, False)

    def report(self, msg: dict) -> None:
        """A message to the daemon (tunnels use it)."""
        try:
            send(self.ctl, msg)
        except OSError:
            pass

    def forget(self, t: tls_tunnel.Tunnel) -> None:
        """A tunnel closed."""
        self.tunnels.pop(t.id, None)
        for fd in (t.client_fd, t.outer_fd):
            if self.tunnel_fds.get(fd) is t:
                del self.tunnel_fds[fd]

    def _forget(self, c: _Served, abort: bool = False) -> None:
        self.backlogged.discard(c)
        self.ready.discard(c)
        del self.conns[c.fd]
        del self.by_id[c.id]
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        c.close()
        if c.tunnel is not None:
            if c.tunnel.state == tls_tunnel.DIRECT and c.ended is None:
                c.tunnel.relay_again()
            else:
                c.tunnel.close(not abort)

    def _stall(self, c: _Served) -> None:
        """Replies wait for the socket: stop reading the connection until they are sent."""
        c.stalled = True
        c.backlog_since = time.monotonic()
        self.backlogged.add(c)

    def _give_back(self, c: _Served, why: str, hold: bool = False) -> None:
        """Hand `c` back to the daemon: the request bytes not served (a WRITE part-way to the
        file: the whole of it, `splice.Payload.unserved`), the replies not sent (`hold`: not
        worth offering again at once: the client reads nothing, or the daemon's only
        connection reads big blocks)."""
        left = c.rview[c.start:c.end]
        try:
            data = bytes(left) if c.payload is None else c.payload.unserved()
        except OSError as exc:
            left.release()
            self._end(c, True, f"write not served, nor given back: {exc}")
            return
        fds = [blob(data + c.backlog)] if data or c.backlog else []
        try:
            send(self.ctl, {"op": "back", "id": c.id, "why": why, "left": len(data),
                            "unsent": len(c.backlog), "hold": hold}, fds)
        finally:
            for fd in fds:
                os.close(fd)
            left.release()
            self._forget(c)

    def _end(self, c: _Served, abort: bool, why: str) -> None:
        c.ended = why
        send(self.ctl, {"op": "ended", "id": c.id, "abort": abort, "why": why})
        self._forget(c, abort)

    # ---- the data path ----------------------------------------------------------------

    def _drain(self, c: _Served) -> None:
        """EPOLLOUT: send the backlog; then serve what is buffered."""
        try:
            if c.tunnel is not None:
                left = c.sock.flush_nowait()
            else:
                c.backlog = c.backlog[c.sock.send(c.backlog, _DONTWAIT):]
                left = len(c.backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(c, True, f"reply not sent: {exc}")
            return
        if not left:
            c.stalled = False
            self.backlogged.discard(c)
            self.ep.modify(c.fd, select.EPOLLIN)
            self._pump(c, c.tunnel is not None)

    def _flush(self, c: _Served, apos: int) -> bool:
        """Send the arena's replies; what the socket does not take becomes the backlog
        (False: stop reading this connection until it is sent). Raises OSError."""
        view = c.aview[:apos]
        if c.tunnel is not None:      # encrypted; what the socket does not take stays in the stream
            try:
                left = c.sock.send_nowait(view)
            finally:
                view.release()
            if left:
                self._stall(c)
                return False
            return True
        try:
            sent = c.sock.send(view, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < apos:
            c.backlog = bytes(view[sent:])
            self._stall(c)
        view.release()
        return sent == apos

    def _room(self, c: _Served, apos: int, need: int) -> int:
        """Where `need` more reply bytes go in the arena: `apos`, or 0 once the arena is
        sent; -1 if the socket did not take it all (the rest is the backlog: stop)."""
        if apos + need <= ARENA:
            return apos
        return 0 if self._flush(c, apos) else -1

    def _pump(self, c: _Served, receive_first: bool) -> None:
        """Serve what has arrived: the rest of a big WRITE's payload first, then the whole
        requests in the buffer, then the next payload, as long as the client keeps up."""
        while True:
            if c.payload is not None:
                if not self._move_payload(c):
                    return
                receive_first = True
            self._batch(c, receive_first)
            if c.payload is None or c.stalled or c.id not in self.by_id:
                return

    def _move_payload(self, c: _Served) -> bool:
        """Move the WRITE payload the client has sent to the file; once it is all there,
        reply. False while the client has not sent it all, or if the connection left."""
        p = c.payload
        try:
            done = p.move(self.pipe, c.fd)
        except EOFError:
            self._end(c, False, "EOF")
            return False
        except OSError as exc:
            self._end(c, False, f"connection ended: {exc}")
            return False
        if done is None:
            self._give_back(c, "write failed")
            return False
        if not done:
            return False
        c.payload = None
        _SIMPLE.pack_into(c.arena, 0, C.SIMPLE_REPLY_MAGIC, 0, _REQUEST.unpack_from(p.header)[3])
        try:
            if not self._flush(c, _SIMPLE.size):
                self.ep.modify(c.fd, select.EPOLLOUT)
                return False
        except OSError as exc:
            self._end(c, True, f"reply not sent: {exc}")
            return False
        return True

    def _send_spliced(self, c: _Served, apos: int, length: int) -> bool:
        """Send the arena's `apos` bytes (the last of them a READ's header), then the READ's
        `length` bytes in the pipe. What the socket does not take becomes the backlog (False:
        stop reading). Raises OSError."""
        view = c.aview[:apos]
        try:
            try:
                sent = c.sock.send(view, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            left = self.pipe.send(c.fd, c.sock_flags, length) if sent == apos else length
            if sent == apos and not left:
                return True
            c.backlog = bytes(view[sent:]) + self.pipe.take(left)
        except BaseException:
            self.pipe.drop()
            raise
        finally:
            view.release()
        self._stall(c)
        return False

    def _batch(self, c: _Served, receive_first: bool) -> None:
        """Receive what has arrived and serve the whole requests in the buffer."""
        rbuf, rview, start, end = c.rbuf, c.rview, c.start, c.end
        if receive_first:
            if start:
                rview[:end - start] = rview[start:end]
                end -= start
                start = 0
            try:
                n = c.sock.recv_into(rview[end:], 0, _DONTWAIT)
            except BlockingIOError:
                n = -1
            except OSError as exc:
                self._end(c, False, f"connection ended: {exc}")
                return
            if n == 0:
                self._end(c, False, "EOF")
                return
            if n > 0:
                end += n
        arena, aview = c.arena, c.aview
        hlen = _CHUNK.size if c.structured else _SIMPLE.size
        structured = c.structured
        starts, deltas, seg_fd, writable = c.starts, c.deltas, c.seg_fd, c.writable
        size, mask, biggest = c.size, c.mask, c.max
        single = len(starts) == 2        # one segment: no search
        request_magic, simple_magic = C.REQUEST_MAGIC, C.SIMPLE_REPLY_MAGIC
        apos = 0
        why = None
        hold = False
        ended = None
        try:
            while end - start >= 28:
                magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(rbuf, start)
                if magic != request_magic or flags:
                    why = "not a plain request"
                    break
                if cmd == _READ or cmd == _WRITE:
                    if (not length or length > biggest or (offset | length) & mask
                            or offset + length > size):
                        why = "request the daemon refuses or splits"
                        break
                    i = 0 if single else bisect_right(starts, offset) - 1
                    if offset + length > starts[i + 1] or cmd == _WRITE and not writable[i]:
                        why = "request over segments or read-only"
                        break
                    spliced = False       # a big READ whose data goes by splice (`splice.py`)
                    if cmd == _READ and length >= BIG_READ:
                        if c.spliced[i] and length <= self.pipe.room():
                            spliced = True
                        elif c.alone:
                            why = "a big read on the daemon's only connection"
                            hold = True
                            break
                    if cmd == _WRITE:
                        need = 28 + length
                        if end - start < need:       # the payload is not all here yet
                            if length >= splice.MIN and c.spliced[i] and self.pipe.room():
                                # what is here goes to the file now, the rest from the socket
                                have = end - start - 28
                                try:
                                    done = os.pwrite(seg_fd[i], rview[start + 28:end], offset + deltas[i])
                                except OSError:
                                    done = -1
                                if done != have:
                                    why = "write failed"
                                    break
                                c.payload = splice.Payload(bytes(rview[start:start + 28]), seg_fd[i],
                                                           offset + deltas[i], length, have)
                                start = end
                            elif len(rbuf) < need:     # a big write: room for it, kept
                                c.rbuf = bytearray(need + RECV_BUFFER)
                                c.rview = memoryview(c.rbuf)
                                c.rview[:end - start] = rview[start:end]
                                rview.release()
                                rbuf, rview = c.rbuf, c.rview
                                end -= start
                                start = 0
                            break
                        if apos + 16 > ARENA:
                            apos = self._room(c, apos, 16)
                            if apos < 0:
                                apos = 0
                                break
                        try:      # the payload's view is released as the call returns
                            done = os.pwrite(seg_fd[i], rview[start + 28:start + need], offset + deltas[i])
                        except OSError:
                            done = -1
                        if done != length:
                            why = "write failed"
                            break
                        start += need
                        _SIMPLE.pack_into(arena, apos, simple_magic, 0, cookie)
                        apos += 16
                        continue
                    need = hlen if spliced else hlen + length
                    if apos + need > ARENA:
                        apos = self._room(c, apos, need)
                        if apos < 0:
                            apos = 0
                            break
                    if spliced:
                        done = length if self.pipe.fill(seg_fd[i], offset + deltas[i], length) else -1
                    else:
                        try:
                            done = os.preadv(seg_fd[i], [aview[apos + hlen:apos + need]], offset + deltas[i])
                        except OSError:
                            done = -1
                    if done != length:
                        why = "read failed"
                        break
                    start += 28
                    if structured:
                        _CHUNK.pack_into(arena, apos, C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE,
                                         C.REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)
                    else:
                        _SIMPLE.pack_into(arena, apos, simple_magic, 0, cookie)
                    if spliced:                  # the header, then the data from the pipe
                        sent = self._send_spliced(c, apos + hlen, length)
                        apos = 0
                        if not sent:
                            break
                        continue
                    apos += need
                    if length >= BIG_READ:       # sent at once, as the daemon's workers do:
                        if not self._flush(c, apos):   # the client waits for it
                            apos = 0
                            break
                        apos = 0
                elif cmd == _FLUSH and not offset and not length:
                    apos = self._room(c, apos, 16)
                    if apos < 0:
                        apos = 0
                        break
                    try:
                        for fd in c.files:
                            os.fdatasync(fd)
                    except OSError:
                        why = "flush failed"
                        break
                    start += 28
                    _SIMPLE.pack_into(arena, apos, C.SIMPLE_REPLY_MAGIC, 0, cookie)
                    apos += 16
                elif cmd == _DISC:
                    start += 28
                    ended = "NBD_CMD_DISC"
                    break
                else:
                    why = "request the worker does not do"
                    break
            if apos:
                self._flush(c, apos)
        except OSError as exc:
            c.start, c.end = start, end
            self._end(c, True, f"reply not sent: {exc}")
            return
        c.start, c.end = start, end
        if ended is not None and c.stalled:
            c.start -= 28                  # the daemon sends the replies, then disconnects
            self._give_back(c, "disconnect with replies unsent")
        elif ended is not None:
            self._end(c, False, ended)
        elif why is not None:
            self._give_back(c, why, hold)
        elif c.stalled:
            self.ep.modify(c.fd, select.EPOLLOUT)
        elif c.tunnel is not None and c.sock.buffered():
            self.ready.add(c)


def main(argv: list[str]) -> None:
    """`worker.py FD [POLL_SECONDS]`: the control socket, and the daemon's poll window limit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the daemon decides when to stop
    ctl = socket.socket(fileno=int(argv[0]))
    if len(argv) > 1:
        busypoll.LIMIT = float(argv[1])
    Worker(ctl).run()


if __name__ == "__main__":
    main(sys.argv[1:])
