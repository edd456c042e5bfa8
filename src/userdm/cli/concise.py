"""dmsetup's concise device format (`create --concise`, `table --concise`).

`<name>,<uuid>,<minor>,<flags>,<table line>[,<table line>...][;<next device>...]`: commas
separate the fields of a device, semicolons separate devices, a backslash escapes the next
character (a comma, semicolon or backslash in a name or a table). uuid, minor and flags may be
empty; flags is `ro` or `rw` (the default); a device without table lines is created without a
table.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from ..errors import DMError, quoted


@dataclass
class ConciseDevice:
    name: str
    uuid: str | None = None
    minor: int | None = None
    readonly: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def table(self) -> str | None:
        return "\n".join(self.lines) + "\n" if self.lines else None


def _split(text: str) -> list[list[str]]:
    """Devices, each a list of fields, with escapes resolved."""
    devices: list[list[str]] = [[]]
    current: list[str] = []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise DMError(errno.EINVAL, "concise device specification ends with a lone backslash")
            current.append(nxt)
        elif c == ",":
            devices[-1].append("".join(current))
            current = []
        elif c == ";":
            devices[-1].append("".join(current))
            current = []
            devices.append([])
        else:
            current.append(c)
    devices[-1].append("".join(current))
    return devices


def parse(text: str) -> list[ConciseDevice]:
    """The devices of a concise specification; EINVAL naming the device and field at fault."""
    text = text.strip()
    if not text:
        raise DMError(errno.EINVAL, "empty concise device specification")
    out = []
    for n, fields in enumerate(_split(text), 1):
        if len(fields) < 4:
            raise DMError(errno.EINVAL, f"concise device {n} {quoted(','.join(fields))}: expected "
                          "<name>,<uuid>,<minor>,<flags>[,<table line>...]")
        name, uuid, minor, flags = (f.strip() for f in fields[:4])
        if not name:
            raise DMError(errno.EINVAL, f"concise device {n}: the name is empty")
        if minor and not minor.isdigit():
            raise DMError(errno.EINVAL, f"concise device {n} ({name}): minor {quoted(minor)} is not a number")
        if flags not in ("", "ro", "rw"):
            raise DMError(errno.EINVAL, f"concise device {n} ({name}): flags {quoted(flags)} are not ro or rw")
        lines = [line.strip() for line in fields[4:] if line.strip()]   # `name,,,,` has no table
        out.append(ConciseDevice(name, uuid or None, int(minor) if minor else None, flags == "ro", lines))
    return out


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")


def format_device(info: dict[str, Any], lines: list[str]) -> str:
    """One device as `table --concise` prints it (the table only if it has one)."""
    fields = [info["name"], info["uuid"] or "", str(info["minor"]), "ro" if info["readonly"] else "rw"]
    return ",".join(_escape(f) for f in fields + lines)


def dependency_order(tree: list[dict[str, Any]]) -> list[str]:
    """Device names, each after the mapped devices its tables use (ties by name), so that
    `create --concise` can recreate them from `table --concise` in one pass."""
    by_name = {d["name"]: d for d in tree}
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in by_name:
            return
        seen.add(name)
        for dep in by_name[name]["deps"]:
            if dep.get("device"):
                visit(dep["device"])
        done.append(name)

    for name in sorted(by_name):
        visit(name)
    return done
