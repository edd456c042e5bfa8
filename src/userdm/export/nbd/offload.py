"""Serving NBD connections from worker processes: the daemon's side (issue 18).

One Python process runs one thread at a time, so however many connections are open, the
daemon serves them on one CPU. `Offloader` moves the data path of a connection to a worker
process (`worker.py`) while that is exactly what the daemon would do:

- the connection is plain, or its TLS session is in that worker (a session cannot move: see
  below), came from a listener, and is at a request boundary with nothing in flight;
- it is plain or tunnelled, even alone: one connection served by a worker measured faster
  than in its daemon thread at 4 KiB (qd1 27.5k -> 33.6k IOPS, qd16 reads 194k -> 210k,
  writes 152k -> 161k, in one run of `bench/nbd.py`), and a worker splices big READs and
  WRITEs (`splice.py`) with no copy of its own. Only where it cannot (a file open with
  O_DIRECT) do the daemon's threads copy big READs faster, on two CPUs at once (1 MiB reads
  at qd8 2.9 against 2.4 GB/s): a worker hands the daemon's only plain connection back at
  its first such READ, and it is offered again RETRY seconds later;
- its device lends its collapsed table (`MappedDevice.lend_flat`: not suspended or
  suspending, not interposed, not dead) and every segment of it is a file (`FileSink`).

Everything else stays in the daemon: the handshake, the control plane, the opens, events. The
worker serves READ, WRITE and FLUSH and hands the connection back, unserved, at the first
request it does not do, or that fails (the daemon then answers it: its errno, its failure
events). The lent Flat counts as one user of it, so when the device drops it (suspend start,
resume, load, remove, or any of these below it) the suspend waits for it: the Flat's watcher
sends `revoke`, the worker hands the connection back between two requests, and only then is
the Flat returned and the suspend's drain goes on; the connection's next request then waits
for the resume in the daemon, as always. A file that dies (deleted, failed) is seen within
DEAD_CHECK seconds and the connection revoked too.

A worker that dies takes its connections with it: the daemon closes them (their streams are
in an unknown state) and keeps serving the others; a new worker starts on the next hand-off.
`stop()` takes every connection back before the server stops them as usual; `close()` then
ends the workers.

TLS connections (`tunnel.py`): at NBD_OPT_STARTTLS (`start_tls`, after the ACK) the client's
socket goes to a worker, which runs the TLS handshake and then relays plaintext over a new
socketpair whose other end the connection keeps as its socket: the daemon serves the rest
of the handshake and every request the worker does not do as for a plaintext connection.
Such a connection is offered to a worker even when it is the only one open (relaying costs
more than serving in the daemon), and always to the worker that holds its session, which
then serves it over that session (DIRECT mode) until it hands it back to relaying. Without
a certificate directory (a server made in process with a context only) TLS stays in the
daemon, as with no workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ...dm import collapse
from .. import busypoll
from . import worker as wire

log = logging.getLogger("userdm.nbd")

#: seconds between looks at whether a file under an offloaded connection died
DEAD_CHECK = 0.1
#: seconds a connection waits before it is offered to a worker again after a refusal
RETRY = 1.0
#: seconds `stop` waits for the workers to hand their connections back
STOP_GRACE = 5.0


@dataclass(eq=False)
class _Tunnel:
    """A connection whose TLS session a worker holds (`tunnel.py`)."""

    id: int
    worker: "_Worker"
    owner: "Offloader"

    def release(self) -> None:
        """The connection ended: the worker's tunnel closes by itself (EOF)."""
        with self.owner._lock:
            self.worker.tunnels.discard(self.id)
            self.owner._tunnels.pop(self.id, None)


@dataclass(eq=False)
class _Lent:
    conn: object          # Connection
    device: object        # the MappedDevice that lent `flat`
    flat: collapse.Flat
    watcher: object
    worker: "_Worker"
    disks: list


class _Worker:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "userdm.export.nbd.worker", str(theirs.fileno()),
                                          repr(busypoll.LIMIT)],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_worker_env())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.ctl = ours
        self.alive = True
        self.ids: set[int] = set()
        self.tunnels: set[int] = set()      # TLS sessions it holds
        self.send_lock = threading.Lock()

    def load(self) -> int:
        return len(self.ids) + len(self.tunnels)

    def send(self, msg: dict, fds: list[int] = ()) -> bool:
        try:
            with self.send_lock:
                wire.send(self.ctl, msg, fds)
            return True
        except OSError:
            return False


class Offloader:
    """Hands connections to at most `workers` worker processes (started on first use)."""

    def __init__(self, workers: int, tls=None) -> None:  # noqa: ANN001
        self.count = workers
        #: the server's TLS (`tls.ServerTLS`): its certificate directory goes to the workers
        self.tls = tls
        self._tunnels: dict[int, _Tunnel] = {}
        #: seconds before a connection it refused is offered again
        self.retry = RETRY
        self._workers: list[_Worker] = []
        self._lent: dict[int, _Lent] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._monitor: threading.Thread | None = None
        #: connections handed to a worker and handed back, over the server's life
        self.handed = 0
        self.returned = 0

    def offloaded(self) -> int:
        """Connections a worker serves now."""
        with self._lock:
            return len(self._lent)

    # ---- hand-off ---------------------------------------------------------------------

    def start_tls(self, conn, initial: bytes, deadline: float | None) -> socket.socket | None:  # noqa: ANN001
        """STARTTLS was acknowledged on `conn`'s socket: hand the socket (and `initial`, the
        bytes received after the option) to a worker, which runs the TLS handshake before
        `deadline` (time.monotonic()) and relays; returns the connection's new socket, its
        end of the relay (None: no worker, TLS stays here)."""
        sock = conn.sock
        tls = self.tls
        if (tls is None or tls.directory is None or self._stopping or sock.__class__ is not socket.socket
                or getattr(conn.catalog, "open_until_eof", False)):
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ident = next(self._ids)
        msg = {"op": "tls", "tunnel": ident, "certs": tls.directory, "verify_peer": tls.verify_peer,
               "left": None if deadline is None else max(0.0, deadline - time.monotonic()),
               "initial": len(initial), "reply_timeout": conn.reply_timeout}
        extra = [wire.blob(initial)] if initial else []
        tunnel = None
        try:
            with self._lock:
                worker = None if self._stopping else self._worker()
                if worker is not None and worker.send(msg, [sock.fileno(), theirs.fileno(), *extra]):
                    tunnel = _Tunnel(ident, worker, self)
                    worker.tunnels.add(ident)
                    self._tunnels[ident] = tunnel
        finally:
            theirs.close()
            for fd in extra:
                os.close(fd)
            if tunnel is None:
                ours.close()
        if tunnel is None:
            return None
        conn.tunnel = tunnel
        sock.close()       # the worker holds the client's socket now
        return ours

    def take(self, conn, handle, pending: memoryview, wait_idle, alone: bool = False) -> bool:  # noqa: ANN001
        """Give `conn` (at a request boundary; `pending`: the request bytes it holds) to a
        worker; `wait_idle()` waits until its dispatched requests are answered. False: it
        stays here (and is offered again after RETRY seconds). A connection whose TLS
        session a worker holds goes to that worker, with its end of the relay. A plain
        connection `alone` (no other open) comes back at its first big READ it cannot splice."""
        if self._stopping or conn.sock.__class__ is not socket.socket or getattr(conn.catalog, "open_until_eof", False):
            return False
        tunnel = conn.tunnel
        if tunnel is not None and not tunnel.worker.alive:
            return False
        device = getattr(handle, "device", None)
        lend = getattr(device, "lend_flat", None)
        if lend is None or device.suspended or device.interposers:
            return False
        wait_idle()
        ident = next(self._ids)
        watcher = lambda: self.revoke(ident)  # noqa: E731
        flat = lend(watcher)
        if flat is None:
            return False
        files = collapse.file_segments(flat)
        if files is None or len(files[1]) > wire.MAX_FDS - 2:
            device.return_flat(flat, watcher)
            return False
        segments, sinks = files
        export = conn.export
        msg = {"op": "serve", "id": ident, "size": device.size, "structured": export.structured,
               "min_block": export.min_block, "max_payload": export.max_payload,
               "read_only": export.read_only, "files": len(sinks), "segments": segments,
               "pending": len(pending), "tunnel": tunnel.id if tunnel is not None else None,
               "alone": alone}
        fds = [conn.sock.fileno(), *(s.fd for s in sinks)]
        extra = [wire.blob(pending)] if len(pending) else []
        try:
            with self._lock:
                worker = None if self._stopping else tunnel.worker if tunnel is not None else self._worker()
                if worker is None or not worker.alive or flat.retired:
                    device.return_flat(flat, watcher)
                    return False
                lent = _Lent(conn, device, flat, watcher, worker, [s.disk for s in sinks])
                self._lent[ident] = lent
                worker.ids.add(ident)
                if not worker.send(msg, fds + extra):
                    del self._lent[ident]
                    worker.ids.discard(ident)
                    device.return_flat(flat, watcher)
                    return False
                self.handed += 1
        finally:
            for fd in extra:
                os.close(fd)
        return True

    def _worker(self) -> _Worker | None:
        """With `_lock` held: a live worker with no connection, else a new one while fewer
        than `count` are alive, else the one with the fewest connections (a connection a
        process, as long as there are workers: at qd1 each waits for its client)."""
        self._workers = [w for w in self._workers if w.alive]
        idle = [w for w in self._workers if not w.load()]
        if idle:
            return idle[0]
        if len(self._workers) < self.count:
            try:
                w = _Worker()
            except OSError as exc:
                log.warning("nbd: no worker process (%s): connections are served in the daemon", exc)
                return min(self._workers, key=_Worker.load, default=None)
            self._workers.append(w)
            threading.Thread(target=self._read, args=(w,), name="nbd-offload", daemon=True).start()
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._watch_disks, name="nbd-offload-watch", daemon=True)
                self._monitor.start()
            return w
        return min(self._workers, key=_Worker.load)

    def revoke(self, ident: int) -> None:
        """Ask for connection `ident` back (a Flat watcher: must not block)."""
        with self._lock:
            lent = self._lent.get(ident)
        if lent is not None:
            lent.worker.send({"op": "revoke", "id": ident})

    # ---- what workers say ---------------------------------------------------------------

    def _read(self, w: _Worker) -> None:
        try:
            while True:
                try:
                    msg, fds = wire.receive(w.ctl)
                except OSError:
                    msg, fds = None, []
                if msg is None:
                    break
                self._message(msg, fds)
        finally:
            self._worker_gone(w)

    def _message(self, msg: dict, fds: list[int]) -> None:
        if msg["op"] == "tls_failed":
            log.info("nbd: %s, closing the connection", msg["why"])
            return
        with self._cond:
            lent = self._lent.pop(msg.get("id"), None)
            if lent is not None:
                lent.worker.ids.discard(msg["id"])
                self._cond.notify_all()
        if msg["op"] == "back":
            data = wire.read_blob(fds[0], msg["left"] + msg["unsent"]) if fds else b""
        else:
            for fd in fds:
                os.close(fd)
            data = b""
        if lent is None:
            return
        # the Flat first: a suspend waiting for it goes on, and the connection's next request
        # then waits for the resume here
        lent.device.return_flat(lent.flat, lent.watcher)
        conn = lent.conn
        if msg["op"] == "back":
            self.returned += 1
            left, unsent = data[:msg["left"]], data[msg["left"]:]
            if msg.get("hold"):      # a client that reads nothing, or a lone one's big reads
                conn.offload_after = time.perf_counter() + self.retry
            log.debug("nbd: connection back from its worker: %s", msg.get("why"))
            threading.Thread(target=conn.take_back, args=(left, unsent), name="nbd-conn", daemon=True).start()
        else:
            log.debug("nbd: offloaded connection ended: %s", msg.get("why"))
            threading.Thread(target=conn.end_offloaded, args=(bool(msg.get("abort")),),
                             name="nbd-conn", daemon=True).start()

    def _worker_gone(self, w: _Worker) -> None:
        """The worker exited (or its socket broke): close its connections, their streams are
        in an unknown state."""
        with self._cond:
            w.alive = False
            gone = [self._lent.pop(i) for i in list(w.ids) if i in self._lent]
            w.ids.clear()
            for i in w.tunnels:           # their connections see EOF on their end of the relay
                self._tunnels.pop(i, None)
            w.tunnels.clear()
            self._cond.notify_all()
        if gone and not self._stopping:
            log.warning("nbd: worker process %d ended (%s): closing its %d connection(s)", w.proc.pid,
                        _exit_status(w.proc), len(gone))
        for lent in gone:
            lent.device.return_flat(lent.flat, lent.watcher)
            threading.Thread(target=lent.conn.end_offloaded, args=(True,), name="nbd-conn", daemon=True).start()
        try:
            w.ctl.close()
        except OSError:
            pass
        _reap(w.proc)

    def _watch_disks(self) -> None:
        """Revoke connections whose files died (the daemon's own path then fails them)."""
        while not self._stopping:
            time.sleep(DEAD_CHECK)
            with self._lock:
                lents = list(self._lent.items())
            for ident, lent in lents:
                if lent.device.dead or any(d.dead for d in lent.disks):
                    self.revoke(ident)

    # ---- stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Take every connection back (the server then stops them as usual; TLS ones through
        their workers, which relay until `close`)."""
        with self._cond:
            self._stopping = True
            idents = list(self._lent)
        for ident in idents:
            self.revoke(ident)
        deadline = time.monotonic() + STOP_GRACE
        with self._cond:
            while self._lent and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    def close(self) -> None:
        """End the workers (after `stop` and after the server's connections ended)."""
        self.stop()
        with self._cond:
            workers = list(self._workers)
        for w in workers:
            try:
                w.ctl.shutdown(socket.SHUT_RDWR)    # the worker sees EOF and exits
            except OSError:
                pass
        for w in workers:
            _reap(w.proc)


def _worker_env() -> dict[str, str]:
    """The daemon's environment, with the tree this userdm was imported from first on the
    path (the worker runs the same code, however the daemon found it)."""
    tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": tree + (os.pathsep + path if path else "")}


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _exit_status(proc: subprocess.Popen) -> str:
    code = proc.poll()
    if code is None:
        return "its socket broke"
    return f"signal {-code}" if code < 0 else f"status {code}"

