"""dmsetup's output formats, as pure functions from the Mapper's results to text."""

from __future__ import annotations

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


#: `info -c` fields: name -> (heading, minimum width, right-aligned, value)
FIELDS: dict[str, tuple[str, int, bool, Any]] = {
    "name": ("Name", 16, False, lambda i: i["name"]),
    "major": ("Maj", 3, True, lambda i: i["major"]),
    "minor": ("Min", 3, True, lambda i: i["minor"]),
    "attr": ("Stat", 4, False, attr),
    "open": ("Open", 4, True, lambda i: i["open_count"]),
    "segments": ("Targ", 4, True, lambda i: i["target_count"]),
    "events": ("Event", 6, True, lambda i: i["event_nr"]),
    "uuid": ("UUID", 32, False, lambda i: i["uuid"]),
    "devno": ("DevNo", 5, False, lambda i: f"{i['major']}:{i['minor']}"),
    "blkdevname": ("BlkDevName", 10, False, lambda i: f"dm-{i['minor']}"),
    "flags": ("Flags", 5, False, lambda i: ",".join(userdm_flags(i)) or "-"),
    "diskseq": ("DiskSeq", 7, True, lambda i: i.get("diskseq") or "-"),
}
DEFAULT_FIELDS = ["name", "major", "minor", "attr", "open", "segments", "events", "uuid"]


def parse_fields(spec: str | None) -> list[str]:
    """`-o` option: a comma list, `+f` appends to the defaults."""
    if not spec:
        return list(DEFAULT_FIELDS)
    fields = list(DEFAULT_FIELDS) if spec.startswith("+") else []
    for name in spec.lstrip("+").split(","):
        name = name.strip()
        if name not in FIELDS:
            raise ValueError(f"unrecognised field {name!r}; choose from {', '.join(FIELDS)}")
        fields.append(name)
    return fields


def info_columns(infos: list[dict[str, Any]], fields: list[str], *, headings: bool = True,
                 separator: str = " ") -> str:
    """`dmsetup info -c`: aligned columns (numbers right, text left)."""
    rows = [[str(FIELDS[f][3](i)) for f in fields] for i in infos]
    widths = [max([FIELDS[f][1], len(FIELDS[f][0])] + [len(r[n]) for r in rows]) for n, f in enumerate(fields)]
    out = []

    def line(cells: list[str], align: bool = True) -> str:
        parts = [c.rjust(w) if align and FIELDS[f][2] else c.ljust(w) for c, w, f in zip(cells, widths, fields)]
        return separator.join(parts).rstrip()

    if headings:  # libdm left-aligns every heading
        out.append(line([FIELDS[f][0] for f in fields], align=False))
    out += [line(r) for r in rows]
    return "\n".join(out) + "\n" if out else ""


def dep_label(dep: dict[str, Any]) -> str:
    if dep["devno"]:
        return f"({dep['devno'][0]}, {dep['devno'][1]})"
    return f"({dep['name']})"


def deps_line(deps: list[dict[str, Any]]) -> str:
    return f"{len(deps)} dependencies\t:" + "".join(" " + dep_label(d) for d in deps)


def table_line(line: list[Any]) -> str:
    start, length, ttype, params = line
    return f"{start} {length} {ttype} {params}"


def ls_line(info: dict[str, Any]) -> str:
    return f"{info['name']}\t({info['major']}:{info['minor']})"


def tree(devices: list[dict[str, Any]]) -> str:
    """`dmsetup ls --tree`: devices not used by other mapped devices at the top, their
    dependencies below; an edge opened without a claim is marked [shared], and a device
    held by its kernel block device `[blockdev /dev/loopN]`."""
    by_name = {d["name"]: d for d in devices}
    used = {dep["device"] for d in devices for dep in d["deps"] if dep["device"]}
    out: list[str] = []

    def label(name: str, devno: list[int] | None) -> str:
        return f"{name} ({devno[0]}:{devno[1]})" if devno else name

    def walk(dev: dict[str, Any], prefix: str, seen: frozenset[str]) -> None:
        deps = dev["deps"]
        for n, dep in enumerate(deps):
            last = n == len(deps) - 1
            branch = "└─" if last else "├─"
            if dep["device"]:
                text = label(dep["device"], dep["devno"])
            elif dep["devno"]:
                text = f" ({dep['devno'][0]}:{dep['devno'][1]})"
            else:
                text = dep["name"]
            if dep["shared"]:
                text += " [shared]"
            out.append(f"{prefix}{branch}{text}")
            child = by_name.get(dep["device"]) if dep["device"] else None
            if child is not None and child["name"] not in seen:
                walk(child, prefix + ("   " if last else "│  "), seen | {child["name"]})

    for dev in devices:
        if dev["name"] in used:
            continue
        held = f" [blockdev {dev['block_device']}]" if dev.get("block_device") else ""
        out.append(label(dev["name"], [dev["major"], dev["minor"]]) + held)
        walk(dev, " ", frozenset({dev["name"]}))
    return "\n".join(out) + "\n" if out else ""
