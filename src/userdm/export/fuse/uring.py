"""A minimal io_uring for the FUSE server: set-up, submission of URING_CMDs, WRITEs and NOPs, completions.

Only what the FUSE server needs, through the raw system calls (no liburing): a ring made with
SQE128 (FUSE's command block is 24 of the 80 bytes after the standard SQE), NO_SQARRAY (the
submission queue's slots are taken in order) and COOP_TASKRUN (`SETUP_FLAGS`); its queues are
mapped with one mmap (the kernel offers IORING_FEAT_SINGLE_MMAP since 5.4), its SQEs with another.

`Ring.push_fuse` writes one FUSE URING_CMD into the next submission slot (the caller holds
`Ring.lock`: several threads push), `Ring.take_pushed` publishes what was pushed, `Ring.enter`
submits it and may wait for completions, `Ring.reap` returns the completions that arrived, as
(user_data, result) pairs. `Ring.write_all` writes a batch of buffers and waits for them, on
a ring of its own (replies to /dev/fuse, `replies.py`). The ring's memory is shared with the kernel: the stores and loads
here are plain ones, which is enough on x86 (total store order); the head and tail updates are
single aligned 32-bit accesses. `Ring.close` unmaps the queues and replaces the ring's fd by
/dev/null: the kernel then cancels the commands still queued (an mmap would keep the ring
alive), and a thread that still calls `enter` on the number gets an error instead of reaching
a reused fd.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: root turns FUSE over io_uring on and off here (off by default)
FUSE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SETUP_COOP_TASKRUN = 1 << 8
SETUP_SQE128 = 1 << 10
SETUP_NO_SQARRAY = 1 << 16
#: COOP_TASKRUN: work the kernel queues for a thread that runs (FUSE copies a request into an
#: entry in the context of the thread that submitted the entry's command) waits for its next
#: system call instead of interrupting it; a sleeping thread is still woken for it. Measured:
#: 6.3-7.9 us of CPU per 4 KiB request against 8.0-9.1 without (loop on the FUSE file, qd16).
SETUP_TASKRUN_FLAG = 1 << 9
#: TASKRUN_FLAG: while such work waits, the kernel sets SQ_TASKRUN in the ring's SQ flags,
#: which a thread that polls (`Ring.ready`) sees without a system call
SETUP_FLAGS = SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG | SETUP_SQE128 | SETUP_NO_SQARRAY
SQ_TASKRUN = 1 << 1
ENTER_GETEVENTS = 1
FEAT_SINGLE_MMAP = 1 << 0
OFF_SQES = 0x10000000
OP_NOP = 0
OP_WRITE = 23
OP_URING_CMD = 46
SQE_SIZE = 128           # with SQE128
CQE_SIZE = 16

#: io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features,
#: wq_fd, resv[3], then io_sqring_offsets and io_cqring_offsets (40 bytes each)
PARAMS = struct.Struct("<IIIIIII12x" "IIIIIIIIQ" "IIIIIIIIQ")
#: an SQE up to the end of a FUSE command: opcode, flags, ioprio, fd, cmd_op, pad, addr, len,
#: uring_cmd_flags, user_data, buf_index, personality, file_index, then the command block's
#: first 24 bytes (`fuse_uring_cmd_req`: flags, commit_id, qid); the rest of a slot is not read
SQE = struct.Struct("<BBHiIIQIIQHHiQQH6x")
CQE = struct.Struct("<QiI")
#: a WRITE's buffer in an SQE, from byte 16: addr, len, rw_flags, user_data
_BUFFER = struct.Struct("<QIIQ")
U32 = struct.Struct("<I")
_pack_sqe = SQE.pack_into

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_long = ctypes.c_long


class Ring:
    """One io_uring instance of `entries` submission slots (twice as many completion slots)."""

    def __init__(self, entries: int) -> None:
        params = bytearray(PARAMS.size)
        PARAMS.pack_into(params, 0, 0, 0, SETUP_FLAGS, *([0] * 22))
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(_long(SYS_IO_URING_SETUP), _long(entries), buf)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        del buf
        self.fd = int(fd)
        try:
            (sq_entries, cq_entries, _flags, _cpu, _idle, features, _wq,
             sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array, _r1, _ua1,
             cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, _cq_flags, _r2, _ua2) = PARAMS.unpack(params)
            if not features & FEAT_SINGLE_MMAP:
                raise OSError(errno.EOPNOTSUPP, "io_uring without IORING_FEAT_SINGLE_MMAP")
            size = max(sq_array + sq_entries * 4, cqes + cq_entries * CQE_SIZE)
            self._rings = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._sqes = mmap.mmap(self.fd, sq_entries * SQE_SIZE, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        rings = self._rings
        self._sq_head, self._sq_tail, self._cq_head, self._cq_tail = sq_head, sq_tail, cq_head, cq_tail
        self._sq_flags = sq_flags
        self._sq_mask = U32.unpack_from(rings, sq_mask)[0]      # the offsets point at the values
        self._cq_mask = U32.unpack_from(rings, cq_mask)[0]
        self._sq_entries = sq_entries
        self._cqes = cqes
        self._tail = U32.unpack_from(rings, sq_tail)[0]         # ours: the kernel only reads it
        self._head = self._tail                                  # the kernel's, as last read
        self.pushed = 0           # pushed and not yet passed to `enter`
        self.closed = False
        self._cq_entries = cq_entries
        #: the fd every SQE slot writes to (`write_all`), and the CQEs as int32s
        self._writes_to = -1
        self._results = memoryview(self._rings).cast("i")
        #: held by whoever touches the ring's memory (push, reap) or closes it
        self.lock = threading.Lock()

    def _slot(self) -> int:
        """The offset of the next free SQE (the caller holds the lock)."""
        if self.closed:
            raise OSError(errno.ENOTCONN, "the io_uring is closed")
        if (self._tail - self._head) & 0xFFFFFFFF >= self._sq_entries:
            self._head = U32.unpack_from(self._rings, self._sq_head)[0]
            if (self._tail - self._head) & 0xFFFFFFFF >= self._sq_entries:
                raise OSError(errno.EBUSY, "the io_uring's submission queue is full")
        return (self._tail & self._sq_mask) * SQE_SIZE

    def _advance(self) -> None:
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self.pushed += 1

    def push_fuse(self, fd: int, cmd_op: int, iovecs: int, user_data: int, commit_id: int, qid: int) -> None:
        """Queue a FUSE URING_CMD on `fd`: `iovecs` is the address of an entry's two iovecs
        (header and payload), the command block a `fuse_uring_cmd_req` (the caller holds the lock)."""
        tail = self._tail
        if (tail - self._head) & 0xFFFFFFFF >= self._sq_entries or self.closed:
            self._slot()     # raises unless the kernel took some since `_head` was read
        _pack_sqe(self._sqes, (tail & self._sq_mask) * SQE_SIZE, OP_URING_CMD, 0, 0, fd, cmd_op, 0, iovecs, 2, 0,
                  user_data, 0, 0, 0, 0, commit_id, qid)
        self._tail = (tail + 1) & 0xFFFFFFFF
        self.pushed += 1

    def write_all(self, fd: int, buffers: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Write each (address, length) of `buffers` to `fd` with one `io_uring_enter`, and
        wait for all of them; the failures, as (index in `buffers`, -errno). For a ring with
        one user and nothing else in flight (`replies.py`); the offset is 0, which a
        character device ignores. Raises OSError if the ring fails."""
        n = len(buffers)
        if self.pushed or n > self._sq_entries:
            raise OSError(errno.EBUSY, f"io_uring: {n} writes do not fit")
        self._head = U32.unpack_from(self._rings, self._sq_head)[0]
        if (self._tail - self._head) & 0xFFFFFFFF:
            raise OSError(errno.EBUSY, "io_uring: the submission queue is not empty")
        sqes, tail, mask = self._sqes, self._tail, self._sq_mask
        if self._writes_to != fd:      # every slot a WRITE to `fd`: then only the buffer changes
            for slot in range(self._sq_entries):
                _pack_sqe(sqes, slot * SQE_SIZE, OP_WRITE, 0, 0, fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            self._writes_to = fd
        pack = _BUFFER.pack_into
        for i, (address, length) in enumerate(buffers):
            pack(sqes, ((tail + i) & mask) * SQE_SIZE + 16, address, length, 0, i)
        self._tail = (tail + n) & 0xFFFFFFFF
        self.pushed = n
        self.enter(self.take_pushed(), n)
        rings = self._rings
        head = U32.unpack_from(rings, self._cq_head)[0]
        while (U32.unpack_from(rings, self._cq_tail)[0] - head) & 0xFFFFFFFF < n:
            self.enter(0, n)           # (interrupted by a signal)
        # the results, every CQE's int32 at byte 8, in one or two strides (the queue wraps)
        first = head & self._cq_mask
        results = self._results
        runs = [(first, min(n, self._cq_entries - first))]
        if runs[0][1] < n:
            runs.append((0, n - runs[0][1]))
        failed = []
        for start, count in runs:
            at = self._cqes // 4 + start * 4 + 2
            if min(results[at:at + 4 * count:4]) < 0:
                for k in range(count):
                    user_data, res, _ = CQE.unpack_from(rings, self._cqes + (start + k) * CQE_SIZE)
                    if res < 0:
                        failed.append((user_data, res))
        U32.pack_into(rings, self._cq_head, (head + n) & 0xFFFFFFFF)
        return failed

    def push_nop(self, user_data: int) -> None:
        """Queue a NOP, whose completion wakes a thread waiting in `enter` (lock held)."""
        SQE.pack_into(self._sqes, self._slot(), OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0, user_data, 0, 0, 0, 0, 0, 0)
        self._advance()

    def take_pushed(self) -> int:
        """Publish the pushed SQEs to the kernel (the queue's tail) and return how many the
        caller's next `enter` submits (lock held). The kernel reads the tail only in `enter`."""
        n, self.pushed = self.pushed, 0
        if n:
            U32.pack_into(self._rings, self._sq_tail, self._tail)
        return n

    def enter(self, to_submit: int, wait: int, getevents: bool = False) -> int:
        """io_uring_enter: submit `to_submit`, then wait for `wait` completions (`getevents`
        with 0: only run the work that completes requests, not waiting). EINTR is returned
        as 0 (the caller looks at the completion queue and comes back)."""
        ret = _syscall(_long(SYS_IO_URING_ENTER), _long(self.fd), _long(to_submit), _long(wait),
                       _long(ENTER_GETEVENTS if wait or getevents else 0), None, _long(0))
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                return 0
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        return int(ret)

    def ready(self) -> bool:
        """Whether completions, or work that makes them, wait (no lock, no system call: for
        a thread that polls before it waits in `enter`)."""
        rings = self._rings
        try:
            return (U32.unpack_from(rings, self._cq_head)[0] != U32.unpack_from(rings, self._cq_tail)[0]
                    or bool(U32.unpack_from(rings, self._sq_flags)[0] & SQ_TASKRUN))
        except ValueError:      # closed meanwhile (unmapped)
            return True

    def reap(self) -> list[tuple[int, int]]:
        """The completions that arrived, as (user_data, result) (the caller holds the lock)."""
        if self.closed:
            return []
        rings = self._rings
        head = U32.unpack_from(rings, self._cq_head)[0]
        tail = U32.unpack_from(rings, self._cq_tail)[0]
        if head == tail:
            return []
        out = []
        mask, base, unpack = self._cq_mask, self._cqes, CQE.unpack_from
        while head != tail:
            user_data, res, _flags = unpack(rings, base + (head & mask) * CQE_SIZE)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        U32.pack_into(rings, self._cq_head, head)
        return out

    def close(self) -> None:
        """Unmap the queues and make the fd /dev/null (the caller holds the lock); the kernel
        tears the ring down (cancelling its commands) once no system call uses it."""
        if self.closed:
            return
        self.closed = True
        self._results.release()
        self._rings.close()
        self._sqes.close()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, self.fd)
        finally:
            os.close(null)

    def release_fd(self) -> None:
        """Close the fd's number (after `close`, once no thread can use it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def fuse_uring_enabled() -> Iterator[bool]:
    """The kernel's FUSE over io_uring turned on while the block runs, and back to what it was
    after (for tests and benchmarks; needs root). Yields whether it is on."""
    try:
        with open(FUSE_PARAMETER) as f:
            was = f.read().strip()
    except OSError:
        yield False                 # no such kernel
        return
    if was == "Y":
        yield True
        return
    try:
        with open(FUSE_PARAMETER, "w") as f:
            f.write("Y")
    except OSError:
        yield False                 # not root
        return
    try:
        yield True
    finally:
        with open(FUSE_PARAMETER, "w") as f:
            f.write(was)
