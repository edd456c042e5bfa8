"""lockfs: freeze (FIFREEZE) every filesystem mounted on a device's loop devices, and thaw.

The kernel's `dm_suspend` calls `freeze_bdev` on the mapped device; userdm's filesystems sit
on loop devices over a device's FUSE file (its own block device, `userdm.export.blockdev`,
or any loop device a user attached by hand). Those are found by their backing file
(/sys/block/loopN/loop/backing_file), their mounts by device number in /proc/self/mountinfo;
each filesystem is frozen once (a bind mount is the same superblock).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterable

from ...errors import DMError
from . import loop

log = logging.getLogger("userdm.blockdev")

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts_on(devnos: Iterable[tuple[int, int]]) -> list[tuple[tuple[int, int], str]]:
    """(device number, mount point) of one mount of each filesystem on those devices."""
    wanted = set(devnos)
    out: dict[tuple[int, int], str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        try:
            major, minor = (int(x) for x in fields[2].split(":"))
        except ValueError:
            continue
        if (major, minor) in wanted and (major, minor) not in out:
            out[(major, minor)] = _unescape(fields[4])
    return sorted(out.items())


def loops_over(paths: Iterable[str], extra: Iterable[int] = ()) -> list[int]:
    """The loop devices whose backing file is one of `paths`, and the `extra` ones."""
    wanted = set(paths)
    found = {number for number, backing in loop.backing_files().items() if backing in wanted}
    return sorted(found | set(extra))


def _ioctl(mountpoint: str, request: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze(name: str, loops: Iterable[int]) -> Callable[[], None] | None:
    """Freeze every filesystem mounted on `loops`; returns the thaw of those frozen (None if
    none was). If one cannot be frozen, those already frozen are thawed and DMError carries
    that filesystem's errno and a sentence naming it."""
    numbers = {}
    for number in loops:
        dn = loop.devno(number)
        if dn is not None:
            numbers[dn] = number
    frozen: list[str] = []
    for dn, mountpoint in mounts_on(numbers):
        try:
            _ioctl(mountpoint, FIFREEZE)
        except OSError as exc:
            _thaw_all(frozen)
            raise DMError(exc.errno or errno.EIO, f"suspend {name}: cannot freeze the filesystem mounted at "
                          f"{mountpoint} (on {loop.loop_path(numbers[dn])}): {exc.strerror}; "
                          "nothing was suspended (use --nolockfs to suspend without freezing)") from None
        frozen.append(mountpoint)
        log.info("froze %s (on %s) for %s", mountpoint, loop.loop_path(numbers[dn]), name)
    if not frozen:
        return None
    return lambda: _thaw_all(frozen)


def _thaw_all(mountpoints: list[str]) -> None:
    for mountpoint in reversed(mountpoints):
        try:
            _ioctl(mountpoint, FITHAW)
        except OSError as exc:  # unmounted meanwhile, or thawed from outside: nothing stays frozen
            if exc.errno != errno.EINVAL:
                log.warning("cannot thaw %s: %s", mountpoint, exc)
