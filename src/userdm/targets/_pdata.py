"""persistent-data: the kernel's copy-on-write btrees and space maps (`drivers/md/persistent-data/`).

What `dm-thin-metadata.c` stands on, in the kernel's on-disk format, bit for bit:

- **Blocks** of 4096 bytes. Every block starts with `csum u32, flags|padding u32, blocknr u64`;
  the checksum is crc32c (seed ~0, no final inversion) over bytes 4..4095, XOR a constant per
  block type (`checksum`). `blocknr` is where the block must live.
- **Btree nodes**: a 32-byte header (csum, flags 1 = internal / 2 = leaf, blocknr, nr_entries,
  max_entries, value_size, padding), then `max_entries` u64 keys, then `max_entries` values.
  `max_entries = 3 * floor((4096 - 32) / (8 + value_size) / 3)`; every node but the root holds
  at least max_entries / 3 entries (thin_check insists). Internal nodes map the lowest key of a
  child to the child's block.
- **Space maps**: two bits per block (0, 1, 2, 3 = "look in the ref count btree", whose u32
  values hold the counts above 2), 16,320 entries per bitmap block after a 16-byte header, the
  high bit of an entry first. The metadata space map indexes its bitmaps in one index block (at
  most 255 entries); the data space map in a btree of `disk_index_entry` values.

Transactions are copy-on-write as in `dm-transaction-manager.c`: a node is modified only
after it is *shadowed*: a node allocated in this transaction and referenced once is changed
in place; any other is copied to a new block (its children gain a reference if the old node
stays shared, else the copy takes its references over and the old block is free). Freed
blocks are never reused before the commit, so the last committed state stays intact on disk
until the superblock that replaces it is written. Reference counts are exact: a block's count
is the number of nodes (or superblocks) that point at it, as thin_check counts them.

Counts live in memory as numpy arrays (`SpaceMap`); bitmaps, index entries and ref count
btrees are written from them at commit (`write_metadata_sm`, `write_disk_sm`). Node keys and
values are numpy arrays, so bulk inserts, removals and reference counting are array operations.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from itertools import pairwise

import crc32c
import numpy as np

from ..block.device import BlockOpen
from ..errors import DMError

BLOCK = 4096
SUPERBLOCK_CSUM_XOR = 160774
BTREE_CSUM_XOR = 121107
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478

INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER = struct.Struct("<IIQIIII")  # csum flags blocknr nr_entries max_entries value_size padding
BITMAP_HEADER = 16
ENTRIES_PER_BITMAP = (BLOCK - BITMAP_HEADER) * 4
MAX_METADATA_BITMAPS = 255
SM_ROOT = struct.Struct("<QQQQ")  # nr_blocks nr_allocated bitmap_root ref_count_root

U64 = np.dtype("<u8")
U32 = np.dtype("<u4")
#: the data space map's btree values (`struct disk_index_entry`)
INDEX_ENTRY = np.dtype([("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")])


def checksum(block: bytes | bytearray | memoryview, xor: int) -> int:
    """The kernel's `dm_bm_checksum(bytes 4.., xor)`: crc32c without the final inversion."""
    return crc32c.crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF ^ xor


def seal(block: bytearray, location: int, xor: int) -> bytearray:
    """Stamp `location` and the checksum into a block about to be written."""
    struct.pack_into("<Q", block, 8, location)
    struct.pack_into("<I", block, 0, checksum(block, xor))
    return block


def check(block: bytes | bytearray, location: int, xor: int, what: str) -> None:
    """Refuse a block whose location or checksum is wrong (EILSEQ, as the validators do)."""
    csum, = struct.unpack_from("<I", block, 0)
    blocknr, = struct.unpack_from("<Q", block, 8)
    if blocknr != location:
        raise DMError(errno.EILSEQ, f"{what} at metadata block {location} claims to be block {blocknr}")
    if csum != checksum(block, xor):
        raise DMError(errno.EILSEQ, f"bad checksum in {what} at metadata block {location}")


def max_entries(value_size: int) -> int:
    return 3 * ((BLOCK - NODE_HEADER.size) // (8 + value_size) // 3)


# ---- nodes ------------------------------------------------------------------------------------

class Node:
    """One btree node in memory: sorted u64 `keys` and their `values` (block numbers in an
    internal node)."""

    __slots__ = ("block", "keys", "leaf", "values")

    def __init__(self, block: int, leaf: bool, keys: np.ndarray, values: np.ndarray) -> None:
        self.block = block
        self.leaf = leaf
        self.keys = keys
        self.values = values

    def pack(self) -> bytearray:
        vdtype = self.values.dtype
        cap = max_entries(vdtype.itemsize)
        n = len(self.keys)
        buf = bytearray(BLOCK)
        NODE_HEADER.pack_into(buf, 0, 0, LEAF_NODE if self.leaf else INTERNAL_NODE, self.block,
                              n, cap, vdtype.itemsize, 0)
        start = NODE_HEADER.size
        buf[start:start + 8 * n] = self.keys.astype(U64, copy=False).tobytes()
        start += 8 * cap
        buf[start:start + vdtype.itemsize * n] = self.values.tobytes()
        return seal(buf, self.block, BTREE_CSUM_XOR)


def unpack_node(buf: bytes | bytearray, location: int, vdtype: np.dtype) -> Node:
    check(buf, location, BTREE_CSUM_XOR, "btree node")
    _csum, flags, _blocknr, n, cap, vsize, _pad = NODE_HEADER.unpack_from(buf)
    leaf = bool(flags & LEAF_NODE)
    want = vdtype if leaf else U64
    if vsize != want.itemsize or cap != max_entries(vsize) or n > cap:
        raise DMError(errno.EILSEQ, f"btree node at metadata block {location}: value size {vsize}, "
                      f"max entries {cap}, {n} entries; expected value size {want.itemsize}")
    start = NODE_HEADER.size
    keys = np.frombuffer(buf, U64, n, start).astype(np.uint64)
    values = np.frombuffer(buf, want, n, start + 8 * cap).copy()
    return Node(location, leaf, keys, values)


class ValueType:
    """What a leaf value holds a reference to: `inc`/`dec` take arrays of values (None: nothing)."""

    def __init__(self, dtype: np.dtype, inc: Callable[[np.ndarray], None] | None = None,
                 dec: Callable[[np.ndarray], None] | None = None) -> None:
        self.dtype = dtype
        self.inc = inc
        self.dec = dec


PLAIN_U64 = ValueType(U64)
PLAIN_U32 = ValueType(U32)
PLAIN_INDEX = ValueType(INDEX_ENTRY)


# ---- space maps -----------------------------------------------------------------------------

class SpaceMap:
    """Reference counts of `nr_blocks` blocks, and the counts as of the last commit: a block is
    allocatable only when both are zero (freed blocks are not reused within a transaction)."""

    def __init__(self, counts: np.ndarray, what: str) -> None:
        self.counts = counts.astype(np.uint32)
        self.committed = self.counts.copy()
        self.what = what
        self._hint = 0
        self._free = int(np.count_nonzero(self.counts == 0))  # kept in step by every change

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    def nr_free(self) -> int:
        return self._free

    def extend(self, nr_blocks: int) -> None:
        if nr_blocks > self.nr_blocks:
            grow = np.zeros(nr_blocks - self.nr_blocks, np.uint32)
            self.counts = np.concatenate([self.counts, grow])
            self.committed = np.concatenate([self.committed, grow])
            self._free += len(grow)

    def alloc(self, n: int = 1) -> np.ndarray | None:
        """`n` free blocks (count 1 each), searched from the last allocation on, or None."""
        h = self._hint
        if n == 1 and h < self.nr_blocks and not self.counts[h] and not self.committed[h]:
            self.counts[h] = 1  # the data path's common case: the block after the last one
            self._hint = h + 1
            self._free -= 1
            return np.array([h], np.uint64)
        got: list[np.ndarray] = []
        need = n
        for lo, hi in ((self._hint, self.nr_blocks), (0, self._hint)):
            pos = lo
            window = max(256, 2 * n)  # usually the blocks right after the last ones are free
            while need and pos < hi:
                end = min(hi, pos + window)
                window = 1 << 16
                free = np.flatnonzero((self.counts[pos:end] == 0) & (self.committed[pos:end] == 0))
                if len(free):
                    take = free[:need] + pos
                    got.append(take)
                    need -= len(take)
                pos = end
        if need:
            return None
        blocks = np.concatenate(got) if len(got) > 1 else got[0]
        self.counts[blocks] = 1
        self._hint = int(blocks[-1]) + 1
        self._free -= len(blocks)
        return blocks.astype(np.uint64)

    def inc(self, blocks: np.ndarray | int) -> None:
        idx = np.asarray(blocks, dtype=np.int64)
        if idx.ndim == 0:
            self._free -= not self.counts[idx]
            self.counts[idx] += 1
            return
        self._free -= int(np.count_nonzero(self.counts[np.unique(idx)] == 0))
        np.add.at(self.counts, idx, 1)

    def dec(self, blocks: np.ndarray | int) -> None:
        idx = np.asarray(blocks, dtype=np.int64)
        if np.any(self.counts[idx] == 0):
            raise DMError(errno.EILSEQ, f"{self.what} space map: a reference count would drop below 0")
        if idx.ndim == 0:
            self.counts[idx] -= 1
            self._free += not self.counts[idx]
            return
        np.subtract.at(self.counts, idx, 1)
        self._free += int(np.count_nonzero(self.counts[np.unique(idx)] == 0))

    def commit(self) -> None:
        self.committed = self.counts.copy()


def decode_bitmap(buf: bytes | bytearray) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, np.uint8, BLOCK - BITMAP_HEADER, BITMAP_HEADER),
                         bitorder="little").reshape(-1, 2)
    return (bits[:, 0] * 2 + bits[:, 1]).astype(np.uint32)


def encode_bitmap(counts: np.ndarray, location: int) -> bytearray:
    v = np.zeros(ENTRIES_PER_BITMAP, np.uint8)
    v[:len(counts)] = np.minimum(counts, 3)
    bits = np.stack([(v >> 1) & 1, v & 1], axis=1).ravel()
    buf = bytearray(BITMAP_HEADER) + np.packbits(bits, bitorder="little").tobytes()
    return seal(buf, location, BITMAP_CSUM_XOR)


def _index_entry(counts: np.ndarray, location: int) -> tuple[int, int, int]:
    used = np.flatnonzero(counts == 0)
    nr_free = ENTRIES_PER_BITMAP - (len(counts) - len(used))
    first_free = int(used[0]) if len(used) else len(counts)
    return location, nr_free, first_free


# ---- the transaction manager and btrees -----------------------------------------------------

class Transaction:
    """Metadata blocks on `dev`: reading and caching nodes, allocating (from `meta`), shadowing,
    releasing, and writing the nodes of the open transaction at commit."""

    def __init__(self, dev: BlockOpen, meta: SpaceMap) -> None:
        self.dev = dev
        self.meta = meta
        self._nodes: dict[int, Node] = {}
        self._new: set[int] = set()

    # -- blocks
    def read_block(self, location: int) -> bytearray:
        if not 0 <= location < self.meta.nr_blocks:
            raise DMError(errno.EILSEQ, f"metadata refers to block {location}, beyond the "
                          f"{self.meta.nr_blocks} blocks of the metadata device")
        buf = bytearray(BLOCK)
        self.dev.readinto(location * BLOCK, buf)
        return buf

    def write_block(self, location: int, buf: bytes | bytearray) -> None:
        self.dev.write(location * BLOCK, buf)

    def alloc_block(self) -> int:
        got = self.meta.alloc(1)
        if got is None:
            raise DMError(errno.ENOSPC, f"the metadata device {self.dev.device.ref} is full "
                          f"({self.meta.nr_blocks} blocks of {BLOCK} bytes)")
        return int(got[0])

    # -- nodes
    def node(self, location: int, vdtype: np.dtype) -> Node:
        node = self._nodes.get(location)
        if node is None:
            node = self._nodes[location] = unpack_node(self.read_block(location), location, vdtype)
        return node

    def new_node(self, leaf: bool, keys: np.ndarray, values: np.ndarray) -> Node:
        node = Node(self.alloc_block(), leaf, keys, values)
        self._nodes[node.block] = node
        self._new.add(node.block)
        return node

    def empty_tree(self, vt: ValueType) -> int:
        return self.new_node(True, np.zeros(0, np.uint64), np.zeros(0, vt.dtype)).block

    def mutable(self, node: Node) -> bool:
        return node.block in self._new and self.meta.counts[node.block] == 1

    def shadow(self, node: Node, vt: ValueType) -> Node:
        """The node, writable: itself if it is new and unshared, else a copy (`dm_tm_shadow_block`)."""
        if self.mutable(node):
            return node
        if self.meta.counts[node.block] > 1:
            self._inc_children(node, vt)
        self.meta.dec(node.block)
        if not self.meta.counts[node.block]:
            self._forget(node.block)
        return self.new_node(node.leaf, node.keys.copy(), node.values.copy())

    def _inc_children(self, node: Node, vt: ValueType) -> None:
        if not node.leaf:
            self.meta.inc(node.values)
        elif vt.inc is not None and len(node.values):
            vt.inc(node.values)

    def _forget(self, location: int) -> None:
        if location in self._new:
            self._new.discard(location)
            self._nodes.pop(location, None)

    def drop(self, node: Node) -> None:
        """Free a new, unshared node whose entries moved elsewhere."""
        self.meta.dec(node.block)
        self._forget(node.block)

    def inc_tree(self, root: int) -> None:
        self.meta.inc(root)

    def release(self, root: int, vt: ValueType) -> None:
        """Drop one reference to a tree; nodes that reach zero release their children
        (`dm_btree_del`: shared nodes are only decremented)."""
        stack = [root]
        while stack:
            location = stack.pop()
            self.meta.dec(location)
            if self.meta.counts[location]:
                continue
            node = self.node(location, vt.dtype)
            self._forget(location)
            if node.leaf:
                if vt.dec is not None and len(node.values):
                    vt.dec(node.values)
            else:
                stack.extend(int(v) for v in node.values)

    def write_nodes(self) -> None:
        """Write every live node of this transaction (to blocks nothing committed uses)."""
        for location in sorted(self._new):
            self.write_block(location, self._nodes[location].pack())

    def end(self) -> None:
        self._new.clear()

    def abandon(self) -> None:
        """Forget the open transaction's nodes (after a failed commit, before re-reading)."""
        for location in self._new:
            self._nodes.pop(location, None)
        self._new.clear()


def _insert1(array: np.ndarray, i: int, value) -> np.ndarray:
    """`np.insert` of one element, without its generality (a tenth of its cost)."""
    out = np.empty(len(array) + 1, array.dtype)
    out[:i] = array[:i]
    out[i] = value
    out[i + 1:] = array[i:]
    return out


def _min_entries(node: Node) -> int:
    return max_entries(node.values.dtype.itemsize) // 3


class BTree:
    """Operations on one kind of btree (its value type), in the `Transaction` `tm`."""

    def __init__(self, tm: Transaction, vt: ValueType) -> None:
        self.tm = tm
        self.vt = vt

    def _node(self, location: int) -> Node:
        return self.tm.node(location, self.vt.dtype)

    # -- reading
    def lookup(self, root: int, key: int):
        node = self._node(root)
        while not node.leaf:
            i = max(int(np.searchsorted(node.keys, key, "right")) - 1, 0)
            if not len(node.keys):
                return None
            node = self._node(int(node.values[i]))
        i = int(np.searchsorted(node.keys, key))
        if i < len(node.keys) and node.keys[i] == key:
            return node.values[i]
        return None

    def range(self, root: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys in [lo, hi) and their values."""
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        stack = [self._node(root)]
        while stack:
            node = stack.pop()
            a = max(int(np.searchsorted(node.keys, lo, "right")) - (0 if node.leaf else 1), 0)
            if node.leaf:
                a = int(np.searchsorted(node.keys, lo))
            b = int(np.searchsorted(node.keys, hi))
            if node.leaf:
                keys.append(node.keys[a:b])
                values.append(node.values[a:b])
            else:
                stack.extend(self._node(int(v)) for v in node.values[a:b][::-1])
        if not keys:
            return np.zeros(0, np.uint64), np.zeros(0, self.vt.dtype)
        return np.concatenate(keys), np.concatenate(values)

    def items(self, root: int) -> tuple[np.ndarray, np.ndarray]:
        return self.range(root, 0, 1 << 64)

    def last_key(self, root: int) -> int | None:
        node = self._node(root)
        while not node.leaf:
            node = self._node(int(node.values[-1]))
        return int(node.keys[-1]) if len(node.keys) else None

    def count(self, root: int) -> int:
        node = self._node(root)
        if node.leaf:
            return len(node.keys)
        return sum(self.count(int(v)) for v in node.values)

    # -- changing
    def insert(self, root: int, keys: np.ndarray, values: np.ndarray) -> int:
        """Set `keys` (sorted, unique) to `values`; the tree takes over the references the
        values hold, and drops those of the values it replaces. Returns the new root."""
        return self._apply(root, np.asarray(keys, np.uint64), values)

    def remove(self, root: int, keys: np.ndarray) -> int:
        """Remove `keys` (sorted, unique, all present), dropping their values' references."""
        return self._apply(root, np.asarray(keys, np.uint64), None)

    def mutable_leaf(self, root: int, key: int) -> tuple[int, Node, int]:
        """Shadow the path to `key` (present): (new root, writable leaf, index of the key). The
        caller may then replace the value in place, taking over its references."""
        tm = self.tm
        node = tm.shadow(self._node(root), self.vt)
        new_root = node.block
        while not node.leaf:
            i = max(int(np.searchsorted(node.keys, key, "right")) - 1, 0)
            child = tm.shadow(self._node(int(node.values[i])), self.vt)
            node.values[i] = child.block
            node = child
        i = int(np.searchsorted(node.keys, key))
        if i >= len(node.keys) or node.keys[i] != key:
            raise DMError(errno.ENODATA, f"key {key} is not in the btree")
        return new_root, node, i

    def _apply(self, root: int, keys: np.ndarray, values: np.ndarray | None) -> int:
        tm = self.tm
        if not len(keys):
            return root
        nodes = self._update(self._node(root), keys, values)
        while len(nodes) > 1:
            parent = tm.new_node(False, np.array([n.keys[0] for n in nodes], np.uint64),
                                 np.array([n.block for n in nodes], np.uint64))
            nodes = self._split(parent)
        if not nodes:
            return tm.empty_tree(self.vt)
        top = nodes[0]
        while not top.leaf and len(top.keys) <= 1:
            tm.drop(top)  # a root with one child: the child becomes the root (its reference moves)
            if not len(top.keys):
                return tm.empty_tree(self.vt)
            top = self._node(int(top.values[0]))
        return top.block

    def _update(self, node: Node, keys: np.ndarray, values: np.ndarray | None) -> list[Node]:
        tm = self.tm
        node = tm.shadow(node, self.vt)
        if node.leaf and len(keys) == 1 and values is not None:  # the data path's common case
            i = int(node.keys.searchsorted(keys[0]))
            if i < len(node.keys) and node.keys[i] == keys[0]:
                if self.vt.dec is not None:
                    self.vt.dec(node.values[i:i + 1])
                node.values[i] = values[0]
            else:
                node.keys = _insert1(node.keys, i, keys[0])
                node.values = _insert1(node.values, i, values[0])
            return self._split(node)
        if node.leaf:
            pos = np.searchsorted(node.keys, keys)
            clipped = np.minimum(pos, max(len(node.keys) - 1, 0))
            found = (pos < len(node.keys)) & (node.keys[clipped] == keys) if len(node.keys) else \
                np.zeros(len(keys), bool)
            hit = pos[found]
            if self.vt.dec is not None and len(hit):
                self.vt.dec(node.values[hit])
            if values is None:
                node.keys = np.delete(node.keys, hit)
                node.values = np.delete(node.values, hit)
            else:
                node.values[hit] = values[found]
                new = ~found
                if new.any():
                    node.keys = np.insert(node.keys, pos[new], keys[new])
                    node.values = np.insert(node.values, pos[new], values[new])
            if not len(node.keys):
                tm.drop(node)
                return []
            return self._split(node)
        # internal: route each key to its child, top-down (the parent is writable first)
        touched: dict[int, list[Node]] = {}
        if len(keys) == 1:
            i = max(int(node.keys.searchsorted(keys[0], "right")) - 1, 0)
            touched[i] = self._update(self._node(int(node.values[i])), keys, values)
        else:
            route = np.maximum(np.searchsorted(node.keys, keys, "right") - 1, 0)
            bounds = np.flatnonzero(np.diff(route)) + 1
            starts = np.concatenate([[0], bounds])
            ends = np.concatenate([bounds, [len(keys)]])
            for s, e in zip(starts.tolist(), ends.tolist()):
                i = int(route[s])
                child = self._node(int(node.values[i]))
                touched[i] = self._update(child, keys[s:e], None if values is None else values[s:e])
        if all(len(res) == 1 and len(res[0].keys) >= _min_entries(res[0]) for res in touched.values()):
            for i, res in touched.items():  # the common case: each child changed in place
                node.keys[i] = res[0].keys[0]
                node.values[i] = res[0].block
            return [node]
        out_keys: list[int] = []
        out_nodes: list[Node | int] = []
        for i, (k, b) in enumerate(zip(node.keys.tolist(), node.values.tolist())):
            if i in touched:
                for n in touched[i]:
                    out_keys.append(int(n.keys[0]))
                    out_nodes.append(n)
            else:
                out_keys.append(int(k))
                out_nodes.append(int(b))
        self._rebalance(out_keys, out_nodes)
        if not out_nodes:
            tm.drop(node)
            return []
        node.keys = np.array(out_keys, np.uint64)
        node.values = np.array([n if isinstance(n, int) else n.block for n in out_nodes], np.uint64)
        return self._split(node)

    def _rebalance(self, keys: list[int], nodes: list[Node | int]) -> None:
        """Merge children below max/3 entries with a neighbour (re-splitting evenly if the two
        do not fit in one node), as `dm-btree-remove.c` rebalances."""
        tm = self.tm
        i = 0
        while i < len(nodes) and len(nodes) > 1:
            n = nodes[i]
            if isinstance(n, int) or len(n.keys) >= _min_entries(n):
                i += 1
                continue
            j = i + 1 if i + 1 < len(nodes) else i - 1
            left_i, right_i = min(i, j), max(i, j)
            left = self._writable(nodes[left_i])
            right = self._writable(nodes[right_i])
            all_keys = np.concatenate([left.keys, right.keys])
            all_values = np.concatenate([left.values, right.values])
            cap = max_entries(left.values.dtype.itemsize)
            if len(all_keys) <= cap:
                left.keys, left.values = all_keys, all_values
                tm.drop(right)
                del nodes[right_i], keys[right_i]
                nodes[left_i], keys[left_i] = left, int(left.keys[0])
            else:
                half = len(all_keys) // 2
                left.keys, left.values = all_keys[:half], all_values[:half]
                right.keys, right.values = all_keys[half:], all_values[half:]
                nodes[left_i], keys[left_i] = left, int(left.keys[0])
                nodes[right_i], keys[right_i] = right, int(right.keys[0])
            i = left_i

    def _writable(self, n: Node | int) -> Node:
        return self.tm.shadow(self._node(n) if isinstance(n, int) else n, self.vt)

    def _split(self, node: Node) -> list[Node]:
        cap = max_entries(node.values.dtype.itemsize)
        n = len(node.keys)
        if n <= cap:
            return [node]
        k = -(-n // cap)
        cuts = [n * i // k for i in range(k + 1)]
        keys, values = node.keys, node.values
        node.keys, node.values = keys[:cuts[1]], values[:cuts[1]]
        out = [node]
        for a, b in pairwise(cuts[1:]):
            out.append(self.tm.new_node(node.leaf, keys[a:b], values[a:b]))
        return out


# ---- space maps on disk -----------------------------------------------------------------------

def read_sm_counts(tm: Transaction, root: bytes, index_entries: Callable[[int, int], np.ndarray],
                   what: str) -> np.ndarray:
    """Reference counts of a space map whose root (`disk_sm_root`) is `root`;
    `index_entries(bitmap_root, nr_bitmaps)` gives the bitmap block numbers."""
    nr_blocks, _allocated, bitmap_root, ref_root = SM_ROOT.unpack_from(root)
    nr_bitmaps = -(-nr_blocks // ENTRIES_PER_BITMAP)
    counts = np.zeros(nr_bitmaps * ENTRIES_PER_BITMAP, np.uint32)
    for i, location in enumerate(index_entries(bitmap_root, nr_bitmaps)):
        buf = tm.read_block(int(location))
        check(buf, int(location), BITMAP_CSUM_XOR, f"{what} space map bitmap")
        counts[i * ENTRIES_PER_BITMAP:(i + 1) * ENTRIES_PER_BITMAP] = decode_bitmap(buf)
    keys, values = BTree(tm, PLAIN_U32).items(ref_root)
    big = keys < len(counts)
    counts[keys[big].astype(np.int64)] = values[big]
    return counts[:nr_blocks]


def metadata_index(tm: Transaction, location: int, nr_bitmaps: int) -> np.ndarray:
    buf = tm.read_block(location)
    check(buf, location, INDEX_CSUM_XOR, "metadata space map index")
    if nr_bitmaps > MAX_METADATA_BITMAPS:
        raise DMError(errno.EILSEQ, f"metadata space map has {nr_bitmaps} bitmaps (at most 255)")
    return np.frombuffer(buf, INDEX_ENTRY, nr_bitmaps, 16)["blocknr"]


def disk_index(tm: Transaction, root: int, nr_bitmaps: int) -> np.ndarray:
    keys, values = BTree(tm, PLAIN_INDEX).items(root)
    if len(keys) != nr_bitmaps or (len(keys) and int(keys[-1]) != nr_bitmaps - 1):
        raise DMError(errno.EILSEQ, f"data space map index has {len(keys)} entries, "
                      f"expected {nr_bitmaps}")
    return values["blocknr"]


class SmState:
    """Where a space map lives on disk as of the last commit."""

    def __init__(self, bitmaps: list[int], index_root: int, ref_root: int) -> None:
        self.bitmaps = bitmaps      # bitmap block per bitmap index
        self.index_root = index_root
        self.ref_root = ref_root


def _differs(sm: SpaceMap, i: int) -> bool:
    a, b = i * ENTRIES_PER_BITMAP, (i + 1) * ENTRIES_PER_BITMAP
    return not np.array_equal(np.minimum(sm.counts[a:b], 3), np.minimum(sm.committed[a:b], 3))


def _update_ref_tree(tm: Transaction, sm: SpaceMap, ref_root: int) -> int:
    """Bring the ref count btree (counts above 2) in line with `sm.counts`."""
    now, before = sm.counts, sm.committed
    n = len(before)
    changed = np.flatnonzero((now[:n] != before) & ((now[:n] > 2) | (before > 2)))
    grown = np.flatnonzero(now[n:] > 2) + n
    changed = np.concatenate([changed, grown]).astype(np.int64)
    if not len(changed):
        return ref_root
    tree = BTree(tm, PLAIN_U32)
    gone = changed[now[changed] <= 2]
    gone = gone[gone < n]
    gone = gone[before[gone] > 2]
    if len(gone):
        ref_root = tree.remove(ref_root, gone.astype(np.uint64))
    keep = changed[now[changed] > 2]
    if len(keep):
        ref_root = tree.insert(ref_root, keep.astype(np.uint64), now[keep].astype(U32))
    return ref_root


def write_disk_sm(tm: Transaction, sm: SpaceMap, state: SmState) -> bytes:
    """Commit the data space map: rewrite changed bitmaps into new blocks, update its index
    btree and ref count btree. Returns its `disk_sm_root`."""
    nr_bitmaps = -(-sm.nr_blocks // ENTRIES_PER_BITMAP)
    changed = [i for i in range(nr_bitmaps) if i >= len(state.bitmaps) or _differs(sm, i)]
    state.ref_root = _update_ref_tree(tm, sm, state.ref_root)
    entries = np.zeros(len(changed), INDEX_ENTRY)
    for j, i in enumerate(changed):
        location = tm.alloc_block()
        if i < len(state.bitmaps):
            tm.meta.dec(state.bitmaps[i])
            state.bitmaps[i] = location
        else:
            state.bitmaps.append(location)
        chunk = sm.counts[i * ENTRIES_PER_BITMAP:(i + 1) * ENTRIES_PER_BITMAP]
        tm.write_block(location, encode_bitmap(chunk, location))
        entries[j] = _index_entry(chunk, location)
    if changed:
        state.index_root = BTree(tm, PLAIN_INDEX).insert(
            state.index_root, np.array(changed, np.uint64), entries)
    allocated = int(np.count_nonzero(sm.counts))
    return SM_ROOT.pack(sm.nr_blocks, allocated, state.index_root, state.ref_root)


def write_metadata_sm(tm: Transaction, state: SmState) -> bytes:
    """Commit the metadata space map, whose own new blocks change the counts it records: new
    blocks are taken until no further bitmap changes, then all are written with the final
    counts. Returns its `disk_sm_root`."""
    sm = tm.meta
    state.ref_root = _update_ref_tree(tm, sm, state.ref_root)
    tm.write_nodes()  # the ref count btree's nodes (the callers wrote theirs)
    tm.end()
    nr_bitmaps = -(-sm.nr_blocks // ENTRIES_PER_BITMAP)
    index_block = tm.alloc_block()
    if state.index_root:
        sm.dec(state.index_root)
    relocated: set[int] = set()
    while True:
        todo = [i for i in range(nr_bitmaps)
                if i not in relocated and (i >= len(state.bitmaps) or _differs(sm, i))]
        if not todo:
            break
        for i in todo:
            location = tm.alloc_block()
            if i < len(state.bitmaps):
                sm.dec(state.bitmaps[i])
                state.bitmaps[i] = location
            else:
                state.bitmaps.append(location)
            relocated.add(i)
    index = bytearray(BLOCK)
    for i in range(nr_bitmaps):
        chunk = sm.counts[i * ENTRIES_PER_BITMAP:(i + 1) * ENTRIES_PER_BITMAP]
        location = state.bitmaps[i]
        if i in relocated:
            tm.write_block(location, encode_bitmap(chunk, location))
        struct.pack_into("<QII", index, 16 + 16 * i, *_index_entry(chunk, location))
    tm.write_block(index_block, seal(index, index_block, INDEX_CSUM_XOR))
    state.index_root = index_block
    allocated = int(np.count_nonzero(sm.counts))
    return SM_ROOT.pack(sm.nr_blocks, allocated, index_block, state.ref_root)
