"""A thin FUSE server: /dev/fuse, mount(2), and threads that move messages to `DeviceOperations`.

`Session.mount()` opens /dev/fuse and mounts it with the mount system call, as fusermount does
for root (`fd=N,rootmode=40000,user_id=...,group_id=...`); no libfuse is involved. Each
serving thread has its own clone of the device fd (FUSE_DEV_IOC_CLONE: the kernel answers a
request only on the fd it was read from, so a thread held by a suspended device holds only
its own request) and its own preallocated request and reply buffers.

The threads take turns (leader/followers): one thread at a time, the leader, reads requests
(nonblocking; when none is queued it waits in epoll) and serves each itself: `ops.serve`
answers it, the reply leaves in one `os.write`. The others wait on a condition to lead. No
request is handed between threads, and only one thread wants the GIL, so a stream of small
requests costs no thread wake-ups (with several threads reading the device, GIL and lock
hand-offs cost more CPU than serving: measured in docs/fuse.md). A READ's data is read by the
device straight into the reply buffer behind the header and a WRITE's data is a view of the
request buffer: no copies besides the kernel's. A big READ that lies in one file is spliced
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
- the mount unmounted from outside: reads fail with ENODEV, the threads end and `on_end` runs;
- `stop()` wakes the waiting threads (a pipe), severs the connection without waiting for
  requests held by suspended devices (every device fd is replaced by /dev/null: the kernel
  aborts the connection when its last one goes, failing what is pending; late replies go
  nowhere), and detaches the mount lazily.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time
from time import monotonic
from collections.abc import Callable

from ...errors import DMError
from . import protocol as P
from .ops import REPLY_BUFFER, REQUEST_BUFFER, SPLICE_MIN, DeviceOperations, drain
from .unmount import is_fuse_mount, lazy_unmount

log = logging.getLogger("userdm.fuse")

MIN_THREADS = 2      # at start: the leader and one follower
MAX_THREADS = 64     # requests served (or held in suspended devices) at once
STALL_TICK = 0.001   # a leader serving one request for a whole tick is deposed
BIG_THREADS = 4      # threads that serve big requests at once (more only queue for the GIL)
BIG_WINDOW = 0.01    # after a big request, threads that served one read beside the leader this long
PARK_TICKS = 100     # the watchdog parks after this many ticks found the leader waiting
MAX_IDLE = 4         # followers kept beyond IDLE_EXIT seconds (not at once: no churn of threads)
IDLE_EXIT = 10.0
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)   # a request wakes one of the threads reading
_BIG = struct.Struct("<4xI48xI")   # a request's opcode, and a READ's size

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
                 allow_other: bool = False, on_end: Callable[[], None] = lambda: None) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.allow_other = allow_other
        self.on_end = on_end                  # called once when serving ended by itself (unmounted)
        self._fd = -1                         # the connection's first fd (notifications go there)
        self._fds: set[int] = set()           # every device fd still open (severed at stop)
        self._wake: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)   # followers wait on it to lead
        self._alive = 0         # serving threads
        self._followers = 0     # threads waiting to lead
        self._leader: list[int] | None = None   # the leading thread's slot: [request it serves, or 0]
        self._stopping = False
        self._destroyed = False
        self.threads: list[threading.Thread] = []
        self._taken = 0                       # requests taken (numbers them; may miss one in a race)
        self._big_until = 0.0                 # (monotonic) until then, threads back from big requests read too
        self._parked = False                  # the watchdog waits for `_active`
        self._active = threading.Event()

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
            self._spawn()
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

    def _spawn(self) -> None:
        """Start one serving thread (the caller holds no lock)."""
        with self._lock:
            if self._stopping or self._alive >= MAX_THREADS:
                return
            try:
                fd = self._clone()
            except OSError as exc:
                log.error("FUSE at %s: cannot clone the device fd: %s", self.mountpoint, exc)
                return
            self._fds.add(fd)
            self._alive += 1
            t = threading.Thread(target=self._serve, args=(fd,), name="userdm-fuse", daemon=True)
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    # ---- serving -----------------------------------------------------------------------

    def _serve(self, fd: int) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        pipe = _reply_pipe()
        slot = [0]                 # the number of the request this thread serves, or 0
        request = bytearray(REQUEST_BUFFER)
        req_view = memoryview(request)
        reply_view = memoryview(bytearray(REPLY_BUFFER))
        ep = select.epoll()
        ended = False
        serve = self.ops.serve
        big = _BIG.unpack_from
        try:
            try:
                ep.register(fd, select.EPOLLIN | _EXCLUSIVE)
            except PermissionError:    # severed before this thread started: fd is /dev/null
                return
            ep.register(wake, select.EPOLLIN)
            while self._follow(slot):
                while True:     # lead (or, while big requests come, read beside the leader)
                    try:
                        n = os.readv(fd, (request,))
                    except BlockingIOError:
                        # (only now: a thread woken for a request reads it before it may go)
                        timeout = None
                        if self._leader is not slot:
                            timeout = self._big_until - monotonic()
                            if timeout <= 0:
                                break            # follow
                        if any(f == wake for f, _ in ep.poll(timeout)):
                            return
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
                    slot[0] = self._taken = self._taken + 1
                    if self._parked:                 # after slot[0]: see `_watch`
                        self._unpark()
                    if n >= _BIG.size:
                        opcode, size = big(request)
                        if n > SPLICE_MIN or (opcode == P.READ and size >= SPLICE_MIN):
                            self._big_until = monotonic() + BIG_WINDOW
                            self._step_down(slot, BIG_THREADS)   # another reads while this copies
                    try:
                        opcode, out = serve(req_view[:n], reply_view, pipe)
                    except P.ProtocolError as exc:
                        log.error("FUSE at %s: dropped a malformed request: %s", self.mountpoint, exc)
                        continue
                    finally:
                        slot[0] = 0
                    if out.__class__ is int:
                        self._splice(fd, out, pipe)
                    elif out is not None:
                        self._send(fd, out)
                    if opcode == P.DESTROY:
                        ended = True
                        return
                    if self._leader is not slot and monotonic() >= self._big_until:
                        break                    # deposed, or back from a big request: follow
        except Exception:
            log.exception("FUSE at %s: a serving thread failed", self.mountpoint)
        finally:
            ep.close()
            for end in (pipe or ())[:2]:
                os.close(end)
            with self._lock:
                if self._leader is slot:
                    self._leader = None
                    self._cond.notify()
                self._alive -= 1
                last = self._alive == 0
                first_end = ended and not self._stopping
                if first_end:
                    self._stopping = True
                    self._cond.notify_all()
                self._fds.discard(fd)
                os.close(fd)
            if first_end:
                self._end_by_itself()
            if last:
                self._destroy_if_stopped()

    def _follow(self, slot: list[int]) -> bool:
        """Wait until no thread leads, then lead (True); False: this thread ends (stopping, or
        it waited IDLE_EXIT seconds while MAX_IDLE others wait too)."""
        with self._cond:
            while self._leader is not None and not self._stopping:
                self._followers += 1
                woken = self._cond.wait(IDLE_EXIT)
                self._followers -= 1
                if not woken and self._leader is not None and self._followers >= MAX_IDLE:
                    return False
            if self._stopping:
                return False
            self._leader = slot
            return True

    def _step_down(self, slot: list[int], most: int = MAX_THREADS) -> None:
        """Stop leading: a waiting thread (or a new one, while fewer than `most` serve) reads
        the next request."""
        with self._cond:
            if self._leader is not slot:
                return
            self._leader = None
            spawn = self._call_follower(most)
        if spawn:
            self._spawn()

    def _call_follower(self, most: int) -> bool:
        """With `_cond` held and no leader: wake a follower to lead; True if none waits and
        fewer than `most` threads serve (the caller starts one, without the lock)."""
        if self._followers:
            self._cond.notify()
            return False
        return self._alive < most

    def _unpark(self) -> None:
        """The leader took a request: make sure the watchdog watches."""
        self._parked = False
        self._active.set()

    def _watch(self) -> None:
        """Depose a leader that has served the same request for a whole STALL_TICK (a suspended
        device, a slow backend): another thread leads meanwhile. After PARK_TICKS ticks that
        found the leader waiting for requests, park until it takes one. (The leader sets its
        slot, then looks at `_parked`; this sets `_parked`, then looks at the slot: one of the
        two sees the other's write.)"""
        last = 0
        idle = 0
        taken = 0
        while True:
            time.sleep(STALL_TICK)
            if self._stopping:
                return
            leader = self._leader
            current = leader[0] if leader is not None else -1
            if current > 0 and current == last:
                self._step_down(leader)
            elif current == last == -1 and self._taken == taken:
                # nobody led, and no thread took a request, for a whole tick (big ones held)
                with self._cond:
                    spawn = self._leader is None and not self._stopping and self._call_follower(MAX_THREADS)
                if spawn:
                    self._spawn()
            idle = idle + 1 if current == 0 else 0
            last, taken = current, self._taken
            if idle >= PARK_TICKS:
                idle = 0
                self._active.clear()
                self._parked = True
                leader = self._leader
                if leader is not None and not leader[0] and not self._stopping:
                    self._active.wait()
                self._parked = False

    def _send(self, fd: int, out: bytes | memoryview) -> None:
        try:
            os.write(fd, out)
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; the others: the connection is
            if exc.errno not in (errno.ENOENT, *_GONE):
                log.error("FUSE at %s: cannot send a reply: %s", self.mountpoint, exc)

    def _splice(self, fd: int, length: int, pipe: tuple[int, int, int]) -> None:
        """Send the reply of `length` bytes waiting in `pipe` (one splice: the kernel takes a
        reply whole); what a failure leaves in the pipe is drained."""
        try:
            os.splice(pipe[0], fd, length)
        except OSError as exc:
            drain(pipe[0])
            if exc.errno not in (errno.ENOENT, *_GONE):
                log.error("FUSE at %s: cannot send a reply: %s", self.mountpoint, exc)

    def _end_by_itself(self) -> None:
        """The mount went away from outside (umount): wake the other threads too."""
        log.info("FUSE at %s was unmounted", self.mountpoint)
        self._wake_all()
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
            self._sever()
        if not ended or is_fuse_mount(self.mountpoint):   # ended by `umount -f`: the mount stays
            try:
                lazy_unmount(self.mountpoint)
            except DMError as exc:
                log.debug("%s", exc)   # already unmounted
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join(0.05 if t.is_alive() else None)   # idle threads leave at once
        with self._lock:
            last = self._alive == 0
        if last:
            self._destroy_if_stopped()

    def _wake_all(self) -> None:
        """Make every waiting thread (and every later poll) return: the pipe stays readable;
        followers and a parked watchdog wake too (they see `_stopping`)."""
        with self._lock:
            if self._wake is not None:
                os.write(self._wake[1], b"x")
            self._cond.notify_all()
        self._active.set()

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
            if not self._stopping or self._destroyed or self._fd < 0 or self._alive:
                return
            self._destroyed = True
            fd, self._fd = self._fd, -1
            self._fds.discard(fd)
            wake, self._wake = self._wake, None
        os.close(fd)
        for w in wake or ():
            os.close(w)

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._fd >= 0 and not self._stopping
