"""Notice when the file behind a file-backed disk is deleted, and mark the disk dead (DESIGN §6).

A regular file keeps working through its open descriptor after its last name is removed, but
nobody can reach that data any more and it vanishes at the last close: the disk is gone, as a
hot-unplugged disk is. One inotify instance per process watches every file-backed disk for
changes of its link count (IN_ATTRIB) and for the unmount of its filesystem (IN_UNMOUNT); when
the file has no name left (`st_nlink == 0`) or its filesystem went away, the disk is marked dead
(`BlockDevice.mark_dead(surprise=True)`), which travels to the holders up the stack. A renamed
file, or one with another hard link left, lives on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from typing import Any

log = logging.getLogger("userdm.block.watch")

IN_ATTRIB = 0x00000004
IN_DELETE_SELF = 0x00000400
IN_UNMOUNT = 0x00002000
IN_IGNORED = 0x00008000
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_ATTRIB | IN_DELETE_SELF | IN_UNMOUNT

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class FileWatch:
    """The process's inotify watches over file-backed disks (anything with `path`, `fd` and
    `mark_dead`); a thread of its own reads the events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        #: watch descriptor -> the disks on that inode (the kernel gives one per inode)
        self._disks: dict[int, list[Any]] = {}
        self._wd_of: dict[int, int] = {}  # id(disk) -> its watch descriptor

    def add(self, disk: Any) -> None:
        """Watch `disk.path`; a file that is already gone marks the disk dead at once."""
        with self._lock:
            if self._fd < 0:
                fd = _libc.inotify_init1(IN_CLOEXEC)
                if fd < 0:
                    log.warning("cannot watch backing files: inotify_init1: %s", os.strerror(ctypes.get_errno()))
                    return
                self._fd = fd
                threading.Thread(target=self._run, name="userdm-file-watch", daemon=True).start()
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(disk.path), WATCH_MASK)
            if wd < 0:
                log.warning("cannot watch %s for deletion: %s", disk.path, os.strerror(ctypes.get_errno()))
                return
            self._disks.setdefault(wd, []).append(disk)
            self._wd_of[id(disk)] = wd
        self._check(disk, 0)  # deleted between its open and the watch

    def remove(self, disk: Any) -> None:
        with self._lock:
            wd = self._wd_of.pop(id(disk), None)
            disks = self._disks.get(wd, []) if wd is not None else []
            if disk in disks:
                disks.remove(disk)
                if not disks:
                    del self._disks[wd]
                    _libc.inotify_rm_watch(self._fd, wd)

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("backing-file watch stopped: %s", exc)
                return
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size + length
                with self._lock:
                    disks = list(self._disks.get(wd, ()))
                    if mask & IN_IGNORED:  # the kernel dropped the watch (file freed, fs unmounted)
                        self._disks.pop(wd, None)
                for disk in disks:
                    self._check(disk, mask)

    @staticmethod
    def _check(disk: Any, mask: int) -> None:
        if disk.dead:
            return
        if mask & (IN_UNMOUNT | IN_DELETE_SELF):
            disk.mark_dead(True)
            return
        try:
            gone = os.fstat(disk.fd).st_nlink == 0
        except OSError:
            return  # closed meanwhile
        if gone:
            log.warning("%s was deleted: the device is gone", disk.path)
            disk.mark_dead(True)


#: the one watch of this process
WATCH = FileWatch()
