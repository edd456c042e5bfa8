"""A thin FUSE server: /dev/fuse, mount(2), and threads that move messages to `DeviceOperations`.

`Session.mount()` opens /dev/fuse and mounts it with the mount system call, as fusermount does
for root (`fd=N,rootmode=40000,user_id=...,group_id=...`); no libfuse is involved. Each
serving thread has its own clone of the device fd (FUSE_DEV_IOC_CLONE: the kernel answers a
request only on the fd it was read from, so a thread held by a suspended device holds only
its own request) and its own preallocated request and reply buffers.

The threads take turns (leader/followers): one thread at a time, the leader, reads requests
(nonblocking; when none is queued it waits in epoll) and serves each itself: `ops.serve`
answers it, the reply leaves in one `os.write`, or, while more requests are queued behind
it, is held and leaves with the next ones in one `io_uring_enter` (`replies.py`). The
others wait on a condition to lead. No request is handed between threads, and only one
thread wants the GIL, so a stream of small requests costs no thread wake-ups (with several
threads reading the device, GIL and lock hand-offs cost more CPU than serving: measured in
docs/fuse.md). A READ's data is read by the device straight into the reply buffer behind
the header and a WRITE's data is a view of the request buffer: no copies besides the
kernel's. A big READ that lies in one file is spliced
instead (file -> the thread's pipe -> /dev/fuse: the page cache is copied once, straight into
the reader's pages; `ops.SPLICE_MIN`).

- the leader steps down before it serves a big request (a copy of 64 KiB or more): another
  thread reads the next one meanwhile (a new one only while fewer than BIG_THREADS serve), so
  big reads and writes are copied on both CPUs. For BIG_WINDOW after a big request, the
  threads back from one read beside the leader instead of waiting to lead: a stream of big
  requests is served like a pool, with no hand-off per request. A thread woken in epoll
  always reads before it may stop reading (EPOLLEXCLUSIVE gives a request's wake-up to one);
- a watchdog deposes a leader that has served one request for a whole STALL_TICK (I/O to a
  suspended device, a slow backend): a follower, or a new thread, leads, up to MAX_THREADS
  threads; the deposed one follows when its request is done. When nobody leads and no thread
  took a request for a whole tick (big requests held: the leader stepped down without a new
  thread), it calls a follower or starts a thread. Requests that block never stop the rest.
  A follower idle for IDLE_EXIT seconds ends while MAX_IDLE others wait;
- FUSE over io_uring (when the kernel offers it at INIT and `ring` is on): after INIT the
  session registers RING_ENTRIES entries per CPU queue (`RingEntry`: header and payload
  buffers) with an io_uring (`uring.Ring`), and a second team of threads serves them the same
  way: its leader submits the commits pushed so far and waits in the ring for completions
  (entries that got requests), then serves them in place (`ops.serve_entry`) and pushes each
  commit, which also fetches the entry's next request. One system call thus answers a batch
  and fetches the next; a thread that no longer leads submits its own commit at once. More
  entries are registered while fewer than RING_SPARE of a queue wait, since requests held by
  suspended devices hold their entries. INTERRUPT and FORGET still come on /dev/fuse;
- the mount unmounted from outside: reads fail with ENODEV, the threads end and `on_end` runs;
- `stop()` wakes the waiting threads (a pipe, a NOP in the ring), closes the ring (its
  commands hold the connection), severs the connection without waiting for
  requests held by suspended devices (every device fd is replaced by /dev/null: the kernel
  aborts the connection when its last one goes, failing what is pending; late replies go
  nowhere), and detaches the mount lazily.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import platform
import select
import struct
import threading
import time
from time import monotonic
from collections import deque
from collections.abc import Callable

from ...errors import DMError
from ..busypoll import PollWindow
from . import protocol as P
from .lent import LentTables
from .replies import GONE as REPLY_GONE, Replies, write_reply
from .ops import MAX_WRITE, REPLY_BUFFER, REQUEST_BUFFER, SPLICE_MIN, DeviceOperations, drain
from .uring import Ring
from .unmount import is_fuse_mount, lazy_unmount

log = logging.getLogger("userdm.fuse")

MIN_THREADS = 2      # at start: the leader and one follower
MAX_THREADS = 64     # requests served (or held in suspended devices) at once
STALL_TICK = 0.001   # a leader serving one request for a whole tick is deposed
#: threads that serve big requests at once: one per CPU (more only queue for the GIL and
#: spin on the backing file's inode lock: on 2 CPUs, 1 MiB writes through loop at qd4 went
#: from 2.73-2.78 GB/s with 4 to 3.05-3.17 with 2)
BIG_THREADS = max(2, len(os.sched_getaffinity(0)))
BIG_WINDOW = 0.01    # after a big request, threads that served one read beside the leader this long
PARK_TICKS = 100     # the watchdog parks after this many ticks found the leader waiting
MAX_IDLE = 4         # followers kept beyond IDLE_EXIT seconds (not at once: no churn of threads)
IDLE_EXIT = 10.0
RING_THREADS = MAX_THREADS   # threads serving ring entries at most (they never end: see `_serve_ring`)
RING_ENTRIES = 16    # ring entries registered per queue at first
RING_SPARE = 8       # more are registered while fewer than this many of a queue's wait for requests
RING_MAX_ENTRIES = 128   # per queue
RING_WAKE = 1 << 63  # the user_data of NOPs that wake a thread waiting in the ring
#: the ring's memory is shared with the kernel through plain loads and stores (`uring.py`),
#: which order themselves only on x86; elsewhere requests come through /dev/fuse
TOTAL_STORE_ORDER = platform.machine() in ("x86_64", "i386", "i686")
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)   # a request wakes one of the threads reading
_BIG = struct.Struct("<4xI48xI")   # a request's opcode, and a READ's size
#: a ring entry's opcode, READ's size (in op_in) and the payload's size
_RING_BIG = struct.Struct(f"<4xI{P.RING_OP_IN + 16 - 8}xI{P.RING_PAYLOAD_SIZE - P.RING_OP_IN - 20}xI")

FUSE_DEV_IOC_CLONE = 0x8004E500        # _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501   # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("<iIQ")      # fd, flags, padding
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PAGE = 4096
MS_NOSUID, MS_NODEV = 0x2, 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_mount.restype = ctypes.c_int

_GONE = (errno.ENODEV, errno.ENOTCONN, errno.EBADF)   # the connection was aborted or unmounted


class Team:
    """The bookkeeping of one group of serving threads that take turns leading: the /dev/fuse
    readers, or the threads serving io_uring entries. The condition's lock is the session's."""

    def __init__(self, lock: threading.Lock, max_threads: int) -> None:
        self.cond = threading.Condition(lock)   # followers wait on it to lead
        self.max_threads = max_threads
        self.alive = 0         # serving threads
        self.followers = 0     # threads waiting to lead
        self.leader: list[int] | None = None   # the leading thread's slot: [request it serves, or 0]
        self.taken = 0         # requests taken (numbers them; may miss one in a race)
        self.big_until = 0.0   # (monotonic) until then, threads back from big requests read too


def _possible_cpus() -> int:
    """How many CPUs the kernel may ever run (one FUSE ring queue each)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return int(f.read().strip().split(",")[-1].split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


class RingEntry:
    """One FUSE-over-io_uring entry: its header and payload buffers and the iovec naming them."""

    __slots__ = ("index", "qid", "header", "payload", "iovecs", "_memory", "_iov")

    def __init__(self, index: int, qid: int) -> None:
        self.index = index
        self.qid = qid
        self._memory = mmap.mmap(-1, PAGE + MAX_WRITE)   # untouched pages cost nothing
        view = memoryview(self._memory)
        self.header = view[:P.RING_HEADER_SIZE]
        self.payload = view[PAGE:]
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._iov = (ctypes.c_uint64 * 4)(base, P.RING_HEADER_SIZE, base + PAGE, MAX_WRITE)
        self.iovecs = ctypes.addressof(self._iov)

    def big(self) -> bool:
        """A READ or WRITE whose copy is SPLICE_MIN bytes or more."""
        opcode, size, payload = _RING_BIG.unpack_from(self.header)
        return payload >= SPLICE_MIN or (opcode == P.READ and size >= SPLICE_MIN)


def _reply_pipe() -> tuple[int, int, int] | None:
    """(read end, write end, room for data) of a pipe for `DeviceOperations` to splice big
    READ replies into: as big as the largest reply, or as /proc/sys/fs/pipe-max-size allows
    (1 MiB by default: a loop device's 512 KiB requests fit); the header takes a page of it.
    None if no pipe of at least a splice's worth can be had, or none at all (out of file
    descriptors): then every READ is copied."""
    try:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("FUSE: no pipe to splice reads into (%s); reads are copied", exc)
        return None
    for size in (REPLY_BUFFER, 1 << 20, 256 << 10):
        try:
            room = fcntl.fcntl(w, F_SETPIPE_SZ, size) - PAGE
        except OSError:
            continue
        if room >= SPLICE_MIN:
            return r, w, room
    os.close(r)
    os.close(w)
    return None


def mount_fuse(fd: int, mountpoint: str, *, fsname: str, allow_other: bool) -> None:
    """mount(2) the FUSE connection of `fd` at `mountpoint` (root's way, without fusermount)."""
    data = (f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions"
            + (",allow_other" if allow_other else ""))
    if _mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{fsname}".encode(), MS_NOSUID | MS_NODEV,
              data.encode()) != 0:
        err = ctypes.get_errno()
        raise DMError(err, f"cannot mount FUSE at {mountpoint}: {os.strerror(err)}")


class Session:
    """One FUSE connection mounted at `mountpoint`, its requests answered by `ops`."""

    def __init__(self, ops: DeviceOperations, mountpoint: str, *, fsname: str = "userdm",
                 allow_other: bool = False, on_end: Callable[[], None] = lambda: None,
                 ring: bool = False) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.allow_other = allow_other
        self.on_end = on_end                  # called once when serving ended by itself (unmounted)
        ops.want_ring = ring and TOTAL_STORE_ORDER   # FUSE over io_uring if the kernel offers it
        self._fd = -1                         # the connection's first fd (notifications go there)
        self._fds: set[int] = set()           # every device fd still open (severed at stop)
        self._wake: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._dev = Team(self._lock, MAX_THREADS)       # threads reading /dev/fuse
        self._rings = Team(self._lock, RING_THREADS)    # threads serving io_uring entries
        self._stopping = False
        self._destroyed = False
        self.threads: list[threading.Thread] = []
        self._parked = False                  # the watchdog waits for `_active`
        self._active = threading.Event()
        self._ring: Ring | None = None
        self._entries: list[RingEntry] = []
        self._ready: deque[RingEntry] = deque()   # entries holding a request nobody serves yet
        self._waiting: list[int] = []             # per queue: entries waiting for a request
        self._ring_poll = PollWindow()            # the ring's leader polls before it waits

    @property
    def ring_entries(self) -> int:
        """How many io_uring entries serve the connection (0: requests come through /dev/fuse)."""
        return len(self._entries)

    # ---- start -------------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse, mount it, start the serving threads (they answer INIT)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            mount_fuse(fd, self.mountpoint, fsname=self.fsname, allow_other=self.allow_other)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._fds.add(fd)
        self._wake = os.pipe()
        for _ in range(MIN_THREADS):
            self._spawn(self._dev)
        threading.Thread(target=self._watch, name="userdm-fuse-watchdog", daemon=True).start()

    def _clone(self) -> int:
        """A new fd of the same connection (requests read on it are answered on it)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", self._fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _spawn(self, team: Team) -> None:
        """Start one serving thread of `team` (the caller holds no lock)."""
        with self._lock:
            if self._stopping or team.alive >= team.max_threads:
                return
            if team is self._dev:
                try:
                    fd = self._clone()
                except OSError as exc:
                    log.error("FUSE at %s: cannot clone the device fd: %s", self.mountpoint, exc)
                    return
                self._fds.add(fd)
                t = threading.Thread(target=self._serve, args=(fd,), name="userdm-fuse", daemon=True)
            else:
                t = threading.Thread(target=self._serve_ring, name="userdm-fuse-ring", daemon=True)
            team.alive += 1
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    # ---- serving /dev/fuse -------------------------------------------------------------

    def _serve(self, fd: int) -> None:
        assert self._wake is not None
        team = self._dev
        wake = self._wake[0]
        pipe = _reply_pipe()
        slot = [0]                 # the number of the request this thread serves, or 0
        request = bytearray(REQUEST_BUFFER)
        req_view = memoryview(request)
        reply_view = memoryview(bytearray(REPLY_BUFFER))
        ep = select.epoll()
        ended = False
        serve = self.ops.serve
        # replies held and sent a batch at a time (`replies.py`); they leave whenever the
        # thread gives its lent tables back (`lent.py`), before every wait
        replies = Replies(fd, self.mountpoint, usable=TOTAL_STORE_ORDER)
        lent = self.ops.lent_tables(replies.send)
        big = _BIG.unpack_from
        poll = PollWindow()
        deadline = 0.0             # when the leader's poll for the next request gives up
        perf = time.perf_counter
        try:
            try:
                ep.register(fd, select.EPOLLIN | _EXCLUSIVE)
            except PermissionError:    # severed before this thread started: fd is /dev/null
                return
            ep.register(wake, select.EPOLLIN)
            while self._follow(team, slot):
                while True:     # lead (or, while big requests come, read beside the leader)
                    try:
                        n = os.readv(fd, (request,))
                    except BlockingIOError:
                        if replies.run:
                            replies.drained()
                        # (only now: a thread woken for a request reads it before it may go)
                        if team.leader is not slot:
                            lent.give_back()
                            timeout = team.big_until - monotonic()
                            if timeout <= 0:
                                break            # follow
                            if any(f == wake for f, _ in ep.poll(timeout)):
                                return
                            continue
                        # the leader polls a little before it sleeps (`busypoll.py`)
                        if not deadline:
                            deadline = poll.deadline() or -1.0
                        if perf() < deadline and poll.pause():
                            continue
                        lent.give_back()
                        slept = perf()
                        if any(f == wake for f, _ in ep.poll()):
                            return
                        poll.slept(perf() - slept)
                        deadline = 0.0
                        continue
                    except InterruptedError:
                        continue
                    except OSError as exc:
                        if exc.errno in _GONE:       # unmounted or aborted
                            ended = True
                            return
                        raise
                    if n == 0:                       # severed: the fd is /dev/null now
                        ended = True
                        return
                    deadline = 0.0
                    replies.read()
                    slot[0] = team.taken = team.taken + 1
                    if self._parked:                 # after slot[0]: see `_watch`
                        self._unpark()
                    held = False
                    if n >= _BIG.size:
                        opcode, size = big(request)
                        if n > SPLICE_MIN or (opcode == P.READ and size >= SPLICE_MIN):
                            replies.send()
                            team.big_until = monotonic() + BIG_WINDOW
                            self._step_down(team, slot, BIG_THREADS)   # another reads while this copies
                        elif (opcode == P.READ or opcode == P.WRITE) and replies.holding:
                            held = True
                    try:
                        opcode, out = serve(req_view[:n], replies.buffer() if held else reply_view, pipe, lent)
                    except P.ProtocolError as exc:
                        log.error("FUSE at %s: dropped a malformed request: %s", self.mountpoint, exc)
                        continue
                    finally:
                        slot[0] = 0
                    if out.__class__ is int:
                        self._splice(fd, out, pipe)
                    elif held:
                        replies.hold(out)
                    elif out is not None:
                        write_reply(fd, out, self.mountpoint)
                    if opcode == P.DESTROY:
                        ended = True
                        return
                    if opcode == P.INIT and self.ops.ring and self._ring is None:
                        self._start_ring()
                    if team.leader is not slot and monotonic() >= team.big_until:
                        lent.give_back()
                        break                    # deposed, or back from a big request: follow
        except Exception:
            log.exception("FUSE at %s: a serving thread failed", self.mountpoint)
        finally:
            lent.give_back()
            replies.close()
            ep.close()
            for end in (pipe or ())[:2]:
                os.close(end)
            with self._lock:
                self._fds.discard(fd)
                os.close(fd)
            self._leave(team, slot, ended)

    def _leave(self, team: Team, slot: list[int], ended: bool) -> None:
        """A serving thread ends: another leads; the first to see the connection end ends it."""
        with self._lock:
            if team.leader is slot:
                team.leader = None
                team.cond.notify()
            team.alive -= 1
            first_end = ended and not self._stopping
            if first_end:
                self._stopping = True
                self._dev.cond.notify_all()
                self._rings.cond.notify_all()
        if first_end:
            self._end_by_itself()
        self._destroy_if_stopped()

    def _follow(self, team: Team, slot: list[int], may_end: bool = True) -> bool:
        """Wait until no thread of `team` leads, then lead (True); False: this thread ends
        (stopping, or, if it `may_end`, it waited IDLE_EXIT seconds while MAX_IDLE others wait)."""
        with team.cond:
            while team.leader is not None and not self._stopping:
                team.followers += 1
                woken = team.cond.wait(IDLE_EXIT)
                team.followers -= 1
                if may_end and not woken and team.leader is not None and team.followers >= MAX_IDLE:
                    return False
            if self._stopping:
                return False
            team.leader = slot
            return True

    def _step_down(self, team: Team, slot: list[int], most: int = MAX_THREADS) -> None:
        """Stop leading: a waiting thread (or a new one, while fewer than `most` serve) takes
        the next request."""
        with team.cond:
            if team.leader is not slot:
                return
            team.leader = None
            spawn = self._call_follower(team, most)
        if spawn:
            self._spawn(team)

    @staticmethod
    def _call_follower(team: Team, most: int) -> bool:
        """With the lock held and no leader: wake a follower to lead; True if none waits and
        fewer than `most` threads serve (the caller starts one, without the lock)."""
        if team.followers:
            team.cond.notify()
            return False
        return team.alive < most

    # ---- serving io_uring entries ------------------------------------------------------

    def _start_ring(self) -> None:
        """INIT agreed to FUSE over io_uring: make the ring and its entries, RING_ENTRIES for
        each CPU's queue (the kernel uses the ring once every queue has one), and start the
        ring's threads; the first to lead submits the registrations. If anything fails,
        requests keep coming through /dev/fuse."""
        try:
            ring = Ring(4 * RING_MAX_ENTRIES)
        except OSError as exc:
            log.warning("FUSE at %s: no io_uring (%s); requests come through /dev/fuse", self.mountpoint, exc)
            return
        with ring.lock:
            self._ring = ring
            self._waiting = [0] * _possible_cpus()
            for qid in range(len(self._waiting)):
                self._register(qid, RING_ENTRIES)
        for _ in range(MIN_THREADS):
            self._spawn(self._rings)
        log.info("FUSE at %s: requests come through io_uring (%d queues)", self.mountpoint, len(self._waiting))

    def _register(self, qid: int, count: int) -> None:
        """Push the registration of `count` new entries of queue `qid` (ring lock held)."""
        assert self._ring is not None
        for _ in range(count):
            entry = RingEntry(len(self._entries), qid)
            self._ring.push_fuse(self._fd, P.RING_REGISTER, entry.iovecs, entry.index, 0, qid)
            self._entries.append(entry)
            self._waiting[qid] += 1

    def _serve_ring(self) -> None:
        """Serve ring entries. The leader submits what was pushed and waits in the ring for
        completions (one system call answers a batch of requests and fetches the next ones),
        then serves the entries that got requests, pushing each one's commit. A thread that
        no longer leads (deposed, or it stepped down for a big request) serves what is ready
        beside the leader, submits its own commits, and follows. These threads never end
        before the session: the kernel delivers an entry's next request in the context of
        the thread that submitted its last command, and cancels them when that thread exits."""
        team = self._rings
        ring = self._ring
        assert ring is not None
        slot = [0]
        reply_view = memoryview(bytearray(REPLY_BUFFER))
        serve = self.ops.serve_entry
        lent = self.ops.lent_tables()   # given back before every wait (`lent.py`)
        ready = self._ready
        ended = False
        try:
            while self._follow(team, slot, may_end=False):
                while True:
                    try:
                        entry = ready.popleft()
                    except IndexError:
                        if team.leader is not slot:
                            lent.give_back()
                            break                                 # follow
                        gone = self._wait_ring(ring, lent)
                        if gone is not None:
                            ended = gone
                            return
                        continue
                    slot[0] = team.taken = team.taken + 1
                    if self._parked:
                        self._unpark()
                    if entry.big():
                        self._step_down(team, slot, BIG_THREADS)
                    try:
                        unique = serve(entry.header, entry.payload, reply_view, lent)
                    finally:
                        slot[0] = 0
                    self._commit(ring, entry, unique, team.leader is slot)
        except Exception:
            log.exception("FUSE at %s: a ring thread failed", self.mountpoint)
        finally:
            lent.give_back()
            self._leave(team, slot, ended)

    def _wait_ring(self, ring: Ring, lent: LentTables) -> bool | None:
        """Submit what was pushed, wait for completions and queue the entries that got requests
        (the thread's `lent` tables are given back before it sleeps). None: go on; False: stop
        serving; True: the connection ended (unmounted, aborted)."""
        with ring.lock:
            if ring.closed:
                return False
            pushed = ring.take_pushed()
        poll = self._ring_poll
        try:
            if poll.window:
                # submit, and complete what came meanwhile; nothing: poll a little before
                # sleeping (`busypoll.py`)
                ring.enter(pushed, 0, getevents=True)

                def sleep() -> None:
                    lent.give_back()
                    ring.enter(0, 1)

                poll.wait(ring.ready, sleep)
            else:             # submit and sleep in one system call
                lent.give_back()
                slept = time.perf_counter()
                ring.enter(pushed, 1)
                poll.slept(time.perf_counter() - slept)
        except OSError as exc:
            if not ring.closed:
                log.error("FUSE at %s: io_uring_enter failed: %s", self.mountpoint, exc)
            return False
        with ring.lock:
            done = ring.reap()
            for index, res in done:
                if index == RING_WAKE:
                    continue
                entry = self._entries[index]
                self._waiting[entry.qid] -= 1
                if res == 0:
                    self._ready.append(entry)
                    if self._waiting[entry.qid] < RING_SPARE and \
                            len(self._entries) < RING_MAX_ENTRIES * len(self._waiting):
                        self._register(entry.qid, RING_SPARE)     # held requests tie entries up
                elif -res in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV):
                    return None if self._stopping else True
                else:
                    log.error("FUSE at %s: io_uring entry %d of queue %d failed: %s", self.mountpoint,
                              index, entry.qid, os.strerror(-res))
        return False if self._stopping else None

    def _commit(self, ring: Ring, entry: RingEntry, unique: int, leading: bool) -> None:
        """Push the commit of `entry`'s reply to request `unique` (it fetches the entry's next
        request). The leader submits it with its next wait; any other thread submits at once."""
        with ring.lock:
            try:
                ring.push_fuse(self._fd, P.RING_COMMIT_AND_FETCH, entry.iovecs, entry.index, unique, entry.qid)
            except OSError as exc:
                if not ring.closed:
                    log.error("FUSE at %s: cannot commit a reply: %s", self.mountpoint, exc)
                return
            self._waiting[entry.qid] += 1
            pushed = 0 if leading else ring.take_pushed()
        if pushed:
            try:
                ring.enter(pushed, 0)
            except OSError as exc:
                if not ring.closed:
                    log.error("FUSE at %s: cannot commit a reply: %s", self.mountpoint, exc)

    def _wake_ring(self) -> None:
        """Wake a thread waiting in the ring (it sees `_stopping`)."""
        ring = self._ring
        if ring is None:
            return
        with ring.lock:
            try:
                ring.push_nop(RING_WAKE)
            except OSError:
                return
            pushed = ring.take_pushed()
        try:
            ring.enter(pushed, 0)
        except OSError:
            pass

    # ---- the watchdog ------------------------------------------------------------------

    def _unpark(self) -> None:
        """A leader took a request: make sure the watchdog watches."""
        self._parked = False
        self._active.set()

    def _watch(self) -> None:
        """Depose a leader that has served the same request for a whole STALL_TICK (a suspended
        device, a slow backend): another thread leads meanwhile. When nobody led and no thread
        took a request for a whole tick (big ones held), call a follower or start a thread.
        After PARK_TICKS ticks that found every leader waiting for requests, park until one
        takes one. (A leader sets its slot, then looks at `_parked`; this sets `_parked`, then
        looks at the slots: one of the two sees the other's write.)"""
        last = {id(t): 0 for t in (self._dev, self._rings)}
        taken = dict(last)
        idle = 0
        while True:
            time.sleep(STALL_TICK)
            if self._stopping:
                return
            busy = False
            for team in (self._dev, self._rings):
                if team is self._rings and self._ring is None:
                    continue
                leader = team.leader
                current = leader[0] if leader is not None else -1
                if current > 0 and current == last[id(team)]:
                    self._step_down(team, leader)
                elif current == last[id(team)] == -1 and team.taken == taken[id(team)]:
                    # nobody led, and no thread took a request, for a whole tick (big ones held)
                    with team.cond:
                        spawn = (team.leader is None and not self._stopping
                                 and self._call_follower(team, team.max_threads))
                    if spawn:
                        self._spawn(team)
                busy = busy or current != 0
                last[id(team)], taken[id(team)] = current, team.taken
            idle = 0 if busy else idle + 1
            if idle >= PARK_TICKS:
                idle = 0
                self._active.clear()
                self._parked = True
                if not self._stopping and all(
                        t.leader is not None and not t.leader[0]
                        for t in (self._dev, self._rings) if t is self._dev or self._ring is not None):
                    self._active.wait()
                self._parked = False

    # ---- replies on /dev/fuse ----------------------------------------------------------

    def _splice(self, fd: int, length: int, pipe: tuple[int, int, int]) -> None:
        """Send the reply of `length` bytes waiting in `pipe` (one splice: the kernel takes a
        reply whole); what a failure leaves in the pipe is drained."""
        try:
            os.splice(pipe[0], fd, length)
        except OSError as exc:
            drain(pipe[0])
            if exc.errno not in REPLY_GONE:
                log.error("FUSE at %s: cannot send a reply: %s", self.mountpoint, exc)

    def _end_by_itself(self) -> None:
        """The mount went away from outside (umount): wake the other threads too."""
        log.info("FUSE at %s was unmounted", self.mountpoint)
        self._wake_all()
        self._close_ring()
        try:
            self.on_end()
        except Exception:
            log.exception("FUSE at %s: end callback failed", self.mountpoint)

    # ---- backing files (FUSE passthrough) ----------------------------------------------

    def open_backing(self, fd: int) -> int:
        """Register the file `fd` with the kernel for passthrough opens; returns its backing
        id (needs CAP_SYS_ADMIN and a kernel with FUSE passthrough: OSError otherwise)."""
        return fcntl.ioctl(self._fd, FUSE_DEV_IOC_BACKING_OPEN, bytearray(BACKING_MAP.pack(fd, 0, 0)), True)

    def close_backing(self, backing_id: int) -> None:
        fcntl.ioctl(self._fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)), True)

    # ---- notifications and stop --------------------------------------------------------

    def invalidate(self, ino: int) -> None:
        """Drop the kernel's cached attributes of inode `ino` (e.g. after a resize)."""
        with self._lock:
            if self._stopping or self._fd < 0:
                return
            try:
                os.write(self._fd, P.notify_inval_inode(ino))
            except OSError as exc:
                if exc.errno != errno.ENOENT:     # ENOENT: the kernel does not hold the inode
                    log.warning("cannot invalidate the FUSE attributes of inode %d: %s", ino, exc)

    def stop(self) -> None:
        """Stop serving and sever the connection now (requests held by suspended devices fail
        for their callers), detach the mount lazily. Idempotent; never waits for a request."""
        with self._lock:
            ended = self._fd < 0 or self._destroyed
            self._stopping = True
        self._active.set()      # the watchdog sees _stopping and ends
        if not ended:
            self._wake_all()
            self._close_ring()
            self._sever()
        if not ended or is_fuse_mount(self.mountpoint):   # ended by `umount -f`: the mount stays
            try:
                lazy_unmount(self.mountpoint)
            except DMError as exc:
                log.debug("%s", exc)   # already unmounted
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join(0.05 if t.is_alive() else None)   # idle threads leave at once
        self._destroy_if_stopped()

    def _wake_all(self) -> None:
        """Make every waiting thread (and every later poll) return: the pipe stays readable;
        followers and a parked watchdog wake too (they see `_stopping`)."""
        with self._lock:
            if self._wake is not None:
                os.write(self._wake[1], b"x")
            self._dev.cond.notify_all()
            self._rings.cond.notify_all()
        self._active.set()
        self._wake_ring()

    def _close_ring(self) -> None:
        """Unmap the ring and let the kernel cancel its commands (they hold the connection:
        it cannot end while they wait); commits of requests still served go nowhere."""
        ring = self._ring
        if ring is not None:
            with ring.lock:
                ring.close()

    def _sever(self) -> None:
        """Replace every device fd by /dev/null: when the last goes, the kernel aborts the
        connection (pending requests fail, loop devices on the files get EIO); replies that
        threads still send later land in /dev/null."""
        null = os.open(os.devnull, os.O_RDWR)
        try:
            with self._lock:     # a thread closes its fd under the lock: never a reused number
                for fd in self._fds:
                    os.dup2(null, fd)
        finally:
            os.close(null)

    def _destroy_if_stopped(self) -> None:
        with self._lock:
            if not self._stopping or self._destroyed or self._fd < 0 or self._dev.alive or self._rings.alive:
                return
            self._destroyed = True
            fd, self._fd = self._fd, -1
            self._fds.discard(fd)
            wake, self._wake = self._wake, None
        os.close(fd)
        for w in wake or ():
            os.close(w)
        self._close_ring()
        if self._ring is not None:
            self._ring.release_fd()

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._fd >= 0 and not self._stopping
