"""The thin-pool's metadata in the kernel's format (`dm-thin-metadata.c`), over `_pdata`.

Block 0 is the superblock (csum@0 flags@4 blocknr@8 uuid@16 magic 27022010@32 version 2@40
time@44 trans_id@48 held_root@56 data space map root@64 metadata space map root@192
data_mapping_root@320 device_details_root@328 data_block_size@336 metadata_block_size@340
metadata_nr_blocks@344 compat flags@352..363). The mapping tree has two levels: thin device id
-> root of that device's tree, virtual block -> `(data block << 24) | time`. The details tree
maps a device id to `{mapped_blocks u64, transaction_id u64, creation_time u32,
snapshotted_time u32}`. The superblock's uuid, flags, version and compat flags are kept as
found (a kernel's or thin_restore's metadata is written back as it was). A snapshot shares its
origin's tree (one more reference to its root) and bumps the pool's time; a mapping is shared
when its time is older than its device's snapshotted_time, and a write to it then goes to a
new block.

A commit writes the changed device details, the data space map, every node of the
transaction, the metadata space map (which counts all of them), flushes, then writes the
superblock and flushes again: until the superblock lands, the previous commit stays whole on
disk. `reserve_metadata_snap` keeps a copy of the superblock (its space map roots zeroed) that
holds a reference to both trees, so userspace tools can read a consistent snapshot of a live
pool (`thin_dump --metadata-snap`).
"""

from __future__ import annotations

import errno
import struct
import threading

import numpy as np

from ..block.device import BlockOpen
from ..errors import DMError
from ._pdata import (
    BLOCK,
    ENTRIES_PER_BITMAP,
    MAX_METADATA_BITMAPS,
    PLAIN_INDEX,
    PLAIN_U32,
    SM_ROOT,
    SUPERBLOCK_CSUM_XOR,
    U64,
    BTree,
    SmState,
    SpaceMap,
    Transaction,
    ValueType,
    check,
    disk_index,
    metadata_index,
    read_sm_counts,
    seal,
    write_disk_sm,
    write_metadata_sm,
)

MAGIC = 27022010
VERSION = 2
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP
MAX_DEV_ID = (1 << 24) - 1
TIME_MASK = (1 << 24) - 1
METADATA_BLOCK_SECTORS = BLOCK // 512
NEEDS_CHECK_FLAG = 1

SUPERBLOCK = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
DETAILS = np.dtype([("mapped_blocks", "<u8"), ("transaction_id", "<u8"),
                    ("creation_time", "<u4"), ("snapshotted_time", "<u4")])


class ThinMetadata:
    """The metadata of one pool on `dev`, formatted if its first block is all zeroes.
    Every method takes the lock; callers hold it (`lock`) across a lookup and what follows."""

    def __init__(self, dev: BlockOpen, data_block_size: int, data_blocks: int) -> None:
        self.dev = dev
        self.data_block_size = data_block_size
        self.lock = threading.RLock()
        self.nr_meta_blocks = min(dev.size // BLOCK, MAX_METADATA_BLOCKS)
        if self.nr_meta_blocks < 8:
            raise DMError(errno.ENOSPC, f"metadata device {dev.device.ref} has {self.nr_meta_blocks} "
                          f"blocks of {BLOCK} bytes; a thin pool needs at least 8")
        self.dirty = False
        #: how often the open transaction was thrown away: data blocks allocated before an
        #: abort belong to no one after it (`insert` refuses them)
        self.aborts = 0
        buf = bytearray(BLOCK)
        dev.readinto(0, buf)
        if not any(buf):
            self._format(data_blocks)
        else:
            self._open(buf)

    # ---- set-up ------------------------------------------------------------------------------

    def _trees(self) -> None:
        tm = self.tm
        self.mappings_vt = ValueType(U64, inc=lambda v: self.data.inc(v >> 24),
                                     dec=lambda v: self.data.dec(v >> 24))
        self.mappings = BTree(tm, self.mappings_vt)
        top_vt = ValueType(U64, inc=tm.meta.inc, dec=self._release_subtrees)
        self.top = BTree(tm, top_vt)
        self.details_tree = BTree(tm, ValueType(DETAILS))

    def _release_subtrees(self, roots: np.ndarray) -> None:
        for root in roots.tolist():
            self.tm.release(root, self.mappings_vt)

    def _format(self, data_blocks: int) -> None:
        meta = SpaceMap(np.zeros(self.nr_meta_blocks, np.uint32), "metadata")
        meta.inc(0)  # the superblock
        self.tm = Transaction(self.dev, meta)
        self.data = SpaceMap(np.zeros(data_blocks, np.uint32), "data")
        self._trees()
        self.time = 0
        self.trans_id = 0
        self.held_root = 0
        self.flags, self.uuid, self.version, self.compat = 0, bytes(16), VERSION, (0, 0)
        self.mapping_root = self.tm.empty_tree(self.top.vt)
        self.details_root = self.tm.empty_tree(self.details_tree.vt)
        self.data_sm = SmState([], self.tm.empty_tree(PLAIN_INDEX), self.tm.empty_tree(PLAIN_U32))
        self.meta_sm = SmState([], 0, self.tm.empty_tree(PLAIN_U32))
        self.details: dict[int, list[int]] = {}
        self._details_dirty: set[int] = set()
        self._cache: dict[int, dict[int, int]] = {}
        self.dirty = True
        self.commit()

    def _open(self, buf: bytearray) -> None:
        (_csum, flags, _blocknr, uuid, magic, version, time, trans_id, held_root, data_sm_root,
         meta_sm_root, mapping_root, details_root, dbs, mbs, _mnr, compat, compat_ro, incompat
         ) = SUPERBLOCK.unpack_from(buf)
        if magic != MAGIC:
            raise DMError(errno.EILSEQ, f"metadata device {self.dev.device.ref}: bad superblock "
                          f"magic {magic} (a thin pool's is {MAGIC}); zero its first 4 KiB to format it")
        check(buf, 0, SUPERBLOCK_CSUM_XOR, "superblock")
        if not 1 <= version <= VERSION or incompat:
            raise DMError(errno.EINVAL, f"thin metadata version {version} (incompat flags {incompat}) "
                          f"is not supported (versions 1 to {VERSION})")
        if mbs != METADATA_BLOCK_SECTORS:
            raise DMError(errno.EINVAL, f"metadata block size {mbs} sectors is not supported (8)")
        if dbs != self.data_block_size:
            raise DMError(errno.EINVAL, f"changing the data block size (from {dbs} to "
                          f"{self.data_block_size}) is not supported")
        meta_nr = SM_ROOT.unpack_from(meta_sm_root)[0]
        probe = SpaceMap(np.zeros(max(meta_nr, self.nr_meta_blocks), np.uint32), "metadata")
        self.tm = Transaction(self.dev, probe)
        counts = read_sm_counts(self.tm, meta_sm_root, lambda r, n: metadata_index(self.tm, r, n),
                                "metadata")
        meta = SpaceMap(counts, "metadata")
        meta.extend(self.nr_meta_blocks)
        self.tm.meta = meta
        self.data = SpaceMap(read_sm_counts(self.tm, data_sm_root,
                                            lambda r, n: disk_index(self.tm, r, n), "data"), "data")
        self._trees()
        _n, _a, meta_index, meta_ref = SM_ROOT.unpack_from(meta_sm_root)
        nr_bitmaps = -(-_n // ENTRIES_PER_BITMAP)
        self.meta_sm = SmState(metadata_index(self.tm, meta_index, nr_bitmaps).tolist(), meta_index, meta_ref)
        _n, _a, data_index, data_ref = SM_ROOT.unpack_from(data_sm_root)
        nr_bitmaps = -(-_n // ENTRIES_PER_BITMAP)
        self.data_sm = SmState(disk_index(self.tm, data_index, nr_bitmaps).tolist(), data_index, data_ref)
        self.time, self.trans_id, self.held_root = time, trans_id, held_root
        self.flags, self.uuid, self.version, self.compat = flags, uuid, version, (compat, compat_ro)
        self.mapping_root, self.details_root = mapping_root, details_root
        keys, values = self.details_tree.items(details_root)
        self.details = {int(k): [int(x) for x in v] for k, v in zip(keys, values.tolist())}
        self._details_dirty = set()
        self._cache = {}
        self.dirty = meta.nr_blocks != meta_nr  # a grown metadata device is recorded at once

    def abort(self) -> None:
        """Forget the open transaction: back to the last committed state on disk."""
        with self.lock:
            buf = bytearray(BLOCK)
            self.dev.readinto(0, buf)
            self._open(buf)
            self.aborts += 1

    # ---- commits -------------------------------------------------------------------------------

    def _superblock(self, location: int, data_root: bytes, meta_root: bytes, held: int) -> bytearray:
        buf = bytearray(BLOCK)
        SUPERBLOCK.pack_into(buf, 0, 0, self.flags, location, self.uuid, MAGIC, self.version, self.time,
                             self.trans_id, held, data_root, meta_root, self.mapping_root,
                             self.details_root, self.data_block_size, METADATA_BLOCK_SECTORS,
                             self.tm.meta.nr_blocks, *self.compat, 0)
        return seal(buf, location, SUPERBLOCK_CSUM_XOR)

    def commit(self) -> bool:
        """Make the open transaction durable; False if there was nothing to commit."""
        with self.lock:
            if not self.dirty:
                return False
            if self._details_dirty:
                devs = sorted(self._details_dirty)
                values = np.array([tuple(self.details[d]) for d in devs], DETAILS)
                self.details_root = self.details_tree.insert(self.details_root, np.array(devs, np.uint64), values)
                self._details_dirty.clear()
            data_root = write_disk_sm(self.tm, self.data, self.data_sm)
            meta_root = write_metadata_sm(self.tm, self.meta_sm)
            self.dev.flush()
            self.tm.write_block(0, self._superblock(0, data_root, meta_root, self.held_root))
            self.dev.flush()
            self.tm.meta.commit()
            self.data.commit()
            self.dirty = False
            return True

    # ---- devices -------------------------------------------------------------------------------

    def _subtree(self, dev: int) -> int:
        root = self.top.lookup(self.mapping_root, dev)
        if root is None:
            raise DMError(errno.ENODATA, f"thin device {dev} does not exist in the pool")
        return int(root)

    @property
    def needs_check(self) -> bool:
        """The superblock's NEEDS_CHECK flag: set by a kernel that hit a metadata error, cleared by
        thin_check --clear-needs-check-flag (or thin_repair); the pool stays read-only meanwhile."""
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def exists(self, dev: int) -> bool:
        return dev in self.details

    def create_thin(self, dev: int) -> None:
        with self.lock:
            if dev in self.details:
                raise DMError(errno.EEXIST, f"thin device {dev} already exists")
            root = self.tm.empty_tree(self.mappings_vt)
            self.mapping_root = self.top.insert(self.mapping_root, np.array([dev], np.uint64),
                                                np.array([root], U64))
            self._new_details(dev, 0)
            self.dirty = True

    def create_snap(self, dev: int, origin: int) -> None:
        with self.lock:
            if dev in self.details:
                raise DMError(errno.EEXIST, f"thin device {dev} already exists")
            if origin not in self.details:
                raise DMError(errno.ENODATA, f"origin thin device {origin} does not exist")
            root = self._subtree(origin)
            self.tm.meta.inc(root)
            self.mapping_root = self.top.insert(self.mapping_root, np.array([dev], np.uint64),
                                                np.array([root], U64))
            self.time = (self.time + 1) & 0xFFFFFFFF
            self._new_details(dev, self.details[origin][0])
            self.details[origin][3] = self.time
            self._details_dirty.add(origin)
            self.dirty = True

    def _new_details(self, dev: int, mapped: int) -> None:
        self.details[dev] = [mapped, self.trans_id, self.time, self.time]
        self._details_dirty.add(dev)

    def delete(self, dev: int) -> None:
        with self.lock:
            if dev not in self.details:
                raise DMError(errno.ENODATA, f"thin device {dev} does not exist")
            key = np.array([dev], np.uint64)
            self.mapping_root = self.top.remove(self.mapping_root, key)
            if self.details_tree.lookup(self.details_root, dev) is not None:  # committed before
                self.details_root = self.details_tree.remove(self.details_root, key)
            del self.details[dev]
            self._details_dirty.discard(dev)
            self._cache.pop(dev, None)
            self.dirty = True

    def set_transaction_id(self, current: int, new: int) -> None:
        with self.lock:
            if self.trans_id != current:
                raise DMError(errno.EINVAL, f"mismatched transaction id: the pool's is "
                              f"{self.trans_id}, the message says {current}")
            self.trans_id = new
            self.dirty = True

    def reserve_metadata_snap(self) -> None:
        with self.lock:
            if self.held_root:
                raise DMError(errno.EBUSY, "Pool metadata snapshot already exists: release this "
                              "before taking another.")
            self.dirty = True
            self.commit()
            location = self.tm.alloc_block()
            self.tm.meta.inc(self.mapping_root)
            self.tm.meta.inc(self.details_root)
            self.tm.write_block(location, self._superblock(location, bytes(128), bytes(128), 0))
            self.held_root = location
            self.dirty = True

    def release_metadata_snap(self) -> None:
        with self.lock:
            if not self.held_root:
                raise DMError(errno.EINVAL, "No pool metadata snapshot found: please reserve one first.")
            buf = self.tm.read_block(self.held_root)
            check(buf, self.held_root, SUPERBLOCK_CSUM_XOR, "metadata snapshot superblock")
            fields = SUPERBLOCK.unpack_from(buf)
            self.tm.release(fields[11], self.top.vt)
            self.tm.release(fields[12], self.details_tree.vt)
            self.tm.meta.dec(self.held_root)
            self.held_root = 0
            self.dirty = True

    # ---- mappings (the data path) -------------------------------------------------------------------

    def lookup(self, dev: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(virtual blocks, data blocks, times) of the mapped blocks in [first, first+count)."""
        with self.lock:
            keys, values = self.mappings.range(self._subtree(dev), first, first + count)
            return keys, values >> 24, (values & TIME_MASK).astype(np.uint32)

    def _mapping_of(self, dev: int) -> dict[int, int]:
        """A device's mappings {virtual block: packed value}, read from its btree on first use
        and kept in step by `insert` and `remove`: the data path's lookups are dict lookups."""
        cache = self._cache.get(dev)
        if cache is None:
            keys, values = self.mappings.items(self._subtree(dev))
            cache = self._cache[dev] = dict(zip(keys.tolist(), values.tolist()))
        return cache

    def find_one(self, dev: int, block: int) -> tuple[int, bool] | None:
        """`find` for one block: (data block, shared) or None."""
        with self.lock:
            v = (self._cache.get(dev) or self._mapping_of(dev)).get(block)
            if v is None:
                return None
            return v >> 24, (v & TIME_MASK) < self.details[dev][3]

    def find(self, dev: int, first: int, last: int) -> dict[int, tuple[int, bool]]:
        """{virtual block: (data block, shared)} for the mapped blocks in [first, last]; a
        mapping is shared when it is older than the device's last snapshot
        (`__snapshotted_since`), and a write to it then goes to a new block."""
        with self.lock:
            cache = self._mapping_of(dev)
            since = self.details[dev][3]
            out = {}
            for b in range(first, last + 1):
                v = cache.get(b)
                if v is not None:
                    out[b] = (v >> 24, (v & TIME_MASK) < since)
            return out

    def alloc_data(self, n: int) -> np.ndarray | None:
        with self.lock:
            return self.data.alloc(n)

    def free_data(self, blocks: np.ndarray) -> None:
        """Give back blocks from `alloc_data` that were never inserted."""
        with self.lock:
            self.data.dec(blocks)

    def insert(self, dev: int, vblocks: np.ndarray, dblocks: np.ndarray, aborts: int | None = None) -> None:
        """Map `vblocks` (sorted, unique) to `dblocks` (whose references the tree takes), at the
        current time; a replaced mapping drops its data block's reference. `aborts`: the value
        of `self.aborts` when the blocks were allocated."""
        with self.lock:
            if aborts is not None and aborts != self.aborts:
                raise DMError(errno.EAGAIN, "the pool went back to its last commit while this "
                              "write was being provisioned")
            vblocks = np.asarray(vblocks, np.uint64)
            cache = self._mapping_of(dev)
            keys = vblocks.tolist()
            new = sum(1 for k in keys if k not in cache)
            values = (np.asarray(dblocks, np.uint64) << np.uint64(24)) | np.uint64(self.time & TIME_MASK)
            self.mapping_root, leaf, i = self.top.mutable_leaf(self.mapping_root, dev)
            leaf.values[i] = self.mappings.insert(int(leaf.values[i]), vblocks, values)
            cache.update(zip(keys, values.tolist()))
            self.details[dev][0] += new
            self._details_dirty.add(dev)
            self.dirty = True

    def remove(self, dev: int, first: int, count: int) -> np.ndarray:
        """Unmap the mapped blocks in [first, first+count); returns the data blocks that no
        mapping references any more (free once committed)."""
        with self.lock:
            keys, values = self.mappings.range(self._subtree(dev), first, first + count)
            if not len(keys):
                return np.zeros(0, np.uint64)
            self.mapping_root, leaf, i = self.top.mutable_leaf(self.mapping_root, dev)
            leaf.values[i] = self.mappings.remove(int(leaf.values[i]), keys)
            cache = self._cache.get(dev)
            if cache is not None:
                for k in keys.tolist():
                    del cache[k]
            self.details[dev][0] -= len(keys)
            self._details_dirty.add(dev)
            self.dirty = True
            blocks = values >> 24
            return blocks[self.data.counts[blocks.astype(np.int64)] == 0]

    # ---- figures -------------------------------------------------------------------------------------

    def mapped_blocks(self, dev: int) -> int:
        return self.details[dev][0]

    def highest_mapped(self, dev: int) -> int | None:
        with self.lock:
            return self.mappings.last_key(self._subtree(dev))

    def resize_data(self, nr_blocks: int) -> None:
        with self.lock:
            if nr_blocks < self.data.nr_blocks:
                raise DMError(errno.EINVAL, f"pool target ({nr_blocks} blocks) too small: "
                              f"expected {self.data.nr_blocks}")
            if nr_blocks > self.data.nr_blocks:
                self.data.extend(nr_blocks)
                self.dirty = True

    def resize_metadata(self, nr_blocks: int) -> None:
        with self.lock:
            nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
            if nr_blocks > self.tm.meta.nr_blocks:
                self.tm.meta.extend(nr_blocks)
                self.nr_meta_blocks = nr_blocks
                self.dirty = True

    def dump(self) -> dict[int, dict[int, int]]:
        """Every device's mappings {virtual block: data block} (for tests and tools)."""
        with self.lock:
            out = {}
            for dev in sorted(self.details):
                keys, values = self.mappings.items(self._subtree(dev))
                out[dev] = dict(zip(keys.tolist(), (values >> 24).tolist()))
            return out
