"""The era target's persistent metadata: a crash-safe, copy-on-write store on the metadata device.

It keeps what `dm-era-target.c` keeps in its persistent-data btrees, in a simpler format of
its own (not bit-compatible with the kernel's): the current era, the current era's writeset
(one bit per origin block: written in this era) and the era array (per origin block, the
last era in which it was written; 0 = never, or before tracking began). Archiving a writeset
("digesting" it, in the kernel's words) sets `era[b] = era` for each marked block; it happens
at each era rollover (checkpoint, take_metadata_snap, suspend, resume), in the same commit.

Format (little-endian, metadata blocks of 4096 bytes = 8 sectors, block numbers are u32):

    block 0, 1   superblock slots; generation g lives in slot g % 2
    superblock   0 u32 csum (zlib crc32 of bytes 4..4095, xor CSUM_XOR)   4 u64 magic
                 12 u32 version (1)    16 u32 flags (1 = a metadata snapshot's copy)
                 20 u64 generation     28 u64 blocknr (where this copy lives)
                 36 u32 data block size (sectors)   40 u32 nr_blocks (origin blocks)
                 44 u32 current era    48 u32 held snapshot root (block; 0 = none)
                 52 u32 #era index blocks   56 u32 #writeset index blocks (0 = no writeset)
                 64.. u32 era index block numbers, then writeset index block numbers
    era index    1024 u32 numbers of era array blocks (0 = an all-zero block, not stored)
    era array    1024 u32 eras (entries past nr_blocks are zero)
    ws index     1024 u32 numbers of writeset bitmap blocks
    ws bitmap    32768 bits, block b is bit b % 8 of byte b // 8 of the whole bitmap

Crash safety. A commit writes every new block to free space (never over a block that the
last committed superblock or the held snapshot references), flushes, then writes the
superblock with generation + 1 into the other slot and flushes again. On open the valid slot
(magic, version, checksum, blocknr) with the highest generation wins, so a torn superblock
write falls back to the previous, intact state. Free space is not stored: it is everything
not reachable from the live superblock and the held snapshot, so no crash can leak blocks
and the used/total counts in the status line are exact. The one in-place update is marking
a block in the current writeset: its bitmap block is rewritten and the metadata device
flushed *before* the data write is let through (the kernel's "commit the writeset before
remapping a write to an unmarked block"). Bits are only ever added there, so a torn bitmap
write cannot lose a bit that was already durable. Concurrent first writes share one flush
(group commit).

A metadata snapshot (take_metadata_snap) is a copy of the superblock, made right after an
era rollover, in a block of its own (the "held root" of the status line). It references the
era array as of that moment, whose blocks the live metadata then only ever copies on write.
"""

from __future__ import annotations

import errno
import struct
import threading
import zlib
from array import array
from collections.abc import Iterable, Iterator

from ..block.device import BlockOpen
from ..errors import DMError

BLOCK = 4096
BLOCK_SECTORS = BLOCK // 512
MAGIC = int.from_bytes(b"udm-era1", "little")
CSUM_XOR = 146538381  # the kernel's SUPERBLOCK_CSUM_XOR
VERSION = 1
FLAG_SNAPSHOT = 1

_HEADER = struct.Struct("<IQIIQQIIIIIII")  # csum .. #ws index, and one reserved word: 64 bytes
MAX_POINTERS = (BLOCK - _HEADER.size) // 4
PER_BLOCK = BLOCK // 4          # u32 entries per index or era array block
BITS_PER_BLOCK = BLOCK * 8      # writeset bits per bitmap block
_ZERO_BLOCK = bytes(BLOCK)


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def layout(nr_blocks: int) -> tuple[int, int, int, int]:
    """(#era array blocks, #era index blocks, #writeset bitmap blocks, #writeset index blocks)."""
    era_blocks = _div_up(nr_blocks, PER_BLOCK)
    ws_blocks = _div_up(nr_blocks, BITS_PER_BLOCK)
    return era_blocks, _div_up(era_blocks, PER_BLOCK), ws_blocks, _div_up(ws_blocks, PER_BLOCK)


def max_nr_blocks() -> int:
    """The largest origin (in era blocks) whose index pointers fit in a superblock."""
    n = MAX_POINTERS * PER_BLOCK * PER_BLOCK
    while sum(layout(n)[1::2]) > MAX_POINTERS:
        n -= PER_BLOCK * PER_BLOCK
    return n


class _State:
    """One committed (or about to be committed) version of the metadata."""

    __slots__ = ("generation", "nr_blocks", "era", "snap", "era_index", "era_ptrs",
                 "ws_index", "ws_ptrs")

    def __init__(self, generation: int, nr_blocks: int, era: int, snap: int,
                 era_index: list[int], era_ptrs: list[int], ws_index: list[int], ws_ptrs: list[int]):
        self.generation = generation
        self.nr_blocks = nr_blocks
        self.era = era
        self.snap = snap
        self.era_index = era_index   # blocks holding era_ptrs
        self.era_ptrs = era_ptrs     # era array blocks (0 = all zeroes)
        self.ws_index = ws_index     # blocks holding ws_ptrs ([] = no current writeset)
        self.ws_ptrs = ws_ptrs       # writeset bitmap blocks

    def references(self) -> Iterator[int]:
        yield from self.era_index
        yield from (p for p in self.era_ptrs if p)
        yield from self.ws_index
        yield from self.ws_ptrs
        if self.snap:
            yield self.snap


class EraMetadata:
    """The metadata of one era target, opened (and formatted if all zeroes) on `dev`."""

    def __init__(self, dev: BlockOpen, data_block_size: int) -> None:
        self.dev = dev
        self.data_block_size = data_block_size
        self.total = min(dev.size // BLOCK, 0xFFFFFFFF)  # block numbers are u32
        if self.total < 4:
            raise DMError(errno.ENOSPC, f"the metadata device {dev.device.ref} has {self.total} "
                          f"blocks of {BLOCK} bytes; era needs at least 4")
        self._lock = threading.RLock()
        self._marking = threading.Condition(threading.Lock())
        self._committing = False
        self._pending: set[int] = set()
        self.load()

    # ---- raw block I/O ------------------------------------------------------------------

    def _read(self, block: int) -> bytearray:
        if not 0 <= block < self.total:
            raise DMError(errno.EILSEQ, f"era metadata refers to block {block}, beyond the end of "
                          f"the metadata device ({self.total} blocks)")
        buf = bytearray(BLOCK)
        self.dev.readinto(block * BLOCK, buf)
        return buf

    def _write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        self.dev.write(block * BLOCK, data)

    def _read_u32s(self, blocks: list[int], count: int) -> list[int]:
        out = array("I")
        for block in blocks:
            out.frombytes(self._read(block) if block else _ZERO_BLOCK)
        return out[:count].tolist()

    # ---- superblocks --------------------------------------------------------------------

    def _pack_super(self, st: _State, location: int, flags: int = 0) -> bytearray:
        pointers = st.era_index + st.ws_index
        buf = bytearray(BLOCK)
        _HEADER.pack_into(buf, 0, 0, MAGIC, VERSION, flags, st.generation, location,
                          self.data_block_size, st.nr_blocks, st.era, st.snap,
                          len(st.era_index), len(st.ws_index), 0)
        struct.pack_into(f"<{len(pointers)}I", buf, _HEADER.size, *pointers)
        struct.pack_into("<I", buf, 0, (zlib.crc32(memoryview(buf)[4:]) ^ CSUM_XOR) & 0xFFFFFFFF)
        return buf

    def _unpack_super(self, buf: bytearray, location: int) -> tuple[int, _State] | str:
        """(flags, state without the pointed-to lists read yet) or the reason it is invalid."""
        (csum, magic, version, flags, generation, blocknr, dbs, nr_blocks, era, snap,
         n_era_index, n_ws_index, _reserved) = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            return f"bad magic {magic:#x}"
        if (zlib.crc32(memoryview(buf)[4:]) ^ CSUM_XOR) & 0xFFFFFFFF != csum:
            return "bad checksum"
        if version != VERSION:
            return f"metadata version {version} found, but only version {VERSION} is supported"
        if blocknr != location:
            return f"it claims to live at block {blocknr}"
        if dbs != self.data_block_size:
            raise DMError(errno.EINVAL, f"changing the data block size (from {dbs} to "
                          f"{self.data_block_size}) is not supported")
        _, era_index, _, ws_index = layout(nr_blocks)
        if n_era_index + n_ws_index > MAX_POINTERS or n_era_index != era_index \
                or n_ws_index not in (0, ws_index):
            return f"index sizes {n_era_index}/{n_ws_index} do not match {nr_blocks} blocks"
        pointers = list(struct.unpack_from(f"<{n_era_index + n_ws_index}I", buf, _HEADER.size))
        st = _State(generation, nr_blocks, era, snap, pointers[:n_era_index], [],
                    pointers[n_era_index:], [])
        return flags, st

    def _read_lists(self, st: _State) -> None:
        era_blocks, _, ws_blocks, _ = layout(st.nr_blocks)
        st.era_ptrs = self._read_u32s(st.era_index, era_blocks)
        st.ws_ptrs = self._read_u32s(st.ws_index, ws_blocks) if st.ws_index else []
        for p in list(st.references()):
            if not 2 <= p < self.total:
                raise DMError(errno.EILSEQ, f"era metadata refers to block {p}, outside the "
                              f"metadata device's blocks 2 to {self.total - 1}")

    def load(self) -> None:
        """Read the newest valid superblock (formatting the device if it is all zeroes)."""
        with self._lock:
            found: list[_State] = []
            problems = []
            raw = [self._read(slot) for slot in (0, 1)]
            for slot, buf in enumerate(raw):
                got = self._unpack_super(buf, slot)
                if isinstance(got, str):
                    if any(buf):
                        problems.append(f"superblock slot {slot}: {got}")
                elif got[0] & FLAG_SNAPSHOT:
                    problems.append(f"superblock slot {slot}: is a snapshot copy")
                else:
                    found.append(got[1])
            if not found:
                if problems:
                    raise DMError(errno.EILSEQ, "no valid era superblock: " + "; ".join(problems))
                self._format()
                return
            st = max(found, key=lambda s: s.generation)
            self._read_lists(st)
            self.state = st
            self.ws_bits = self._read_bitmap(st)
            self._load_snapshot()
            self._recount()

    def _format(self) -> None:
        """A fresh store: era 0, every era array entry 0, no writeset (the first resume makes one)."""
        self.state = _State(0, 0, 0, 0, [], [], [], [])
        self.ws_bits = bytearray()
        self.snap_state: _State | None = None
        self._snap_refs: set[int] = set()
        self._recount()
        self._commit(_State(0, 0, 0, 0, [], [], [], []))

    def _read_bitmap(self, st: _State) -> bytearray:
        bits = bytearray()
        for p in st.ws_ptrs:
            bits += self._read(p)
        return bits[:_div_up(st.nr_blocks, 8)] if st.ws_ptrs else bytearray()

    def _load_snapshot(self) -> None:
        self.snap_state = None
        self._snap_refs = set()
        if not self.state.snap:
            return
        got = self._unpack_super(self._read(self.state.snap), self.state.snap)
        if isinstance(got, str) or not got[0] & FLAG_SNAPSHOT:
            reason = got if isinstance(got, str) else "not a snapshot copy"
            raise DMError(errno.EILSEQ, f"held metadata snapshot at block {self.state.snap}: {reason}")
        snap = got[1]
        self._read_lists(snap)
        self.snap_state = snap
        self._snap_refs = {self.state.snap, *snap.references()}

    # ---- space --------------------------------------------------------------------------

    def _recount(self) -> None:
        """Mark exactly the blocks the live state and the held snapshot reference as used."""
        used = bytearray(self.total)
        used[0] = used[1] = 1
        for p in self.state.references():
            used[p] = 1
        for p in self._snap_refs:
            used[p] = 1
        self._used = used
        self._hint = 2

    def _allocate(self) -> int:
        block = self._used.find(0, self._hint)
        if block < 0:
            block = self._used.find(0, 2)
        if block < 0:
            raise DMError(errno.ENOSPC, f"the era metadata device {self.dev.device.ref} is full "
                          f"({self.total} blocks of {BLOCK} bytes); give it more room")
        self._used[block] = 1
        self._hint = block + 1
        return block

    def used_blocks(self) -> int:
        return self._used.count(1)

    # ---- commits ------------------------------------------------------------------------

    def _write_list(self, values: list[int], old_values: list[int], old_blocks: list[int]) -> list[int]:
        """Store a u32 list in index blocks, keeping each old block whose content is unchanged."""
        blocks = []
        for i in range(_div_up(len(values), PER_BLOCK)):
            chunk = values[i * PER_BLOCK:(i + 1) * PER_BLOCK]
            if i < len(old_blocks) and chunk == old_values[i * PER_BLOCK:(i + 1) * PER_BLOCK]:
                blocks.append(old_blocks[i])
                continue
            block = self._allocate()
            self._write(block, array("I", chunk).tobytes().ljust(BLOCK, b"\0"))
            blocks.append(block)
        return blocks

    def _commit(self, st: _State) -> None:
        """Make `st` the committed state: new blocks are written; flush, superblock, flush."""
        st.generation = self.state.generation + 1
        self.dev.flush()
        self._write(st.generation % 2, self._pack_super(st, st.generation % 2))
        self.dev.flush()
        self.state = st
        self._recount()

    def _transaction(self, build) -> None:  # noqa: ANN001 - a callable building the new state
        """Run `build()` (which allocates and writes new blocks) and commit what it returns; on
        any failure the committed state stays and the blocks allocated meanwhile are free again."""
        with self._lock:
            try:
                self._commit(build())
            except BaseException:
                self._recount()
                raise

    # ---- the writeset (the data path) -----------------------------------------------------

    def marked(self, block: int) -> bool:
        bits = self.ws_bits
        return bool(bits[block >> 3] >> (block & 7) & 1) if block >> 3 < len(bits) else False

    def mark(self, blocks: Iterable[int]) -> None:
        """Make the marks of `blocks` in the current writeset durable (group commit)."""
        need = {b for b in blocks if not self.marked(b)}
        if not need:
            return
        with self._marking:
            need = {b for b in need if not self.marked(b)}  # a batch may have marked them meanwhile
            self._pending |= need
            while not all(self.marked(b) for b in need):
                if self._committing:
                    self._marking.wait()
                    continue
                # this thread's own blocks too: a failed batch may have taken them; blocks that
                # a batch marked after they were added are left out
                batch = {b for b in self._pending | need if not self.marked(b)}
                self._pending = set()
                self._committing = True
                self._marking.release()
                try:
                    self._write_marks(batch)
                finally:
                    self._marking.acquire()
                    self._committing = False
                    self._marking.notify_all()

    def _write_marks(self, batch: set[int]) -> None:
        st = self.state
        if not st.ws_ptrs:
            raise DMError(errno.EIO, "era metadata has no current writeset (the device is suspended)")
        bits = self.ws_bits
        staged: dict[int, bytearray] = {}
        for b in batch:
            if b >= st.nr_blocks:
                raise DMError(errno.EIO, f"era block {b} is beyond the {st.nr_blocks} tracked blocks")
            page = b // BITS_PER_BLOCK
            buf = staged.get(page)
            if buf is None:
                buf = staged[page] = bytearray(bits[page * BLOCK:(page + 1) * BLOCK]).ljust(BLOCK, b"\0")
            buf[(b % BITS_PER_BLOCK) >> 3] |= 1 << (b & 7)
        for page, buf in staged.items():
            self._write(st.ws_ptrs[page], buf)
        self.dev.flush()
        for page, buf in staged.items():  # durable now: let the writes through
            start = page * BLOCK
            end = min(start + BLOCK, len(bits))
            bits[start:end] = buf[:end - start]

    # ---- eras -------------------------------------------------------------------------------

    def _archived_era_ptrs(self, nr_blocks: int) -> list[int]:
        """Write the era array blocks that archiving the current writeset (and resizing to
        `nr_blocks`) changes into new blocks; return the new list of era array blocks."""
        st = self.state
        era_blocks = layout(nr_blocks)[0]
        ptrs = st.era_ptrs[:era_blocks] + [0] * (era_blocks - len(st.era_ptrs))
        bits = self.ws_bits
        for i in range(era_blocks):
            first, last = i * PER_BLOCK, min((i + 1) * PER_BLOCK, nr_blocks)
            marks = bits[first >> 3:_div_up(last, 8)]
            shrinks = ptrs[i] and nr_blocks < st.nr_blocks and i == era_blocks - 1
            if not any(marks) and not shrinks:
                continue
            values = array("I", self._read(ptrs[i]) if ptrs[i] else _ZERO_BLOCK)
            for j, byte in enumerate(marks):
                while byte:
                    low = byte & -byte
                    b = first + j * 8 + low.bit_length() - 1
                    if b < last:
                        values[b - first] = st.era
                    byte ^= low
            for b in range(last - first, PER_BLOCK):
                values[b] = 0
            if not any(values):
                ptrs[i] = 0
                continue
            block = self._allocate()
            self._write(block, values.tobytes())
            ptrs[i] = block
        return ptrs

    def _new_writeset(self, nr_blocks: int) -> tuple[list[int], list[int]]:
        _, _, ws_blocks, _ = layout(nr_blocks)
        ptrs = []
        for _ in range(ws_blocks):
            block = self._allocate()
            self._write(block, _ZERO_BLOCK)
            ptrs.append(block)
        return self._write_list(ptrs, [], []), ptrs

    def archive(self) -> None:
        """Digest the current writeset into the era array and drop it (the kernel's postsuspend)."""
        with self._lock:
            if not self.state.ws_ptrs:
                return
            nr = self.state.nr_blocks

            def build() -> _State:
                era_ptrs = self._archived_era_ptrs(nr)
                era_index = self._write_list(era_ptrs, self.state.era_ptrs, self.state.era_index)
                return _State(0, nr, self.state.era, self.state.snap, era_index, era_ptrs, [], [])
            self._transaction(build)
            self.ws_bits = bytearray()

    def rollover(self, nr_blocks: int | None = None) -> None:
        """Archive the current writeset, start an empty one and move to the next era; with
        `nr_blocks`, also resize the era array (new blocks have era 0)."""
        with self._lock:
            with self._marking:
                # no write is being marked during an era change (the target's `_exclusive`), so
                # what is left here was marked already: it must not reach the next era's writeset
                self._pending = set()
            nr = self.state.nr_blocks if nr_blocks is None else nr_blocks
            if not 0 < nr <= max_nr_blocks():
                raise DMError(errno.EINVAL, f"Invalid number of origin blocks {nr} (era metadata "
                              f"tracks 1 to {max_nr_blocks()} blocks)")
            if self.state.era >= 0xFFFFFFFF:
                raise DMError(errno.EOVERFLOW, "the era counter is at its maximum (2^32 - 1)")

            def build() -> _State:
                era_ptrs = self._archived_era_ptrs(nr)
                index = self._write_list(era_ptrs, self.state.era_ptrs, self.state.era_index)
                ws_index, ws_ptrs = self._new_writeset(nr)
                return _State(0, nr, self.state.era + 1, self.state.snap, index, era_ptrs,
                              ws_index, ws_ptrs)
            self._transaction(build)
            self.ws_bits = bytearray(_div_up(nr, 8))

    # ---- metadata snapshots ----------------------------------------------------------------

    def take_snapshot(self) -> None:
        """Roll over, then hold a copy of the superblock whose era array stays readable."""
        with self._lock:
            if self.state.snap:
                raise DMError(errno.EINVAL, f"a metadata snapshot is already held (at block "
                              f"{self.state.snap}); send drop_metadata_snap first")
            self.rollover()
            st = self.state

            def build() -> _State:
                location = self._allocate()
                copy = _State(st.generation, st.nr_blocks, st.era, 0, list(st.era_index),
                              list(st.era_ptrs), [], [])
                self._write(location, self._pack_super(copy, location, FLAG_SNAPSHOT))
                return _State(0, st.nr_blocks, st.era, location, st.era_index, st.era_ptrs,
                              st.ws_index, st.ws_ptrs)
            self._transaction(build)
            self._load_snapshot()
            self._recount()

    def drop_snapshot(self) -> None:
        with self._lock:
            if not self.state.snap:
                raise DMError(errno.EINVAL, "no metadata snapshot is held; nothing to drop")
            st = self.state
            self._transaction(lambda: _State(0, st.nr_blocks, st.era, 0, st.era_index,
                                             st.era_ptrs, st.ws_index, st.ws_ptrs))
            self.snap_state, self._snap_refs = None, set()
            self._recount()

    # ---- queries ------------------------------------------------------------------------------

    def written_since(self, since: int, *, snapshot: bool = False) -> list[tuple[int, int]]:
        """Runs `[begin, end)` of blocks written in era `since` or later: era array entries
        >= since, and the current writeset if the current era is >= since."""
        with self._lock:
            if snapshot:
                if self.snap_state is None:
                    raise DMError(errno.EINVAL, "no metadata snapshot is held; send "
                                  "take_metadata_snap first")
                st, bits = self.snap_state, b""
            else:
                st, bits = self.state, self.ws_bits if self.state.era >= since else b""
            runs: list[tuple[int, int]] = []
            for i, ptr in enumerate(st.era_ptrs):
                first, last = i * PER_BLOCK, min((i + 1) * PER_BLOCK, st.nr_blocks)
                hit = bytearray(b"\1" * (last - first) if since == 0 else last - first)
                if since and ptr:
                    for j, era in enumerate(array("I", self._read(ptr))[:last - first]):
                        if era >= since:
                            hit[j] = 1
                for j, byte in enumerate(bits[first >> 3:_div_up(last, 8)]):
                    while byte:
                        low = byte & -byte
                        b = j * 8 + low.bit_length() - 1
                        if b < len(hit):
                            hit[b] = 1
                        byte ^= low
                _add_runs(runs, hit, first)
            return runs

    def stats(self) -> tuple[int, int, int, int]:
        """(used metadata blocks, total metadata blocks, current era, held root or 0)."""
        with self._lock:
            return self.used_blocks(), self.total, self.state.era, self.state.snap


def _add_runs(runs: list[tuple[int, int]], hit: bytearray, base: int) -> None:
    """Append the runs of 1s in `hit` (offset by `base`), joining one that continues the last."""
    pos = hit.find(1)
    while pos >= 0:
        end = hit.find(0, pos)
        if end < 0:
            end = len(hit)
        begin = base + pos
        if runs and runs[-1][1] == begin:
            runs[-1] = (runs[-1][0], base + end)
        else:
            runs.append((begin, base + end))
        pos = hit.find(1, end)
