"""dm-verity over real `veritysetup format` images: both hash formats, with and without a
superblock, hash trees in their own file or after the data at `--hash-offset`, several
algorithms and salts; corruption of data and hash blocks, the optional arguments, userdm's
`data_start`, refusals with the kernel's messages, and the status and table formats."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from userdm.errors import DMError

from conftest import wait_until

pytestmark = pytest.mark.skipif(shutil.which("veritysetup") is None,
                                reason="veritysetup is not installed (apt: cryptsetup-bin)")

MiB = 1 << 20
DATA_SIZE = 4 * MiB
SB_SIZE = 512  # the veritysetup superblock


@dataclass
class Image:
    """A formatted verity image and the table line that maps it."""

    data: str
    hash: str
    root: str
    salt: str
    version: int
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    hash_start: int
    algorithm: str
    content: bytes

    def table(self, *opts: str, data: str | None = None, sectors: int | None = None) -> str:
        sectors = self.data_blocks * self.data_block_size // 512 if sectors is None else sectors
        line = (f"0 {sectors} verity {self.version} {data or self.data} {self.hash} {self.data_block_size} "
                f"{self.hash_block_size} {self.data_blocks} {self.hash_start} {self.algorithm} "
                f"{self.root} {self.salt}")
        return f"{line} {len(opts)} {' '.join(opts)}" if opts else line

    def hash_block_offset(self, level_from_top: int = 0) -> int:
        """Byte offset in the hash file of the first hash block of a tree level (0 = the top)."""
        return (self.hash_start + level_from_top) * self.hash_block_size


def pattern(size: int, zero_blocks: tuple[int, ...] = (), block: int = 4096) -> bytes:
    out = bytearray(os.urandom(size))
    for b in zero_blocks:
        out[b * block:(b + 1) * block] = bytes(block)
    return bytes(out)


def veritysetup_format(data: str, hash_: str, *, version: int = 1, algorithm: str = "sha256",
                       salt: str | None = None, superblock: bool = True, hash_offset: int = 0,
                       data_block_size: int = 4096, hash_block_size: int = 4096,
                       data_blocks: int | None = None) -> Image:
    cmd = ["veritysetup", "format", data, hash_, f"--format={version}", f"--hash={algorithm}",
           f"--data-block-size={data_block_size}", f"--hash-block-size={hash_block_size}"]
    if salt is not None:
        cmd.append(f"--salt={salt}")
    if not superblock:
        cmd.append("--no-superblock")
    if hash_offset:
        cmd.append(f"--hash-offset={hash_offset}")
    if data_blocks is not None:
        cmd.append(f"--data-blocks={data_blocks}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    field = {k.strip(): v.strip() for k, v in re.findall(r"^([^:\n]+):\s*(.*)$", out, re.M)}
    if superblock:  # the tree starts at the first hash block after the superblock
        hash_start = (hash_offset + SB_SIZE + hash_block_size - 1) // hash_block_size
    else:
        hash_start = hash_offset // hash_block_size
    blocks = int(field["Data blocks"])
    with open(data, "rb") as f:
        content = f.read(blocks * data_block_size)
    return Image(data, hash_, field["Root hash"], field["Salt"], version, data_block_size,
                 hash_block_size, blocks, hash_start, algorithm, content)


@pytest.fixture
def make_image(tmp_path):
    """make_image(**format options) -> Image over a fresh random data file."""
    count = [0]

    def make(content: bytes | None = None, **kw) -> Image:
        count[0] += 1
        data = tmp_path / f"data{count[0]}.img"
        data.write_bytes(pattern(DATA_SIZE) if content is None else content)
        return veritysetup_format(str(data), str(tmp_path / f"hash{count[0]}.img"), **kw)
    return make


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def failing_blocks(dev, block_size: int) -> set[int]:
    bad = set()
    for b in range(dev.size // block_size):
        try:
            dev.read(b * block_size, block_size)
        except DMError as exc:
            assert exc.errno == errno.EIO
            bad.add(b)
    return bad


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


# ---- reading real images ------------------------------------------------------------------

FORMATS = {
    "v1-sha256-superblock": dict(),
    "v1-sha1-nosb-nosalt": dict(algorithm="sha1", superblock=False, salt="-"),
    "v1-sha512-salt": dict(algorithm="sha512", salt="00112233445566778899aabbccddeeff"),
    "v0-sha256-nosb": dict(version=0, superblock=False),
    "v0-sha1-packed": dict(version=0, algorithm="sha1", superblock=False, salt="abcdef"),
    "v0-sha512-superblock": dict(version=0, algorithm="sha512", salt="-"),
    "v1-small-blocks-3-levels": dict(data_block_size=512, hash_block_size=1024),
    "v1-mixed-block-sizes": dict(data_block_size=1024, hash_block_size=4096, algorithm="sha1"),
}


@pytest.mark.parametrize("opts", FORMATS.values(), ids=FORMATS.keys())
def test_reads_whole_image(mapper, make_image, opts):
    img = make_image(**opts)
    mapper.create("v", img.table(), readonly=True)
    dev = mapper.open_device("v", write=False)
    try:
        assert dev.size == DATA_SIZE
        assert dev.read(0, DATA_SIZE) == img.content
        # unaligned reads verify the blocks around them
        assert dev.read(1000, 10000) == img.content[1000:11000]
        assert dev.read(DATA_SIZE - 512, 512) == img.content[-512:]
        assert mapper.status("v") == [[0, DATA_SIZE // 512, "verity", "V -"]]
    finally:
        dev.close()
    target = mapper.device("v").live.targets[0]
    if opts.get("data_block_size") == 512:
        assert target.levels == 3  # 8192 blocks, 32 digests per 1 KiB hash block


def test_hash_tree_after_the_data_in_the_same_file(mapper, tmp_path):
    path = str(tmp_path / "both.img")
    content = pattern(DATA_SIZE)
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(DATA_SIZE + MiB)
    for superblock in (True, False):
        img = veritysetup_format(path, path, hash_offset=DATA_SIZE, superblock=superblock,
                                 data_blocks=DATA_SIZE // 4096)
        assert img.hash_start == DATA_SIZE // 4096 + (1 if superblock else 0)
        mapper.create("v", img.table(), readonly=True)
        with mapper.open_device("v", write=False) as dev:
            assert dev.read(0, DATA_SIZE) == content
        assert mapper.deps("v")[0]["name"] == path
        assert len(mapper.deps("v")) == 1  # one device: data and hash tree share the file
        mapper.remove("v")


def test_a_verity_device_can_sit_on_a_mapped_device(mapper, make_image):
    img = make_image()
    mapper.create("lower", f"0 {DATA_SIZE // 512} linear {img.data} 0")
    mapper.create("v", img.table(data="/dev/mapper/lower"), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert dev.read(0, DATA_SIZE) == img.content
    params = mapper.table("v")[0][3]
    assert params.startswith(f"1 253:0 {img.hash} 4096 4096 1024 1 sha256 {img.root} {img.salt}")


# ---- corruption ---------------------------------------------------------------------------

def test_corrupted_data_block_fails_exactly_that_block(mapper, make_image):
    img = make_image()
    flip_byte(img.data, 37 * 4096 + 100)
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert failing_blocks(dev, 4096) == {37}
        e = err(dev.read, 36 * 4096, 3 * 4096)  # a read that spans it fails as a whole
        assert e.errno == errno.EIO and "data block 37 is corrupted" in e.message
        assert dev.read(38 * 4096, 4096) == img.content[38 * 4096:39 * 4096]
    assert mapper.status("v")[0][3] == "C -"
    target = mapper.device("v").live.targets[0]
    assert target.corrupted_errs == 2  # read twice, reported twice
    assert mapper.info("v")["event_nr"] == 2  # each reported corruption is an event


def test_corrupted_hash_block_fails_the_blocks_it_covers(mapper, make_image):
    img = make_image()  # 1024 blocks: a top block, then 8 level-0 blocks of 128 digests
    flip_byte(img.hash, img.hash_block_offset(1 + 2) + 5)  # third level-0 block: data 256..383
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert failing_blocks(dev, 4096) == set(range(256, 384))
        e = err(dev.read, 300 * 4096, 4096)
        assert f"metadata block {img.hash_start + 3} is corrupted" in e.message


def test_corrupted_top_hash_block_fails_everything(mapper, make_image):
    img = make_image(superblock=False, salt="-")
    flip_byte(img.hash, img.hash_block_offset(0) + 4095)
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert failing_blocks(dev, 4096) == set(range(1024))


def test_wrong_root_digest_fails_every_read(mapper, make_image):
    img = make_image()
    img.root = ("0" if img.root[0] != "0" else "1") + img.root[1:]
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert err(dev.read, 0, 4096).errno == errno.EIO


def test_ignore_corruption_returns_the_data_and_raises_events(mapper, make_image):
    img = make_image()
    flip_byte(img.data, 5 * 4096)
    mapper.create("v", img.table("ignore_corruption"), readonly=True)
    assert mapper.info("v")["event_nr"] == 0
    with mapper.open_device("v", write=False) as dev:
        got = dev.read(4 * 4096, 3 * 4096)
        with open(img.data, "rb") as f:
            f.seek(4 * 4096)
            assert got == f.read(3 * 4096)  # the corrupted bytes, as on disk
        assert got != img.content[4 * 4096:7 * 4096]
        assert wait_until(lambda: mapper.info("v")["event_nr"] == 1)
        dev.read(5 * 4096, 4096)
        assert mapper.info("v")["event_nr"] == 2
    assert mapper.status("v")[0][3] == "C -"
    assert mapper.device("v").live.targets[0].corrupted_errs == 2


def test_corruption_reports_stop_at_the_kernels_limit(mapper, make_image):
    img = make_image()
    flip_byte(img.data, 0)
    mapper.create("v", img.table("ignore_corruption"), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        for _ in range(105):
            dev.read(0, 4096)
    assert mapper.device("v").live.targets[0].corrupted_errs == 100
    assert mapper.info("v")["event_nr"] == 100


def test_restart_and_panic_on_corruption_fail_the_io(mapper, make_image):
    img = make_image()
    flip_byte(img.data, 0)
    for mode in ("restart_on_corruption", "panic_on_corruption"):
        mapper.create("v", img.table(mode, "restart_on_error"), readonly=True)
        with mapper.open_device("v", write=False) as dev:
            assert err(dev.read, 0, 4096).errno == errno.EIO
            assert dev.read(4096, 4096) == img.content[4096:8192]
        mapper.remove("v")


def test_check_at_most_once_trusts_blocks_it_verified(mapper, make_image):
    img = make_image()
    mapper.create("once", img.table("check_at_most_once"), readonly=True)
    mapper.create("always", img.table(), readonly=True)
    once = mapper.open_device("once", write=False)
    always = mapper.open_device("always", write=False)
    try:
        assert once.read(0, 8 * 4096) == always.read(0, 8 * 4096) == img.content[:8 * 4096]
        flip_byte(img.data, 3 * 4096 + 1)   # corrupt a block both have verified
        flip_byte(img.data, 9 * 4096 + 1)   # and one neither has read
        assert once.read(3 * 4096, 4096) != img.content[3 * 4096:4 * 4096]  # not checked again
        assert err(always.read, 3 * 4096, 4096).errno == errno.EIO
        assert err(once.read, 9 * 4096, 4096).errno == errno.EIO
        assert mapper.status("once")[0][3] == "C -"
    finally:
        once.close()
        always.close()


def test_verified_hash_blocks_are_cached_until_suspend(mapper, make_image):
    img = make_image()
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        dev.read(0, 4096)                       # verifies the top and the first level-0 block
        flip_byte(img.hash, img.hash_block_offset(1) + 64)  # digest of data block 2
        assert dev.read(2 * 4096, 4096) == img.content[2 * 4096:3 * 4096]  # served from the cache
        mapper.suspend("v")
        mapper.resume("v")                      # postsuspend drops the cache, as dm-bufio's reset
        assert err(dev.read, 2 * 4096, 4096).errno == errno.EIO


def test_ignore_zero_blocks_returns_zeroes_without_reading_them(mapper, make_image):
    content = pattern(DATA_SIZE, zero_blocks=(10, 11, 500))
    img = make_image(content)
    with open(img.data, "r+b") as f:  # garbage where the tree says zeroes
        f.seek(11 * 4096)
        f.write(b"\xAA" * 4096)
    mapper.create("z", img.table("ignore_zero_blocks"), readonly=True)
    mapper.create("v", img.table(), readonly=True)
    with mapper.open_device("z", write=False) as z, mapper.open_device("v", write=False) as v:
        assert z.read(0, DATA_SIZE) == content
        assert failing_blocks(v, 4096) == {11}
    assert mapper.status("z")[0][3] == "V -"


# ---- userdm's data_start ------------------------------------------------------------------

def test_data_start_finds_the_data_inside_a_bigger_file(mapper, make_image, tmp_path):
    img = make_image()
    big = tmp_path / "system.img"
    with open(big, "wb") as f:
        f.write(os.urandom(MiB))      # something else before the data area
        f.write(img.content)
        f.write(os.urandom(MiB))
    offset = MiB // 512
    mapper.create("v", img.table("data_start", str(offset), data=str(big)), readonly=True)
    with mapper.open_device("v", write=False) as dev:
        assert dev.read(0, DATA_SIZE) == img.content
        assert dev.read(12345, 999) == img.content[12345:13344]
    assert mapper.table("v")[0][3].endswith(f" 2 data_start {offset}")
    # without data_start the same table reads the wrong area: verification fails
    mapper.create("w", img.table(data=str(big)), readonly=True)
    with mapper.open_device("w", write=False) as dev:
        assert err(dev.read, 0, 4096).errno == errno.EIO
    # the data area must fit in the data device after data_start
    e = err(mapper.create, "x", img.table("data_start", str(3 * offset), data=str(big)), readonly=True)
    assert e.errno == errno.EINVAL and "too small" in e.message


# ---- refusals -----------------------------------------------------------------------------

def bad_tables(img: Image) -> dict[str, tuple[str, int, str]]:
    t = img.table
    v = f"{img.version} {img.data} {img.hash}"
    tail = f"{img.data_blocks} {img.hash_start} sha256 {img.root} {img.salt}"
    n = img.data_blocks * 8
    return {
        "not-enough-args": (f"0 {n} verity {v} 4096 4096 {img.data_blocks}", errno.EINVAL, "Not enough arguments"),
        "version-2": (f"0 {n} verity 2 {img.data} {img.hash} 4096 4096 {tail}", errno.EINVAL, "Invalid version"),
        "short-digest": (t().replace(img.root, img.root[:-2]), errno.EINVAL, "Invalid root digest"),
        "digest-not-hex": (t().replace(img.root, "x" * 64), errno.EINVAL, "Invalid root digest"),
        "sha1-length-for-sha256": (t().replace(img.root, img.root[:40]), errno.EINVAL, "Invalid root digest"),
        "unknown-algorithm": (t().replace(" sha256 ", " sha257 "), errno.ENOENT, "Cannot initialize hash function"),
        "odd-salt": (t().replace(img.salt, img.salt[:-1]), errno.EINVAL, "Invalid salt"),
        "data-block-3000": (f"0 {n} verity {v} 3000 4096 {tail}", errno.EINVAL, "Invalid data device block size"),
        "data-block-8192": (f"0 {n} verity {v} 8192 4096 {tail}", errno.EINVAL, "Invalid data device block size"),
        "data-block-256": (f"0 {n} verity {v} 256 4096 {tail}", errno.EINVAL, "Invalid data device block size"),
        "data-block-0": (f"0 {n} verity {v} 0 4096 {tail}", errno.EINVAL, "Invalid data device block size"),
        "hash-block-1000": (f"0 {n} verity {v} 4096 1000 {tail}", errno.EINVAL, "Invalid hash device block size"),
        "data-blocks-text": (f"0 {n} verity {v} 4096 4096 many {img.hash_start} sha256 {img.root} {img.salt}",
                             errno.EINVAL, "Invalid data blocks"),
        "too-few-data-blocks": (f"0 {n} verity {v} 4096 4096 10 {img.hash_start} sha256 {img.root} {img.salt}",
                                errno.EINVAL, "Data device is too small"),
        "length-not-block-multiple": (t(sectors=n - 1), errno.EINVAL, "not a multiple of the data block size"),
        "hash-start-text": (f"0 {n} verity {v} 4096 4096 {img.data_blocks} -1 sha256 {img.root} {img.salt}",
                            errno.EINVAL, "Invalid hash start"),
        "hash-device-too-small": (f"0 {n} verity {v} 4096 4096 {img.data_blocks} 5 sha256 {img.root} {img.salt}",
                                  errno.E2BIG, "Hash device is too small"),
        "unknown-option": (t("verify_nothing"), errno.EINVAL, "Unrecognized verity feature request: verify_nothing"),
        "fec-not-supported": (t("use_fec_from_device", img.data), errno.EINVAL, "Unrecognized verity feature request"),
        "conflicting-modes": (t("ignore_corruption", "restart_on_corruption"), errno.EINVAL,
                              "Conflicting error handling parameters"),
        "too-many-feature-args": (t() + " 16 " + " ".join(["ignore_zero_blocks"] * 16), errno.EINVAL,
                                  "Invalid number of feature args"),
        "insufficient-feature-args": (t() + " 3 ignore_zero_blocks", errno.EINVAL, "Insufficient arguments"),
        "data-start-missing": (t("data_start"), errno.EINVAL, "data_start needs a sector"),
        "data-start-text": (t("data_start", "ten"), errno.EINVAL, "Invalid data_start sector"),
        "missing-data-device": (t(data="/nonexistent/data.img"), errno.ENOENT,
                                "Data device lookup failed: ENOENT: cannot use /nonexistent/data.img"),
        "missing-hash-device": (t().replace(f" {img.hash} ", " /nonexistent/hash.img "), errno.ENOENT,
                                "Hash device lookup failed: ENOENT: cannot use /nonexistent/hash.img"),
        "not-alone": (t() + f"\n{n} 8 zero", errno.EINVAL, "must appear alone in table"),
    }


def test_bad_tables_are_refused_with_the_kernels_messages(mapper, make_image):
    img = make_image()
    for case, (table, code, text) in bad_tables(img).items():
        e = err(mapper.create, "bad", table, readonly=True)
        assert (e.errno, text in e.message) == (code, True), (case, e)
        assert "table line" in e.message and "verity" in e.message, (case, e)
    assert mapper.list() == []  # nothing half-created is left behind
    # and nothing stayed claimed: an outside exclusive open of the data file works
    mapper.backing.open(img.data, write=False, holder="someone").close()


def test_a_writable_table_is_refused(mapper, make_image):
    img = make_image()
    e = err(mapper.create, "v", img.table())
    assert e.errno == errno.EINVAL and "Device must be readonly" in e.message
    mapper.create("v")
    e = err(mapper.load, "v", img.table(), readonly=False)
    assert e.errno == errno.EINVAL and "table line 1: verity: Device must be readonly" in e.message


def test_writes_never_succeed(mapper, make_image):
    img = make_image()
    mapper.create("v", img.table(), readonly=True)
    assert err(mapper.open_device, "v", write=True).errno == errno.EACCES
    with mapper.open_device("v", write=False) as dev:
        assert err(dev.write, 0, b"x" * 4096).errno == errno.EPERM
    target = mapper.device("v").live.targets[0]
    assert err(target.write, 0, memoryview(b"x" * 4096), False).errno == errno.EIO
    assert err(target.discard, 0, 4096).errno == errno.EOPNOTSUPP
    with open(img.data, "rb") as f:
        assert f.read(4096) == img.content[:4096]


# ---- status and table ---------------------------------------------------------------------

def test_table_prints_the_arguments_back_in_the_kernels_order(mapper, make_image):
    img = make_image(salt="-", algorithm="sha1", version=0, superblock=False)
    given = img.table("CHECK_AT_MOST_ONCE", "ignore_zero_blocks", "panic_on_error", "ignore_corruption",
                      "data_start", "0")
    mapper.create("v", given, readonly=True)
    (line,) = mapper.table("v")
    assert line == [0, DATA_SIZE // 512, "verity",
                    f"0 {img.data} {img.hash} 4096 4096 1024 0 sha1 {img.root} - "
                    "6 ignore_corruption panic_on_error ignore_zero_blocks check_at_most_once data_start 0"]
    # the printed table loads again and means the same
    mapper.create("again", f"0 {line[1]} verity {line[3]}", readonly=True)
    assert mapper.table("again") == mapper.table("v")
    with mapper.open_device("again", write=False) as dev:
        assert dev.read(0, DATA_SIZE) == img.content
    plain = make_image()
    mapper.create("plain", plain.table(), readonly=True)
    assert mapper.table("plain")[0][3] == (f"1 {plain.data} {plain.hash} 4096 4096 1024 1 sha256 "
                                           f"{plain.root} {plain.salt}")
    assert mapper.targets() and any(t["name"] == "verity" for t in mapper.targets())


def test_status_and_table_through_the_cli(daemon, make_image):
    img = make_image()
    daemon.run("create", "vroot", "--readonly", "--table", img.table())
    assert daemon.run("status", "vroot").stdout == f"0 {DATA_SIZE // 512} verity V -\n"
    assert daemon.run("table", "vroot").stdout == f"{img.table()}\n"
    assert daemon.run("deps", "vroot").stdout == f"2 dependencies\t: ({img.data}) ({img.hash})\n"
    res = daemon.run("create", "rw", "--table", img.table(), check=False)
    assert res.returncode == 1 and "EINVAL" in res.stderr and "Device must be readonly" in res.stderr
    with daemon.connect() as client:
        info = client.info("vroot")
        assert info["readonly"] and info["event_nr"] == 0
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt: qemu-utils)")
    uri = f"nbd+unix:///vroot?socket={daemon.runtime}/nbd.sock"
    compare = ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, img.data]
    res = subprocess.run(compare, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr   # a real NBD client reads the verified data
    flip_byte(img.data, 7 * 4096)
    res = subprocess.run(compare, capture_output=True, text=True, timeout=60)
    # an I/O error (exit 4), not a difference (exit 1)
    assert res.returncode == 4 and "Input/output error" in res.stderr, res.stdout + res.stderr
    with daemon.connect() as client:
        assert client.info("vroot")["event_nr"] >= 1
        assert client.status("vroot") == [[0, DATA_SIZE // 512, "verity", "C -"]]
