"""Where the daemon lives: the runtime directory (sockets, FUSE) and the state directory, and
the rules that make them safe to use.

The daemon creates both directories with mode 0700 and refuses (EPERM, saying why) one that is
a symbolic link, is not owned by its own user, or is writable by group or others: someone else
could replace its sockets or its saved tables. A `mapper` entry in the runtime directory that
is a symbolic link or is owned by another user is refused the same way (the FUSE mount point
itself is made as DESIGN.md says). Every check uses `lstat`: a planted symlink is never followed.

A client (`userdm.connect`, the CLI) refuses to talk to a control socket whose directory is
owned by anyone but itself or root, or is writable by group or others (EPERM): it would
otherwise send its tables to, and accept file descriptors from, whoever planted the socket.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import DMError


def _choose(explicit: str | None, env: str, root_default: str, user_base: str) -> Path:
    """The explicit option, else the environment variable, else root's or the user's default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(env):
        return Path(os.environ[env])
    if os.geteuid() == 0:
        return Path(root_default)
    return Path(user_base) / "userdm"


def runtime_dir(explicit: str | None = None) -> Path:
    user = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/userdm-{os.geteuid()}"
    return _choose(explicit, "USERDM_RUNTIME_DIR", "/run/userdm", user)


def state_dir(explicit: str | None = None) -> Path:
    user = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return _choose(explicit, "USERDM_STATE_DIR", "/var/lib/userdm", user)


def control_socket(rundir: Path) -> Path:
    return rundir / "control"


def nbd_socket(rundir: Path) -> Path:
    return rundir / "nbd.sock"


def fuse_dir(rundir: Path) -> Path:
    return rundir / "mapper"


def block_dir(rundir: Path) -> Path:
    """`dev/`: links to the devices' kernel block devices (`userdm.export.blockdev`)."""
    return rundir / "dev"


def _refuse_link(path: Path, what: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise DMError(errno.EPERM, f"{what} {path} is a symbolic link (to {target}); "
                      "refusing to follow it: remove it, or choose another directory")


def _refuse_owner(path: Path, what: str, st: os.stat_result, owners: tuple[int, ...]) -> None:
    if st.st_uid not in owners:
        whom = " or ".join(f"uid {uid}" for uid in owners)
        raise DMError(errno.EPERM, f"{what} {path} is owned by uid {st.st_uid}, not by {whom}; "
                      "refusing to use it")


def _refuse_writable(path: Path, what: str, st: os.stat_result) -> None:
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DMError(errno.EPERM, f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: writable by "
                      "group or others; refusing to use it (chmod go-w, or choose another directory)")


def check_private_dir(path: Path, what: str) -> None:
    """EPERM unless `path` is a real directory owned by us and writable by nobody else."""
    st = os.lstat(path)
    _refuse_link(path, what, st)
    if not stat.S_ISDIR(st.st_mode):
        raise DMError(errno.ENOTDIR, f"{what} {path} is not a directory")
    _refuse_owner(path, what, st, (os.geteuid(),))
    _refuse_writable(path, what, st)


def private_dir(path: Path, what: str) -> Path:
    """Create `path` with mode 0700 if it does not exist (its parents as usual); then check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)  # whatever the umask
    check_private_dir(path, what)
    return path


def check_mapper(path: Path) -> None:
    """EPERM if the FUSE mount point is a symbolic link or someone else's. A stale mount of a
    crashed daemon (ENOTCONN) is left to the FUSE export, which cleans it up."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    what = "FUSE directory"
    _refuse_link(path, what, st)
    _refuse_owner(path, what, st, (os.geteuid(),))


def prepare_daemon_dirs(rundir: Path, statedir: Path) -> None:
    """The daemon's directories, created 0700 and checked, before anything is put in them."""
    private_dir(rundir, "runtime directory")
    private_dir(statedir, "state directory")
    check_mapper(fuse_dir(rundir))


def check_socket_dir(directory: str) -> None:
    """A client's check of the directory of the control socket it is about to use (a missing
    one is left to `connect`, which says the daemon is not running)."""
    try:
        st = os.lstat(directory)
    except OSError:
        return
    what = "the control socket's directory"
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(directory)  # a symlinked runtime directory is the user's choice: judge its target
    _refuse_owner(Path(directory), what, st, tuple(sorted({0, os.geteuid()})))
    _refuse_writable(Path(directory), what, st)
