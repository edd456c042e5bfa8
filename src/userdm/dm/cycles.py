"""Dependency cycles: a table never makes a device depend on itself (DESIGN §2, ELOOP).

A cycle would make every I/O recurse until Python's recursion limit and a suspend wait for
itself, so a load or resume that would close one is refused with ELOOP and the cycle spelled
out: `cyA -> cyB -> cyA`. The graph is walked over the device objects themselves (their live
and inactive tables), without the registry lock; `DependencyGraph.lock` serialises the check
of a new table with its installation, so two loads cannot each close half of a cycle.

Nodes and edges (what the I/O of one device may reach):
- a mapped device `X` (I/O submitted to X): X's own tables, and every interposer of X,
  attached or pending (a device whose table names `[interpose]X`: it attaches at its resume);
- X's own tables: every device of X's live and inactive tables (the inactive table may be
  resumed later), and the devices a target writes beyond its table (`Target.also_reaches`:
  snapshot-origin copies origin chunks into the COW devices of its origin's snapshots);
- a partition: its whole disk;
- `[interpose]X` in the table of interposer F: X's own tables and the interposers attached
  below F, never F itself (an interposer's own I/O reaches X's original mapping, so its edge
  to X is no cycle, but a table that makes X depend on F is);
- a reference to this daemon's own NBD export (`nbd+unix:///NAME?socket=RUNTIME/nbd.sock`,
  or `nbd://HOST:PORT/NAME` to its `--nbd-listen` address): the device named NAME. Such a
  reference is checked before it is connected: connecting is what would hang.
`/dev/mapper/NAME`, `MAJOR:MINOR` and the FUSE path `RUNTIME/mapper/NAME` are already
resolved to the device objects in process, so they are ordinary edges.

What is not seen: a path that leaves this daemon's knowledge, e.g. a kernel loop device over
our own FUSE file, `/dev/nbdN` connected to our NBD socket, or an NBD export of another server
that connects back to us. Such a hop is an ordinary file, block device or remote export here.
Two spellings of one NBD socket are recognised by the socket file's identity, a TCP address by
resolving its host; an export name is resolved when the check runs (a rename may later make
another device answer to it: that is why a resume checks again).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..block.device import BlockDevice
from ..errors import DMError
from .interposer import PREFIX, InterposedView
from .mapped import MappedDevice
from .partitioned import MappedPartition
from .table import Table
from .target import Target

NBD_DEFAULT_PORT = 10809
_WILDCARD = {"", "0.0.0.0", "::"}

#: a node of the graph: ("dev", md), ("own", md), ("part", partition) or ("view", dev, front)
Node = tuple
#: an edge: (node it leads to, shown in the chain, note explaining the hop or None)
Edge = tuple[Node, bool, "str | None"]


def _key(node: Node) -> tuple:
    return (node[0], *map(id, node[1:]))


def _name(node: Node) -> str:
    if node[0] == "view":
        return f"{PREFIX}{node[1].name}"
    return node[1].name


class _Walk:
    """One check: the device whose tables change and what they will be."""

    def __init__(self, md: MappedDevice, tables: list[Table]) -> None:
        self.md = md
        self.tables = tables
        self._fronts: dict[int, list[MappedDevice]] | None = None

    def tables_of(self, md: MappedDevice) -> list[Table]:
        if md is self.md:
            return self.tables
        return [t for t in (md.live, md.inactive) if t is not None]

    def fronts(self, dev: MappedDevice, devices: Callable[[], Iterable[MappedDevice]]) -> list[MappedDevice]:
        """The interposers of `dev`: attached, or pending in a table that names `[interpose]dev`."""
        if self._fronts is None:
            self._fronts = {}
            for md in {id(m): m for m in (*devices(), self.md)}.values():
                for table in self.tables_of(md):
                    for tdev in table.devices():
                        view = tdev.open.device
                        if isinstance(view, InterposedView) and view.front is md:
                            self._fronts.setdefault(id(view.dev), []).append(md)
        pending = self._fronts.get(id(dev), [])
        return list(dev.interposers) + [f for f in pending if f not in dev.interposers]


class DependencyGraph:
    """The dependency graph of one Mapper's devices.

    `mapped_ref(ref)` is the mapped device or partition a table reference names (None if it
    names something else; it may raise ENXIO), `by_name(name)` the device of an NBD export
    name (or None), `devices()` every mapped device, and `nbd_addresses()` this daemon's own
    NBD listeners: Unix socket paths (str) and TCP addresses ((host, port))."""

    def __init__(self, *, mapped_ref: Callable[[str], BlockDevice | None],
                 by_name: Callable[[str], BlockDevice | None],
                 devices: Callable[[], Iterable[MappedDevice]],
                 nbd_addresses: Callable[[], Iterable[Any]]) -> None:
        self.lock = threading.Lock()
        self._mapped_ref = mapped_ref
        self._by_name = by_name
        self._devices = devices
        self._nbd_addresses = nbd_addresses

    # ---- the checks -----------------------------------------------------------------------

    def check_ref(self, md: MappedDevice, ref: str) -> None:
        """Before `md`'s table being built opens `ref`: refuse it if it leads back to `md`
        (the open itself may already recurse or hang, as an NBD connection to ourselves does)."""
        edge = self._ref_edge(md, ref)
        if edge is not None:
            # the table being built replaces the inactive one; the live one stays
            self._check(_Walk(md, [md.live] if md.live is not None else []), [edge])

    def check_table(self, md: MappedDevice, table: Table, keep: Table | None = None) -> None:
        """Before `table` becomes one of `md`'s tables (with `keep`, the other slot that stays):
        refuse it if it closes a cycle. At load `keep` is the live table, at resume None."""
        walk = _Walk(md, [t for t in (table, keep) if t is not None])
        self._check(walk, self._table_edges(walk, [table]))

    # ---- edges ----------------------------------------------------------------------------

    def _ref_edge(self, md: MappedDevice, ref: str) -> Edge | None:
        """The edge a table reference makes, without opening it."""
        try:
            if ref.startswith(PREFIX):
                # what the open refuses (not an interposer, not a mapped device, itself) it reports
                dev = self._mapped_ref(ref[len(PREFIX):]) if md.interpose else None
                usable = isinstance(dev, MappedDevice) and dev is not md
                return (("view", dev, md), True, None) if usable else None
            device = self._mapped_ref(ref)
        except DMError:
            return None  # the open reports it
        if device is not None:
            return self._device_edge(device, ref)
        return self._export_edge(ref)

    def _device_edge(self, device: BlockDevice, ref: str) -> Edge | None:
        if isinstance(device, InterposedView):
            return ("view", device.dev, device.front), True, None
        if isinstance(device, MappedDevice):
            return ("dev", device), True, None
        if isinstance(device, MappedPartition):
            return ("part", device), True, None
        return self._export_edge(ref)

    def _export_edge(self, ref: str) -> Edge | None:
        name = self.own_export(ref)
        device = self._by_name(name) if name is not None else None
        if device is None:
            return None
        edge = self._device_edge(device, "")
        if edge is None:
            return None
        return edge[0], True, f"{ref} is this daemon's own NBD export of {name}"

    def _table_edges(self, walk: _Walk, tables: Iterable[Table]) -> Iterator[Edge]:
        for table in tables:
            for tdev in table.devices():
                edge = self._device_edge(tdev.open.device, tdev.ref)
                if edge is not None:
                    yield edge
            if all(cls.also_reaches is Target.also_reaches for cls in table.classes):
                continue   # no target reaches further than its devices (a million linear ones)
            for target in table.targets:
                for tdev in target.also_reaches():
                    edge = self._device_edge(tdev.open.device, tdev.ref)
                    if edge is not None:
                        yield edge[0], edge[1], (f"{target.name} writes into {tdev.name}" if edge[2] is None
                                                 else edge[2])

    def _edges(self, node: Node, walk: _Walk) -> Iterator[Edge]:
        kind = node[0]
        if kind == "dev":
            yield ("own", node[1]), False, None
            for front in walk.fronts(node[1], self._devices):
                yield ("own", front), True, f"{front.name} interposes {node[1].name}"
        elif kind == "own":
            yield from self._table_edges(walk, walk.tables_of(node[1]))
        elif kind == "part":
            yield ("dev", node[1].whole), True, None
        else:  # a view of dev for interposer front: dev's own tables and interposers below front
            dev, front = node[1], node[2]
            yield ("own", dev), True, None
            below = dev.interposers
            if front in below:
                below = below[:below.index(front)]
            for other in below:
                yield ("own", other), True, f"{other.name} interposes {dev.name}"

    # ---- the walk ---------------------------------------------------------------------------

    def _check(self, walk: _Walk, first: Iterable[Edge]) -> None:
        """Depth-first from `walk.md`'s own tables (whose edges are `first`); ELOOP on a cycle."""
        start: Node = ("own", walk.md)
        frames: list[tuple[Node, bool, str | None, Iterator[Edge]]] = [(start, True, None, iter(first))]
        on_path = {_key(start): 0}
        done: set[tuple] = set()
        while frames:
            node, _shown, _note, edges = frames[-1]
            edge = next(edges, None)
            if edge is None:
                frames.pop()
                key = _key(node)
                del on_path[key]
                done.add(key)
                continue
            child, shown, note = edge
            key = _key(child)
            if key in done:
                continue
            if key in on_path:
                raise _cycle_error(walk.md, frames[on_path[key]:], edge)
            on_path[key] = len(frames)
            frames.append((child, shown, note, self._edges(child, walk)))

    # ---- this daemon's own NBD exports ----------------------------------------------------------

    def own_export(self, ref: str) -> str | None:
        """The export name if `ref` is an NBD URL that points at this daemon's own NBD server."""
        scheme = ref.partition("://")[0]
        if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix") or "://" not in ref:
            return None
        try:
            parts = urlsplit(ref)
            port = parts.port
        except ValueError:
            return None
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        addresses = list(self._nbd_addresses() or ())
        if scheme.endswith("+unix"):
            paths = parse_qs(parts.query).get("socket")
            if paths and any(isinstance(a, (str, os.PathLike)) and _same_socket(paths[0], os.fspath(a))
                             for a in addresses):
                return export
            return None
        host, port = parts.hostname or "", port or NBD_DEFAULT_PORT
        for address in addresses:
            if isinstance(address, tuple) and address[1] == port and _same_host(host, address[0]):
                return export
        return None


def _cycle_error(md: MappedDevice, frames: list, closing: Edge) -> DMError:
    names = [_name(frames[0][0])] + [_name(node) for node, shown, _n, _e in frames[1:] if shown]
    if closing[1]:
        names.append(_name(closing[0]))
    notes = [note for _node, _s, note, _e in frames[1:] if note] + ([closing[2]] if closing[2] else [])
    chain = " -> ".join(names)
    text = f"{chain}: this table of {md.name} would make {names[0]} depend on itself"
    if notes:
        text += f" ({'; '.join(dict.fromkeys(notes))})"
    exc = DMError(errno.ELOOP, text)
    exc.cycle = names  # type: ignore[attr-defined]  # TargetContext passes it on as it is
    return exc


def _same_socket(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _addresses(host: str) -> set[str]:
    if not host:
        return set()
    try:
        return {info[4][0] for info in socket.getaddrinfo(host or None, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def _is_local(ip: str) -> bool:
    """True if `ip` is an address of this machine (binding to it succeeds)."""
    if ip in _WILDCARD:
        return True  # connecting to the unspecified address reaches the local host
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
        return True
    except OSError:
        return False


def _same_host(host: str, listen: str) -> bool:
    """Does a connection to `host` reach a server listening on address `listen`?"""
    targets = _addresses(host)
    if listen in _WILDCARD:
        return any(_is_local(ip) for ip in targets)
    listening = _addresses(listen)
    if targets & listening:
        return True
    return any(ip in _WILDCARD for ip in targets) and any(_is_local(ip) for ip in listening)
