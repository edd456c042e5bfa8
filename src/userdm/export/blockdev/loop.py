"""Kernel loop devices through their ioctls (`/dev/loop-control`, LOOP_CONFIGURE ...).

No subprocess: the daemon serves the FUSE files that its loop devices read, and a child
process started while the daemon holds one of those files open could hang it (see
`userdm.export.fuse.export`). The FUSE file is open only for the LOOP_CONFIGURE call.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from ...dm.hooks import SPAWN_LOCK
from ...errors import DMError

LOOP_MAJOR = 7
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16

#: struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt_type,
#: encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32], init[2]
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
_FLAGS_AT = 5 * 8 + 3 * 4
#: struct loop_config: fd, block_size, info, reserved[8]
_CONFIG = struct.Struct("=II" + _INFO64.format[1:] + "8Q")

ATTACH_TRIES = 16


def loop_path(number: int) -> str:
    return f"/dev/loop{number}"


def attach(backing: str, *, read_only: bool, block_size: int = 512, direct_io: bool = True) -> int:
    """A free loop device over `backing`, configured in one step (LOOP_CONFIGURE); returns its
    number. DMError with the errno and a sentence if no loop device can be had."""
    with SPAWN_LOCK:  # no hook process may be started while the daemon holds a FUSE file open
        return _attach(backing, read_only, block_size, direct_io)


def _attach(backing: str, read_only: bool, block_size: int, direct_io: bool) -> int:
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        backing_fd = os.open(backing, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise DMError(exc.errno or errno.EIO, f"cannot open {backing} for a loop device: {exc.strerror}") from None
    try:
        lo_flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_DIRECT_IO if direct_io else 0)
        name = os.fsencode(backing)[:63]
        config = _CONFIG.pack(backing_fd, block_size, 0, 0, 0, 0, 0, 0, 0, 0, lo_flags, name, b"", b"", 0, 0,
                              *([0] * 8))
        last: OSError | None = None
        for _ in range(ATTACH_TRIES):
            number = _get_free()
            try:
                fd = os.open(loop_path(number), (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            except OSError as exc:
                raise DMError(exc.errno or errno.EIO, f"cannot open {loop_path(number)}: {exc.strerror}") from None
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                return number
            except OSError as exc:
                if exc.errno != errno.EBUSY:  # EBUSY: another process took it first; take the next
                    raise DMError(exc.errno or errno.EIO, f"cannot attach {loop_path(number)} to {backing}: "
                                  f"{exc.strerror}") from None
                last = exc
            finally:
                os.close(fd)
        raise DMError(errno.EBUSY, f"no free loop device for {backing} after {ATTACH_TRIES} tries ({last})")
    finally:
        os.close(backing_fd)


def _get_free() -> int:
    try:
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DMError(exc.errno or errno.EIO, f"cannot open /dev/loop-control: {exc.strerror}") from None
    try:
        return fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise DMError(exc.errno or errno.EIO, f"/dev/loop-control has no free loop device: {exc.strerror}") from None
    finally:
        os.close(fd)


def in_use(number: int) -> bool:
    """Whether something holds the loop device exclusively (a mounted filesystem, swap ...):
    an O_EXCL open of it fails with EBUSY then."""
    try:
        fd = os.open(loop_path(number), os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return False
        raise DMError(exc.errno or errno.EIO, f"cannot open {loop_path(number)}: {exc.strerror}") from None
    os.close(fd)
    return False


def detach(number: int) -> None:
    """LOOP_CLR_FD: the loop device lets go of its file at its last close (at once if nobody
    else has it open; when a mounted filesystem is unmounted otherwise). ENXIO (not attached)
    is not an error."""
    try:
        fd = os.open(loop_path(number), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise DMError(exc.errno or errno.EIO, f"cannot detach {loop_path(number)}: {exc.strerror}") from None
    finally:
        os.close(fd)


def set_autoclear(number: int, on: bool) -> None:
    """Set or clear LO_FLAGS_AUTOCLEAR (detach at the last close)."""
    fd = os.open(loop_path(number), os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = bytearray(_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        lo_flags = struct.unpack_from("=I", info, _FLAGS_AT)[0]
        lo_flags = (lo_flags | LO_FLAGS_AUTOCLEAR) if on else (lo_flags & ~LO_FLAGS_AUTOCLEAR)
        struct.pack_into("=I", info, _FLAGS_AT, lo_flags)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
    except OSError as exc:
        raise DMError(exc.errno or errno.EIO, f"cannot change the flags of {loop_path(number)}: "
                      f"{exc.strerror}") from None
    finally:
        os.close(fd)


def set_capacity(number: int) -> None:
    """LOOP_SET_CAPACITY: the loop device takes the new size of its file."""
    fd = os.open(loop_path(number), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY)
    except OSError as exc:
        raise DMError(exc.errno or errno.EIO, f"cannot resize {loop_path(number)}: {exc.strerror}") from None
    finally:
        os.close(fd)


def backing_files() -> dict[int, str]:
    """Every attached loop device's backing file, from /sys/block/loopN/loop/backing_file."""
    out = {}
    try:
        entries = os.listdir("/sys/block")
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("loop") or not entry[4:].isdigit():
            continue
        try:
            with open(f"/sys/block/{entry}/loop/backing_file", encoding="utf-8", errors="surrogateescape") as f:
                out[int(entry[4:])] = f.read().rstrip("\n")
        except OSError:
            continue
    return out


def devno(number: int) -> tuple[int, int] | None:
    """The loop device's MAJOR:MINOR, from sysfs."""
    try:
        with open(f"/sys/block/loop{number}/dev", encoding="ascii") as f:
            major, minor = f.read().strip().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def wait_detached(number: int, backing: str, timeout: float = 5.0) -> bool:
    """Wait until loop `number` no longer has `backing` (its detach completes at its last
    close); True if it let go within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while backing_files().get(number) == backing:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
