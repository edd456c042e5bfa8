"""The state file: devices and tables that must survive a daemon restart, written atomically."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("userdm.state")

STATE_FILE = "devices.json"


def load(state_dir: str) -> dict[str, Any]:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("ignoring unreadable state file %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def save(state_dir: str, state: dict[str, Any]) -> None:
    """Write to a temporary file, fsync it, rename it over the old one, fsync the directory."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, STATE_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
