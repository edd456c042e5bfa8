"""LUKS1 and LUKS2 headers, as cryptsetup writes them: parse, unlock a keyslot, describe.

Everything here works on a `read(offset, length) -> bytes` function over the header device, so
it is testable on bytes alone. `read_header` parses a LUKS1 header (592 bytes, big-endian) or
a LUKS2 one (a 4 KiB binary header with a checksum over it and its JSON area, twice: primary
at 0 and secondary at hdr_size; the valid one with the higher sequence id wins, as cryptsetup
decides). `unlock` derives the keyslot key from a passphrase (pbkdf2 with sha1/sha256/sha512,
argon2i/argon2id), decrypts the keyslot area (its cipher, 512-byte sectors, IVs from 0),
merges the anti-forensic stripes and checks the result against the digest: the volume key.
`crypt_table` gives the `crypt` table of the data segment; `dump` is `cryptsetup luksDump`
without key material. Every refusal is a DMError naming what is wrong, never key material.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DMError
from ._crypt_cipher import Engine, SpecError, parse_spec

Reader = Callable[[int, int], bytes]

MAGIC1 = b"LUKS\xba\xbe"
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
LUKS1 = struct.Struct(">6sH32s32s32sII20s32sI40s")          # 208 bytes, then 8 keyslots
LUKS1_SLOT = struct.Struct(">II32sII")                        # 48 bytes each
LUKS1_SLOTS = 8
LUKS1_ACTIVE, LUKS1_INACTIVE = 0x00AC71F3, 0x0000DEAD
LUKS2_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")    # 512 bytes of the 4 KiB header
LUKS2_BIN_SIZE = 4096
#: where cryptsetup may put the second LUKS2 header (= the first one's hdr_size)
LUKS2_OFFSETS = tuple(0x4000 << i for i in range(9))           # 16 KiB .. 4 MiB
HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "whirlpool", "sha3-256", "sha3-512")
NO_KEY = "No key available with this passphrase"


def _bad(what: str, err: int = errno.EINVAL) -> DMError:
    return DMError(err, what)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass
class Keyslot:
    """One keyslot, LUKS1 or LUKS2, in LUKS2's terms."""

    id: int
    key_size: int                 # the volume key it holds, bytes
    cipher: str                   # of its area
    area_key_size: int
    area_offset: int              # bytes
    area_size: int
    stripes: int
    af_hash: str
    kdf: dict[str, Any]           # type, and hash/iterations/salt or time/memory/cpus/salt
    priority: int = 1             # 0 ignore, 1 normal, 2 high
    digest: int | None = None


@dataclass
class Segment:
    offset: int                   # bytes from the start of the data device
    size: int | None              # bytes; None: to the end of the device ("dynamic")
    iv_tweak: int                 # first IV sector
    cipher: str
    sector_size: int = 512


@dataclass
class Header:
    version: int
    uuid: str
    segment: Segment
    keyslots: list[Keyslot]
    digest: dict[str, Any]        # hash, iterations, salt, digest (bytes), keyslots
    key_size: int
    flags: list[str] = field(default_factory=list)
    label: str = ""
    subsystem: str = ""
    epoch: int = 0
    hdr_size: int = 0
    keyslots_size: int = 0
    hash_spec: str = ""           # LUKS1
    notes: list[str] = field(default_factory=list)   # e.g. "secondary header is corrupt"
    extra_digests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def type(self) -> str:
        return f"LUKS{self.version}"

    def dm_uuid(self, name: str) -> str:
        """The device's uuid as cryptsetup sets it."""
        return f"CRYPT-{self.type}-{self.uuid.replace('-', '')}-{name}"


# ---- parsing ------------------------------------------------------------------------------

def read_header(read: Reader, device_size: int) -> Header:
    """Parse the LUKS header at the start of a device of `device_size` bytes."""
    if device_size < LUKS1.size + LUKS1_SLOT.size * LUKS1_SLOTS:
        raise _bad(f"device is too small for a LUKS header ({device_size} bytes)")
    start = read(0, 8)
    magic, version = start[:6], struct.unpack(">H", start[6:8])[0]
    if magic == MAGIC1 and version == 1:
        return _luks1(read, device_size)
    if magic in (MAGIC1, MAGIC2_SECONDARY) and version == 2 or magic != MAGIC1:
        return _luks2(read, device_size)
    raise _bad(f"unsupported LUKS version {version}")


def _luks1(read: Reader, device_size: int) -> Header:
    raw = read(0, LUKS1.size + LUKS1_SLOT.size * LUKS1_SLOTS)
    (_, _, cipher, mode, hash_spec, payload, key_bytes, mk_digest, mk_salt, mk_iter,
     uuid) = LUKS1.unpack_from(raw)
    cipher_s, mode_s, hash_s = _cstr(cipher), _cstr(mode), _cstr(hash_spec).lower()
    if hash_s not in HASHES:
        raise _bad(f"LUKS1 header: unknown hash spec {hash_s!r}")
    if key_bytes not in (16, 24, 32, 48, 64):
        raise _bad(f"LUKS1 header: invalid key size {key_bytes} bytes")
    if mk_iter == 0:
        raise _bad("LUKS1 header: the volume key digest has 0 iterations")
    spec = f"{cipher_s}-{mode_s}"
    _check_cipher(spec, key_bytes, "LUKS1 header")
    slots = []
    for i in range(LUKS1_SLOTS):
        active, iters, salt, material, stripes = LUKS1_SLOT.unpack_from(raw, LUKS1.size + i * LUKS1_SLOT.size)
        if active == LUKS1_INACTIVE:
            continue
        if active != LUKS1_ACTIVE:
            raise _bad(f"LUKS1 keyslot {i} is corrupt (state 0x{active:08x})")
        if stripes == 0 or iters == 0:
            raise _bad(f"LUKS1 keyslot {i} is corrupt ({stripes} stripes, {iters} iterations)")
        slots.append(Keyslot(i, key_bytes, spec, key_bytes, material * 512, _round512(key_bytes * stripes),
                             stripes, hash_s, {"type": "pbkdf2", "hash": hash_s, "iterations": iters, "salt": salt},
                             digest=0))
    header = Header(1, _cstr(uuid), Segment(payload * 512, None, 0, spec), slots,
                    {"hash": hash_s, "iterations": mk_iter, "salt": mk_salt, "digest": mk_digest, "keyslots": None},
                    key_bytes, hash_spec=hash_s)
    _check_areas(header, device_size, payload * 512)
    return header


def _luks2(read: Reader, device_size: int) -> Header:
    candidates = []
    problems = []
    primary = _luks2_at(read, device_size, 0, problems)
    if primary is not None:
        candidates.append(primary)
    offsets = [primary[0]["hdr_size"]] if primary is not None else list(LUKS2_OFFSETS)
    for offset in offsets:
        if offset + LUKS2_BIN_SIZE > device_size:
            continue
        secondary = _luks2_at(read, device_size, offset, problems if primary is not None else [])
        if secondary is not None:
            candidates.append(secondary)
            break
    if not candidates:
        if read(0, 6) not in (MAGIC1, MAGIC2_SECONDARY) and len(problems) <= 1:
            raise _bad("not a LUKS device: no LUKS header at byte 0 and no LUKS2 secondary header")
        raise _bad("no valid LUKS2 header: " + "; ".join(problems))
    best = max(candidates, key=lambda c: c[0]["seqid"])  # primary first on a tie
    notes = [p for p in problems] if len(candidates) < 2 else []
    if len(candidates) == 2 and candidates[0][0]["seqid"] != candidates[1][0]["seqid"]:
        notes.append("the two LUKS2 headers differ; using the one with the higher sequence id")
    return _luks2_header(best[0], best[1], device_size, notes)


def _luks2_at(read: Reader, device_size: int, offset: int, problems: list[str]) -> tuple[dict, dict] | None:
    where = "primary" if offset == 0 else f"secondary (at {offset})"
    binary = read(offset, LUKS2_BIN_SIZE)
    (magic, version, hdr_size, seqid, label, csum_alg, salt, uuid, subsystem, hdr_offset, _,
     csum) = LUKS2_BIN.unpack_from(binary)
    want = MAGIC1 if offset == 0 else MAGIC2_SECONDARY
    if magic != want or version != 2:
        problems.append(f"{where} LUKS2 header: bad magic or version")
        return None
    if hdr_size not in LUKS2_OFFSETS or hdr_offset != offset or offset + hdr_size > device_size:
        problems.append(f"{where} LUKS2 header: bad header size {hdr_size} or offset {hdr_offset}")
        return None
    alg = _cstr(csum_alg)
    if alg not in ("sha1", "sha256", "sha512"):
        problems.append(f"{where} LUKS2 header: unknown checksum algorithm {alg!r}")
        return None
    area = bytearray(binary + read(offset + LUKS2_BIN_SIZE, hdr_size - LUKS2_BIN_SIZE))
    at = LUKS2_BIN.size - 64
    area[at:at + 64] = bytes(64)
    digest = hashlib.new(alg, area).digest()
    if csum[:len(digest)] != digest:
        problems.append(f"{where} LUKS2 header: checksum mismatch")
        return None
    text = bytes(area[LUKS2_BIN_SIZE:]).split(b"\0", 1)[0]
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{where} LUKS2 header: its JSON area is invalid ({exc})")
        return None
    return ({"hdr_size": hdr_size, "seqid": seqid, "label": _cstr(label), "uuid": _cstr(uuid),
             "subsystem": _cstr(subsystem)}, meta)


def _luks2_header(binary: dict, meta: dict, device_size: int, notes: list[str]) -> Header:
    def section(name: str) -> dict:
        value = meta.get(name, {})
        if not isinstance(value, dict):
            raise _bad(f"LUKS2 JSON: {name} is not an object")
        return value

    config = section("config")
    requirements = config.get("requirements")
    required = requirements.get("mandatory", []) if isinstance(requirements, dict) else []
    if required:
        raise _bad(f"LUKS2 header requires {', '.join(map(str, required))}, which userdm does not support",
                   errno.EOPNOTSUPP)
    segments = {k: v for k, v in section("segments").items() if isinstance(v, dict)}
    if not segments:
        raise _bad("LUKS2 JSON: no data segment")
    first = segments[min(segments, key=_int_key)]
    if first.get("type") != "crypt":
        raise _bad(f"LUKS2 segment type {first.get('type')!r} is not supported (only crypt)", errno.EOPNOTSUPP)
    if first.get("integrity"):
        raise _bad("LUKS2 segment with integrity needs dm-integrity, which userdm does not have", errno.EOPNOTSUPP)
    if len(segments) > 1 or "in-reencryption" in first.get("flags", []):
        raise _bad("LUKS2 volume is being reencrypted; finish it with cryptsetup first", errno.EOPNOTSUPP)
    size = None if first.get("size") == "dynamic" else _num(first.get("size"), "segment size")
    segment = Segment(_num(first.get("offset"), "segment offset"), size, _num(first.get("iv_tweak", "0"), "iv_tweak"),
                      str(first.get("encryption")), _num(first.get("sector_size", 512), "sector_size"))
    if segment.sector_size not in (512, 1024, 2048, 4096):
        raise _bad(f"LUKS2 segment sector size {segment.sector_size} is invalid")
    digests = [d for _, d in sorted(section("digests").items(), key=lambda kv: _int_key(kv[0])) if isinstance(d, dict)]
    seg_digests = [d for d in digests if "0" in d.get("segments", []) or
                   min(segments, key=_int_key) in d.get("segments", [])]
    if not seg_digests:
        raise _bad("LUKS2 JSON: no digest for the data segment")
    digest = seg_digests[0]
    if digest.get("type") != "pbkdf2":
        raise _bad(f"LUKS2 digest type {digest.get('type')!r} is not supported", errno.EOPNOTSUPP)
    digest_info = {"hash": str(digest.get("hash")), "iterations": _num(digest.get("iterations"), "digest iterations"),
                   "salt": _b64(digest.get("salt"), "digest salt"), "digest": _b64(digest.get("digest"), "digest"),
                   "keyslots": [int(k) for k in digest.get("keyslots", []) if str(k).isdigit()]}
    slots = []
    for key, slot in sorted(section("keyslots").items(), key=lambda kv: _int_key(kv[0])):
        if not isinstance(slot, dict) or not str(key).isdigit():
            raise _bad(f"LUKS2 keyslot {key!r} is not an object")
        slots.append(_luks2_slot(int(key), slot, digest_info["keyslots"]))
    key_size = slots[0].key_size if slots else 0
    keyslots_size = _num(config.get("keyslots_size", 0), "keyslots_size")
    raw_flags = config.get("flags")
    flags = [f for f in raw_flags if isinstance(f, str)] if isinstance(raw_flags, list) else []
    header = Header(2, binary["uuid"], segment, slots, digest_info, key_size, flags, binary["label"],
                    binary["subsystem"], binary["seqid"], binary["hdr_size"], keyslots_size, notes=notes,
                    extra_digests=digests)
    if slots:
        _check_cipher(segment.cipher, key_size, "LUKS2 segment")
    _check_areas(header, device_size, None)
    return header


def _luks2_slot(sid: int, slot: dict, digest_slots: list[int]) -> Keyslot:
    where = f"LUKS2 keyslot {sid}"
    if slot.get("type") != "luks2":
        raise _bad(f"{where}: type {slot.get('type')!r} is not supported", errno.EOPNOTSUPP)
    area, af, kdf = slot.get("area"), slot.get("af"), slot.get("kdf")
    if not all(isinstance(x, dict) for x in (area, af, kdf)):
        raise _bad(f"{where}: area, af and kdf must be objects")
    if area.get("type") != "raw" or af.get("type") != "luks1":
        raise _bad(f"{where}: area {area.get('type')!r} / af {af.get('type')!r} is not supported", errno.EOPNOTSUPP)
    kind = kdf.get("type")
    if kind == "pbkdf2":
        kdf_info = {"type": kind, "hash": str(kdf.get("hash")),
                    "iterations": _num(kdf.get("iterations"), f"{where} iterations"),
                    "salt": _b64(kdf.get("salt"), f"{where} salt")}
        if kdf_info["hash"] not in HASHES:
            raise _bad(f"{where}: unknown pbkdf2 hash {kdf_info['hash']!r}")
    elif kind in ("argon2i", "argon2id"):
        kdf_info = {"type": kind, "time": _num(kdf.get("time"), f"{where} time"),
                    "memory": _num(kdf.get("memory"), f"{where} memory"),
                    "cpus": _num(kdf.get("cpus"), f"{where} cpus"),
                    "salt": _b64(kdf.get("salt"), f"{where} salt")}
        if not (1 <= kdf_info["cpus"] <= 16 and 8 <= kdf_info["memory"] <= 4 << 20 and kdf_info["time"] >= 1):
            raise _bad(f"{where}: argon2 parameters out of range")
    else:
        raise _bad(f"{where}: unknown kdf {kind!r}", errno.EOPNOTSUPP)
    key_size = _num(slot.get("key_size"), f"{where} key_size")
    stripes = _num(af.get("stripes"), f"{where} stripes")
    if not 1 <= stripes <= 4000 * 64 or str(af.get("hash")) not in HASHES or not 0 < key_size <= 512:
        raise _bad(f"{where}: bad anti-forensic parameters")
    priority = _num(slot.get("priority", 1), f"{where} priority")
    area_key = _num(area.get("key_size"), f"{where} area key_size")
    _check_cipher(str(area.get("encryption")), area_key, where)
    return Keyslot(sid, key_size, str(area.get("encryption")), area_key, _num(area.get("offset"), f"{where} offset"),
                   _num(area.get("size"), f"{where} size"), stripes, str(af.get("hash")), kdf_info, priority,
                   0 if sid in digest_slots else None)


def _check_cipher(spec: str, key_size: int, where: str) -> None:
    try:
        cipher = parse_spec(spec)
        Engine(cipher, bytearray(key_size), 512, False)
    except SpecError as exc:
        raise _bad(f"{where}: cipher {spec!r} with a {key_size * 8}-bit key: {exc}", exc.errno) from None


def _check_areas(header: Header, device_size: int, data_offset: int | None) -> None:
    for slot in header.keyslots:
        need = _round512(slot.key_size * slot.stripes)
        if slot.area_size < need:
            raise _bad(f"keyslot {slot.id}: its area ({slot.area_size} bytes) is smaller than its "
                       f"{slot.stripes} stripes of {slot.key_size} bytes")
        if slot.area_offset + need > device_size:
            raise _bad(f"keyslot {slot.id}: its area ends at byte {slot.area_offset + need}, past the end "
                       f"of the header device ({device_size} bytes)")
        if slot.area_offset < (LUKS1.size if header.version == 1 else 2 * header.hdr_size):
            raise _bad(f"keyslot {slot.id}: its area at byte {slot.area_offset} overlaps the header")


def _num(value: Any, what: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise _bad(f"LUKS2 JSON: {what} {value!r} is not a number")
    number = int(value)
    if number >= 1 << 63:
        raise _bad(f"LUKS2 JSON: {what} {number} is too large")
    return number


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"LUKS2 JSON: {what} is not base64") from None


def _int_key(key: str) -> int:
    return int(key) if str(key).isdigit() else 1 << 62


def _round512(n: int) -> int:
    return (n + 511) // 512 * 512


# ---- unlocking ----------------------------------------------------------------------------

def unlock(header: Header, read: Reader, passphrase: bytes, keyslot: int | None = None) -> bytearray:
    """The volume key from the first keyslot this passphrase opens (or only from `keyslot`),
    in cryptsetup's order: high priority first, priority 0 only if named."""
    slots = [s for s in header.keyslots if keyslot is None or s.id == keyslot]
    if keyslot is not None and not slots:
        raise _bad(f"keyslot {keyslot} is not active", errno.ENOENT)
    slots = sorted((s for s in slots if s.priority or keyslot is not None), key=lambda s: -s.priority)
    for slot in slots:
        if slot.digest is None:
            continue
        key = _try_slot(header, read, slot, passphrase)
        if key is not None:
            return key
    raise DMError(errno.EPERM, NO_KEY + (f" in keyslot {keyslot}" if keyslot is not None else ""))


def _try_slot(header: Header, read: Reader, slot: Keyslot, passphrase: bytes) -> bytearray | None:
    derived = bytearray(derive(slot.kdf, passphrase, slot.area_key_size))
    size = _round512(slot.key_size * slot.stripes)
    area = memoryview(bytearray(read(slot.area_offset, size)))
    engine = Engine(parse_spec(slot.cipher), derived, 512, False)
    try:
        engine.decrypt(area, 0)
    finally:
        engine.wipe()
        derived[:] = bytes(len(derived))
    key = af_merge(area[:slot.key_size * slot.stripes], slot.key_size, slot.stripes, slot.af_hash)
    area[:] = bytes(len(area))
    if check_digest(header, key):
        return key
    key[:] = bytes(len(key))
    return None


def derive(kdf: dict[str, Any], passphrase: bytes, length: int) -> bytes:
    if kdf["type"] == "pbkdf2":
        return hashlib.pbkdf2_hmac(_hashlib_name(kdf["hash"]), passphrase, kdf["salt"], kdf["iterations"], length)
    from argon2.low_level import Type, hash_secret_raw
    kind = Type.ID if kdf["type"] == "argon2id" else Type.I
    return hash_secret_raw(passphrase, kdf["salt"], time_cost=kdf["time"], memory_cost=kdf["memory"],
                           parallelism=kdf["cpus"], hash_len=length, type=kind, version=19)


def check_digest(header: Header, key: bytearray) -> bool:
    d = header.digest
    got = hashlib.pbkdf2_hmac(_hashlib_name(d["hash"]), bytes(key), d["salt"], d["iterations"], len(d["digest"]))
    return hmac.compare_digest(got, d["digest"])


def _hashlib_name(name: str) -> str:
    return {"sha3-256": "sha3_256", "sha3-512": "sha3_512"}.get(name, name)


def af_merge(data: memoryview, key_size: int, stripes: int, hash_name: str) -> bytearray:
    """Anti-forensic merge (cryptsetup's AF_merge): XOR each stripe in, diffusing between."""
    out = bytearray(key_size)
    name = _hashlib_name(hash_name)
    for i in range(stripes - 1):
        _xor_into(out, data[i * key_size:(i + 1) * key_size])
        out = _diffuse(out, name)
    _xor_into(out, data[(stripes - 1) * key_size:stripes * key_size])
    return out


def _xor_into(acc: bytearray, block: memoryview) -> None:
    n = len(acc)
    acc[:] = (int.from_bytes(acc, "little") ^ int.from_bytes(block, "little")).to_bytes(n, "little")


def _diffuse(block: bytearray, name: str) -> bytearray:
    size = hashlib.new(name).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out += hashlib.new(name, struct.pack(">I", i // size) + piece).digest()[:len(piece)]
    return out


# ---- using it -----------------------------------------------------------------------------

#: LUKS2 config flags that are crypt table options
FLAG_OPTIONS = {"allow-discards": "allow_discards", "same-cpu-crypt": "same_cpu_crypt",
                "submit-from-crypt-cpus": "submit_from_crypt_cpus", "no-read-workqueue": "no_read_workqueue",
                "no-write-workqueue": "no_write_workqueue"}


def crypt_table(header: Header, key: bytearray, device: str, device_size: int, *,
                allow_discards: bool = False) -> str:
    """The one-line `crypt` table that maps the data segment of `device`."""
    seg = header.segment
    end = device_size if seg.size is None else seg.offset + seg.size
    if seg.offset % 512 or end > device_size or end <= seg.offset:
        raise _bad(f"the data segment (bytes {seg.offset} to {end}) does not fit the data device "
                   f"({device_size} bytes)")
    length = (end - seg.offset) // seg.sector_size * seg.sector_size // 512
    options = [FLAG_OPTIONS[f] for f in header.flags if f in FLAG_OPTIONS]
    if allow_discards and "allow_discards" not in options:
        options.insert(0, "allow_discards")
    if seg.sector_size != 512:
        options.append(f"sector_size:{seg.sector_size}")
    line = f"0 {length} crypt {seg.cipher} {key.hex()} {seg.iv_tweak} {device} {seg.offset // 512}"
    return line + (f" {len(options)} {' '.join(options)}" if options else "")


def _hexdump(data: bytes, indent: str, first: str = "", width: int = 16) -> str:
    rows = [" ".join(f"{b:02x}" for b in data[i:i + width]) + " " for i in range(0, len(data), width)]
    return first + f"\n{indent}".join(rows)


def dump(header: Header, device: str) -> str:
    """`cryptsetup luksDump`, without any key material."""
    if header.version == 1:
        return _dump1(header, device)
    out = ["LUKS header information", "Version:       \t2", f"Epoch:         \t{header.epoch}",
           f"Metadata area: \t{header.hdr_size} [bytes]", f"Keyslots area: \t{header.keyslots_size} [bytes]",
           f"UUID:          \t{header.uuid}", f"Label:         \t{header.label or '(no label)'}",
           f"Subsystem:     \t{header.subsystem or '(no subsystem)'}",
           f"Flags:       \t{' '.join(header.flags) if header.flags else '(no flags)'}", "", "Data segments:"]
    seg = header.segment
    out += ["  0: crypt", f"\toffset: {seg.offset} [bytes]",
            f"\tlength: {'(whole device)' if seg.size is None else f'{seg.size} [bytes]'}",
            f"\tcipher: {seg.cipher}", f"\tsector: {seg.sector_size} [bytes]", "", "Keyslots:"]
    for s in header.keyslots:
        out += [f"  {s.id}: luks2", f"\tKey:        {s.key_size * 8} bits",
                f"\tPriority:   {('ignored', 'normal', 'high')[min(s.priority, 2)]}",
                f"\tCipher:     {s.cipher}", f"\tCipher key: {s.area_key_size * 8} bits",
                f"\tPBKDF:      {s.kdf['type']}"]
        if s.kdf["type"] == "pbkdf2":
            out += [f"\tHash:       {s.kdf['hash']}", f"\tIterations: {s.kdf['iterations']}"]
        else:
            out += [f"\tTime cost:  {s.kdf['time']}", f"\tMemory:     {s.kdf['memory']}",
                    f"\tThreads:    {s.kdf['cpus']}"]
        out += [_hexdump(s.kdf["salt"], "\t            ", "\tSalt:       "), f"\tAF stripes: {s.stripes}",
                f"\tAF hash:    {s.af_hash}", f"\tArea offset:{s.area_offset} [bytes]",
                f"\tArea length:{s.area_size} [bytes]", f"\tDigest ID:  {0 if s.digest is not None else '-'}"]
    d = header.digest
    out += ["Tokens:", "Digests:", "  0: pbkdf2", f"\tHash:       {d['hash']}", f"\tIterations: {d['iterations']}",
            _hexdump(d["salt"], "\t            ", "\tSalt:       "),
            _hexdump(d["digest"], "\t            ", "\tDigest:     ")]
    out += [f"Note: {n}" for n in header.notes]
    return "\n".join(out) + "\n"


def _dump1(header: Header, device: str) -> str:
    d = header.digest
    seg = header.segment
    name, _, mode = seg.cipher.partition("-")
    out = [f"LUKS header information for {device}", "", "Version:       \t1", f"Cipher name:   \t{name}",
           f"Cipher mode:   \t{mode}", f"Hash spec:     \t{header.hash_spec}", f"Payload offset:\t{seg.offset // 512}",
           f"MK bits:       \t{header.key_size * 8}", _hexdump(d["digest"], "", "MK digest:     \t", width=20),
           _hexdump(d["salt"], "               \t", "MK salt:       \t"), f"MK iterations: \t{d['iterations']}",
           f"UUID:          \t{header.uuid}", ""]
    active = {s.id: s for s in header.keyslots}
    for i in range(LUKS1_SLOTS):
        s = active.get(i)
        if s is None:
            out.append(f"Key Slot {i}: DISABLED")
            continue
        out += [f"Key Slot {i}: ENABLED", f"\tIterations:         \t{s.kdf['iterations']}",
                _hexdump(s.kdf["salt"], "\t                      \t", "\tSalt:               \t"),
                f"\tKey material offset:\t{s.area_offset // 512}", f"\tAF stripes:            \t{s.stripes}"]
    return "\n".join(out) + "\n"
