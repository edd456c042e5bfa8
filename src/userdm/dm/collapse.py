"""Collapsed remapping: one lookup for a chain of remap-only targets (issue 18).

A request to a mapped device normally walks its table (a binary search), the target, the
open of the device below (its checks), and, when that is a mapped device too, the same again
there. The kernel pays one remap per layer. A `Flat` is the live table of one device with the
linear targets followed down through the mapped devices below it, in one sorted list of
segments, each with a *sink* that does the I/O in one step:

- a linear chain that ends on a file (`FileSink`): `preadv`/`pwritev` on its descriptor;
- a striped target straight onto files, at the bottom of a chain or in the device's own
  table (`TargetSink`): the target itself;
- a target whose reads are a remap it picks per request (`Target.remaps_reads`: a mirror)
  straight onto files (`TargetSink` too): reads are its `collapsed_read`, writes its own.
Everything else has no sink: such requests go through the table as before.

A chain is followed through a mapped device only while the device is plain (not a partition,
not interposed), not suspended or suspending, not dead, and has a live table; otherwise the
segment's sink is the linear target that points at the device, so the request enters that
device as it always did (and waits for its resume there).

Who keeps a Flat right: `MappedDevice` (see there) drops the Flats of itself and of every
device stacked above it when it starts a suspend (and then waits until no request uses a
dropped one, so its drain sees every request that could reach its table), when it resumes,
and when it is destroyed; a device builds its Flat again on its next request. A sink that
cannot do a request cleanly (a dead or shrunk file, an error, a FUA write, a write through a
read-only open) says so, and the request goes through the live table instead, which does
what it always did (errors, failure reports). A request that spans segments goes through the
table too. Tables of more than MAX_SEGMENTS targets are not collapsed (building the list would
hold the interpreter for a long time), except those whose every target is linear onto one
file (`_one_file`); nor are tables where no target is linear or such a striped one.
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_left, bisect_right
from functools import partial

from ..block.device import SECTOR
from ..block.file import FileDisk

#: tables with more targets are not collapsed
MAX_SEGMENTS = 4096
#: buckets of a big table's index made in one go (`bucket_index`: a few ms)
INDEX_SLICE = 8192
#: collapse at all (benchmarks turn it off to measure what it saves)
ENABLED = True
_preadv = os.preadv
_pwritev = os.pwritev
_splice = os.splice


class FileSink:
    """A file at the bottom of a linear chain: one system call per request."""

    __slots__ = ("disk", "fd", "writable", "read", "write")

    def place(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset) of these bytes in the file (for `splice`), None if the file is dead."""
        return None if self.disk.dead else (self.fd, offset)

    def __init__(self, disk: FileDisk, writable: bool) -> None:
        self.disk = disk
        self.fd = disk.fd
        self.writable = writable
        self.read = self._read
        self.write = self._write if writable else _refuse

    def _read(self, offset: int, buf: memoryview) -> bool:
        if self.disk.dead:
            return False
        try:
            return _preadv(self.fd, [buf], offset) == len(buf)
        except OSError:
            return False

    def _write(self, offset: int, data: memoryview, fua: bool) -> bool:
        if fua or self.disk.dead:
            return False
        try:
            return _pwritev(self.fd, [data], offset) == len(data)
        except OSError:
            return False


class TargetSink:
    """A target straight onto files (`_bottom`). A stateless remap: a request that `locate`
    places whole is one system call, the target does the others (its errors are the
    request's, as through the table). A `remaps_reads` target: its `collapsed_read`, and
    its own writes."""

    __slots__ = ("target", "writable", "read", "write")

    def __init__(self, target, writable: bool) -> None:  # noqa: ANN001 - a Target
        self.target = target
        self.writable = writable
        stateless = target.stateless_remap
        self.read = self._read if stateless else target.collapsed_read
        self.write = _refuse if not writable else self._write if stateless else self._write_target

    def place(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset) of these bytes if they lie whole in one live file, else None (always
        for a `remaps_reads` target: its leg is chosen per read)."""
        if not self.target.stateless_remap:
            return None
        where = self.target.locate(offset, length)
        if where is None or where[0].device.dead:
            return None
        return where[0].device.fd, where[1]

    def _read(self, offset: int, buf: memoryview) -> bool:
        n = len(buf)
        place = self.target.locate(offset, n)
        if place is None:            # over chunks: the target splits it
            self.target.readinto(offset, buf)
            return True
        disk = place[0].device
        if disk.dead:
            return False
        try:
            return _preadv(disk.fd, [buf], place[1]) == n
        except OSError:
            return False

    def _write(self, offset: int, data: memoryview, fua: bool) -> bool:
        n = len(data)
        place = None if fua else self.target.locate(offset, n)
        if place is None:
            self.target.write(offset, data, fua)
            return True
        open_, at = place
        disk = open_.device
        if disk.dead or not open_.write_mode:
            return False
        try:
            return _pwritev(disk.fd, [data], at) == n
        except OSError:
            return False

    def _write_target(self, offset: int, data: memoryview, fua: bool) -> bool:
        self.target.write(offset, data, fua)
        return True


def _refuse(offset: int, data: memoryview, fua: bool) -> bool:
    return False


class Flat:
    """The collapsed segments of one live table. `read`/`write` do a request in one step and
    return True, or return False: the caller then sends it through `table` (as it always did)."""

    __slots__ = ("table", "segments", "starts", "deltas", "reads", "writes", "users", "retired",
                 "read", "write", "_sink", "watchers", "_first", "_shift")

    def __init__(self, table, segments: list[tuple[int, int, object, int]] | None,  # noqa: ANN001
                 columns: tuple[list, list, list, list] | None = None, sink: FileSink | None = None,
                 index: tuple[int, array] | None = None) -> None:
        self.table = table
        #: (start, end, sink or None, delta): device bytes [start, end) are sink bytes + delta;
        #: no sink: through the table. None for a big table's (`_one_file`): not followed
        #: from above
        self.segments = segments
        if columns is None:
            columns = ([s[0] for s in segments] + [segments[-1][1]], [s[3] for s in segments],
                       [s[2].read if s[2] is not None else _no for s in segments],
                       [s[2].write if s[2] is not None else _no for s in segments])
        #: segment starts and, last, the device's end (the segments are contiguous: segment
        #: i ends where i + 1 starts, in the same cache line); offsets to add; sink calls
        self.starts, self.deltas, self.reads, self.writes = columns
        #: requests in a sink now, and whether its device dropped it (see `MappedDevice`)
        self.users = 0
        self.retired = False
        #: called (no arguments, must not block) when its device drops it: holders of a lent
        #: Flat (`MappedDevice.lend_flat`) give it back then
        self.watchers: list = []
        #: the one sink of every segment (`_one_file`): no per-segment call to look up
        self._sink = sink
        self.read, self.write = (self._read_one, self._write_one) if sink is not None else (self._read, self._write)
        #: a big table's index (`_one_file`, `bucket_index`)
        self._shift, self._first = index if index is not None else (0, None)

    def place(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset) of the `length` bytes at `offset` if they lie whole in one file, else None."""
        i = bisect_right(self.starts, offset) - 1
        if offset + length > self.starts[i + 1]:
            return None
        sink = self._sink if self._sink is not None else self.segments[i][2]
        return None if sink is None else sink.place(offset + self.deltas[i], length)

    def _read_one(self, offset: int, buf: memoryview) -> bool:
        first, b = self._first, offset >> self._shift
        i = bisect_right(self.starts, offset, first[b], first[b + 1]) - 1
        return offset + len(buf) <= self.starts[i + 1] and self._sink.read(offset + self.deltas[i], buf)

    def _write_one(self, offset: int, data: memoryview, fua: bool) -> bool:
        first, b = self._first, offset >> self._shift
        i = bisect_right(self.starts, offset, first[b], first[b + 1]) - 1
        return offset + len(data) <= self.starts[i + 1] and self._sink.write(offset + self.deltas[i], data, fua)

    def _read(self, offset: int, buf: memoryview) -> bool:
        i = bisect_right(self.starts, offset) - 1
        return offset + len(buf) <= self.starts[i + 1] and self.reads[i](offset + self.deltas[i], buf)

    def _write(self, offset: int, data: memoryview, fua: bool) -> bool:
        i = bisect_right(self.starts, offset) - 1
        return offset + len(data) <= self.starts[i + 1] and self.writes[i](offset + self.deltas[i], data, fua)


def file_segments(flat: Flat) -> tuple[list[list], list[FileSink]] | None:
    """The Flat as files only, for I/O done in another process: ([start, end, index of the
    file in the second list, delta, writable] per segment, [FileSink, ...] without
    repeats), or None if a segment has another sink or none, a file is dead, or the table
    has more than MAX_SEGMENTS segments."""
    if len(flat.starts) - 1 > MAX_SEGMENTS:
        return None
    sinks: list[FileSink] = []
    index: dict[int, int] = {}
    segments = []
    for i in range(len(flat.starts) - 1):
        sink = flat._sink if flat._sink is not None else flat.segments[i][2]
        if sink.__class__ is not FileSink or sink.disk.dead:
            return None
        at = index.get(id(sink))
        if at is None:
            at = index[id(sink)] = len(sinks)
            sinks.append(sink)
        segments.append([flat.starts[i], flat.starts[i + 1], at, flat.deltas[i], sink.writable])
    return segments, sinks


def splice_file(fd: int, offset: int, length: int, pipe: int) -> bool:
    """Move `length` bytes of file `fd` at `offset` into the pipe by reference (the pipe holds
    page references, no copy). False if the file ended or failed: the pipe may hold a part."""
    while length:
        try:
            n = _splice(fd, pipe, length, offset)
        except OSError:
            return False
        if n <= 0:
            return False
        offset += n
        length -= n
    return True


def _no(*args) -> bool:  # noqa: ANN002
    return False


def build(table, below) -> Flat | None:  # noqa: ANN001
    """The Flat of `table` (a device's live table), or None if collapsing does not pay.
    `below(device)` returns the Flat of a mapped device to follow a chain through (None: do
    not follow; it takes that device's lock)."""
    targets = table.targets
    if not ENABLED:
        return None
    if len(targets) > MAX_SEGMENTS:
        return _one_file(table)
    if not any(t.passthrough() is not None or _bottom(t) for t in targets):
        return None
    writable = not table.read_only
    files: dict[tuple[int, bool], FileSink] = {}   # one sink per file: neighbours merge
    segments: list[tuple[int, int, object, int]] = []
    for t in targets:
        start = t.begin * SECTOR
        end = start + t.length * SECTOR
        through = t.passthrough()
        if through is None:
            sink = TargetSink(t, writable) if _bottom(t) else None
            segments.append((start, end, sink, -start))
            continue
        tdev, base = through
        open_ = tdev.open
        dev = open_.device
        ok = writable and open_.write_mode and not dev.read_only
        if isinstance(dev, FileDisk) and not dev.direct:
            sink = files.get((id(dev), ok))
            if sink is None:
                sink = files[(id(dev), ok)] = FileSink(dev, ok)
            segments.append((start, end, sink, base - start))
            continue
        lower = below(dev)
        if lower is None or lower.segments is None or len(lower.segments) > MAX_SEGMENTS:
            segments.append((start, end, None, 0))
            continue
        shift = base - start          # device offset -> lower device offset
        lo, hi = base, base + (end - start)
        i = max(bisect_right(lower.starts, lo) - 1, 0)
        while i < len(lower.segments) and lower.segments[i][0] < hi:
            l_start, l_end, sink, l_delta = lower.segments[i]
            if sink is not None and not ok and sink.writable:
                sink = _read_only(sink)
            segments.append((max(l_start, lo) - shift, min(l_end, hi) - shift, sink, shift + l_delta))
            i += 1
    if len(segments) > MAX_SEGMENTS or all(seg[2] is None for seg in segments):
        return None
    return Flat(table, _merge(segments))


def _one_file(table) -> Flat | None:  # noqa: ANN001
    """The Flat of a big table whose every target passes through onto one file (a million
    linear segments): the table's own start and end lists, one offset per target, one sink.
    One pass over the targets (the interpreter is handed over meanwhile, as always)."""
    targets = table.targets
    first = targets[0].passthrough()
    if first is None:
        return None
    open_ = first[0].open
    disk = open_.device
    if not isinstance(disk, FileDisk) or disk.direct:
        return None
    deltas: list[int] = []
    append = deltas.append
    for t, start in zip(targets, table.starts):
        through = t.passthrough()
        if through is None or through[0].open is not open_:
            return None
        append(through[1] - start)
    sink = FileSink(disk, not table.read_only and open_.write_mode and not disk.read_only)
    # machine integers, each start beside its segment's delta: a search over a million of
    # them touches far fewer cache lines than over lists of int objects, and the delta is
    # in the line the search ended on
    starts = array("q", table.starts + [table.size])
    pairs = memoryview(array("q", bytes(16 * len(starts))))
    pairs[::2] = memoryview(starts)
    pairs[1:-1:2] = memoryview(array("q", deltas))
    return Flat(table, None, (pairs[::2], pairs[1::2], [], []), sink, bucket_index(starts))


def bucket_index(starts: array) -> tuple[int, array]:
    """(shift, first) such that the segments that start in bucket b (device bytes from
    b << shift to (b + 1) << shift) are those from first[b] to first[b + 1] - 1: a search
    then looks at a handful of starts (about eight), not at twenty levels of a million (a
    third of the cost of a 4 KiB read). Built a slice at a time, so that other threads run
    meanwhile."""
    size = starts[-1]
    shift = max(0, (size // (len(starts) - 1)).bit_length() + 2)
    first = array("q")
    find = partial(bisect_left, starts)
    bucket = 1 << shift
    for lo in range(0, size + 2 * bucket, INDEX_SLICE * bucket):
        first.extend(map(find, range(lo, min(lo + INDEX_SLICE * bucket, size + 2 * bucket), bucket)))
    return shift, first


def _bottom(target) -> bool:  # noqa: ANN001
    """A target a sink may call directly: a stateless remap, or a target that remaps its
    reads, straight onto files (it never waits for another mapped device, so a request in it
    never waits for a resume)."""
    return (target.stateless_remap or target.remaps_reads) and all(
        isinstance(d.open.device, FileDisk) and not d.open.device.direct for d in target.devices())


def _read_only(sink):  # noqa: ANN001, ANN202
    """The same sink, refusing writes (an open above it is read-only: the table says EPERM)."""
    if isinstance(sink, FileSink):
        return FileSink(sink.disk, False)
    return TargetSink(sink.target, False)


def _merge(segments: list) -> list:
    """Join neighbours that are one run of the same sink (a chain cut into pieces above)."""
    out: list = []
    for seg in segments:
        if out:
            p = out[-1]
            if p[2] is seg[2] and p[1] == seg[0] and (p[3] == seg[3] or seg[2] is None):
                out[-1] = (p[0], seg[1], p[2], p[3])
                continue
        out.append(seg)
    return out
