"""verity: read-only block integrity checking with a Merkle tree (`dm-verity-target.c`).

Table (the kernel's, compatible with `veritysetup format` images):
`<version> <data_dev> <hash_dev> <data_block_size> <hash_block_size> <num_data_blocks>
<hash_start_block> <algorithm> <root_digest> <salt|-> [<#opt_params> <opt_params>]`.
Version 1 hashes `salt || block` and pads every digest slot to a power of two; version 0
(Chrome OS) hashes `block || salt` and packs digests. The tree's levels are stored top level
first from `hash_start_block` (in hash blocks) on the hash device; level 0 holds the digests
of the data blocks. The table must be read-only ("Device must be readonly").

Optional parameters: `ignore_corruption` (return the data anyway), `restart_on_corruption`,
`panic_on_corruption` (userdm cannot restart or panic the machine: it logs that the kernel
would have, and fails the I/O with EIO), `restart_on_error`, `panic_on_error`,
`ignore_zero_blocks` (blocks whose digest is that of a zero block read as zeroes unverified),
`check_at_most_once` (a bitmap of verified data blocks), `try_verify_in_tasklet` (accepted,
no effect), and userdm's `data_start <sector>` (seed 000, never merged in the kernel): the
data area starts at that sector of the data device. Anything else is refused as the kernel
without FEC and signature support refuses it.

A corrupted data or hash block makes the read fail with EIO (unless `ignore_corruption`),
marks the target corrupted, and raises a table event, for the first 100 corruptions (the
kernel's limit for its uevents). INFO status: `V` (valid) or `C` (corruption found), then
the FEC corrected count, always `-` here. Table: the arguments as parsed, digests in hex.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from ..block.device import SECTOR
from ..dm.target import Target, TableDevice, TargetContext, TargetError, register
from ..errors import DMError

log = logging.getLogger("userdm.verity")

PAGE_SIZE = 4096                 # the largest data block size the kernel accepts
MAX_LEVELS = 63                  # DM_VERITY_MAX_LEVELS
MAX_CORRUPTED_ERRS = 100         # DM_VERITY_MAX_CORRUPTED_ERRS
OPTS_MAX = 5 + 8 + 2             # DM_VERITY_OPTS_MAX with FEC and signature options
HASH_CACHE_BYTES = 32 << 20      # verified hash blocks kept (the kernel's dm-bufio cache)

MODE_EIO, MODE_LOGGING, MODE_RESTART, MODE_PANIC = range(4)
CORRUPTION_MODES = {"ignore_corruption": MODE_LOGGING, "restart_on_corruption": MODE_RESTART,
                    "panic_on_corruption": MODE_PANIC}
ERROR_MODES = {"restart_on_error": MODE_RESTART, "panic_on_error": MODE_PANIC}

#: the kernel crypto API's names of the hashes hashlib provides
ALGORITHMS: dict[str, Callable[..., "hashlib._Hash"]] = {
    "sha1": hashlib.sha1, "sha224": hashlib.sha224, "sha256": hashlib.sha256,
    "sha384": hashlib.sha384, "sha512": hashlib.sha512, "md5": hashlib.md5,
    "sha3-224": hashlib.sha3_224, "sha3-256": hashlib.sha3_256,
    "sha3-384": hashlib.sha3_384, "sha3-512": hashlib.sha3_512,
    **{f"blake2b-{bits}": (lambda data=b"", n=bits // 8: hashlib.blake2b(data, digest_size=n))
       for bits in (160, 256, 384, 512)},
}


def _number(text: str, error: str, limit: int = 1 << 64) -> int:
    """`sscanf("%u%c")` / `"%llu%c"`: decimal digits only, below `limit`."""
    if not (text.isascii() and text.isdigit()) or int(text) >= limit:
        raise TargetError(f"{error}: {text!r}")
    return int(text)


def _hex(text: str, size: int, error: str) -> bytes:
    try:
        if len(text) != size * 2:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise TargetError(f"{error}: {text!r} is not {size * 2} hex digits") from None


@register
class VerityTarget(Target):
    name = "verity"
    version = (1, 12, 0)
    singleton = True
    immutable = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if not ctx.read_only:
            raise TargetError("Device must be readonly (load the table read-only, e.g. create --readonly)")
        if len(args) < 10:
            raise TargetError(f"Not enough arguments: verity needs at least 10, got {len(args)}")
        self.format_version = _number(args[0], "Invalid version", 2)
        self.mode = self.error_mode = MODE_EIO
        self.ignore_zero_blocks = self.check_at_most_once = self.tasklet = False
        self.data_start: int | None = None
        self._parse_opt_args(args[10:])
        start = self.data_start or 0
        self.data_dev = ctx.get_device(args[1], start, length, role="data device",
                                       lookup_error="Data device lookup failed")
        # data and hash may share a device: only the hash tree's own region must not overlap
        self.hash_dev = ctx.get_device(args[2], 0, 0, region=False, lookup_error="Hash device lookup failed")
        self.data_block_size = self._block_size(args[3], self.data_dev, "Invalid data device block size",
                                                PAGE_SIZE)
        self.hash_block_size = self._block_size(args[4], self.hash_dev, "Invalid hash device block size",
                                                (1 << 31) - 1)
        dbits = self.data_block_size.bit_length() - 1
        hbits = self.hash_block_size.bit_length() - 1
        self.data_blocks = _number(args[5], "Invalid data blocks", 1 << (64 - (dbits - 9)))
        covered = self.data_blocks * self.data_block_size // SECTOR
        if length > covered:
            raise TargetError(f"Data device is too small: the target has {length} sectors, "
                              f"{self.data_blocks} data blocks cover {covered}")
        if length * SECTOR % self.data_block_size:
            raise TargetError(f"target length {length} sectors is not a multiple of the data block size "
                              f"({self.data_block_size} bytes)")
        self.hash_start = _number(args[6], "Invalid hash start", 1 << (64 - (hbits - 9)))
        self.algorithm = args[7]
        factory = ALGORITHMS.get(self.algorithm)
        if factory is None:
            raise TargetError(f"Cannot initialize hash function {self.algorithm!r} "
                              f"(known: {', '.join(ALGORITHMS)})", errno.ENOENT)
        self._factory = factory
        self.digest_size = factory().digest_size
        if self.hash_block_size < self.digest_size * 2:
            raise TargetError(f"Digest size too big: {self.algorithm} digests ({self.digest_size} bytes) "
                              f"do not fit twice in a {self.hash_block_size}-byte hash block")
        self.root_digest = _hex(args[8], self.digest_size, "Invalid root digest")
        if args[9] != "-" and len(args[9]) % 2:
            raise TargetError(f"Invalid salt: {args[9]!r} has an odd number of hex digits")
        self.salt = b"" if args[9] == "-" else _hex(args[9], len(args[9]) // 2, "Invalid salt")
        if self.format_version:
            self._salted = factory()
            self._salted.update(self.salt)
        self._layout(hbits)
        hash_size_blocks = self.hash_dev.open.size // self.hash_block_size
        if hash_size_blocks < self.hash_blocks:
            raise TargetError(f"Hash device is too small: {self.hash_dev.name} has {hash_size_blocks} "
                              f"hash blocks, the tree needs {self.hash_blocks}", errno.E2BIG)
        per_block = self.hash_block_size // SECTOR
        if self.hash_blocks > self.hash_start:
            ctx.use_region(self.hash_dev, self.hash_start * per_block,
                           (self.hash_blocks - self.hash_start) * per_block, "hash device")
        self._zero_block = bytes(self.data_block_size)
        self.zero_digest = self._hash(self._zero_block) if self.ignore_zero_blocks else None
        if self.check_at_most_once and self.data_blocks > (1 << 31) - 1:
            raise TargetError("device too large to use check_at_most_once", errno.E2BIG)
        self.validated = bytearray((self.data_blocks + 7) // 8) if self.check_at_most_once else None
        self.hash_failed = False
        self.corrupted_errs = 0
        self._event = ctx.event
        self._data = self.data_dev.open
        self._hash_open = self.hash_dev.open
        self._data_base = start * SECTOR
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = max(16, HASH_CACHE_BYTES // self.hash_block_size)
        self._lock = threading.Lock()

    # ---- constructor helpers -------------------------------------------------------------

    def _parse_opt_args(self, args: list[str]) -> None:
        if not args:
            return
        count = _number(args[0], "Invalid number of feature args", OPTS_MAX + 1)
        if count > len(args) - 1:
            raise TargetError(f"Insufficient arguments: {count} feature args announced, "
                              f"{len(args) - 1} given")
        rest = iter(args[1:count + 1])
        for arg in rest:
            name = arg.lower()
            if name in CORRUPTION_MODES:
                if self.mode != MODE_EIO:
                    raise TargetError(f"Conflicting error handling parameters: {arg}")
                self.mode = CORRUPTION_MODES[name]
            elif name in ERROR_MODES:
                if self.error_mode != MODE_EIO:
                    raise TargetError(f"Conflicting error handling parameters: {arg}")
                self.error_mode = ERROR_MODES[name]
            elif name == "ignore_zero_blocks":
                self.ignore_zero_blocks = True
            elif name == "check_at_most_once":
                self.check_at_most_once = True
            elif name == "try_verify_in_tasklet":
                self.tasklet = True
            elif name == "data_start":
                value = next(rest, None)
                if value is None:
                    raise TargetError("data_start needs a sector: it is missing from the feature args")
                self.data_start = _number(value, "Invalid data_start sector")
            else:
                raise TargetError(f"Unrecognized verity feature request: {arg}")

    @staticmethod
    def _block_size(text: str, dev: TableDevice, error: str, limit: int) -> int:
        size = _number(text, error, 1 << 32)
        lbs = dev.device.logical_block_size
        if not size or size & (size - 1) or size < lbs or size > limit:
            raise TargetError(f"{error}: {text} (a power of two from {lbs} to {limit} bytes)")
        return size

    def _layout(self, hbits: int) -> None:
        """Tree levels and where each starts on the hash device (`verity_ctr`'s arithmetic)."""
        self.hash_per_block_bits = (self.hash_block_size // self.digest_size).bit_length() - 1
        bits = self.hash_per_block_bits
        levels = 0
        if self.data_blocks:
            while bits * levels < 64 and (self.data_blocks - 1) >> (bits * levels):
                levels += 1
        if levels > MAX_LEVELS:
            raise TargetError(f"Too many tree levels: {levels}", errno.E2BIG)
        self.levels = levels
        self.level_block = [0] * levels
        position = self.hash_start
        for i in range(levels - 1, -1, -1):
            self.level_block[i] = position
            position += (self.data_blocks + (1 << ((i + 1) * bits)) - 1) >> ((i + 1) * bits)
            if position >= 1 << 64:
                raise TargetError("Hash device offset overflow", errno.E2BIG)
        self.hash_blocks = position
        #: version 1 pads each digest to a power of two; version 0 packs them
        self._slot_shift = hbits - bits

    # ---- hashing ------------------------------------------------------------------------

    def _hash(self, data: memoryview | bytes) -> bytes:
        if self.format_version:
            h = self._salted.copy()
            h.update(data)
        else:
            h = self._factory(data)
            h.update(self.salt)
        return h.digest()

    def _hash_position(self, block: int, level: int) -> tuple[int, int]:
        """(hash block, byte offset of the digest in it) for a data block at a tree level."""
        position = block >> (level * self.hash_per_block_bits)
        index = position & ((1 << self.hash_per_block_bits) - 1)
        offset = index << self._slot_shift if self.format_version else index * self.digest_size
        return self.level_block[level] + (position >> self.hash_per_block_bits), offset

    def _cached(self, hash_block: int) -> bytes | None:
        with self._lock:
            data = self._cache.get(hash_block)
            if data is not None:
                self._cache.move_to_end(hash_block)
            return data

    def _remember(self, hash_block: int, data: bytes) -> None:
        with self._lock:
            self._cache[hash_block] = data
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)

    def _want_digest(self, block: int) -> bytes:
        """The digest a data block must have, verifying the hash blocks on the way down."""
        if not self.levels:
            return self.root_digest
        hash_block, offset = self._hash_position(block, 0)
        data = self._cached(hash_block)
        if data is not None:  # a verified level-0 block vouches for the digest
            return data[offset:offset + self.digest_size]
        want = self.root_digest
        for level in range(self.levels - 1, -1, -1):
            hash_block, offset = self._hash_position(block, level)
            data = self._cached(hash_block)
            if data is None:
                buf = bytearray(self.hash_block_size)
                self._read(self._hash_open, hash_block * self.hash_block_size, memoryview(buf))
                data = bytes(buf)
                if self._hash(data) == want:
                    self._remember(hash_block, data)
                else:  # with ignore_corruption the block is used, but never cached as verified
                    self._corrupted("metadata", hash_block)
            want = data[offset:offset + self.digest_size]
        return want

    # ---- errors ---------------------------------------------------------------------------

    def _corrupted(self, kind: str, block: int) -> None:
        """`verity_handle_err`: count and report, then fail the I/O unless ignoring corruption."""
        with self._lock:
            self.hash_failed = True
            report = self.corrupted_errs < MAX_CORRUPTED_ERRS
            if report:
                self.corrupted_errs += 1
        if report:
            log.error("%s: %s block %d is corrupted", self.data_dev.name, kind, block)
            if self.corrupted_errs == MAX_CORRUPTED_ERRS:
                log.error("%s: reached maximum errors", self.data_dev.name)
            self._event()
        if self.mode == MODE_LOGGING:
            return
        if self.mode != MODE_EIO:
            log.critical("%s: dm-verity device corrupted: the kernel would %s; userdm fails the I/O",
                         self.data_dev.name, "restart" if self.mode == MODE_RESTART else "panic")
        raise DMError(errno.EIO, f"verity: {self.data_dev.name}: {kind} block {block} is corrupted")

    def _read(self, open_, offset: int, buf: memoryview) -> None:
        try:
            open_.readinto(offset, buf)
        except DMError:
            if self.error_mode != MODE_EIO:
                log.critical("%s: dm-verity device has I/O error: the kernel would %s",
                             self.data_dev.name, "restart" if self.error_mode == MODE_RESTART else "panic")
            raise

    # ---- data path ------------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        bs = self.data_block_size
        if offset % bs == 0 and len(buf) % bs == 0:
            self._read(self._data, self._data_base + offset, buf)
            self._verify(offset // bs, buf)
            return
        # unaligned: verify the whole blocks around the range (the kernel sets its logical
        # block size to the data block size, so it never sees such requests)
        first = offset // bs
        end = -(-(offset + len(buf)) // bs)
        bounce = memoryview(bytearray((end - first) * bs))
        self._read(self._data, self._data_base + first * bs, bounce)
        self._verify(first, bounce)
        skip = offset - first * bs
        buf[:] = bounce[skip:skip + len(buf)]

    def _verify(self, first: int, buf: memoryview) -> None:
        bs = self.data_block_size
        validated = self.validated
        for i in range(len(buf) // bs):
            block = first + i
            if validated is not None and validated[block >> 3] >> (block & 7) & 1:
                continue
            want = self._want_digest(block)
            data = buf[i * bs:(i + 1) * bs]
            if want == self.zero_digest:
                data[:] = self._zero_block
                continue
            if self._hash(data) != want and not self._recheck(block, want, data):
                self._corrupted("data", block)
                continue
            if validated is not None:
                validated[block >> 3] |= 1 << (block & 7)

    def _recheck(self, block: int, want: bytes, dest: memoryview) -> bool:
        """`verity_recheck`: read the block again into a private buffer (the caller's buffer
        may have changed under us) and use it if it verifies."""
        bs = self.data_block_size
        buf = bytearray(bs)
        self._read(self._data, self._data_base + block * bs, memoryview(buf))
        if self._hash(buf) != want:
            return False
        dest[:] = buf
        return True

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise DMError(errno.EIO, f"verity: write at sector {self.begin + offset // SECTOR} refused: "
                      "a verity device is read-only")

    def discard(self, offset: int, length: int) -> None:
        raise DMError(errno.EOPNOTSUPP, "verity: discard is not supported on a read-only verity device")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise DMError(errno.EOPNOTSUPP, "verity: write zeroes is not supported on a read-only verity device")

    def postsuspend(self) -> None:
        with self._lock:  # dm_bufio_client_reset: hash blocks are read and verified again
            self._cache.clear()

    # ---- reporting ------------------------------------------------------------------------

    def status(self) -> str:
        return f"{'C' if self.hash_failed else 'V'} -"

    def table(self) -> str:
        salt = self.salt.hex() if self.salt else "-"
        line = (f"{self.format_version} {self.data_dev.name} {self.hash_dev.name} {self.data_block_size} "
                f"{self.hash_block_size} {self.data_blocks} {self.hash_start} {self.algorithm} "
                f"{self.root_digest.hex()} {salt}")
        opts = []
        if self.mode != MODE_EIO:
            opts.append({v: k for k, v in CORRUPTION_MODES.items()}[self.mode])
        if self.error_mode != MODE_EIO:
            opts.append({v: k for k, v in ERROR_MODES.items()}[self.error_mode])
        if self.ignore_zero_blocks:
            opts.append("ignore_zero_blocks")
        if self.check_at_most_once:
            opts.append("check_at_most_once")
        if self.tasklet:
            opts.append("try_verify_in_tasklet")
        if self.data_start is not None:
            opts += ["data_start", str(self.data_start)]
        return f"{line} {len(opts)} {' '.join(opts)}" if opts else line

    def devices(self) -> list[TableDevice]:
        return [self.data_dev]  # verity_iterate_devices reports the data device only
