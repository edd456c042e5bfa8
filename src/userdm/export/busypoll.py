"""Busy polling before a serving thread sleeps: an adaptive window, as the kernel's haltpoll.

On this kind of machine (a VM whose idle vCPUs halt, `cpuidle_haltpoll` with
`guest_halt_poll_ns=0`), a thread that blocks on a socket or /dev/fuse for the next request
puts its vCPU to sleep, and the request that wakes it pays a halt exit and an IPI through the
hypervisor: tens of microseconds, more than the request itself costs to serve. At queue
depth 1 that wake-up is most of the round trip. Polling the source a little while before
blocking (a non-blocking `recv`, a look at a completion ring) catches the next request of
a client that issues one request after another while the vCPU is still awake: a threaded
Python NBD server at 4 KiB qd1 went from 14k to 37k IOPS here with a 50 us window (nbdkit:
23k), and it spent less CPU per request, since a halt and a wake-up cost more than the poll.

The window adapts as haltpoll's does, so that a client that pauses between requests costs
little: a poll that finds the request keeps the window; a sleep that ends soon after the
window ran out (within `limit`) doubles it, a longer sleep halves it, and below a floor it
closes (0: sleep at once) until a short sleep opens it again. `PollWindow.wait(ready, block)`
is the whole poll for a source with a non-blocking look (epoll, a ring); a caller whose try
raises writes the loop itself:

    deadline = window.deadline()            # 0.0: do not poll
    while ...: try the source without blocking; stop at the deadline or when not pause()
    if nothing came: t = perf_counter(); block; window.slept(perf_counter() - t)

Between two tries the poll yields the CPU (`sched_yield`): a thread or process that could
run there (the client, a kernel worker, another connection's server) goes first, so that
polling only uses time the CPU would have spent halted; without the yield, 4 KiB at qd16
through the FUSE file lost a fifth of its rate to the poll. The poll ends as soon as the
CPUs are wanted: a yield that let someone run long (over BUSY), or more runnable threads on
the machine than CPUs (/proc/loadavg). Unlike the kernel's idle poll, which the scheduler
sees as an idle CPU, a polling thread looks busy: a woken client or kernel worker waits in
some run queue for its turn, where it would have taken the sleeper's CPU at once. With a
CPU hog beside it, loop on the FUSE file at 4 KiB qd1 read 10.5k IOPS polling against 24.7k
sleeping, before this rule. `LIMIT` 0 turns polling off
(`userdm daemon --poll-us 0`).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import DMError

#: the largest window, in seconds, of the windows made from now on (`configure`): the
#: kernel's haltpoll default (guest_halt_poll_ns 200 us). An NBD client at qd1 here turns a
#: request around in 15-30 us; a loop device on a FUSE file, whose requests pass a kernel
#: worker and fio on the way, in 60-100 us (a 50 us window caught none of those)
LIMIT = 200e-6
#: the largest `userdm daemon --poll-us` (a window longer than this is sleeping by other means)
MAX_US = 10_000
#: a yield that took longer than this let another thread or process run long: the CPU is
#: wanted, and the poll gives up (`PollWindow.pause`)
BUSY = 50e-6
#: a window shrunk below this closes (0)
FLOOR = 5e-6
#: a closed window opens at this when a short sleep shows a poll would have paid
START = 10e-6

T = TypeVar("T")
_perf = time.perf_counter
_yield = os.sched_yield


def configure(microseconds: int) -> None:
    """Set the largest window (`userdm daemon --poll-us`; 0: never poll)."""
    global LIMIT
    if not 0 <= microseconds <= MAX_US:
        raise DMError(errno.EINVAL, f"--poll-us {microseconds}: must be from 0 (no polling) to {MAX_US} "
                      "microseconds")
    LIMIT = microseconds / 1e6


_CPUS = len(os.sched_getaffinity(0))
try:
    _LOADAVG: int | None = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
except OSError:
    _LOADAVG = None


def _oversubscribed() -> bool:
    """More threads can run, this one included, than the process has CPUs: one of them waits
    (the kernel's count of runnable threads, /proc/loadavg; 1.6 us to read)."""
    if _LOADAVG is None:
        return False
    try:
        running = os.pread(_LOADAVG, 128, 0).split()[3].split(b"/")[0]
    except (OSError, IndexError):
        return False
    return int(running) > _CPUS


class PollWindow:
    """How long the next poll may last: one per serving thread (not thread-safe)."""

    __slots__ = ("window", "limit")

    def __init__(self, limit: float | None = None) -> None:
        self.limit = LIMIT if limit is None else limit
        self.window = self.limit

    def deadline(self) -> float:
        """When the poll that starts now must give up (perf_counter); 0.0 when not polling."""
        window = self.window
        return _perf() + window if window else 0.0

    def pause(self) -> bool:
        """Yield the CPU between two tries. False when the CPUs are wanted: another thread
        or process ran long meanwhile, or more threads can run than there are CPUs. Then
        stop polling and sleep (the poller's CPU goes to whoever waits for one, and the
        request's wake-up preempts whoever runs, where a polling thread would wait in the
        run queue for its turn)."""
        if not _oversubscribed():     # (first: a yield to a busy queue loses the CPU for a slice)
            before = _perf()
            _yield()
            if _perf() - before < BUSY:
                return True
        self._shrink()
        return False

    def wait(self, ready: Callable[[], T], block: Callable[[], T]) -> T:
        """`ready()` (falsy: nothing yet), tried again while the window lasts and the CPUs are
        not wanted; then `block()`, whose sleep is measured (`slept`)."""
        got = ready()
        if got:
            return got
        deadline = self.deadline()
        while deadline and _perf() < deadline and self.pause():
            got = ready()
            if got:
                return got
        slept = _perf()
        got = block()
        self.slept(_perf() - slept)
        return got

    def slept(self, seconds: float) -> None:
        """The poll found nothing and the thread slept `seconds` before the next request came."""
        limit = self.limit
        if not limit:
            return
        if seconds <= limit:       # a longer poll would have caught it
            window = self.window
            self.window = min(limit, window * 2) if window else START
        else:                      # a pause: polling was wasted
            self._shrink()

    def _shrink(self) -> None:
        window = self.window / 2
        self.window = window if window >= FLOOR else 0.0
