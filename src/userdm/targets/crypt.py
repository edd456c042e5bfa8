"""crypt: transparent encryption of a range of another device (`dm-crypt.c`).

Table: `<cipher> <key> <iv_offset> <device> <offset> [<#opt_params> <opt_params>]`.
- cipher: `cipher[:keycount]-chainmode-ivmode[:ivopts]` (e.g. `aes-xts-plain64`,
  `aes-cbc-essiv:sha256`, `aes:2-cbc-plain`, `cipher_null-ecb`) or the crypto API form
  `capi:xts(aes)-plain64`. Ciphers aes and cipher_null, modes xts, cbc, ecb, IV modes plain,
  plain64, plain64be, essiv:HASH, benbi, null (`_crypt_cipher.py`).
- key: hex (`-` for no key, with cipher_null). Kernel keyring references `:<size>:<type>:<desc>`
  are refused with EOPNOTSUPP: userdm has no kernel keyring.
- iv_offset: added to the sector number in the IV; offset: where the data starts on the
  device. Both in 512-byte sectors.
- Optional parameters: `allow_discards` (discards reach the device; without it they are
  dropped), `sector_size:N` (encryption unit 512..4096 bytes; the device's logical block
  size becomes N), `iv_large_sectors` (IVs count N-byte sectors, not 512-byte ones), and
  `same_cpu_crypt`, `submit_from_crypt_cpus`, `no_read_workqueue`, `no_write_workqueue`,
  which tune the kernel's workqueues: userdm converts every request on the thread that serves
  it, as if all four were set; they are kept and printed. `integrity:` is EOPNOTSUPP.

The key is kept in one bytearray (and the subkeys the engine derives from it) and wiped when
the table is destroyed or at `key wipe`; `table` prints it only with `--showkeys` (else as
zeros, as dmsetup does). INFO status is empty. Messages (only while suspended, as in the
kernel): `key set <hex>` (same size) and `key wipe`; a table whose key is not set refuses to
resume (EAGAIN). I/O must be aligned to the encryption sector size (EIO otherwise).
"""

from __future__ import annotations

import errno
import threading

from ..block.device import SECTOR
from ..dm.target import Target, TargetContext, TargetError, register
from ..errors import DMError
from ._crypt_cipher import CipherSpec, Engine, SpecError, parse_spec

MAX_FEATURE_ARGS = 8
#: the workqueue switches: kept and printed, in the kernel's order
WORKQUEUE_FLAGS = ("same_cpu_crypt", "submit_from_crypt_cpus", "no_read_workqueue", "no_write_workqueue")
#: a write is encrypted and written in pieces of at most this size, through one buffer per
#: thread (I/O below a target completes before the call returns, so the buffer is free again)
WRITE_CHUNK = 1 << 20


class _Buffers(threading.local):
    ciphertext: memoryview | None = None


_buffers = _Buffers()


def _ciphertext_buffer() -> memoryview:
    if _buffers.ciphertext is None:
        _buffers.ciphertext = memoryview(bytearray(WRITE_CHUNK))
    return _buffers.ciphertext


def _u64(text: str, error: str) -> int:
    """`sscanf("%llu%c")`."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 64:
        raise TargetError(f"{error}: {text!r}")
    return int(text)


def key_size_of(text: str) -> int:
    """The kernel's get_key_size, without the keyring: hex digits / 2 (`-` has none)."""
    if text.startswith(":"):
        size, colon, rest = text[1:].partition(":")
        if not colon or not (size.isascii() and size.isdigit()):
            raise TargetError("Cannot parse key size: a keyring key is :<size>:<type>:<description>")
        raise TargetError("Error decoding and setting key: kernel keyring keys (:<size>:<type>:<description>) "
                          "are not supported by userdm; give the key in hex", errno.EOPNOTSUPP)
    return len(text) >> 1


def decode_key(text: str, key_size: int) -> bytearray:
    """The key as a new bytearray; the refusal never repeats the key."""
    if key_size == 0:
        if text != "-":
            raise TargetError("Error decoding and setting key: a key of fewer than two hex digits")
        return bytearray()
    if len(text) % 2:
        raise TargetError(f"Error decoding and setting key: the key has an odd number ({len(text)}) of hex digits")
    try:
        return bytearray.fromhex(text)
    except ValueError:
        raise TargetError(f"Error decoding and setting key: the key ({len(text)} characters) is not hex") from None


@register
class CryptTarget(Target):
    name = "crypt"
    version = (1, 24, 0)
    #: `table` takes `showkeys`; the state store keeps no text of such tables (dm/mapper.py)
    has_keys = True

    def __init__(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        super().__init__(ctx, begin, length, args)
        if len(args) < 5:
            raise TargetError(f"Not enough arguments: crypt needs at least 5, got {len(args)}")
        self.cipher_string = args[0]
        key_size = key_size_of(args[1])
        self.allow_discards = False
        self.flags: set[str] = set()
        self.sector_size = SECTOR
        self.iv_large_sectors = False
        self._parse_optional(args[5:], length)
        try:
            self.spec: CipherSpec = parse_spec(args[0])
        except SpecError as exc:
            raise TargetError(str(exc), exc.errno) from None
        self.key_size = key_size
        self._key = decode_key(args[1], key_size)
        self._engine: Engine | None = None
        try:
            self._construct(ctx, begin, length, args)
        except BaseException:
            self._wipe_key()  # a refused table keeps no key
            raise

    def _construct(self, ctx: TargetContext, begin: int, length: int, args: list[str]) -> None:
        self._set_key()
        self.key_valid = True
        self.suspended = False
        step = self.sector_size // SECTOR
        self.iv_offset = _u64(args[2], "Invalid iv_offset sector")
        if self.iv_offset % step:
            raise TargetError(f"Invalid iv_offset sector: {self.iv_offset} is not a multiple of "
                              f"{step} (sector_size:{self.sector_size})")
        self.start = _u64(args[4], "Invalid device sector")
        if begin % step:
            raise TargetError(f"target start {begin} is not aligned to the {self.sector_size}-byte "
                              "encryption sector")
        self.dev = ctx.get_device(args[3], self.start, length)
        self._open = self.dev.open
        self._base = self.start * SECTOR
        #: the mapped device's logical block size follows the encryption sector (crypt_io_hints)
        self.io_block_size = self.sector_size

    def _parse_optional(self, args: list[str], length: int) -> None:
        """`crypt_ctr_optional`: `<#opt_params> <opt_params>`, read before the cipher."""
        if not args:
            return
        count = args[0]
        if not (count.isascii() and count.isdigit()) or int(count) > MAX_FEATURE_ARGS or int(count) > len(args) - 1:
            raise TargetError(f"Invalid number of feature args: {count!r} (at most {MAX_FEATURE_ARGS}, "
                              f"and {len(args) - 1} follow)")
        if int(count) < len(args) - 1:
            raise TargetError(f"Invalid number of feature args: {count} announced, {len(args) - 1} given")
        for opt in args[1:]:
            name = opt.lower()
            if name == "allow_discards":
                self.allow_discards = True
            elif name in WORKQUEUE_FLAGS:
                self.flags.add(name)
            elif name == "iv_large_sectors":
                self.iv_large_sectors = True
            elif name.startswith("integrity:"):
                raise TargetError(f"Integrity profile not supported: {opt} needs dm-integrity, which userdm "
                                  "does not have", errno.EOPNOTSUPP)
            elif name.startswith("sector_size:"):
                value = name[len("sector_size:"):]
                size = int(value) if value.isascii() and value.isdigit() else 0
                if size < SECTOR or size > 4096 or size & (size - 1):
                    raise TargetError(f"Invalid feature value for sector_size: {value!r} (512, 1024, 2048 or 4096)")
                if length % (size // SECTOR):
                    raise TargetError(f"Device size is not multiple of sector_size feature: {length} sectors, "
                                      f"sector_size:{size}")
                self.sector_size = size
            else:
                raise TargetError(f"Invalid feature arguments: {opt!r}")

    # ---- the key ------------------------------------------------------------------------

    def _set_key(self) -> None:
        """`crypt_setkey`: build the engine from `self._key`."""
        old, self._engine = self._engine, None
        if old is not None:
            old.wipe()
        if self.spec.cipher != "cipher_null" and not self._key:
            raise TargetError(f"Error decoding and setting key: {self.spec.cipher} needs a key, not '-'")
        try:
            self._engine = Engine(self.spec, self._key, self.sector_size, self.iv_large_sectors)
        except SpecError as exc:
            raise TargetError(f"Error decoding and setting key: {exc}", exc.errno) from None

    def _wipe_key(self) -> None:
        self.key_valid = False
        if self._engine is not None:
            self._engine.wipe()
            self._engine = None
        self._key[:] = bytes(len(self._key))

    def forget_key(self) -> None:
        """Drop the key as `suspend` + `key wipe` would (cryptsetup's luksSuspend): used for a
        table restored without its key, which then waits for `key set` and a resume."""
        self.suspended = True
        self._wipe_key()

    def message(self, args: list[str]) -> str | None:
        """`key set <key>` and `key wipe`, only while suspended (`crypt_message`)."""
        if len(args) >= 2 and args[0].lower() == "key":
            if not self.suspended:
                raise DMError(errno.EINVAL, "crypt: not suspended during key manipulation (suspend the device first)")
            if len(args) == 3 and args[1].lower() == "set":
                try:
                    size = key_size_of(args[2])
                    if size != self.key_size:
                        raise TargetError(f"key set: the new key has {size} bytes, the table's has {self.key_size}; "
                                          "the key size may not change")
                    key = decode_key(args[2], size)
                except TargetError as exc:
                    raise DMError(exc.errno, f"crypt: {exc}") from None
                self._key[:] = key
                key[:] = bytes(len(key))
                try:
                    self._set_key()
                except TargetError as exc:
                    self.key_valid = False
                    raise DMError(exc.errno, f"crypt: {exc}") from None
                self.key_valid = True
                return None
            if len(args) == 2 and args[1].lower() == "wipe":
                self._wipe_key()
                return None
        raise DMError(errno.EINVAL, f"crypt: unrecognised message received: {args[0]!r} "
                      "(crypt takes 'key set <key>' and 'key wipe')")

    # ---- lifecycle ----------------------------------------------------------------------

    def postsuspend(self) -> None:
        self.suspended = True

    def preresume(self) -> None:
        if not self.key_valid:
            raise DMError(errno.EAGAIN, "crypt: aborting resume - crypt key is not set "
                          "(message the device 'key set <key>' first)")

    def resume(self) -> None:
        self.suspended = False

    def destroy(self) -> None:
        self._wipe_key()

    # ---- the data path ------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> Engine:
        if (self.begin * SECTOR + offset) % self.sector_size or length % self.sector_size:
            raise DMError(errno.EIO, f"crypt: I/O at byte {offset} (+{length}) is not aligned to the "
                          f"{self.sector_size}-byte encryption sector")
        engine = self._engine
        if engine is None or not self.key_valid:
            raise DMError(errno.EIO, "crypt: the key is not set")
        return engine

    def readinto(self, offset: int, buf: memoryview) -> None:
        engine = self._check(offset, len(buf))
        self._open.readinto(self._base + offset, buf)
        engine.decrypt(buf, offset // SECTOR + self.iv_offset)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        engine = self._check(offset, len(data))
        scratch = _ciphertext_buffer()
        for pos in range(0, len(data), WRITE_CHUNK):
            piece = data[pos:pos + WRITE_CHUNK]
            last = pos + WRITE_CHUNK >= len(data)
            out = scratch[:len(piece)]
            engine.encrypt(piece, (offset + pos) // SECTOR + self.iv_offset, out)
            self._open.write(self._base + offset + pos, out, fua and last)

    def discard(self, offset: int, length: int) -> None:
        if self.allow_discards:
            self._open.discard(self._base + offset, length)

    # ---- reporting ----------------------------------------------------------------------

    def status(self) -> str:
        return ""

    def table(self, showkeys: bool = False) -> str:
        key = self._key.hex() if self._key else "-"
        if not showkeys:
            key = "0" * len(key)  # dmsetup's masking: the same length, all zeros
        line = f"{self.cipher_string} {key} {self.iv_offset} {self.dev.name} {self.start}"
        features = (["allow_discards"] if self.allow_discards else []) + \
            [flag for flag in WORKQUEUE_FLAGS if flag in self.flags] + \
            ([f"sector_size:{self.sector_size}"] if self.sector_size != SECTOR else []) + \
            (["iv_large_sectors"] if self.iv_large_sectors else [])
        if features:
            line += f" {len(features)} " + " ".join(features)
        return line

    def devices(self):
        return [self.dev]

    def direct_map(self):
        return self.dev, self._base
