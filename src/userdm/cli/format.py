"""dmsetup's output formats, as pure functions from the Mapper's results to text."""

from __future__ import annotations

import os
from typing import Any


def state_line(info: dict[str, Any]) -> str:
    state = "SUSPENDED" if info["suspended"] else "ACTIVE"
    if info["readonly"]:
        state += " (READ-ONLY)"
    if info["deferred_remove"]:
        state += " (DEFERRED REMOVE)"
    return state


def tables_present(info: dict[str, Any]) -> str:
    if info["live"] and info["inactive"]:
        return "LIVE & INACTIVE"
    if info["live"]:
        return "LIVE"
    if info["inactive"]:
        return "INACTIVE"
    return "None"


def userdm_flags(info: dict[str, Any]) -> list[str]:
    flags = []
    if info.get("shared"):
        flags.append("shared")
    if info.get("autoclear"):
        flags.append("autoclear")
    if info.get("no_open"):
        flags.append("no-open")
    if info.get("max_opens"):
        flags.append(f"max-opens {info['max_opens']}")
    if info.get("interposing"):
        flags.append(f"interposing {info['interposing']}")
    if info.get("interposed_by"):
        flags.append(f"interposed by {', '.join(info['interposed_by'])}")
    if info.get("block_device"):
        flags.append(f"blockdev {info['block_device']}")
    return flags


def query_inactive(info: dict[str, Any]) -> dict[str, Any]:
    """The info as the kernel answers with DM_QUERY_INACTIVE_TABLE_FLAG (`info --inactive`): the
    number of targets and the read-only flag are the inactive table's (0 and read-write without
    one); the rest, `Tables present` included, is the device's."""
    return {**info, "target_count": info.get("inactive_target_count", 0),
            "readonly": info.get("inactive_readonly", False)}


def info_long(info: dict[str, Any], *, opencount: bool = True) -> str:
    """`dmsetup info NAME`."""
    lines = [
        f"Name:              {info['name']}",
        f"State:             {state_line(info)}",
    ]
    if info["live"]:
        lines.append("Read Ahead:        256")
    lines.append(f"Tables present:    {tables_present(info)}")
    if opencount:
        lines.append(f"Open count:        {info['open_count']}")
    lines += [
        f"Event number:      {info['event_nr']}",
        f"Major, minor:      {info['major']}, {info['minor']}",
        f"Number of targets: {info['target_count']}",
    ]
    if info["uuid"]:
        lines.append(f"UUID: {info['uuid']}")
    flags = userdm_flags(info)
    if flags:
        lines.append(f"userdm flags:      {', '.join(flags)}")
    if info.get("restore_error"):
        lines.append(f"Not restored:      {info['restore_error']}")
    return "\n".join(lines) + "\n"


def attr(info: dict[str, Any]) -> str:
    return ("L" if info["live"] else "-") + ("I" if info["inactive"] else "-") + \
        ("s" if info["suspended"] else "-") + ("r" if info["readonly"] else "w")


def kernel_name(devno: list[int] | None) -> str | None:
    """A block device's kernel name (`loop0`) from sysfs, as libdm's dm_device_get_name."""
    if not devno:
        return None
    try:
        return os.path.basename(os.readlink(f"/sys/dev/block/{devno[0]}:{devno[1]}"))
    except OSError:
        return None


def dep_label(dep: dict[str, Any], name_type: str = "devno") -> str:
    """One dependency as `deps -o devno|blkdevname|devname` shows it: a mapped device is dm-N
    or its name, another block device its kernel name (`loop0`) in both cases, a number when
    sysfs does not know it; a file (userdm's) is its path."""
    devno = dep["devno"]
    if not devno:
        return f"({dep['name']})"
    if name_type != "devno":
        if dep.get("device"):
            return f"({dep['device'] if name_type == 'devname' else f'dm-{devno[1]}'})"
        kname = kernel_name(devno)
        if kname:
            return f"({kname})"
    return f"({devno[0]}, {devno[1]})"


def deps_line(deps: list[dict[str, Any]], name_type: str = "devno") -> str:
    return f"{len(deps)} dependencies\t:" + "".join(" " + dep_label(d, name_type) for d in deps)


def table_line(line: list[Any]) -> str:
    start, length, ttype, params = line
    return f"{start} {length} {ttype} {params}"


def ls_line(info: dict[str, Any]) -> str:
    return f"{info['name']}\t({info['major']}:{info['minor']})"
