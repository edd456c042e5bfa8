"""Replies to /dev/fuse held a moment and sent several at a time: one `io_uring_enter` for a batch.

A reply written to /dev/fuse completes its request in the writer's system call: for a loop
device on the FUSE file, that completion goes to the CPU that issued the request (an IPI, a
VM exit on this machine) or to the block softirq of the writer's CPU, whose `ksoftirqd` then
preempts the writer as the call returns: once per reply (docs/fuse.md). A serving thread
that finds more requests queued behind the one it served can hold the reply, serve the next
ones, and send the held replies together: their completions then come in one system call
(fewer preemptions and IPIs), the loop device and fio get them at once and queue the next
ones at once, and the thread makes one system call instead of one per reply. /dev/fuse
takes one reply per `write`, so a batch goes out as one WRITE per reply, submitted with one
`io_uring_enter` on the thread's own small ring (`uring.Ring.write_all`; the writes complete
inside that call).

Holding must not starve the client: a thread that holds every reply it owes empties the
kernel's queue, and everybody then waits for the batch (loop on the FUSE file, 4 KiB reads
at qd16, in process: 105-110k IOPS holding up to 6-12 replies, 82k holding 16, 77k holding
none). So the number of replies a thread holds at most, `limit`, follows the depth of the queue:

- after GROW x `limit` requests read in a row (the queue never ran dry meanwhile) it grows
  by one, up to MOST;
- when the device has no request (`drained`), the thread sends what it holds; if it read
  fewer than 2 x `limit` requests since the queue last ran dry, those were the whole queue,
  and `limit` drops to half of them;
- below FEWEST nothing is held: at low queue depths a batch saves less than its `io_uring`
  call costs through ctypes, and each held reply waits for the others (qd4: 65k IOPS
  sending at once, 58k holding two). With GROW 8, a queue of 4 runs dry too often for
  `limit` to reach FEWEST (GROW 2 and 4 let it, and held all 4: 50k and 59k against 63k).

A held reply also leaves before anything that may wait: `send` is the thread's `LentTables`
hook (`lent.py`, called wherever the thread gives its tables back: before it sleeps,
follows, or serves a request through the open, which a suspended device may hold), so a
request held by a suspended device never holds the replies of others. And a reply waits at
most HOLD_AGE, whatever the queue. Replies of any other kind (and big ones) are sent at once.

Where io_uring is not available (an old kernel, a seccomp filter in a container), replies
are sent one `write` each, as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import time

from . import protocol as P
from .uring import Ring

log = logging.getLogger("userdm.fuse")

#: `limit` grows by one after GROW x `limit` requests read in a row
GROW = 8
#: replies held at most, and the fewest worth holding
MOST = 16
FEWEST = 4
#: a batch of fewer replies goes out one `write` each (cheaper than the ring's ctypes call)
RING_MIN = 3
#: seconds a held reply waits at most (a slow backing file must not hold the others long)
HOLD_AGE = 100e-6
#: the replies that are held: up to a READ of this many bytes (bigger ones are spliced or
#: sent at once) and every WRITE reply
SLOT = P.OUT_HEADER_SIZE + 64 * 1024
#: errors of a reply that mean the request or the connection is gone (not worth a log line)
GONE = (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED, errno.ENOTCONN, errno.EBADF)

_perf = time.perf_counter


def write_reply(fd: int, out: bytes | memoryview, where: str) -> None:
    """Write one reply to the device fd `fd` (of the mount at `where`); one whose request or
    connection is gone is dropped without a log line."""
    try:
        os.write(fd, out)
    except OSError as exc:
        if exc.errno not in GONE:
            log.error("FUSE at %s: cannot send a reply: %s", where, exc)


class Replies:
    """The replies one serving thread holds for the device fd `fd` (not thread-safe)."""

    __slots__ = ("fd", "where", "limit", "run", "streak", "held", "since", "_ring", "_mem", "_slots", "_base",
                 "_sizes", "_given", "usable", "grow_at", "holding")

    def __init__(self, fd: int, where: str, usable: bool = True) -> None:
        self.fd = fd
        self.where = where              # the mount, for log lines
        self.limit = 1
        self.run = 0                    # requests read since the device last had none
        self.streak = 0                 # the same, since `limit` last grew
        self.held = 0
        self.since = 0.0                # when the first held reply was made
        self._ring: Ring | None = None
        self._mem: mmap.mmap | None = None
        self._slots: list[memoryview] = []
        self._base = 0
        self._sizes = [0] * MOST
        self._given = 0                 # the slot `buffer` handed out last
        #: False: send every reply at once (no ring on this kernel, or not x86: `uring.py`)
        self.usable = usable
        self._set_limit(1)

    def read(self) -> None:
        """A request was read: after GROW x `limit` in a row without the queue running dry,
        hold one more."""
        self.run += 1
        self.streak += 1
        if self.streak >= self.grow_at:
            self._set_limit(self.limit + 1)

    def drained(self) -> None:
        """The device had no request: send what is held. The requests read since it last ran
        dry were the queue: hold at most half as many from now on. (Nothing to do while `run`
        is 0: held replies count in it.)"""
        run = self.run
        self.run = self.streak = 0
        if self.held:
            self.send()
        if 2 <= run < 2 * self.limit:
            self._set_limit(run // 2)

    def _set_limit(self, limit: int) -> None:
        if not self.usable:
            limit = 1
        limit = min(limit, MOST)
        if limit >= FEWEST and self._ring is None:
            self._start()
            if not self.usable:
                limit = 1
        self.limit = limit
        self.streak = 0
        self.grow_at = GROW * limit if limit < MOST else 1 << 62
        #: whether the next small READ or WRITE reply is to be held (`buffer`, `hold`)
        self.holding = limit >= FEWEST

    def buffer(self) -> memoryview:
        """Where the next held reply is to be built (header and data; SLOT bytes)."""
        self._given = i = self.held
        return self._slots[i]

    def hold(self, out: bytes | memoryview) -> None:
        """Hold a reply built in `buffer()` (a view of its start) or given as bytes; the batch
        leaves when it is full or its first reply has waited HOLD_AGE."""
        i = self.held
        if out.__class__ is memoryview:
            size = out.nbytes
            if i != self._given:      # the held ones left while it was built (`send`)
                self._slots[i][:size] = out
        else:
            size = len(out)
            self._slots[i][:size] = out
        self._sizes[i] = size
        self.held = i + 1
        if not i:
            self.since = _perf()
        elif i + 1 >= self.limit or _perf() - self.since >= HOLD_AGE:
            self.send()

    def send(self) -> None:
        """Send every held reply (the hook `LentTables` calls before the thread may wait)."""
        n = self.held
        if not n:
            return
        self.held = 0
        ring = self._ring
        if n < RING_MIN or ring is None:
            for i in range(n):
                self._write(i)
            return
        base, sizes = self._base, self._sizes
        try:
            failed = ring.write_all(self.fd, [(base + i * SLOT, sizes[i]) for i in range(n)])
        except OSError as exc:        # the ring failed: what it did not take goes by write
            log.warning("FUSE at %s: batched replies off: %s", self.where, exc)
            self.usable = False
            self._set_limit(1)
            self._close_ring()
            for i in range(n):
                self._write(i)
            return
        for _, res in failed:
            if -res not in GONE:
                log.error("FUSE at %s: cannot send a reply: %s", self.where, os.strerror(-res))

    def _write(self, i: int) -> None:
        write_reply(self.fd, self._slots[i][:self._sizes[i]], self.where)

    def _start(self) -> None:
        """The ring and the buffers, at the first time replies are to be held."""
        try:
            self._ring = Ring(2 * MOST)
        except OSError as exc:
            log.info("FUSE at %s: replies are sent one by one (no io_uring: %s)", self.where, exc)
            self.usable = False
            return
        self._mem = mmap.mmap(-1, MOST * SLOT)
        view = memoryview(self._mem)
        self._slots = [view[i * SLOT:(i + 1) * SLOT] for i in range(MOST)]
        first = ctypes.c_char.from_buffer(self._mem)
        self._base = ctypes.addressof(first)
        del first                      # (an exported buffer could not be closed)

    def _close_ring(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            with ring.lock:
                ring.close()
            ring.release_fd()

    def close(self) -> None:
        """Send what is held; free the ring and the buffers (the thread ends)."""
        try:
            self.send()
        finally:
            self._close_ring()
            self.usable = False
            self._set_limit(1)
            # (the memory goes with the last view of it: the thread may still hold one)
            self._slots = []
            self._mem = None
