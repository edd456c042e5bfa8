"""The table language and the built table: parsing, the kernel's load rules, and I/O splitting.

A table is lines of `start length type args...` in 512-byte sectors (dmsetup's syntax;
blank lines and `#` comments are skipped, arguments are split as `dm_split_args` does, with
backslash escapes). `build_table` applies the kernel's rules (first target at 0, no gaps or
overlaps, no zero lengths, size limits, singleton/immutable types, read-only for targets that
need it) and constructs each target; every refusal names the line. A built `Table` finds the
target of an offset by binary search over the target starts, and splits I/O that spans targets.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import sys
import threading
from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple

from ..block.device import SECTOR, merge_extents
from ..errors import DMError, quoted
from .target import TableDevice, Target, TargetContext, TargetError, lookup

MAX_SECTORS = (1 << 63) - 1 >> 9  # the kernel's "too large device" limit


class TableLine(NamedTuple):
    """One parsed line (a named tuple: a million of them are made fast)."""

    lineno: int
    start: int
    length: int
    type: str
    args: list[str]


def split_args(text: str) -> list[str]:
    """Split on whitespace; a backslash makes the next character literal (`dm_split_args`)."""
    out: list[str] = []
    cur: list[str] = []
    in_word = False
    it = iter(text)
    for ch in it:
        if ch == "\\":
            nxt = next(it, "")
            cur.append(nxt)
            in_word = True
        elif ch.isspace():
            if in_word:
                out.append("".join(cur))
                cur = []
                in_word = False
        else:
            cur.append(ch)
            in_word = True
    if in_word:
        out.append("".join(cur))
    return out


def _number(text: str, lineno: int, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise DMError(errno.EINVAL, f"table line {lineno}: invalid {what} {quoted(text)}: not a decimal number of sectors")
    return int(text)


#: characters split into lines by one call: a whole 40 MB table at once would hold the GIL
#: (and stall every other device's I/O) for over 100 ms
_LINES_CHUNK = 1 << 20


def _lines(text: str) -> Iterator[str]:
    """`text.splitlines()`, a chunk of about `_LINES_CHUNK` characters at a time (each chunk
    ends just after a newline, so the lines are the same)."""
    begin = 0
    while begin < len(text):
        end = text.find("\n", begin + _LINES_CHUNK)
        end = len(text) if end < 0 else end + 1
        yield from text[begin:end].splitlines()
        begin = end


def parse_table(text: str) -> list[TableLine]:
    """Parse table text into lines (syntax only; the load rules are checked by `build_table`)."""
    lines: list[TableLine] = []
    append = lines.append
    make = TableLine._make
    for lineno, raw in enumerate(_lines(text), 1):
        words = raw.split(None, 3)
        if not words or words[0][0] == "#":
            continue
        if len(words) < 3:
            raise DMError(errno.EINVAL, f"table line {lineno}: {quoted(raw.strip())} needs at least "
                          "'<start> <length> <target type>'")
        first, second = words[0], words[1]
        start = int(first) if first.isdigit() and first.isascii() else _number(first, lineno, "start sector")
        length = int(second) if second.isdigit() and second.isascii() else _number(second, lineno, "length")
        params = words[3] if len(words) > 3 else ""
        append(make((lineno, start, length, words[2], split_args(params) if "\\" in params
                     else params.split())))
    if not lines:
        raise DMError(errno.EINVAL, "table is empty: no targets specified")
    return lines


def check_layout(lines: list[TableLine]) -> None:
    """The kernel's layout rules: contiguous from sector 0, no zero lengths, size limit."""
    end = 0
    for line in lines:
        if line.length == 0:
            raise DMError(errno.EINVAL, f"table line {line.lineno}: zero-length target")
        if line.start != end:
            if end == 0 and line is lines[0]:
                raise DMError(errno.EINVAL, f"table line {line.lineno}: first target starts at sector "
                              f"{line.start}, not 0")
            what = "gap" if line.start > end else "overlap"
            raise DMError(errno.EINVAL, f"table line {line.lineno}: {what} at sector {line.start} "
                          f"(previous target ends at {end})")
        end = line.start + line.length
        if end > MAX_SECTORS:
            raise DMError(errno.EINVAL, f"table line {line.lineno}: too large device: "
                          f"ends at sector {end}, the limit is {MAX_SECTORS}")


class Table:
    """A constructed table: targets sorted by start, with O(log n) lookup."""

    def __init__(self, targets: list[Target], ctx: TargetContext, text: str,
                 classes: frozenset[type[Target]] | None = None) -> None:
        self.targets = targets
        self._ctx = ctx
        self._devices: tuple[int, list[TableDevice]] | None = None   # `devices()` of so many acquired
        #: the target classes it uses, and their names (a million targets of one class are
        #: asked about their class once)
        self.classes = classes if classes is not None else frozenset(type(t) for t in targets)
        self.type_names = frozenset(cls.name for cls in self.classes)
        read_only = ctx.read_only
        self.read_only = read_only
        #: a table that holds a key (a `has_keys` target with a key: crypt) keeps its text with
        #: the key masked, as `table` prints it without --showkeys; the key lives only in its
        #: target, so the state store never sees it (and restores such a table without it)
        self.needs_key = any(cls.has_keys for cls in self.classes) and \
            any(t.has_keys and getattr(t, "key_size", 0) for t in targets)
        self.text = "\n".join(f"{t.begin} {t.length} {t.name} "
                              f"{t.table(False) if t.has_keys else t.table()}"
                              for t in targets) if self.needs_key else text
        self.starts = [t.begin * SECTOR for t in targets]
        self.ends = [(t.begin + t.length) * SECTOR for t in targets]
        self.size = self.ends[-1] if targets else 0
        #: the device's logical block size: 4096 if a target encrypts in 4 KiB sectors (the
        #: kernel's io_hints; `io_block_size` of a target), else 512
        self.logical_block_size = 4096 if any(hasattr(cls, "io_block_size") or not _slotted(cls)
                                              for cls in self.classes) \
            and any(getattr(t, "io_block_size", SECTOR) == 4096 for t in targets) else SECTOR

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def pieces(self, offset: int, length: int) -> Iterator[tuple[Target, int, int, int]]:
        """Yield (target, offset in target, position in request, length) covering the range."""
        i = bisect_right(self.starts, offset) - 1
        pos = 0
        while pos < length:
            start, end = self.starts[i], self.ends[i]
            n = min(length - pos, end - offset - pos)
            yield self.targets[i], offset + pos - start, pos, n
            pos += n
            i += 1

    # The single-target case is the common one: it avoids the generator and the slicing.
    def readinto(self, offset: int, buf: memoryview) -> None:
        i = bisect_right(self.starts, offset) - 1
        if offset + len(buf) <= self.ends[i]:
            self.targets[i].readinto(offset - self.starts[i], buf)
            return
        for target, toff, pos, n in self.pieces(offset, len(buf)):
            target.readinto(toff, buf[pos:pos + n])

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        i = bisect_right(self.starts, offset) - 1
        if offset + len(data) <= self.ends[i]:
            self.targets[i].write(offset - self.starts[i], data, fua)
            return
        for target, toff, pos, n in self.pieces(offset, len(data)):
            target.write(toff, data[pos:pos + n], fua)

    def discard(self, offset: int, length: int) -> None:
        for target, toff, _pos, n in self.pieces(offset, length):
            target.discard(toff, n)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        for target, toff, _pos, n in self.pieces(offset, length):
            target.write_zeroes(toff, n, may_unmap)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for target, toff, _pos, n in self.pieces(offset, length):
            got = 0
            for ext_len, flags in target.block_status(toff, n):
                ext_len = min(ext_len, n - got)
                out.append((ext_len, flags))
                got += ext_len
                if got >= n:
                    break
            if got < n:  # a target described only a prefix: stop there, as NBD allows
                break
        return merge_extents(out)

    def flush(self) -> None:
        """Targets that map flushes themselves (delay, flakey ...) get the flush; for the rest it
        goes once to each of their devices (the kernel's `flush_bypasses_map`)."""
        own = [t for t in self.targets if type(t).flush is not Target.flush]
        if not own:
            for dev in self.devices():
                dev.open.flush()
            return
        for target in own:
            target.flush()
        seen: set[int] = set()
        for target in self.targets:
            if type(target).flush is Target.flush:
                for dev in target.devices():
                    if id(dev.open) not in seen:
                        seen.add(id(dev.open))
                        dev.open.flush()

    def devices(self) -> list[TableDevice]:
        """Underlying devices without duplicates, in table order (the `deps` list)."""
        acquired = self._ctx.acquired
        if self._devices is None or self._devices[0] != len(acquired):
            seen: dict[int, TableDevice] = {}
            for dev in acquired:
                seen.setdefault(id(dev.open), dev)
            self._devices = (len(acquired), list(seen.values()))
        return list(self._devices[1])

    def check_areas(self) -> None:
        """EINVAL if a target maps an area beyond its device's end or not aligned to its
        logical block size (the kernel's check when a table is swapped in)."""
        self._ctx.check_areas()

    def target_at(self, sector: int) -> Target | None:
        offset = sector * SECTOR
        if offset < 0 or offset >= self.size:
            return None
        return self.targets[bisect_right(self.starts, offset) - 1]

    def destroy(self) -> None:
        """Destroy the targets and release every underlying device the table opened."""
        for target in self.targets:
            target.destroy()
        _release(self._ctx)


def _slotted(cls: type) -> bool:
    """Its instances have only the attributes their classes declare (no `__dict__`)."""
    return all("__slots__" in vars(c) for c in cls.__mro__ if c is not object)


def _release(ctx: TargetContext) -> None:
    acquired, ctx.acquired = ctx.acquired, []
    for dev in acquired:
        ctx.put_device(dev)


def build_table(text: str, ctx: TargetContext) -> Table:
    """Parse, check and construct a table. On any refusal, targets built so far are destroyed.
    A big one (`BIG_BUILD` bytes of text) is built handing the interpreter over more often
    (`_yielding_often`), so that other devices' I/O and requests wait less for the GIL."""
    with _collector_paused(), _yielding_often(len(text) >= BIG_BUILD):
        return _build_table(text, ctx)


#: objects made while builds paused the collector from which they are frozen (see below)
FREEZE_AT = 200_000
_paused = 0
_was_enabled = True
_paused_lock = threading.Lock()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while tables are built: a table of a million segments is
    millions of new objects and no garbage, and each full collection the allocations trigger
    walks all of them with the GIL held (it doubled a 1M-segment load, 8.8 s against 4.6 s,
    and stalled every other thread meanwhile). Collection resumes when the last build ends.

    If the builds made many objects (FREEZE_AT, counted by the collector), they are frozen
    first (`gc.freeze`): they live as long as the table, hold no reference cycles (refcounts
    free them when the table goes), and would otherwise be walked by the first collection
    (0.5 s for a million segments, the interpreter held) and by every full one after (0.25 s
    each, for as long as the table lives). Everything else alive at that moment is frozen
    too: cyclic garbage among it is kept (until `gc.unfreeze`), a small one-off cost."""
    global _paused, _was_enabled
    with _paused_lock:
        _paused += 1
        if _paused == 1:
            _was_enabled = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                if gc.get_count()[0] >= FREEZE_AT:
                    gc.freeze()
                gc.enable()


#: a table text this long is a big build (a million segments is 40-65 MB)
BIG_BUILD = 1 << 20
#: the interpreter's switch interval while big builds run (Python's default is 5 ms)
BIG_BUILD_SWITCH = 0.0005
_yielding = 0
_usual_switch = 0.005


@contextlib.contextmanager
def _yielding_often(big: bool) -> Iterator[None]:
    """While a big table is built, a thread that waits for the interpreter (a request of another
    device, a control request) gets it within BIG_BUILD_SWITCH, not the usual 5 ms, and it
    needs it several times per request. The interval is the process's: set by the first big
    build and put back by the last."""
    global _yielding, _usual_switch
    if not big:
        yield
        return
    with _paused_lock:
        _yielding += 1
        if _yielding == 1:
            _usual_switch = sys.getswitchinterval()
            sys.setswitchinterval(BIG_BUILD_SWITCH)
    try:
        yield
    finally:
        with _paused_lock:
            _yielding -= 1
            if _yielding == 0:
                sys.setswitchinterval(_usual_switch)


def _free_lines(lines: list) -> None:
    """Free a big list a slice at a time: freeing a million parsed lines at once is one call
    that holds the interpreter for ~80 ms."""
    while lines:
        del lines[-8192:]


def _checked_type(line: TableLine, lines: int, types: int) -> type[Target]:
    """The class of `line`'s target type, after the rules about types in one table."""
    cls = lookup(line.type)
    if cls is None:
        raise DMError(errno.EINVAL, f"table line {line.lineno}: unknown target type {quoted(line.type)}")
    if cls.singleton and lines > 1:
        raise DMError(errno.EINVAL, f"table line {line.lineno}: target type {line.type} "
                      "must appear alone in table")
    if cls.immutable and types > 1:
        raise DMError(errno.EINVAL, f"table line {line.lineno}: immutable target type "
                      f"{line.type} cannot be mixed with other target types")
    return cls


def _build_table(text: str, ctx: TargetContext) -> Table:
    lines = parse_table(text)
    check_layout(lines)
    types = {line.type for line in lines}
    classes: dict[str, type[Target]] = {}   # each type's class, once its rules were checked
    targets: list[Target] = []
    append = targets.append
    try:
        for line in lines:
            cls = classes.get(line.type)
            if cls is None:
                cls = classes[line.type] = _checked_type(line, len(lines), len(types))
            try:
                # (the quick way only takes areas that lie on the device: nothing to check at resume)
                target = cls.quick(ctx, line.start, line.length, line.args)
                if target is None:
                    ctx.begin_target(line.lineno)
                    target = cls(ctx, line.start, line.length, line.args)
                append(target)
            except TargetError as exc:
                raise DMError(exc.errno, f"table line {line.lineno}: {line.type}: {exc}") from None
    except BaseException:
        for target in targets:
            target.destroy()
        _release(ctx)
        raise
    _free_lines(lines)
    return Table(targets, ctx, text, frozenset(classes.values()))
