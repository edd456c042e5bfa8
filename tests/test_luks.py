"""`userdm luks` with volumes made by real `cryptsetup luksFormat`: LUKS1 and LUKS2, pbkdf2 and
argon2 keyslots, a detached header, a second keyslot, the volume key cryptsetup itself
reports, `luks dump` against `luksDump`, devices reached through a mapped device and an NBD
export, wrong passphrases and corrupt headers; keys across a daemon restart (never on disk);
seed 002's encrypted swap; qemu's own LUKS driver reading what userdm wrote."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import Daemon, wait_until
from userdm.errors import DMError

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None,
                                reason="cryptsetup is not installed (apt: cryptsetup-bin)")

MiB = 1 << 20
FAST_PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
FAST_ARGON = ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"]


def run(*cmd: str, input: bytes | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, input=input, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr.decode()}"
    return res.stdout.decode()


def luks_format(path: Path, passphrase: str, *extra: str, size: int = 24 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    keyfile = path.with_suffix(".pw")
    keyfile.write_text(passphrase)
    run("cryptsetup", "luksFormat", "--batch-mode", "--key-file", str(keyfile), *extra, str(path))
    return keyfile


def volume_key(header: Path, keyfile: Path) -> str:
    """The volume key as cryptsetup itself reports it."""
    out = run("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", str(keyfile), str(header))
    dump = out.split("MK dump:", 1)[1]
    return "".join(dump.split())


def shown_key(daemon: Daemon, name: str) -> str:
    return daemon.run("table", name, "--showkeys").stdout.split()[4]


FORMATS = [
    ("luks1", ["--type", "luks1", *FAST_PBKDF2]),
    ("luks1-sha1-cbc", ["--type", "luks1", "--hash", "sha1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256",
                        *FAST_PBKDF2]),
    ("luks2-pbkdf2", ["--type", "luks2", *FAST_PBKDF2]),
    ("luks2-pbkdf2-sha512", ["--type", "luks2", "--hash", "sha512", *FAST_PBKDF2]),
    ("luks2-argon2id", ["--type", "luks2", "--pbkdf", "argon2id", *FAST_ARGON]),
    ("luks2-argon2i-512", ["--type", "luks2", "--pbkdf", "argon2i", "--sector-size", "512", *FAST_ARGON]),
]


@pytest.mark.parametrize("kind,args", FORMATS, ids=[f[0] for f in FORMATS])
def test_open_gives_cryptsetups_volume_key_and_refuses_a_wrong_passphrase(daemon, tmp_path, kind, args):
    img = tmp_path / "vol.img"
    keyfile = luks_format(img, "correct horse", *args)
    wrong = daemon.run("luks", "open", str(img), "v", input="battery staple\n", check=False)
    assert wrong.returncode == 1 and "EPERM: No key available with this passphrase" in wrong.stderr
    assert "No devices found" in daemon.run("ls").stdout       # the probe device is gone too
    daemon.run("luks", "open", str(img), "v", input="correct horse\n")
    assert shown_key(daemon, "v") == volume_key(img, keyfile)
    info = daemon.run("info", "v").stdout
    uuid = run("cryptsetup", "luksUUID", str(img)).strip().replace("-", "")
    assert f"UUID: CRYPT-{kind[:5].upper()}-{uuid}-v" in info
    assert "0" * 64 in daemon.run("table", "v").stdout           # no key without --showkeys
    daemon.run("luks", "close", "v")
    assert "No devices found" in daemon.run("ls").stdout


def test_dump_is_luksdump_without_keys(daemon, tmp_path):
    for kind in ("luks1", "luks2"):
        img = tmp_path / f"{kind}.img"
        luks_format(img, "pw", "--type", kind, *FAST_PBKDF2)
        ours = daemon.run("luks", "dump", str(img)).stdout
        theirs = run("cryptsetup", "luksDump", str(img))
        assert ours == theirs


def test_detached_header_second_keyslot_and_key_slot_option(daemon, tmp_path):
    img = tmp_path / "data.img"
    hdr = tmp_path / "vol.hdr"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    (tmp_path / "pw1").write_text("first")
    (tmp_path / "pw2").write_text("second")
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--key-file", str(tmp_path / "pw1"),
        *FAST_PBKDF2, "--header", str(hdr), str(img))
    run("cryptsetup", "luksAddKey", "--batch-mode", "--key-file", str(tmp_path / "pw1"), *FAST_PBKDF2,
        "--header", str(hdr), str(img), str(tmp_path / "pw2"))
    assert "No key" in daemon.run("luks", "open", str(img), "d", "--header", str(hdr), "--key-file",
                                  str(tmp_path / "pw2"), "--key-slot", "0", check=False).stderr
    daemon.run("luks", "open", str(img), "d", "--header", str(hdr), "--key-file", str(tmp_path / "pw2"),
               "--readonly", "--allow-discards")
    assert shown_key(daemon, "d") == volume_key(hdr, tmp_path / "pw1")
    table = daemon.run("table", "d").stdout.split()
    assert table[1] == str(8 * MiB // 512) and table[6] == str(img) and table[7] == "0"   # data from 0
    assert table[8:] == ["2", "allow_discards", "sector_size:4096"]
    with daemon.connect() as c:
        assert c.info("d")["readonly"]
    daemon.run("luks", "close", "d")


def test_device_may_be_a_mapped_device_or_an_nbd_export(daemon, tmp_path):
    img = tmp_path / "vol.img"
    keyfile = luks_format(img, "pw", "--type", "luks2", *FAST_PBKDF2)
    size = img.stat().st_size // 512
    daemon.run("create", "lin", "--table", f"0 {size} linear {img} 0")
    daemon.run("luks", "open", "/dev/mapper/lin", "v", "--key-file", str(keyfile))
    assert shown_key(daemon, "v") == volume_key(img, keyfile)
    assert daemon.run("table", "v").stdout.split()[6] == "253:0"
    daemon.run("luks", "close", "v")
    daemon.run("remove", "lin")
    if os.geteuid() == 0 and shutil.which("losetup"):          # a kernel block device
        loop = run("losetup", "--show", "-f", str(img)).strip()
        try:
            daemon.run("luks", "open", loop, "b", "--key-file", str(keyfile))
            assert shown_key(daemon, "b") == volume_key(img, keyfile)
            rdev = os.stat(loop).st_rdev
            assert daemon.run("table", "b").stdout.split()[6] == f"{os.major(rdev)}:{os.minor(rdev)}"
            daemon.run("luks", "close", "b")
        finally:
            run("losetup", "-d", loop)
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-U", str(sock), "file", str(img)])
    try:
        assert wait_until(sock.exists)
        url = f"nbd+unix:///?socket={sock}"
        daemon.run("luks", "open", url, "n", "--key-file", str(keyfile))
        assert shown_key(daemon, "n") == volume_key(img, keyfile)
        daemon.run("luks", "close", "n")
    finally:
        proc.terminate()
        proc.wait(10)


def test_keys_never_reach_the_state_directory_and_come_back_with_luks_open_or_key_set(tmp_path):
    img = tmp_path / "vol.img"
    keyfile = luks_format(img, "pw", "--type", "luks2", *FAST_PBKDF2)
    plain = tmp_path / "plain.img"
    with open(plain, "wb") as f:
        f.truncate(4 * MiB)
    raw_key = os.urandom(64).hex()
    d = Daemon(tmp_path)
    d.start()
    try:
        d.run("luks", "open", str(img), "v", "--key-file", str(keyfile))
        d.run("create", "p", "--table", f"0 8192 crypt aes-xts-plain64 {raw_key} 0 {plain} 0")
        with d.connect() as c:
            c.message("p", 0, "@cancel_deferred_remove")  # any change rewrites the state
        key = shown_key(d, "v")
        d.stop()
        d.start()
        found = subprocess.run(["grep", "-rli", "-e", key, "-e", raw_key, str(d.state)], capture_output=True)
        assert found.returncode == 1, found.stdout                  # nothing found
        for name in ("v", "p"):
            with d.connect() as c:
                info = c.info(name)
            assert not info["live"] and info["inactive"]
            assert info["restore_error"].startswith("ENOKEY: crypt table needs its key again")
        assert key not in d.log.read_text() and raw_key not in d.log.read_text()
        assert "Restore error:     ENOKEY: crypt table needs its key again" in d.run("info", "p").stdout
        d.run("luks", "open", str(img), "v", "--key-file", str(keyfile))
        assert shown_key(d, "v") == volume_key(img, keyfile)
        assert "restore_error" not in str(d.connect().info("v"))
        refused = d.run("resume", "p", check=False)
        assert refused.returncode == 1 and "EAGAIN" in refused.stderr and raw_key not in refused.stderr
        d.run("message", "p", "0", "key", "set", raw_key)
        d.run("resume", "p")
        assert shown_key(d, "p") == raw_key
        events = d.run("events").stdout
        assert raw_key not in events and key not in events
        assert raw_key not in d.log.read_text()
    finally:
        d.stop()


def test_seed_002_encrypted_swap_goes_away_after_its_last_close(daemon, tmp_path):
    """A plain crypt table with a random key (an encrypted swap), held open by its user; then
    `remove --deferred --no-open`: new opens get ENXIO, and the last close removes it."""
    img = tmp_path / "swap.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    daemon.run("create", "swap", "--table", f"0 32768 crypt aes-xts-plain64 {os.urandom(64).hex()} 0 {img} 0")
    with daemon.connect() as c:
        held = c.open("swap")
        try:
            daemon.run("remove", "swap", "--deferred", "--no-open")
            with pytest.raises(DMError) as exc:
                c.open("swap")
            assert exc.value.errno == errno.ENXIO
            assert "swap" in daemon.run("ls").stdout
        finally:
            os.close(held["fd"])
        assert wait_until(lambda: "No devices found" in daemon.run("ls").stdout)


@pytest.mark.interop
def test_qemu_luks_driver_reads_what_userdm_wrote(daemon, tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt: qemu-utils)")
    img = tmp_path / "vol.img"
    keyfile = luks_format(img, "pw", "--type", "luks1", *FAST_PBKDF2, size=8 * MiB)
    daemon.run("luks", "open", str(img), "v", "--key-file", str(keyfile))
    sectors = int(daemon.run("table", "v").stdout.split()[1])
    payload = os.urandom(sectors * 512)
    url = f"nbd+unix:///v?socket={daemon.runtime / 'nbd.sock'}"
    (tmp_path / "payload").write_bytes(payload)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / "payload"), url)
    daemon.run("luks", "close", "v")
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "--object", f"secret,id=s0,file={keyfile},format=raw", "--image-opts",
        f"driver=luks,key-secret=s0,file.filename={img}", "-O", "raw", str(out))
    assert out.read_bytes() == payload


# ---- corrupt and hostile headers ---------------------------------------------------------

def rewrite_luks2_json(img: Path, change, *, secondary_too: bool = True) -> None:
    """Edit the JSON area of a LUKS2 header and fix its checksum, as a hostile writer would."""
    with open(img, "r+b") as f:
        for offset in (0, 16384) if secondary_too else (0,):
            f.seek(offset)
            area = bytearray(f.read(16384))
            meta = json.loads(bytes(area[4096:]).split(b"\0", 1)[0])
            change(meta)
            text = json.dumps(meta).encode()
            area[4096:] = text + bytes(16384 - 4096 - len(text))
            area[448:512] = bytes(64)
            area[448:480] = hashlib.sha256(area).digest()
            f.seek(offset)
            f.write(area)


def flip(img: Path, offset: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.hostile
def test_a_corrupt_primary_luks2_header_falls_back_to_the_secondary(daemon, tmp_path):
    img = tmp_path / "vol.img"
    keyfile = luks_format(img, "pw", "--type", "luks2", *FAST_PBKDF2)
    want = volume_key(img, keyfile)   # before the damage: cryptsetup repairs headers it reads
    flip(img, 4096 + 10)                                        # the primary's JSON
    daemon.run("luks", "open", str(img), "v", "--key-file", str(keyfile))
    assert shown_key(daemon, "v") == want
    assert "primary LUKS2 header: checksum mismatch" in daemon.run("luks", "dump", str(img)).stdout
    daemon.run("luks", "close", "v")
    flip(img, 16384 + 4096 + 10)                                # and the secondary's
    res = daemon.run("luks", "open", str(img), "v", "--key-file", str(keyfile), check=False)
    assert res.returncode == 1 and "no valid LUKS2 header" in res.stderr and "checksum mismatch" in res.stderr


@pytest.mark.hostile
@pytest.mark.parametrize("case,err,text", [
    ("not-luks", "EINVAL", "not a LUKS device"),
    ("truncated", "EINVAL", "too small for a LUKS header"),
    ("luks1-slot-past-end", "EINVAL", "past the end"),
    ("luks1-cipher", "ENOENT", "serpent"),
    ("luks1-hash", "EINVAL", "unknown hash spec"),
    ("luks2-kdf", "EOPNOTSUPP", "unknown kdf 'scrypt'"),
    ("luks2-area-past-end", "EINVAL", "past the end"),
    ("luks2-segment-cipher", "ENOENT", "twofish"),
    ("luks2-json-type", "EINVAL", "is not a number"),
    ("luks2-requirements", "EOPNOTSUPP", "requires online-reencrypt"),
])
def test_corrupt_headers_are_refused_with_a_sentence(daemon, tmp_path, case, err, text):
    img = tmp_path / "vol.img"
    kind = "luks1" if case.startswith("luks1") else "luks2"
    keyfile = luks_format(img, "pw", "--type", kind, *FAST_PBKDF2)
    if case == "not-luks":
        with open(img, "r+b") as f:
            f.write(os.urandom(1 << 20))
    elif case == "truncated":
        with open(img, "r+b") as f:
            f.truncate(2048)
    elif case == "luks1-slot-past-end":
        with open(img, "r+b") as f:
            f.seek(208 + 40)                                     # keyslot 0: key material offset
            f.write(struct.pack(">I", 60000))
    elif case == "luks1-cipher":
        with open(img, "r+b") as f:
            f.seek(8)
            f.write(b"serpent".ljust(32, b"\0"))
    elif case == "luks1-hash":
        with open(img, "r+b") as f:
            f.seek(72)
            f.write(b"crc32".ljust(32, b"\0"))
    elif case == "luks2-kdf":
        rewrite_luks2_json(img, lambda m: m["keyslots"]["0"]["kdf"].update(type="scrypt"))
    elif case == "luks2-area-past-end":
        rewrite_luks2_json(img, lambda m: m["keyslots"]["0"]["area"].update(offset=str(30 * MiB)))
    elif case == "luks2-segment-cipher":
        rewrite_luks2_json(img, lambda m: m["segments"]["0"].update(encryption="twofish-xts-plain64"))
    elif case == "luks2-json-type":
        rewrite_luks2_json(img, lambda m: m["keyslots"]["0"].update(key_size="lots"))
    elif case == "luks2-requirements":
        rewrite_luks2_json(img, lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt-v2"]}))
    res = daemon.run("luks", "open", str(img), "v", "--key-file", str(keyfile), check=False)
    assert res.returncode == 1, res.stdout
    assert f"luks: {err}: " in res.stderr and text in res.stderr, res.stderr
    dump = daemon.run("luks", "dump", str(img), check=False)
    assert dump.returncode == 1 and text in dump.stderr
    assert "No devices found" in daemon.run("ls").stdout
    assert daemon.proc.poll() is None


def test_luks_verbs_refuse_bad_usage(daemon, tmp_path):
    res = daemon.run("luks", "frob", check=False)
    assert res.returncode == 1 and "usage: luks open DEVICE NAME" in res.stderr
    img = tmp_path / "plain.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    daemon.run("create", "lin", "--table", f"0 2048 linear {img} 0")
    res = daemon.run("luks", "close", "lin", check=False)
    assert res.returncode == 1 and "not a crypt device" in res.stderr
