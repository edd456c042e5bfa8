"""One thread that serves the small requests of many NBD connections (epoll), so that
connections do not hand the GIL to each other.

With one reader thread per connection, four busy connections cost each request two more
GIL hand-offs (futex wake-ups, threads woken on an idle CPU): 8 us of daemon CPU per 4 KiB
request instead of 4.8 with one connection. Here one thread waits on every connection's
socket at once and runs what `Connection.loop_pass` can finish without waiting: small
READs, WRITEs and CACHEs whose bytes have arrived, and replies the socket takes at once.
Anything else (a request for the workers, FUA, FLUSH, a big WRITE, a reply the client does
not read, EOF, DISC, a protocol error, a device that turned out slow) hands the connection
to a thread of its own (`Connection.resume_threaded`), which serves it as before and gives
it back once it has run only small requests for a while (`Connection` decides when).

A device call may wait (a suspended device, a slow remote one): the loop must never stall
the other connections for it. A watchdog thread looks every TICK seconds (IDLE_TICK at most
while the loop has nothing to do) whether the loop thread has been in one connection's
pass, without finishing a request, for more than STALL seconds; then it takes that connection out of the loop and starts a new loop thread for
the others. The stuck thread, once its request returns, goes on serving that connection
alone, in a thread of its own, as if it had been handed over (see `_run`).

With nothing to do, the loop thread polls epoll for up to `--poll-us` before it sleeps
(`busypoll.py`).

A connection joins the loop only while two or more connections are in the transmission
phase (`crowded`): one connection alone is served by its own thread (or a worker process,
see `offload.py`), which costs one system call less per request than a wait on epoll.

TLS connections stay in their own threads unless `tls` is set: the loop serves them
correctly (non-blocking TLS stream, records already in the session served without a wait),
but their encryption runs outside the GIL, in parallel when each connection has its thread,
and serialised in the loop; four TLS connections measured 0.87-0.99x with the loop.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import threading
import time
from typing import Protocol

from ..busypoll import PollWindow

log = logging.getLogger("userdm.nbd")

TICK = 0.01      # how often the watchdog looks while the loop serves requests ...
IDLE_TICK = 0.25  # ... and at most while it has connections but nothing to do
STALL = 0.05     # a pass that has not finished a request for this long is taken out of the loop


class Connection(Protocol):
    """What the loop needs of a connection (`connection.Connection`)."""

    sock: socket.socket
    fd: int
    tls: bool

    def buffered(self) -> bool: ...
    def loop_pass(self, lp: "ServeLoop", gen: int) -> bool: ...
    def resume_threaded(self) -> None: ...
    def abort(self) -> None: ...


class ServeLoop:
    """The event loop of one NBD server (see the module docstring)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._conns: dict[int, Connection] = {}
        self._ready: collections.deque[Connection] = collections.deque()
        self._lock = threading.Lock()
        self._nonempty = threading.Event()
        #: which loop thread owns the loop (a new one starts when the watchdog takes over)
        self.gen = 0
        #: the connection whose pass runs, and when its last request ended (or the pass began)
        self.current: Connection | None = None
        self.since = 0.0
        #: passes run (the watchdog looks less often while this does not move)
        self.passes = 0
        #: the connection the watchdog took from each stuck loop thread (by its generation)
        self._stolen: dict[int, Connection] = {}
        #: connections in the transmission phase; `crowded`: two or more
        self.active = 0
        self.crowded = False
        #: TLS connections join the loop too (off: they keep their threads, see above)
        self.tls = False
        #: hands connections to worker processes while crowded (`offload.Offloader`), or None
        self.offload = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._watchdog: threading.Thread | None = None

    # ---- membership -------------------------------------------------------------------

    def entered(self, delta: int) -> None:
        """A connection entered (+1) or left (-1) the transmission phase."""
        with self._lock:
            self.active += delta
            self.crowded = self.active >= 2

    def add(self, conn: Connection) -> bool:
        """Serve `conn` from the loop (its thread hands it over); False if stopping."""
        fd = conn.fd = conn.sock.fileno()
        conn.tls = conn.sock.__class__ is not socket.socket
        with self._lock:
            if self._stopping:
                return False
            self._conns[fd] = conn
            self._epoll.register(fd, select.EPOLLIN)
            if conn.buffered():
                self._ready.append(conn)
                self._wake()
            self._nonempty.set()
            if not self._threads:
                self._start_thread()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="nbd-watchdog", daemon=True)
                self._watchdog.start()
        return True

    def served(self) -> int:
        """How many connections the loop serves now."""
        with self._lock:
            return len(self._conns)

    def _remove(self, conn: Connection) -> None:
        """With `_lock` held: take `conn` out of the loop."""
        fd = conn.fd
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
        if not self._conns:
            self._nonempty.clear()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _start_thread(self) -> None:
        """With `_lock` held: a loop thread for generation `gen`."""
        t = threading.Thread(target=self._run, args=(self.gen,), name="nbd-loop", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [t]
        t.start()

    # ---- the loop ---------------------------------------------------------------------

    def _run(self, gen: int) -> None:
        epoll, conns, ready, lock = self._epoll, self._conns, self._ready, self._lock
        wake_r = self._wake_r
        perf = time.perf_counter
        poll = epoll.poll
        window = PollWindow()
        look = functools.partial(poll, 0)
        while True:
            try:
                # nothing to do: poll a little before sleeping (`busypoll.py`)
                events = poll(0) if ready else window.wait(look, poll)
            except InterruptedError:
                continue
            if self._stopping:
                return
            while ready:     # (other threads append: take them one by one)
                events.append((ready.popleft().fd, 0))
            for fd, _ in events:
                conn = conns.get(fd)
                if conn is None:
                    if fd == wake_r:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                    continue   # handed over or taken out since the wait
                with lock:
                    if self.gen != gen:
                        return self._adopt(gen)
                    self.current = conn
                    self.since = perf()
                    self.passes += 1
                try:
                    stay = conn.loop_pass(self, gen)
                except Exception:   # noqa: BLE001 - a bug must not stop the loop for everyone
                    log.exception("nbd: loop pass failed")
                    conn.abort()
                    stay = False
                if self.gen != gen:
                    return self._adopt(gen)
                self.current = None
                if stay:
                    if conn.tls and conn.buffered():
                        ready.append(conn)
                    continue
                with lock:
                    self._remove(conn)
                threading.Thread(target=conn.resume_threaded, name="nbd-conn", daemon=True).start()

    def _adopt(self, gen: int) -> None:
        """The loop thread of generation `gen` was stuck and replaced: serve the connection
        the watchdog took out of the loop (the one this thread was serving) in this
        thread, alone."""
        with self._lock:
            conn = self._stolen.pop(gen, None)
        if conn is not None:
            conn.resume_threaded()

    def _watch(self) -> None:
        perf = time.perf_counter
        tick, passes = TICK, -1
        while not self._stopping:
            if not self._nonempty.wait(1.0):
                continue
            time.sleep(tick)
            conn, since = self.current, self.since
            if conn is None and self.passes == passes:
                tick = min(tick * 2, IDLE_TICK)   # idle connections: no 100 wake-ups a second
            else:
                tick = TICK
            passes = self.passes
            if conn is None or perf() - since < STALL:
                continue
            with self._lock:
                if self._stopping or self.current is not conn or self.since != since:
                    continue
                log.debug("nbd: a request held the loop for %.3fs; a new loop thread serves the "
                          "other connections", perf() - since)
                self._stolen[self.gen] = conn
                self.gen += 1
                self.current = None
                self._remove(conn)
                self._start_thread()

    # ---- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """End the loop threads (the server has ended every connection first)."""
        with self._lock:
            self._stopping = True
            self._nonempty.set()
            self._wake()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(1.0)
        if self._watchdog is not None:
            self._watchdog.join(2.0)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
