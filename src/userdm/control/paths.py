"""Where the daemon lives: the runtime directory (sockets, FUSE) and the state directory."""

from __future__ import annotations

import os
from pathlib import Path


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
