"""Big READ and WRITE payloads between a socket and a file's page cache, with no copy in
userspace (issue 18): a worker process (`worker.py`) moves them through a pipe with splice(2).

- A READ: the file's pages go into the pipe by reference (`fill`), the reply's header is
  sent, then the pipe's pages go to the socket (`send`), again by reference. The client's
  receive is the only copy, where `preadv` + `send` made two more: a 1 MiB READ costs the
  server about a third of the CPU time. Filling the pipe first means a file that fails does so
  before the header leaves: the request goes back to the daemon unserved, as any failure.
- A WRITE: the payload goes from the socket into the pipe by reference, then from the pipe
  into the file (one copy, the kernel's, where `recv_into` + `pwritev` made two), a pipe's
  worth at a time, as far as the client has sent it (`Payload.move`, non-blocking): a client
  that stops mid-payload holds nothing but its own connection.
- A file open with O_DIRECT is never spliced (its pages are not in a cache), nor is
  a TLS session (its bytes are encrypted in userspace).

Data sent by reference is read when the client receives it: a write to the same blocks
after the reply was queued and before the client read it can show through. That is one of
the outcomes the client allows for a READ overlapping a WRITE in flight, since the READ has
not completed for it until it has the reply; requests of one client that do not overlap in
flight cannot see it.

The socket is shared with the daemon (the same open file description, blocking), so `send`
makes it non-blocking only for the call.
"""

from __future__ import annotations

import fcntl
import os

#: the pipe's size: READs up to this go through it; WRITEs go a pipe's worth at a time
SIZE = 1 << 20
#: payloads at least this big are spliced (smaller ones cost more in system calls than a copy)
MIN = 64 * 1024
_SETPIPE_SZ, _GETPIPE_SZ = 1031, 1032      # fcntl commands (linux/fcntl.h)
_NONBLOCK = os.SPLICE_F_NONBLOCK


def cached(fd: int) -> bool:
    """Whether `fd`'s data may be spliced: a file that is not open with O_DIRECT."""
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT


class Pipe:
    """One pipe, empty between two calls of its user (it is one worker's, single-threaded)."""

    def __init__(self) -> None:
        self.ends: tuple[int, int] | None = None
        self.size = 0

    def room(self) -> int:
        """The most one fill may hold (0: no pipe to be had: copy instead)."""
        if self.ends is None:
            try:
                r, w = os.pipe2(os.O_CLOEXEC)
            except OSError:
                return 0
            try:
                fcntl.fcntl(w, _SETPIPE_SZ, SIZE)
            except OSError:
                pass             # over /proc/sys/fs/pipe-max-size: the pipe's default
            self.ends, self.size = (r, w), fcntl.fcntl(w, _GETPIPE_SZ)
        return self.size

    def drop(self) -> None:
        """Close a pipe that may hold bytes nobody wants; the next `room` makes another."""
        if self.ends is not None:
            for fd in self.ends:
                os.close(fd)
            self.ends = None

    def fill(self, fd: int, pos: int, length: int) -> bool:
        """`length` (at most `room()`) bytes of `fd` at `pos` into the empty pipe; False, the
        pipe emptied, if the file failed or had fewer."""
        w = self.ends[1]
        done = 0
        try:
            while done < length:
                n = os.splice(fd, w, length - done, offset_src=pos + done)
                if not n:
                    break
                done += n
        except OSError:
            pass
        if done == length:
            return True
        self.drop()
        return False

    def send(self, sock: int, sock_flags: int, length: int) -> int:
        """Move the pipe's `length` bytes to the socket without waiting for room; how many
        are left in the pipe. Raises OSError (the pipe dropped) if the socket failed."""
        r = self.ends[0]
        fcntl.fcntl(sock, fcntl.F_SETFL, sock_flags | os.O_NONBLOCK)
        try:
            while length:
                length -= os.splice(r, sock, length)
        except BlockingIOError:
            pass
        except OSError:
            self.drop()
            raise
        finally:
            fcntl.fcntl(sock, fcntl.F_SETFL, sock_flags)
        return length

    def take(self, length: int) -> bytes:
        """The pipe's `length` bytes, read out."""
        r = self.ends[0]
        chunks = []
        while length:
            chunk = os.read(r, length)
            chunks.append(chunk)
            length -= len(chunk)
        return b"".join(chunks)


class Payload:
    """A big WRITE whose payload is on its way from the socket to the file (`move`)."""

    def __init__(self, header: bytes, fd: int, pos: int, length: int, moved: int) -> None:
        self.header = header          # the request's 28 bytes
        self.fd, self.pos, self.length = fd, pos, length
        self.moved = moved            # bytes of the payload already in the file
        self.held = b""               # bytes taken from the socket the file did not take

    def move(self, pipe: Pipe, sock: int) -> bool | None:
        """Move what the socket has: True once the payload is all in the file, False if the
        socket has no more for now. None if the file failed: `unserved` then gives the
        request back. Raises OSError for the socket's errors, EOFError at its end."""
        r, w = pipe.ends
        while self.moved < self.length:
            try:
                n = os.splice(sock, w, min(self.length - self.moved, pipe.size), flags=_NONBLOCK)
            except BlockingIOError:
                return False
            except OSError:
                pipe.drop()
                raise
            if not n:
                raise EOFError
            done = 0
            try:
                while done < n:
                    done += os.splice(r, self.fd, n - done, offset_dst=self.pos + self.moved + done)
            except OSError:
                self.moved += done
                self.held = pipe.take(n - done)
                return None
            self.moved += n
        return True

    def unserved(self) -> bytes:
        """The request's bytes taken from the socket so far, as the client sent them: the
        header, the part already in the file (read back) and the part held. Raises OSError
        if the file does not give that part back."""
        written = os.pread(self.fd, self.moved, self.pos) if self.moved else b""
        if len(written) != self.moved:
            raise OSError(5, "the file gave back less than was written to it")
        return self.header + written + self.held
