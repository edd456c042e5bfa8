"""The cipher engine of the crypt target: the kernel's skciphers and IV generators, in bulk.

`parse_spec` reads dm-crypt's cipher specification, the legacy
`cipher[:keycount]-chainmode-ivmode[:ivopts]` and the crypto API form
`capi:chainmode(cipher)-ivmode[:ivopts]`, into a `CipherSpec`. `Engine` holds the key and
turns whole requests of `sector_size`-byte sectors into ciphertext and back, byte for byte as
the kernel does: AES in XTS, CBC and ECB modes (and `cipher_null`), IVs `plain`, `plain64`,
`plain64be`, `essiv:HASH`, `benbi` and `null`, the key split into `keycount` subkeys (sector
`s` uses subkey `s % keycount`).

Python pays 7-15 us for each cipher context, which caps a context per 512-byte sector at
30-70 MB/s. So a request is converted in one pass wherever the mode allows it: for XTS the
tweaks of every 16-byte block of the request are computed at once with numpy (the encrypted
IV of each sector, multiplied by x^j in GF(2^128)), and one ECB pass of AES runs over the
whole request between two XORs with them; CBC decryption is one ECB pass and one XOR with
the ciphertext shifted by a block. CBC encryption is sequential by nature and uses one context
per sector. Requests of a few sectors, and 4 KiB sectors, take a context per sector (OpenSSL's XTS), which
is cheaper there.
"""

from __future__ import annotations

import errno
import hashlib
import threading
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:   # the context constructors behind Cipher.encryptor(): the public path costs ~7 us more per
    # context in Python-level checks, which is most of the cost of a context per sector
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl
    _encryptor = _rust_openssl.ciphers.create_encryption_ctx
    _decryptor = _rust_openssl.ciphers.create_decryption_ctx
except (ImportError, AttributeError):  # another cryptography: the public API, same results
    def _encryptor(algorithm, mode):  # type: ignore[no-redef]
        return Cipher(algorithm, mode).encryptor()

    def _decryptor(algorithm, mode):  # type: ignore[no-redef]
        return Cipher(algorithm, mode).decryptor()

BLOCK = 16
U64 = np.uint64
_MASK64 = (1 << 64) - 1
#: up to this many sectors a request is cheaper with one cipher context per sector than with
#: the bulk path's fixed numpy cost (measured, 512-byte sectors: 4 KiB 17 us against 25 us in
#: bulk, 8 KiB 30 against 28, 16 KiB 67 against 37; 1 MiB 3.9 ms against 0.86 ms)
PER_SECTOR_MAX = 8
#: from this sector size on, OpenSSL's XTS with a context per sector is as fast as the bulk path
#: for large requests and faster for small ones (measured, 4 KiB sectors: 0.5 ms/MiB both ways;
#: one sector: 6 us against 9 us): a context costs ~4 us, amortised over 4 KiB
PER_SECTOR_SIZE = 2048

CIPHERS = ("aes", "cipher_null")
CHAINMODES = ("xts", "cbc", "ecb")
IVMODES = ("plain", "plain64", "plain64be", "essiv", "benbi", "null")
#: IV generators the kernel has and userdm does not (yet)
KERNEL_ONLY_IVMODES = ("lmk", "tcw", "random", "eboiv", "elephant")
#: key sizes (bytes) of one subkey, per chain mode, for AES
AES_KEY_SIZES = {"xts": (32, 48, 64), "cbc": (16, 24, 32), "ecb": (16, 24, 32)}
#: the kernel crypto API's hash names that ESSIV accepts here
ESSIV_HASHES = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
                "sha512": "sha512", "md5": "md5", "sha3-256": "sha3_256", "sha3-512": "sha3_512"}


class SpecError(Exception):
    """A refused cipher specification: the kernel's `ti->error` text and errno."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class CipherSpec:
    cipher: str            # aes, cipher_null
    chainmode: str         # xts, cbc, ecb
    ivmode: str | None     # None: the mode takes no IV (ecb)
    ivopts: str | None     # the ESSIV hash
    keycount: int          # tfms_count

    @property
    def iv_size(self) -> int:
        return 0 if self.chainmode == "ecb" or self.cipher == "cipher_null" else BLOCK


def parse_spec(text: str) -> CipherSpec:
    """dm-crypt's `crypt_ctr_cipher_new`/`_old`: the cipher string into its parts."""
    if text.startswith("capi:"):
        return _parse_capi(text[len("capi:"):])
    if "(" in text:
        raise SpecError("Bad cipher specification")
    head, _, rest = text.partition("-")
    cipher, colon, count = head.partition(":")
    keycount = 1
    if colon:
        if not (count.isascii() and count.isdigit()) or int(count) == 0 or int(count) & (int(count) - 1):
            raise SpecError(f"Bad cipher key count specification: {count!r} is not a power of two")
        keycount = int(count)
    chainmode, _, rest = rest.partition("-") if rest else ("", "", "")
    ivmode, _, ivopts = rest.partition(":")
    if not chainmode or (chainmode == "plain" and not ivmode):
        chainmode, ivmode = "cbc", "plain"   # the original dm-crypt format: cipher alone
    if chainmode != "ecb" and not ivmode:
        raise SpecError(f"IV mechanism required: {text!r} names no IV mode for {chainmode}")
    return _checked(cipher, chainmode, ivmode or None, ivopts or None, keycount)


def _parse_capi(spec: str) -> CipherSpec:
    ivopts = None
    if ":" in spec:
        spec, ivopts = spec.rsplit(":", 1)
    ivmode = None
    if "-" in spec:
        spec, ivmode = spec.rsplit("-", 1)
    if spec == "cipher_null":
        chainmode, cipher = "ecb", "cipher_null"
    elif spec.endswith(")") and "(" in spec:
        chainmode, _, cipher = spec[:-1].partition("(")
    else:
        raise SpecError(f"Error allocating crypto tfm: {spec!r} is not MODE(CIPHER)", errno.ENOENT)
    if cipher.startswith("authenc(") or chainmode in ("gcm", "ccm", "rfc4106", "rfc4309", "authenc"):
        raise SpecError(f"Error allocating crypto tfm: AEAD cipher {spec!r} needs dm-integrity, "
                        "which userdm does not have", errno.EOPNOTSUPP)
    return _checked(cipher, chainmode, ivmode, ivopts, 64 if ivmode == "lmk" else 1)


def _checked(cipher: str, chainmode: str, ivmode: str | None, ivopts: str | None, keycount: int) -> CipherSpec:
    if ivmode == "essiv" and not ivopts:
        raise SpecError("Digest algorithm missing for ESSIV mode")
    if cipher not in CIPHERS or chainmode not in CHAINMODES:
        raise SpecError(f"Error allocating crypto tfm: no {chainmode}({cipher}) here "
                        f"(ciphers: {', '.join(CIPHERS)}; modes: {', '.join(CHAINMODES)})", errno.ENOENT)
    if ivmode == "essiv" and ivopts not in ESSIV_HASHES:
        raise SpecError(f"Error allocating crypto tfm: no hash {ivopts!r} for ESSIV "
                        f"(known: {', '.join(ESSIV_HASHES)})", errno.ENOENT)
    spec = CipherSpec(cipher, chainmode, ivmode, ivopts, keycount)
    if spec.iv_size == 0:
        return CipherSpec(cipher, chainmode, None, None, keycount)  # "Selected cipher does not support IVs"
    if ivmode in KERNEL_ONLY_IVMODES:
        raise SpecError(f"Invalid IV mode: {ivmode} is a kernel IV mode that userdm does not implement "
                        f"(it has {', '.join(IVMODES)})", errno.EOPNOTSUPP)
    if ivmode not in IVMODES:
        raise SpecError(f"Invalid IV mode: {ivmode!r}")
    return spec


class Engine:
    """Converts runs of whole sectors with one key. The key lives in bytearrays owned here,
    which `wipe` overwrites; cipher objects are built from them and dropped with them."""

    def __init__(self, spec: CipherSpec, key: bytearray, sector_size: int, iv_large_sectors: bool) -> None:
        self.spec = spec
        self.sector_size = sector_size
        self._blocks = sector_size // BLOCK
        self._step = sector_size // 512                     # cc_sector advances by this per sector
        self._iv_shift = (sector_size // 512).bit_length() - 1 if iv_large_sectors else 0
        self._secrets: list[bytearray] = []
        self._subs: list[_Subkey] = []
        if spec.cipher == "cipher_null":
            return
        if len(key) % spec.keycount:
            raise SpecError(f"a key of {len(key)} bytes does not split into {spec.keycount} subkeys")
        size = len(key) // spec.keycount
        if size not in AES_KEY_SIZES[spec.chainmode]:
            raise SpecError(f"a {spec.chainmode}(aes) key has {' or '.join(map(str, AES_KEY_SIZES[spec.chainmode]))} "
                            f"bytes, not {size}")
        whole = memoryview(key)   # slices of a memoryview copy once, into the bytearrays we wipe
        for i in range(spec.keycount):
            sub = bytearray(whole[i * size:(i + 1) * size])
            self._secrets.append(sub)
            self._subs.append(_Subkey(spec, sub, self._secrets))

    def wipe(self) -> None:
        """Overwrite every copy of key material this engine made, and forget the ciphers."""
        self._subs = []
        for secret in self._secrets:
            secret[:] = bytes(len(secret))
        self._secrets = []

    # ---- the data path ----------------------------------------------------------------

    def decrypt(self, buf: memoryview, cc_sector: int) -> None:
        """Decrypt `buf` (whole sectors, the first at cc_sector) in place."""
        self._convert(buf, buf, cc_sector, encrypt=False)

    def encrypt(self, data: memoryview, cc_sector: int, out: memoryview) -> None:
        """Encrypt `data` (whole sectors, the first at cc_sector) into `out` (as long)."""
        self._convert(data, out, cc_sector, encrypt=True)

    def _convert(self, src: memoryview, dst: memoryview, cc_sector: int, *, encrypt: bool) -> None:
        n = len(src) // self.sector_size
        if not self._subs:
            if dst is not src:
                dst[:] = src
            return
        keycount = self.spec.keycount
        # cc_sector is a multiple of the step, so the IV sectors are first + i * inc (mod 2^64)
        inc = self._step >> self._iv_shift
        if keycount == 1:
            self._subs[0].convert(src, dst, (cc_sector & _MASK64) >> self._iv_shift, inc, n,
                                  self.sector_size, encrypt)
            return
        for i in range(n):  # keycount > 1: every sector picks its subkey (rare: loop-AES era tables)
            cc = (cc_sector + i * self._step) & _MASK64
            piece = slice(i * self.sector_size, (i + 1) * self.sector_size)
            self._subs[cc & (keycount - 1)].convert(src[piece], dst[piece], cc >> self._iv_shift, inc, 1,
                                                    self.sector_size, encrypt)


class _Subkey:
    """One transform (the kernel's tfm) with its IV generator."""

    def __init__(self, spec: CipherSpec, key: bytearray, secrets: list[bytearray]) -> None:
        self.spec = spec
        mode = spec.chainmode
        if mode == "xts":
            half = len(key) // 2
            k1, k2 = bytearray(memoryview(key)[:half]), bytearray(memoryview(key)[half:])
            secrets += [k1, k2]
            self._ecb = algorithms.AES(k1)
            self._tweak_ecb = algorithms.AES(k2)
            # OpenSSL's own XTS for short requests; it refuses equal halves (the kernel does not)
            self._xts = algorithms.AES(key) if len(key) in (32, 64) and k1 != k2 else None
        else:
            self._ecb = self._aes = algorithms.AES(key)
        self._essiv = None
        if spec.ivmode == "essiv":
            salt = bytearray(hashlib.new(ESSIV_HASHES[spec.ivopts or ""], key).digest())
            secrets.append(salt)
            if len(salt) not in (16, 24, 32):
                raise SpecError(f"ESSIV: a {spec.ivopts} digest ({len(salt)} bytes) is no AES key")
            self._essiv = algorithms.AES(salt)

    def ivs(self, first: int, inc: int, n: int) -> np.ndarray:
        """The IVs of sectors first, first + inc, ... as (n, 2) little-endian 64-bit halves."""
        ivmode = self.spec.ivmode
        iv_sectors = np.arange(n, dtype=U64) * U64(inc) + U64(first)
        ivs = np.zeros((n, 2), dtype=U64)
        if ivmode in ("plain64", "essiv"):
            ivs[:, 0] = iv_sectors
        elif ivmode == "plain":
            ivs[:, 0] = iv_sectors & U64(0xFFFFFFFF)
        elif ivmode == "plain64be":
            ivs[:, 1] = iv_sectors.byteswap()
        elif ivmode == "benbi":   # big-endian count of 16-byte blocks from 1: 512 >> 4 = 1 << 5
            ivs[:, 1] = ((iv_sectors << U64(5)) + U64(1)).byteswap()
        if self._essiv is not None:
            ivs = _ecb(self._essiv, ivs, encrypt=True)
        return ivs

    def iv_bytes(self, first: int, inc: int, n: int) -> bytes:
        """The same IVs as bytes, computed without numpy (cheaper for a few sectors)."""
        ivmode = self.spec.ivmode
        out = bytearray(BLOCK * n)
        for i in range(n):
            sector = (first + i * inc) & _MASK64
            at = i * BLOCK
            if ivmode in ("plain64", "essiv"):
                out[at:at + 8] = sector.to_bytes(8, "little")
            elif ivmode == "plain":
                out[at:at + 4] = (sector & 0xFFFFFFFF).to_bytes(4, "little")
            elif ivmode == "plain64be":
                out[at + 8:at + 16] = sector.to_bytes(8, "big")
            elif ivmode == "benbi":
                out[at + 8:at + 16] = (((sector << 5) + 1) & _MASK64).to_bytes(8, "big")
        if self._essiv is not None:
            return _encryptor(self._essiv, _ECB).update(bytes(out))
        return bytes(out)

    def convert(self, src: memoryview, dst: memoryview, first: int, inc: int, n: int, sector_size: int,
                encrypt: bool) -> None:
        """Sectors with IV sectors first, first + inc, ...: in bulk, or with a context each."""
        mode = self.spec.chainmode
        if mode == "ecb":
            _ecb_into(self._ecb, src, dst, encrypt)
            return
        if mode == "xts":
            if (n <= PER_SECTOR_MAX or sector_size >= PER_SECTOR_SIZE) and self._xts is not None:
                _per_sector(self._xts, modes.XTS, src, dst, self._raw_ivs(first, inc, n), sector_size, encrypt)
            else:
                _xts_bulk(self._ecb, self._tweak_ecb, src, dst, self.ivs(first, inc, n), sector_size // BLOCK,
                          encrypt)
        elif encrypt or n <= PER_SECTOR_MAX:
            _per_sector(self._aes, modes.CBC, src, dst, self._raw_ivs(first, inc, n), sector_size, encrypt)
        else:
            _cbc_decrypt_bulk(self._ecb, src, dst, self.ivs(first, inc, n), sector_size // BLOCK)

    def _raw_ivs(self, first: int, inc: int, n: int) -> bytes:
        return self.iv_bytes(first, inc, n) if n <= 2 * PER_SECTOR_MAX else self.ivs(first, inc, n).tobytes()


# ---- the bulk primitives ---------------------------------------------------------------

_ECB = modes.ECB()


def _ecb(aes: algorithms.AES, lanes: np.ndarray, *, encrypt: bool) -> np.ndarray:
    ctx = (_encryptor if encrypt else _decryptor)(aes, _ECB)
    return np.frombuffer(ctx.update(memoryview(lanes).cast("B")), dtype=U64).reshape(lanes.shape)


def _ecb_into(aes: algorithms.AES, src: memoryview, dst: memoryview, encrypt: bool) -> None:
    ctx = (_encryptor if encrypt else _decryptor)(aes, _ECB)
    out = bytearray(len(src) + BLOCK)
    ctx.update_into(src, out)
    dst[:] = memoryview(out)[:len(src)]


def _per_sector(alg: algorithms.AES, mode: type, src: memoryview, dst: memoryview, raw: bytes,
                sector_size: int, encrypt: bool) -> None:
    out = bytearray(sector_size + BLOCK)
    view = memoryview(out)[:sector_size]
    for i in range(len(raw) // BLOCK):
        ctx = (_encryptor if encrypt else _decryptor)(alg, mode(raw[i * BLOCK:(i + 1) * BLOCK]))
        piece = slice(i * sector_size, (i + 1) * sector_size)
        ctx.update_into(src[piece], out)
        dst[piece] = view


_J = np.arange(32, dtype=U64)
_J_SHIFT = U64(63) - _J
_ONE = U64(1)
#: the bulk path converts at most this much at a time, in per-thread scratch buffers: fresh
#: buffers for every request cost more in page faults than the XORs themselves (measured:
#: 2.2 ms/MiB with new arrays, see bench/crypt.py), and small pieces stay in the CPU caches
BULK_CHUNK = 256 << 10


class _Scratch(threading.local):
    """Per-thread uint64 buffers, grown on demand and reused."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, count: int) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or len(buf) < count:
            buf = self.buffers[name] = np.empty(count, U64)
        return buf[:count]


_scratch = _Scratch()


def xts_tweaks(first: np.ndarray, blocks: int, out: np.ndarray | None = None) -> np.ndarray:
    """The XTS tweak of every block: `first` holds each sector's encrypted IV as (n, 2)
    little-endian halves (lo, hi); block j of a sector has first * x^j in GF(2^128) modulo
    x^128 + x^7 + x^2 + x + 1. Returns (n * blocks * 2,) uint64 in the data's layout (in
    `out` if given).

    Two levels, each a few numpy operations over all sectors: U_k = T * x^(32k), then
    U_k * x^j for j < 32 by shifting the 128-bit value left j bits and folding the j bits
    that fall off the top back in as their product with 0x87."""
    n = len(first)
    span = min(blocks, 32)
    levels = max(1, blocks // 32)
    lo = np.empty((n, levels), U64)
    hi = np.empty((n, levels), U64)
    lo[:, 0], hi[:, 0] = first[:, 0], first[:, 1]
    s32 = U64(32)
    for k in range(1, levels):
        low, high = lo[:, k - 1], hi[:, k - 1]
        top = high >> s32
        hi[:, k] = (high << s32) | (low >> s32)
        lo[:, k] = (low << s32) ^ _times_87(top)
    size = n * levels * span
    result = (np.empty(size * 2, U64) if out is None else out).reshape(n, levels, span, 2)
    top = _scratch.get("top", size).reshape(n, levels, span)
    tmp = _scratch.get("tmp", size).reshape(n, levels, span)
    out_lo, out_hi = result[..., 0], result[..., 1]
    low, high = lo[:, :, None], hi[:, :, None]
    j, back = _J[:span], _J_SHIFT[:span]
    np.right_shift(high >> _ONE, back, out=top)       # the j bits shifted out (none for j = 0)
    np.left_shift(high, j, out=out_hi)
    np.right_shift(low >> _ONE, back, out=tmp)
    np.bitwise_or(out_hi, tmp, out=out_hi)
    np.left_shift(low, j, out=out_lo)
    np.bitwise_xor(out_lo, top, out=out_lo)
    for bit in (1, 2, 7):                             # top * 0x87, carry-less
        np.left_shift(top, U64(bit), out=tmp)
        np.bitwise_xor(out_lo, tmp, out=out_lo)
    return result.reshape(-1)


def _times_87(v: np.ndarray) -> np.ndarray:
    """Carry-less product with 0x87 of values below 2^57."""
    return v ^ (v << U64(1)) ^ (v << U64(2)) ^ (v << U64(7))


def _xts_bulk(ecb: algorithms.AES, tweak_ecb: algorithms.AES, src: memoryview, dst: memoryview, ivs: np.ndarray,
              blocks: int, encrypt: bool) -> None:
    sector = blocks * BLOCK
    per_chunk = max(1, BULK_CHUNK // sector)
    for first in range(0, len(ivs), per_chunk):
        part = slice(first * sector, min(len(src), (first + per_chunk) * sector))
        _xts_chunk(ecb, tweak_ecb, src[part], dst[part], ivs[first:first + per_chunk], blocks, encrypt)


def _xts_chunk(ecb: algorithms.AES, tweak_ecb: algorithms.AES, src: memoryview, dst: memoryview,
               ivs: np.ndarray, blocks: int, encrypt: bool) -> None:
    count = len(src) // 8
    tweaks = xts_tweaks(_ecb(tweak_ecb, ivs, encrypt=True), blocks, _scratch.get("tweaks", count))
    whitened = _scratch.get("whitened", count)
    np.bitwise_xor(np.frombuffer(src, dtype=U64), tweaks, out=whitened)
    converted = _scratch.get("converted", count + 2)          # update_into wants a block more
    ctx = (_encryptor if encrypt else _decryptor)(ecb, _ECB)
    ctx.update_into(memoryview(whitened).cast("B"), memoryview(converted).cast("B"))
    np.bitwise_xor(converted[:count], tweaks, out=np.frombuffer(dst, dtype=U64))


def _cbc_decrypt_bulk(ecb: algorithms.AES, src: memoryview, dst: memoryview, ivs: np.ndarray, blocks: int) -> None:
    n = len(ivs)
    ct = np.frombuffer(src, dtype=U64).reshape(n, blocks, 2)
    chain = np.empty_like(ct)                         # what each block is XORed with
    chain[:, 0] = ivs
    chain[:, 1:] = ct[:, :-1]
    out = bytearray(len(src) + BLOCK)
    _decryptor(ecb, _ECB).update_into(src, out)
    np.bitwise_xor(np.frombuffer(out, dtype=U64, count=n * blocks * 2), chain.reshape(-1),
                   out=np.frombuffer(dst, dtype=U64))
