"""Where the daemon lives: the runtime directory (sockets, FUSE) and the state directory."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("USERDM_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/userdm")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/userdm-{os.geteuid()}"
    return Path(xdg) / "userdm"


def state_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("USERDM_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/userdm")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "userdm"


def control_socket(rundir: Path) -> Path:
    return rundir / "control"


def nbd_socket(rundir: Path) -> Path:
    return rundir / "nbd.sock"


def fuse_dir(rundir: Path) -> Path:
    return rundir / "mapper"
