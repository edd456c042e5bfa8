"""What one NBD server may cost the daemon: its limits, their `userdm daemon` options, and
the byte budgets that hold requests back.

`NBDLimits` (all defaults survive a 2-core, 24 GiB machine):
- `max_connections`: connections accepted from the listeners at once (in handshake or
  transmission); one more is closed at once, and the log says so once per burst. Sockets
  handed out through the control socket (`connect_nbd`, `create --exec`/`open`) are not
  counted: the control plane bounds those.
- `handshake_deadline`: seconds a listener's connection has to finish its handshake, however
  slowly it sends; then it is closed (within 0.1 s after it: `deadline.py`). Sockets that
  carry an existing open (`BoundCatalog`) have no deadline.
- `connection_bytes` and `total_bytes`: payload buffer bytes that requests of one connection,
  and of all connections together, may hold. A request over the budget waits (its connection
  stops reading from its socket until bytes are freed); it is never refused for that. Both
  must hold at least one request of the maximum payload (32 MiB).
- `reply_timeout`: seconds a reply may wait for the client to make room for it in the
  socket (the client reads nothing); then the connection is closed. This is what frees the
  budget held by a client that sends requests and never reads the replies.
- `workers`: worker processes that serve connections' READs and WRITEs, and hold
  the TLS sessions (`offload.py`, `tunnel.py`); 0: every connection is served, and every
  TLS session held, in the daemon's process. The daemon's
  option defaults to two per CPU (`default_workers`); in-process servers to 0.

`Budget` counts bytes against one limit; each connection has its own, and every connection
of a server shares the server's total. Buffers that a connection keeps for reuse still
count; a budget that makes someone wait asks every pool registered with it to give back
the buffers it is not using (`reclaim`).
"""

from __future__ import annotations

import argparse
import errno
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...errors import DMError
from ...nbd import constants as C

MiB = 1 << 20
GiB = 1 << 30
MAX_WORKERS = 64


@dataclass(frozen=True)
class NBDLimits:
    """The resource limits of one NBD server (see the module docstring)."""

    max_connections: int = 256
    handshake_deadline: float = 10.0
    connection_bytes: int = 128 * MiB
    total_bytes: int = 1 * GiB
    reply_timeout: float = 60.0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise DMError(errno.EINVAL, f"--nbd-max-connections {self.max_connections}: must be at least 1")
        if not self.handshake_deadline > 0:
            raise DMError(errno.EINVAL, f"--nbd-handshake-deadline {self.handshake_deadline}: "
                          "must be a positive number of seconds")
        if not self.reply_timeout > 0:
            raise DMError(errno.EINVAL, f"--nbd-reply-timeout {self.reply_timeout}: "
                          "must be a positive number of seconds")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise DMError(errno.EINVAL, f"--nbd-workers {self.workers}: must be from 0 to {MAX_WORKERS}")
        if self.connection_bytes < C.MAX_PAYLOAD:
            raise DMError(errno.EINVAL, f"--nbd-connection-bytes {self.connection_bytes}: must hold one "
                          f"request of the maximum payload ({C.MAX_PAYLOAD} bytes)")
        if self.total_bytes < self.connection_bytes:
            raise DMError(errno.EINVAL, f"--nbd-total-bytes {self.total_bytes}: must be at least "
                          f"--nbd-connection-bytes ({self.connection_bytes})")


def parse_size(text: str) -> int:
    """`64M`, `1G`, `4096`, `512K` -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(raw[-1:], 1)
    digits = raw[:-1] if raw[-1:] in units else raw
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 128M, 1G)")
    return int(digits) * scale


def default_workers() -> int:
    """Two NBD worker processes per CPU (started as connections need them, one connection
    each while there are enough): with every connection in workers the daemon's own loop is
    idle, and a worker per connection keeps one client's wait from holding up the others
    (measured on 2 vCPUs, four connections: 4K reads at qd1 with 1, 2 and 4 workers 20-38k,
    34-37k and 54-55k IOPS)."""
    return max(2, min(MAX_WORKERS, 2 * (os.cpu_count() or 1)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `userdm daemon` options of the NBD server's limits."""
    d = NBDLimits()
    parser.add_argument("--nbd-max-connections", type=int, default=d.max_connections, metavar="N",
                        help="daemon: NBD connections at once from the sockets it listens on; more are "
                        f"closed at once (default {d.max_connections})")
    parser.add_argument("--nbd-handshake-deadline", type=float, default=d.handshake_deadline, metavar="SEC",
                        help="daemon: seconds an NBD client has to finish its handshake, then it is "
                        f"closed (default {d.handshake_deadline:g})")
    parser.add_argument("--nbd-connection-bytes", type=parse_size, default=d.connection_bytes, metavar="SIZE",
                        help="daemon: request buffer bytes one NBD connection may hold; further requests "
                        f"wait (default {d.connection_bytes // MiB}M, at least 32M)")
    parser.add_argument("--nbd-total-bytes", type=parse_size, default=d.total_bytes, metavar="SIZE",
                        help="daemon: request buffer bytes all NBD connections together may hold; "
                        f"further requests wait (default {d.total_bytes // GiB}G)")
    parser.add_argument("--nbd-reply-timeout", type=float, default=d.reply_timeout, metavar="SEC",
                        help="daemon: seconds an NBD reply may wait for a client that reads nothing, "
                        f"then the connection is closed (default {d.reply_timeout:g})")
    workers = default_workers()
    parser.add_argument("--nbd-workers", type=int, default=workers, metavar="N",
                        help="daemon: worker processes that serve the READs and WRITEs of NBD "
                        "connections to devices mapped onto files (a connection alone hands its big "
                        "READs back to the daemon's threads), and hold TLS sessions; 0 serves all in "
                        "the daemon "
                        f"(default {workers}: two per CPU)")


def from_options(opts: argparse.Namespace) -> NBDLimits:
    return NBDLimits(max_connections=opts.nbd_max_connections,
                     handshake_deadline=opts.nbd_handshake_deadline,
                     connection_bytes=opts.nbd_connection_bytes, total_bytes=opts.nbd_total_bytes,
                     reply_timeout=opts.nbd_reply_timeout, workers=opts.nbd_workers)


class Budget:
    """Bytes held against `limit`: `take` waits for room, `give` returns bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: threads waiting in `take` (read without the lock: a hint to give buffers back)
        self.waiting = 0
        self._cond = threading.Condition(threading.Lock())
        self._pools: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def register(self, pool: Any) -> None:
        """`pool.reclaim()` gives back the bytes of buffers it keeps but does not use."""
        self._pools.add(pool)

    def try_take(self, n: int) -> bool:
        with self._cond:
            if self.used + n <= self.limit:
                self.used += n
                return True
            return False

    def take(self, n: int, cancelled: Callable[[], bool]) -> bool:
        """Hold `n` more bytes, waiting while they do not fit; False if `cancelled()` became
        true meanwhile (the connection is closing; `wake` makes waiters look). A waiter asks
        the registered pools to give back the buffers they keep (first after it counts as
        waiting, so that a buffer released meanwhile is given back rather than kept)."""
        with self._cond:
            if self.used + n <= self.limit:
                self.used += n
                return True
            self.waiting += 1
        try:
            while True:
                for pool in list(self._pools):
                    pool.reclaim()
                with self._cond:
                    if self.used + n > self.limit and not cancelled():
                        self._cond.wait(1.0)
                    if self.used + n <= self.limit:
                        self.used += n
                        return True
                    if cancelled():
                        return False
        finally:
            with self._cond:
                self.waiting -= 1

    def give(self, n: int) -> None:
        if n:
            with self._cond:
                self.used -= n
                self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
