"""Finding and removing FUSE mounts: stale mounts left by a crashed daemon, and forced unmounts.

A daemon killed with SIGKILL leaves its FUSE mount behind; every access to it then fails with
ENOTCONN ("Transport endpoint is not connected") until someone unmounts it. `cleanup_stale`
does that before a new daemon mounts at the same place. Unmounts are lazy (MNT_DETACH), as a
loop device that is still attached to a file of the mount would make a plain unmount EBUSY.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from ...errors import DMError

_STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fuse_mounts() -> dict[str, str]:
    """Mount point -> filesystem type (`fuse.NAME`) of every FUSE mount this process can see."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            fstype = rest.split(" ", 1)[0]
            if len(parts) >= 5 and (fstype == "fuse" or fstype.startswith("fuse.")):
                mounts[_unescape(parts[4])] = fstype
    return mounts


def is_fuse_mount(path: str | os.PathLike[str]) -> bool:
    return os.path.realpath(path) in fuse_mounts() or os.path.abspath(path) in fuse_mounts()


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    """Detach the FUSE mount at `path` now; it goes away when its last user does."""
    path = os.fspath(path)
    tried = []
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if shutil.which(cmd[0]) is None:
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        tried.append(f"{' '.join(cmd)}: {result.stderr.strip() or result.returncode}")
    raise DMError(errno.EBUSY, f"cannot unmount {path}: " + ("; ".join(tried) or "neither fusermount3 nor umount found"))


def cleanup_stale(mountpoint: str | os.PathLike[str]) -> bool:
    """Unmount a dead FUSE mount at `mountpoint` (ENOTCONN on stat). Returns True if there was one.

    A live mount (one that answers) is left alone."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno not in _STALE_ERRNOS:
            return False
        lazy_unmount(mountpoint)
        return True
    return False
