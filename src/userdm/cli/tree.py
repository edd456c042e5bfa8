"""`ls --tree [-o OPTIONS]`: the device tree as dmsetup draws it (dmsetup.c's tree drawing).

The tree is built as libdm's dm_tree builds it: devices are added in list order, each with its
dependencies depth first; a device nobody uses hangs from the root, and so does (inverted) a
device that uses nothing. Options (`-o`, a comma list, later ones win):

- `device`/`nodevice`: show MAJOR:MINOR (the default; `nodevice` also hides devices that
  have no name, the underlying block devices);
- `blkdevname`: the kernel name, `<dm-0>`, `<loop0>`;
- `active`, `rw`, `open`, `uuid`: attributes in brackets (`[ACTIVE, RW, 0, uuid]`);
- `ascii`, `utf`, `vt100`: the line drawing characters (utf by default in a UTF-8 locale);
- `compact`: a device with one line of children continues on its line (`-+-`, `---`);
- `inverted`: from the underlying devices up to their users;
- `notrunc`: no truncation of lines at the terminal's width (80 off a terminal);
- `table`, `status`: accepted as dmsetup accepts them (dmsetup draws nothing for them, but
  they turn `compact` off).

userdm adds `[shared]` after a device opened without a claim and `[blockdev PATH]` after a
device with a kernel block device. Files (userdm's devices over regular files) are leaves named
by their path.
"""

from __future__ import annotations

import errno
import locale
import os
import sys
from typing import Any

from ..errors import DMError
from .format import kernel_name

ASCII = ("  ", "|-", "| ", "`-", "---", "-+-")
UTF = ("  ", "\u251c\u2500", "\u2502 ", "\u2514\u2500", "\u2500\u2500\u2500", "\u2500\u252c\u2500")
_VB, _VE = "\033(0\017", "\033(B"
VT100 = ("  ", _VB + "tq" + _VE, _VB + "x" + _VE + " ", _VB + "mq" + _VE, _VB + "qqq" + _VE,
         _VB + "qwq" + _VE)
EMPTY, BRANCH, VERT, LAST, SINGLE, FIRST = range(6)

SWITCHES = ("device", "blkdevname", "table", "status", "active", "rw", "open", "uuid", "compact",
            "truncate", "inverted")
#: `-o` words that set a switch
SWITCH_OPTIONS = {
    "active": ("active", True), "blkdevname": ("blkdevname", True), "compact": ("compact", True),
    "device": ("device", True), "inverted": ("inverted", True), "nodevice": ("device", False),
    "notrunc": ("truncate", False), "open": ("open", True), "rw": ("rw", True),
    "status": ("status", True), "table": ("table", True), "uuid": ("uuid", True),
}
#: `-o` words that choose the drawing characters
SYMBOL_OPTIONS = {"ascii": ASCII, "utf": UTF, "vt100": VT100}


class Node:
    """A dm_tree node: a mapped device, or a device or file under one. Its links keep their
    order of creation, as libdm's lists do (dicts by id: a tree of thousands of devices is
    built in linear time)."""

    def __init__(self, name: str, devno: list[int] | None, info: dict[str, Any] | None) -> None:
        self.name, self.devno, self.info = name, devno, info
        self.uses: dict[int, tuple[Node, bool]] = {}      # (child, opened shared)
        self.used_by: dict[int, tuple[Node, bool]] = {}

    def linked(self, child: "Node") -> bool:
        return id(child) in self.uses

    def link(self, child: "Node", shared: bool = False) -> None:
        if not self.linked(child):
            self.uses[id(child)] = (child, shared)
            child.used_by[id(self)] = (self, shared)

    def unlink(self, child: "Node") -> None:
        self.uses.pop(id(child), None)
        child.used_by.pop(id(self), None)


def build(devices: list[dict[str, Any]]) -> Node:
    """libdm's dm_tree over the devices of `Mapper.tree()`: the root's `uses` are the devices
    nobody uses, its `used_by` those that use nothing, each list in the order of creation."""
    root = Node("", None, None)
    by_name = {d["name"]: d for d in devices}
    nodes: dict[Any, Node] = {}

    def parents(node: Node) -> int:
        return 0 if root.linked(node) else len(node.used_by)

    def add(parent: Node, key: Any, make: Any, shared: bool) -> None:
        node = nodes.get(key)
        new = node is None
        if node is None:
            node = nodes[key] = make()
        if parent is root:
            if parents(node):
                return
        else:
            root.unlink(node)          # no longer at the top
            parent.unlink(root)        # no longer at the bottom
        parent.link(node, shared)
        if not new:
            return
        dev = by_name.get(node.name) if node.info is not None else None
        if dev is None or not dev["deps"]:
            node.link(root)            # at the bottom
            return
        for dep in dev["deps"]:
            mapped = by_name.get(dep["device"]) if dep.get("device") else None
            if mapped is not None:
                add(node, ("dm", mapped["name"]), _maker(mapped), dep.get("shared", False))
            else:
                key = ("dev", tuple(dep["devno"])) if dep.get("devno") else ("file", dep["name"])
                # a block device shows its number only; a file (userdm's leaf) its path
                name = (dep["device"] or "") if dep.get("devno") else dep["name"]
                add(node, key, lambda n=name, d=dep: Node(n, d.get("devno"), None),
                    dep.get("shared", False))

    for dev in devices:
        add(root, ("dm", dev["name"]), _maker(dev), False)
    return root


def _maker(dev: dict[str, Any]) -> Any:
    return lambda: Node(dev["name"], [dev["major"], dev["minor"]], dev)


def parse_options(spec: str | None) -> tuple[dict[str, bool], tuple[str, ...]]:
    """`-o`: the switches and the drawing characters (dmsetup's _process_tree_options)."""
    switches = {s: False for s in SWITCHES}
    switches["device"] = switches["truncate"] = True
    try:
        utf8 = locale.nl_langinfo(locale.CODESET) == "UTF-8"
    except (AttributeError, ValueError):
        utf8 = False
    symbols = UTF if utf8 else ASCII
    for word in spec.split(",") if spec else []:
        if word in SWITCH_OPTIONS:
            key, value = SWITCH_OPTIONS[word]
            switches[key] = value
        elif word in SYMBOL_OPTIONS:
            symbols = SYMBOL_OPTIONS[word]
        else:
            raise DMError(errno.EINVAL, f"Tree option not recognised: {word}. (choose from "
                          f"{', '.join(sorted([*SWITCH_OPTIONS, *SYMBOL_OPTIONS]))})")
    return switches, symbols


class Drawing:
    """dmsetup's tree output: a cursor that truncates lines at the terminal's width, the
    column widths of compact levels, and which levels have more devices below."""

    def __init__(self, switches: dict[str, bool], symbols: tuple[str, ...], termwidth: int) -> None:
        self.sw, self.sym, self.termwidth = switches, symbols, termwidth
        self.attributes = any(switches[s] for s in ("active", "rw", "open", "uuid"))
        self.compact = switches["compact"] and not self.attributes and not (
            switches["table"] or switches["status"])
        self.out: list[str] = []
        self.x = 1
        self.last_char = ""
        self.width: dict[int, int] = {}
        self.more: dict[int, bool] = {}

    def char(self, c: str) -> None:
        self.x += 1
        if not self.sw["truncate"]:
            self.out.append(c)
            return
        if self.x <= self.termwidth:
            self.out.append(c)
        if self.x == self.termwidth + 1:
            # one character past the width: it is kept for a line that ends right there
            if self.last_char or ord(c) > 0x7f:
                self.out.append("...")
            else:
                self.last_char, self.x = c, self.x - 1

    def string(self, text: str) -> None:
        for c in text:
            self.char(c)

    def newline(self) -> None:
        if self.last_char and self.x == self.termwidth:
            self.out.append(self.last_char)
        self.last_char = ""
        self.out.append("\n")
        self.x = 1

    def prefix(self, depth: int) -> None:
        for d in range(depth):
            self.string(" " * (self.width.get(d, 0) + 1))
            if d == depth - 1:
                self.string(self.sym[BRANCH if self.more.get(depth) else LAST])
            else:
                self.string(self.sym[VERT if self.more.get(d + 1) else EMPTY])

    def node(self, node: Node, shared: bool, depth: int, last: bool, has_children: bool) -> None:
        if not node.name and not (self.sw["device"] or self.sw["blkdevname"]):
            return
        self.more[depth] = not last
        self.width[depth] = 0
        first_on_line = self.x == 1
        if not self.compact or first_on_line:
            self.prefix(depth)
        offset = self.x
        if self.compact and not first_on_line:
            self.string(self.sym[FIRST if self.more[depth] else SINGLE])
        self.string(node.name)
        if self.sw["blkdevname"]:
            kname = f"dm-{node.devno[1]}" if node.info is not None and node.devno else kernel_name(node.devno)
            if kname:
                self.string(f" <{kname}>")
        if self.sw["device"] and node.devno:
            self.string(f" ({node.devno[0]}:{node.devno[1]})")
        if self.attributes and node.info is not None:
            self.string(" [" + ", ".join(self._attributes(node.info)) + "]")
        if shared:
            self.string(" [shared]")
        if node.info is not None and node.info.get("block_device"):
            self.string(f" [blockdev {node.info['block_device']}]")
        if self.compact:
            self.width[depth] = self.x - offset
        if not self.compact or not has_children:
            self.newline()

    def _attributes(self, info: dict[str, Any]) -> list[str]:
        out = []
        if self.sw["active"]:
            out.append("SUSPENDED" if info["suspended"] else "ACTIVE")
        if self.sw["rw"]:
            out.append("RO" if info["readonly"] else "RW")
        if self.sw["open"]:
            out.append(str(info["open_count"]))
        if self.sw["uuid"]:
            out.append(info.get("uuid") or "")
        return out

    def walk(self, root: Node, parent: Node, depth: int, seen: frozenset[int] = frozenset()) -> None:
        inverted = self.sw["inverted"]

        def kids(node: Node) -> list[tuple[Node, bool]]:
            if inverted:
                return [] if root.linked(node) else list(node.used_by.values())
            return [] if node.linked(root) else list(node.uses.values())
        children = kids(parent)
        for n, (child, shared) in enumerate(children):
            if id(child) in seen:      # userdm refuses cycles; never draw one forever
                continue
            has_children = bool(kids(child))
            self.node(child, shared, depth, n == len(children) - 1, has_children)
            if has_children:
                self.walk(root, child, depth + 1, seen | {id(child)})


def draw(devices: list[dict[str, Any]], spec: str | None = None, *, tty: bool | None = None) -> str:
    """`ls --tree -o SPEC`'s text ("" without devices)."""
    switches, symbols = parse_options(spec)
    termwidth = 80
    if tty is None:
        tty = sys.stdout.isatty()
    if tty and symbols is not VT100:
        try:
            columns = os.get_terminal_size(sys.stdout.fileno()).columns
            if columns > 3:
                termwidth = columns - 3
        except (OSError, ValueError):
            pass
    drawing = Drawing(switches, symbols, termwidth)
    root = build(devices)
    drawing.walk(root, root, 0)
    return "".join(drawing.out)
