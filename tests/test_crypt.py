"""dm-crypt byte for byte as the kernel: data encrypted offline by `cryptsetup reencrypt`
(cryptsetup's own implementation of the kernel's ciphers, run without device-mapper) reads back
through a userdm `crypt` table, and data written through userdm decrypts offline with
cryptsetup. Also the table and status lines, `--showkeys`, the key messages and their
kernel rules, the optional parameters and the refusals with the kernel's texts."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from userdm.errors import DMError

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None,
                                reason="cryptsetup is not installed (apt: cryptsetup-bin)")

MiB = 1 << 20
SIZE = 2 * MiB
SECTORS = SIZE // 512

#: the cipher specs of the issue, their key sizes (bits) and sector sizes
CASES = [
    ("aes-xts-plain64", 512, 512),
    ("aes-xts-plain64", 512, 4096),
    ("aes-cbc-essiv:sha256", 256, 512),
    ("aes-xts-plain", 512, 512),
    ("aes-cbc-plain64", 256, 512),
    ("aes-cbc-essiv:sha256", 256, 4096),
    ("aes-xts-plain64", 256, 4096),
    ("aes-xts-benbi", 512, 512),
    ("aes-cbc-plain64be", 256, 512),
    ("aes-cbc-null", 128, 512),
]


def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"
    return res.stdout


def opts(sector: int) -> str:
    return f" 1 sector_size:{sector}" if sector != 512 else ""


def detached_header(work: Path, cipher: str, bits: int, sector: int, key: bytes) -> Path:
    """A LUKS2 detached header with this volume key, data at offset 0 of the image."""
    (work / "vk").write_bytes(key)
    (work / "pw").write_text("passphrase")
    hdr = work / "x.hdr"
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--key-file", str(work / "pw"),
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--header", str(hdr),
        "--volume-key-file", str(work / "vk"), "--cipher", cipher, "--key-size", str(bits),
        "--sector-size", str(sector), "--offset", "0", str(work / "img"))
    return hdr


@pytest.mark.parametrize("cipher,bits,sector", CASES)
def test_reads_what_cryptsetup_encrypted(mapper, tmp_path, cipher, bits, sector):
    plain = os.urandom(SIZE)
    (tmp_path / "img").write_bytes(plain)
    key = os.urandom(bits // 8)
    (tmp_path / "vk").write_bytes(key)
    (tmp_path / "pw").write_text("passphrase")
    run("cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode", "--key-file",
        str(tmp_path / "pw"), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--header",
        str(tmp_path / "x.hdr"), "--volume-key-file", str(tmp_path / "vk"), "--key-size", str(bits),
        "--sector-size", str(sector), "--cipher", cipher, str(tmp_path / "img"))
    assert (tmp_path / "img").read_bytes() != plain
    mapper.create("c", f"0 {SECTORS} crypt {cipher} {key.hex()} 0 {tmp_path / 'img'} 0{opts(sector)}")
    buf = bytearray(SIZE)
    mapper.device("c").readinto(0, memoryview(buf))
    assert buf == plain
    # and a request in the middle, of a few sectors (the per-sector path)
    piece = bytearray(2 * sector)
    mapper.device("c").readinto(7 * sector, memoryview(piece))
    assert piece == plain[7 * sector:9 * sector]


@pytest.mark.parametrize("cipher,bits,sector", CASES)
def test_cryptsetup_decrypts_what_userdm_wrote(mapper, tmp_path, cipher, bits, sector):
    (tmp_path / "img").write_bytes(bytes(SIZE))
    key = os.urandom(bits // 8)
    plain = os.urandom(SIZE)
    mapper.create("c", f"0 {SECTORS} crypt {cipher} {key.hex()} 0 {tmp_path / 'img'} 0{opts(sector)}")
    dev = mapper.device("c")
    dev.write(0, memoryview(plain[:SIZE // 2]))                         # one large request
    for off in range(SIZE // 2, SIZE, 3 * sector):                      # and small ones
        dev.write(off, memoryview(plain[off:min(off + 3 * sector, SIZE)]))
    dev.flush()
    mapper.remove("c")
    assert (tmp_path / "img").read_bytes() != plain
    hdr = detached_header(tmp_path, cipher, bits, sector, key)
    run("cryptsetup", "reencrypt", "--decrypt", "--force-offline-reencrypt", "--batch-mode",
        "--key-file", str(tmp_path / "pw"), "--header", str(hdr), str(tmp_path / "img"))
    assert (tmp_path / "img").read_bytes() == plain


def test_iv_offset_and_device_offset_shift_the_ivs(mapper, tmp_path):
    """The same plaintext at the same device sector, mapped with iv_offset 8 and data 8
    sectors in, gives the ciphertext a table at offset 0 gives 8 sectors further."""
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(64).hex()
    mapper.create("a", f"0 {SECTORS} crypt aes-xts-plain64 {key} 0 {img} 0")
    data = os.urandom(64 * 512)
    mapper.device("a").write(8 * 512, memoryview(data))
    mapper.remove("a")
    first = img.read_bytes()[8 * 512:72 * 512]
    img.write_bytes(bytes(SIZE))
    mapper.create("b", f"0 {SECTORS - 8} crypt aes-xts-plain64 {key} 8 {img} 8")
    mapper.device("b").write(0, memoryview(data))
    mapper.remove("b")
    assert img.read_bytes()[8 * 512:72 * 512] == first


def test_cipher_null_keycount_capi_and_the_other_ivmodes_round_trip(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    data = os.urandom(256 * 512)
    tables = [
        ("cipher_null-ecb", "-"),
        ("capi:cipher_null", "-"),
        ("aes-ecb", os.urandom(16).hex()),
        ("aes:4-cbc-plain", os.urandom(64).hex()),
        ("capi:xts(aes)-plain64", os.urandom(32).hex()),
        ("capi:cbc(aes)-essiv:sha256", os.urandom(32).hex()),
        ("aes-cbc-plain64be", os.urandom(24).hex()),
        ("aes-cbc-null", os.urandom(16).hex()),
        ("aes-xts-plain64", os.urandom(48).hex()),   # AES-192 halves: the bulk path only
    ]
    for cipher, key in tables:
        mapper.create("r", f"0 {SECTORS} crypt {cipher} {key} 0 {img} 0")
        mapper.device("r").write(0, memoryview(data))
        back = bytearray(len(data))
        mapper.device("r").readinto(0, memoryview(back))
        assert back == data, cipher
        raw = img.read_bytes()[:len(data)]
        assert (raw == data) == cipher.startswith(("cipher_null", "capi:cipher_null")), cipher
        mapper.remove("r")


def test_keycount_uses_subkey_by_sector(mapper, tmp_path):
    """aes:2-cbc-plain: even sectors with the first half of the key, odd with the second,
    each as aes-cbc-plain with that subkey alone would."""
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    k1, k2 = os.urandom(32), os.urandom(32)
    data = os.urandom(16 * 512)
    mapper.create("k", f"0 {SECTORS} crypt aes:2-cbc-plain {(k1 + k2).hex()} 0 {img} 0")
    mapper.device("k").write(0, memoryview(data))
    mapper.remove("k")
    both = img.read_bytes()[:len(data)]
    for sub, parity in ((k1, 0), (k2, 1)):
        img.write_bytes(bytes(SIZE))
        mapper.create("s", f"0 {SECTORS} crypt aes-cbc-plain {sub.hex()} 0 {img} 0")
        mapper.device("s").write(0, memoryview(data))
        mapper.remove("s")
        alone = img.read_bytes()[:len(data)]
        for s in range(parity, 16, 2):
            assert both[s * 512:(s + 1) * 512] == alone[s * 512:(s + 1) * 512]


def test_table_hides_the_key_unless_showkeys_and_status_is_empty(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(64).hex()
    mapper.create("t", f"0 {SECTORS} crypt aes-xts-plain64 {key} 16 {img} 0 "
                       "4 allow_discards no_write_workqueue same_cpu_crypt sector_size:4096")
    [[_, _, _, hidden]] = mapper.table("t")
    assert hidden == f"aes-xts-plain64 {'0' * 128} 16 {img} 0 4 allow_discards same_cpu_crypt " \
                     "no_write_workqueue sector_size:4096"
    [[_, _, _, shown]] = mapper.table("t", showkeys=True)
    assert shown == hidden.replace("0" * 128, key)
    assert mapper.status("t") == [[0, SECTORS, "crypt", ""]]
    assert mapper.info("t")["size"] == SIZE and mapper.device("t").logical_block_size == 4096
    mapper.create("n", f"0 8 crypt cipher_null-ecb - 0 {img} 0")
    assert mapper.table("n")[0][3] == f"cipher_null-ecb 0 0 {img} 0"
    assert mapper.table("n", showkeys=True)[0][3] == f"cipher_null-ecb - 0 {img} 0"


def test_key_messages_only_while_suspended_and_resume_needs_a_key(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(32).hex()
    mapper.create("m", f"0 {SECTORS} crypt aes-cbc-essiv:sha256 {key} 0 {img} 0")
    data = os.urandom(8192)
    mapper.device("m").write(0, memoryview(data))
    with pytest.raises(DMError) as exc:
        mapper.message("m", 0, "key wipe")
    assert exc.value.errno == errno.EINVAL and "not suspended" in str(exc.value)
    mapper.suspend("m")
    mapper.message("m", 0, "key wipe")
    assert mapper.table("m", showkeys=True)[0][3].split()[1] == "0" * 64
    with pytest.raises(DMError) as exc:
        mapper.resume("m")
    assert exc.value.errno == errno.EAGAIN and "key is not set" in str(exc.value)
    with pytest.raises(DMError) as exc:
        mapper.message("m", 0, "key set " + key + "00")
    assert exc.value.errno == errno.EINVAL and "may not change" in str(exc.value)
    assert key not in str(exc.value)
    with pytest.raises(DMError) as exc:
        mapper.message("m", 0, "key set :32:logon:cryptsetup:x")
    assert exc.value.errno == errno.EOPNOTSUPP
    mapper.message("m", 0, "key set " + key)
    mapper.resume("m")
    back = bytearray(8192)
    mapper.device("m").readinto(0, memoryview(back))
    assert back == data
    with pytest.raises(DMError) as exc:
        mapper.message("m", 0, "key frobnicate")
    assert exc.value.errno == errno.EINVAL


def test_destroying_the_table_wipes_the_key(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(64)
    mapper.create("w", f"0 {SECTORS} crypt aes-xts-plain64 {key.hex()} 0 {img} 0")
    target = mapper._devices["w"].live.targets[0]
    held = [target._key] + list(target._engine._secrets)
    assert any(bytes(s) == key for s in held)
    mapper.remove("w")
    assert all(not any(s) for s in held)


def test_misaligned_io_on_4k_sectors_is_eio_and_discards_follow_allow_discards(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(os.urandom(SIZE))
    key = os.urandom(64).hex()
    mapper.create("a", f"0 {SECTORS} crypt aes-xts-plain64 {key} 0 {img} 0 1 sector_size:4096")
    with pytest.raises(DMError) as exc:
        mapper.device("a").readinto(512, memoryview(bytearray(4096)))
    assert exc.value.errno == errno.EIO and "4096-byte" in str(exc.value)
    before = img.read_bytes()
    mapper.device("a").discard(0, 65536)           # dropped: allow_discards not set
    assert img.read_bytes() == before
    mapper.remove("a")


@pytest.mark.hostile
@pytest.mark.parametrize("args,err,text", [
    ("aes-xts-plain64", errno.EINVAL, "Not enough arguments"),
    ("aes-xts-plain64 {key} 0 {img}", errno.EINVAL, "Not enough arguments"),
    ("aes-xts-plain64 :32:logon:cryptsetup:x 0 {img} 0", errno.EOPNOTSUPP, "keyring"),
    ("aes-xts-plain64 :x:logon 0 {img} 0", errno.EINVAL, "Cannot parse key size"),
    ("aes-xts-plain64 {key}zz 0 {img} 0", errno.EINVAL, "Error decoding and setting key"),
    ("aes-xts-plain64 {key}0 0 {img} 0", errno.EINVAL, "odd number"),
    ("aes-xts-plain64 00112233 0 {img} 0", errno.EINVAL, "Error decoding and setting key"),
    ("aes-xts-plain64 - 0 {img} 0", errno.EINVAL, "Error decoding and setting key"),
    ("aes-xts-lmk {key} 0 {img} 0", errno.EOPNOTSUPP, "Invalid IV mode"),
    ("aes-xts-frob {key} 0 {img} 0", errno.EINVAL, "Invalid IV mode"),
    ("aes-cbc {key} 0 {img} 0", errno.EINVAL, "IV mechanism required"),
    ("aes-cbc-essiv {key} 0 {img} 0", errno.EINVAL, "Digest algorithm missing for ESSIV mode"),
    ("aes-cbc-essiv:whirl {key} 0 {img} 0", errno.ENOENT, "Error allocating crypto tfm"),
    ("twofish-xts-plain64 {key} 0 {img} 0", errno.ENOENT, "Error allocating crypto tfm"),
    ("aes:3-xts-plain64 {key} 0 {img} 0", errno.EINVAL, "Bad cipher key count specification"),
    ("aes(x)-xts-plain64 {key} 0 {img} 0", errno.EINVAL, "Bad cipher specification"),
    ("capi:gcm(aes)-random {key} 0 {img} 0", errno.EOPNOTSUPP, "AEAD"),
    ("aes-xts-plain64 {key} x {img} 0", errno.EINVAL, "Invalid iv_offset sector"),
    ("aes-xts-plain64 {key} 0 {img} -1", errno.EINVAL, "Invalid device sector"),
    ("aes-xts-plain64 {key} 0 {img} 0 1 integrity:28:aead", errno.EOPNOTSUPP, "Integrity"),
    ("aes-xts-plain64 {key} 0 {img} 0 2 allow_discards", errno.EINVAL, "Invalid number of feature args"),
    ("aes-xts-plain64 {key} 0 {img} 0 9 a b c d e f g h i", errno.EINVAL, "Invalid number of feature args"),
    ("aes-xts-plain64 {key} 0 {img} 0 1 go_faster", errno.EINVAL, "Invalid feature arguments"),
    ("aes-xts-plain64 {key} 0 {img} 0 1 sector_size:1000", errno.EINVAL, "Invalid feature value for sector_size"),
    ("aes-xts-plain64 {key} 4 {img} 0 1 sector_size:4096", errno.EINVAL, "Invalid iv_offset sector"),
    ("aes-xts-plain64 {key} 0 /nonexistent/disk 0", errno.ENOENT, "Device lookup failed"),
    ("aes-xts-plain64 {key} 0 {img} 8000", errno.EINVAL, "too small"),
])
def test_malformed_tables_are_refused_with_the_kernels_text_and_never_echo_the_key(mapper, tmp_path, args,
                                                                                   err, text):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(64).hex()
    line = f"0 {SECTORS} crypt " + args.format(key=key, img=img)
    with pytest.raises(DMError) as exc:
        mapper.create("bad", line)
    assert exc.value.errno == err, str(exc.value)
    assert text in str(exc.value)
    assert key not in str(exc.value)
    assert mapper.list() == []


@pytest.mark.hostile
def test_device_size_must_be_a_multiple_of_sector_size(mapper, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    with pytest.raises(DMError) as exc:
        mapper.create("bad", f"0 12 crypt aes-xts-plain64 {os.urandom(64).hex()} 0 {img} 0 1 sector_size:4096")
    assert "Device size is not multiple of sector_size feature" in str(exc.value)


@pytest.mark.parametrize("cipher", ["aes-xts-plain64", "aes-cbc-plain", "aes-cbc-plain64be", "aes-cbc-benbi",
                                    "aes-cbc-null", "aes-cbc-essiv:sha256"])
def test_the_two_iv_generators_agree_also_where_sectors_wrap(cipher):
    """Small requests compute IVs with Python ints, large ones with numpy: the same IVs,
    also across 2^32 (plain) and 2^64 (the kernel's u64 sector wraps)."""
    from userdm.targets._crypt_cipher import Engine, parse_spec
    spec = parse_spec(cipher)
    sub = Engine(spec, bytearray(os.urandom(64 if "xts" in cipher else 32)), 512, False)._subs[0]
    for first, inc in ((0, 1), ((1 << 32) - 3, 1), ((1 << 64) - 5, 8), (123456789, 8)):
        assert sub.iv_bytes(first, inc, 9) == sub.ivs(first, inc, 9).tobytes(), (first, inc)


def test_table_text_is_the_lines_joined_keys_hidden_or_shown(mapper, tmp_path):
    """`table_text` (what `userdm table` prints) says what `table` says, line for line:
    several targets, a key hidden and shown, an inactive table, a device without one."""
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    key = os.urandom(32).hex()
    mapper.create("t", f"0 8 crypt aes-cbc-essiv:sha256 {key} 0 {img} 0\n8 8 zero\n16 8 linear {img} 8\n")
    mapper.load("t", "0 24 error\n")
    mapper.create("empty", None)
    for name, kw in (("t", {}), ("t", {"showkeys": True}), ("t", {"inactive": True}), ("empty", {})):
        lines = mapper.table(name, **kw)
        assert mapper.table_text(name, **kw) == "".join(f"{s} {n} {t} {p}\n" for s, n, t, p in lines)
    assert key not in mapper.table_text("t") and key in mapper.table_text("t", showkeys=True)
    assert mapper.table_text("empty") == ""
