"""libfuse3's high-level API driven by Python threads, through mfusepy's ctypes declarations.

mfusepy declares libfuse3's structures for the library found on this machine (the layouts
of `fuse_operations`, `fuse_file_info`, `fuse_config`, `stat`, ... changed between libfuse
releases) and loads it. Its own `FUSE` class runs a whole session with `fuse_main`, which
installs process-wide SIGTERM/SIGINT/SIGHUP handlers and blocks its caller, so `Session`
drives the session itself:

- `fuse_new` + `fuse_mount`, then Python threads that each wait for a request (epoll on the
  device fd, the GIL released; EPOLLEXCLUSIVE wakes one thread per request), take it
  (`fuse_session_receive_buf`) and run it (`fuse_session_process_buf`: libfuse calls the
  Python callback and then sends the reply, its copy outside the GIL). Requests run in
  parallel: the two halves of a loop device's 1 MiB request are served at once;
- a thread that takes a request while no other one waits for the next starts another (up to
  MAX_THREADS), so requests that block (I/O to a suspended device) never stop the rest;
  threads beyond MAX_IDLE idle ones end;
- `stop()` wakes the waiting threads (a pipe), severs the connection without waiting for
  requests held by suspended devices (the device fd is replaced by /dev/null: the kernel
  aborts the connection and fails what is pending; late replies go nowhere), detaches the
  mount lazily, and the session is freed when the last thread has left it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import Callable

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse 2 if both are installed
import mfusepy  # noqa: E402

from ...errors import DMError  # noqa: E402
from .unmount import lazy_unmount  # noqa: E402

log = logging.getLogger("userdm.fuse")

MIN_THREADS = 2      # waiting at start: a loop device's 1 MiB request comes as two FUSE requests
MAX_THREADS = 64     # requests served (or blocked in suspended devices) at once
MAX_IDLE = 8         # idle threads kept

if mfusepy.fuse_version_major != 3:
    raise ImportError(f"userdm's FUSE export needs libfuse 3, found {mfusepy.fuse_version_major}."
                      f"{mfusepy.fuse_version_minor}")

lib = mfusepy._libfuse
_libc = ctypes.CDLL(None)


class _Args(ctypes.Structure):
    """struct fuse_args"""
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


def _declare(name: str, restype, *argtypes):  # noqa: ANN001, ANN202
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_vp = ctypes.c_void_p
_fuse_new = _declare("fuse_new", _vp, ctypes.POINTER(_Args), ctypes.POINTER(mfusepy.fuse_operations),
                     ctypes.c_size_t, _vp)
_fuse_mount = _declare("fuse_mount", ctypes.c_int, _vp, ctypes.c_char_p)
_fuse_destroy = _declare("fuse_destroy", None, _vp)
_fuse_get_session = _declare("fuse_get_session", _vp, _vp)
_fuse_invalidate_path = _declare("fuse_invalidate_path", ctypes.c_int, _vp, ctypes.c_char_p)
_session_fd = _declare("fuse_session_fd", ctypes.c_int, _vp)
_session_exit = _declare("fuse_session_exit", None, _vp)
_session_exited = _declare("fuse_session_exited", ctypes.c_int, _vp)
_receive_buf = _declare("fuse_session_receive_buf", ctypes.c_int, _vp, ctypes.POINTER(mfusepy.fuse_buf))
_process_buf = _declare("fuse_session_process_buf", None, _vp, ctypes.POINTER(mfusepy.fuse_buf))
_free = _libc.free
_free.restype, _free.argtypes = None, (_vp,)

_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


class Session:
    """One libfuse session: `operations` (a filled `mfusepy.fuse_operations`) mounted at
    `mountpoint` with `options` (`-o` options of libfuse and the kernel), served by threads."""

    def __init__(self, operations: mfusepy.fuse_operations, mountpoint: str, options: list[str],
                 *, on_end: Callable[[], None] = lambda: None) -> None:
        self.operations = operations          # kept alive: libfuse points into it
        self.mountpoint = mountpoint
        self.options = options
        self.on_end = on_end                  # called once when serving ended by itself (unmounted)
        self._fuse: int | None = None
        self._se: int | None = None
        self._fd = -1
        self._wake: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._alive = 0         # serving threads
        self._waiting = 0       # threads waiting for a request
        self._stopping = False
        self._destroyed = False
        self.threads: list[threading.Thread] = []

    # ---- start -------------------------------------------------------------------------

    def mount(self) -> None:
        """Create and mount the session, start the serving threads (they answer INIT)."""
        argv = [b"userdm", b"-o", ",".join(self.options).encode()]
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        args = _Args(len(argv), c_argv, 0)
        fuse = _fuse_new(ctypes.byref(args), ctypes.byref(self.operations),
                         ctypes.sizeof(self.operations), None)
        if not fuse:
            raise DMError(errno.EINVAL, f"libfuse refused the options {','.join(self.options)!r}")
        if _fuse_mount(fuse, os.fsencode(self.mountpoint)) != 0:
            _fuse_destroy(fuse)
            raise DMError(errno.EIO, f"cannot mount FUSE at {self.mountpoint} (see libfuse's message above)")
        self._fuse = fuse
        self._se = _fuse_get_session(fuse)
        self._fd = _session_fd(self._se)
        os.set_blocking(self._fd, False)      # a thread woken with nothing left to take goes back to wait
        self._wake = os.pipe()
        for _ in range(MIN_THREADS):
            self._spawn()

    def _spawn(self) -> None:
        """Start one serving thread (the caller holds no lock)."""
        t = threading.Thread(target=self._serve, name="userdm-fuse", daemon=True)
        with self._lock:
            if self._stopping or self._alive >= MAX_THREADS:
                return
            self._alive += 1
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    # ---- serving -----------------------------------------------------------------------

    def _serve(self) -> None:
        se, fd = self._se, self._fd
        assert self._wake is not None
        wake = self._wake[0]
        buf = mfusepy.fuse_buf()              # libfuse allocates its memory on the first receive
        ep = select.epoll()
        ended = False
        try:
            ep.register(fd, select.EPOLLIN | _EXCLUSIVE)
            ep.register(wake, select.EPOLLIN)
            while True:
                with self._lock:
                    self._waiting += 1
                try:
                    while True:
                        events = ep.poll()
                        if any(f == wake for f, _ in events):
                            return
                        res = _receive_buf(se, ctypes.byref(buf))
                        if res > 0:
                            break
                        if res == 0 or _session_exited(se):   # unmounted or aborted
                            ended = True
                            return
                        if res not in (-errno.EAGAIN, -errno.EINTR):
                            log.error("FUSE at %s: reading a request failed: %s", self.mountpoint,
                                      os.strerror(-res))
                            ended = True
                            return
                finally:
                    with self._lock:
                        self._waiting -= 1
                        spawn = not self._waiting and not self._stopping and self._alive < MAX_THREADS
                if spawn:   # nobody is left waiting for the next request
                    self._spawn()
                _process_buf(se, ctypes.byref(buf))   # calls the Python callback, sends the reply
                with self._lock:
                    if self._waiting >= MAX_IDLE:
                        return
        except Exception:
            log.exception("FUSE at %s: a serving thread failed", self.mountpoint)
        finally:
            ep.close()
            if buf.mem:
                _free(buf.mem)
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
                first_end = ended and not self._stopping
                if first_end:
                    self._stopping = True
            if first_end:
                self._end_by_itself()
            if last:
                self._destroy_if_stopped()

    def _end_by_itself(self) -> None:
        """The mount went away from outside (fusermount -u): wake the other threads too."""
        log.info("FUSE at %s was unmounted", self.mountpoint)
        _session_exit(self._se)
        self._wake_all()
        try:
            self.on_end()
        except Exception:
            log.exception("FUSE at %s: end callback failed", self.mountpoint)

    # ---- stop --------------------------------------------------------------------------

    def invalidate(self, path: str) -> None:
        """Drop the kernel's cached attributes of `path` (e.g. after a resize)."""
        with self._lock:
            if self._stopping or self._fuse is None:
                return
            res = _fuse_invalidate_path(self._fuse, os.fsencode(path))
        if res not in (0, -errno.ENOENT):   # ENOENT: the kernel has not looked it up
            log.warning("cannot invalidate the FUSE attributes of %s: %s", path, os.strerror(-res))

    def stop(self) -> None:
        """Stop serving and sever the connection now (requests held by suspended devices fail
        for their callers), detach the mount lazily. Idempotent; never waits for a request."""
        with self._lock:
            if self._fuse is None or self._destroyed:
                return
            already = self._stopping
            self._stopping = True
        if not already:
            _session_exit(self._se)
            self._wake_all()
        self._sever()
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
        """Make every waiting thread (and every later poll) return: the pipe stays readable."""
        with self._lock:
            if self._wake is not None:
                os.write(self._wake[1], b"x")

    def _sever(self) -> None:
        """Replace the FUSE device fd by /dev/null: its last reference goes, so the kernel
        aborts the connection (pending requests fail, loop devices on the files get EIO);
        replies that threads still send later land in /dev/null."""
        null = os.open(os.devnull, os.O_RDWR)
        try:
            with self._lock:     # never after fuse_destroy closed the fd (its number may be reused)
                if self._fd >= 0 and not self._destroyed:
                    os.dup2(null, self._fd)
        finally:
            os.close(null)

    def _destroy_if_stopped(self) -> None:
        with self._lock:
            if not self._stopping or self._destroyed or self._fuse is None or self._alive:
                return
            self._destroyed = True
            fuse, self._fd = self._fuse, -1
            wake, self._wake = self._wake, None
        _fuse_destroy(fuse)          # closes the (severed) device fd, frees the session
        for w in wake or ():
            os.close(w)

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._fuse is not None and not self._stopping
