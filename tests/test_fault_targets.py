"""The fault-injection targets dust, flakey and delay, as the kernel's dm-dust.c, dm-flakey.c and
dm-delay.c behave: constructor refusals (errno and the kernel's sentence), every message and its
result, status and table lines that load again into the same table, and I/O through the Mapper
and (dust) through the daemon's NBD socket with qemu-io and nbdinfo.

Flakey's intervals are driven by an injected clock and delay's hold is released by suspend, so
nothing here sleeps or measures time.
"""

from __future__ import annotations

import errno
import random
import shutil
import subprocess
import threading

import pytest

from userdm.errors import DMError
from userdm.targets.flakey import REQ_FUA, FlakeyTarget

from conftest import wait_until

MiB = 1 << 20
SECTORS = 8 * MiB // 512


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


def target_of(mapper, name: str):
    return mapper.device(name).live.targets[0]


def round_trip(mapper, name: str) -> list:
    """The table lines of `name` load again (as a new device) into the same table."""
    lines = mapper.table(name)
    text = "\n".join(f"{start} {length} {kind} {params}" for start, length, kind, params in lines)
    mapper.create(f"{name}-again", text)
    try:
        assert mapper.table(f"{name}-again") == lines
    finally:
        mapper.remove(f"{name}-again")
    return lines


def fill(path: str, size: int = 8 * MiB) -> bytes:
    """Give every 512-byte sector of the image a distinct content; returns it."""
    data = b"".join(i.to_bytes(4, "little") * 128 for i in range(size // 512))
    with open(path, "r+b") as f:
        f.write(data)
    return data


def on_disk(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# ---- dust -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, length, sentence", [
    ("{img} 0", SECTORS, "Invalid argument count"),
    ("{img} 0 4096 extra", SECTORS, "Invalid argument count"),
    ("{img} 0 abc", SECTORS, "Invalid block size parameter"),
    ("{img} 0 0", SECTORS, "Invalid block size parameter"),
    ("{img} 0 4294967296", SECTORS, "Invalid block size parameter"),
    ("{img} 0 256", SECTORS, "Block size must be at least 512"),
    ("{img} 0 1536", SECTORS, "Block size must be a power of 2"),
    ("{img} 0 8192", 8, "Block size is too large"),
    ("{img} 0 2147483648", SECTORS, "Block size is too large"),
    ("{img} x 4096", SECTORS, "Invalid device offset sector"),
    ("{img} -8 4096", SECTORS, "Invalid device offset sector"),
    ("/nonexistent/disk.img 0 4096", SECTORS, "Device lookup failed"),
])
def test_dust_refuses_bad_arguments(mapper, images, args, length, sentence):
    (img,) = images(1, 8 * MiB)
    e = err(mapper.create, "d", f"0 {length} dust " + args.format(img=img))
    assert e.errno in (errno.EINVAL, errno.ENOENT) and f"table line 1: dust: {sentence}" in e.message
    if "Device lookup" not in sentence:
        assert e.errno == errno.EINVAL


def test_dust_messages_and_their_results(mapper, images):
    (img,) = images(1, 8 * MiB)
    mapper.create("d", f"0 {SECTORS} dust {img} 0 4096")
    msg = lambda text: mapper.message("d", 0, text)  # noqa: E731
    assert mapper.status("d") == [[0, SECTORS, "dust", f"{img} bypass verbose"]]
    assert msg("countbadblocks") == "countbadblocks: 0 badblock(s) found"
    assert msg("listbadblocks") == "No blocks in badblocklist"
    assert msg("addbadblock 60") is None
    assert msg("addbadblock 67") is None
    assert msg("AddBadBlock 72") is None  # the kernel compares case-insensitively
    e = err(msg, "addbadblock 60")
    assert (e.errno, e.message) == (errno.EINVAL, "dust_add_block: block 60 already in badblocklist")
    assert msg("queryblock 72") == "dust_query_block: block 72 found in badblocklist"
    assert msg("queryblock 73") == "dust_query_block: block 73 not found in badblocklist"
    assert msg("countbadblocks") == "countbadblocks: 3 badblock(s) found"
    assert msg("listbadblocks") == "60\n67\n72\n"
    assert msg("removebadblock 67") is None
    e = err(msg, "removebadblock 67")
    assert (e.errno, e.message) == (errno.EINVAL, "dust_remove_block: block 67 not found in badblocklist")
    assert msg("enable") is None
    assert mapper.status("d")[0][3] == f"{img} fail_read_on_bad_block verbose"
    assert msg("quiet") is None
    assert mapper.status("d")[0][3] == f"{img} fail_read_on_bad_block quiet"
    assert msg("quiet") is None
    assert msg("disable") is None
    assert mapper.status("d")[0][3] == f"{img} bypass verbose"
    assert msg("clearbadblocks") == "dust_clear_badblocks: badblocks cleared"
    assert msg("clearbadblocks") == "dust_clear_badblocks: no badblocks found"
    assert msg("countbadblocks") == "countbadblocks: 0 badblock(s) found"
    # the device has 8 MiB / 4096 = 2048 blocks; the kernel accepts block numbers up to that count
    assert msg("addbadblock 2048") is None
    refusals = {
        "addbadblock": "addbadblock requires an additional argument",
        "queryblock": "queryblock requires an additional argument",
        "removebadblock": "removebadblock requires an additional argument",
        "frobnicate": "unrecognized message 'frobnicate' received",
        "enable 5": "unrecognized message 'enable' received",
        "removebadblock 5 1": "unrecognized message 'removebadblock' received",
        "addbadblock 2049": "selected block value out of range",
        "addbadblock 5 256": "selected write fail count out of range",
        "addbadblock 1 2 3": "invalid number of arguments '4'",
        "queryblock x": "invalid block number 'x': not a decimal number",
        "addbadblock 5 x": "invalid write fail count 'x': not a number",
    }
    for text, sentence in refusals.items():
        e = err(msg, text)
        assert (e.errno, e.message) == (errno.EINVAL, sentence), text
    assert msg("countbadblocks") == "countbadblocks: 1 badblock(s) found"


def test_dust_reads_of_bad_blocks_fail_only_when_enabled_and_writes_remap_them(mapper, images):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("d", f"0 {SECTORS} dust {img} 0 4096")
    dev = mapper.open_device("d", write=True)
    try:
        mapper.message("d", 0, "addbadblock 5")
        assert dev.read(5 * 4096, 4096) == data[5 * 4096:6 * 4096]  # bypass: bad blocks do nothing
        mapper.message("d", 0, "enable")
        for offset, length in ((5 * 4096, 4096), (5 * 4096 + 1024, 512), (4 * 4096, 3 * 4096)):
            assert err(dev.read, offset, length).errno == errno.EIO
        assert dev.read(4 * 4096, 4096) == data[4 * 4096:5 * 4096]
        assert dev.read(6 * 4096, 8192) == data[6 * 4096:8 * 4096]
        # a write to a bad block succeeds and takes it off the list (the drive remaps it)
        dev.write(5 * 4096, b"\xaa" * 512)
        assert mapper.message("d", 0, "queryblock 5") == "dust_query_block: block 5 not found in badblocklist"
        assert dev.read(5 * 4096, 512) == b"\xaa" * 512
        # while disabled a write leaves the bad block on the list (dust_map_write checks the mode)
        mapper.message("d", 0, "addbadblock 9")
        mapper.message("d", 0, "disable")
        dev.write(9 * 4096, b"\xbb" * 4096)
        assert mapper.message("d", 0, "queryblock 9") == "dust_query_block: block 9 found in badblocklist"
        mapper.message("d", 0, "enable")
        assert err(dev.read, 9 * 4096, 4096).errno == errno.EIO
        mapper.message("d", 0, "disable")
        assert dev.read(9 * 4096, 4096) == b"\xbb" * 4096
    finally:
        dev.close()


def test_dust_write_fail_count_and_multi_block_writes(mapper, images):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("d", f"0 {SECTORS} dust {img} 0 512")
    dev = mapper.open_device("d", write=True)
    try:
        mapper.message("d", 0, "addbadblock 3 2")
        mapper.message("d", 0, "enable")
        # a write over blocks 2..4 is cut per block: blocks 2 and 4 are written, block 3 fails
        assert err(dev.write, 2 * 512, b"\x11" * 1536).errno == errno.EIO
        assert on_disk(img, 2 * 512, 1536) == b"\x11" * 512 + data[3 * 512:4 * 512] + b"\x11" * 512
        assert err(dev.write, 3 * 512, b"\x22" * 512).errno == errno.EIO
        assert mapper.message("d", 0, "queryblock 3") == "dust_query_block: block 3 found in badblocklist"
        dev.write(3 * 512, b"\x33" * 512)  # the fail count is used up: this write remaps the block
        assert mapper.message("d", 0, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
        assert dev.read(2 * 512, 1536) == b"\x11" * 512 + b"\x33" * 512 + b"\x11" * 512
        # discard and write-zeroes are writes too: they remap bad blocks
        mapper.message("d", 0, "addbadblock 7")
        dev.write_zeroes(7 * 512, 512)
        assert mapper.message("d", 0, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
        assert dev.read(7 * 512, 512) == bytes(512)
    finally:
        dev.close()


def test_dust_block_numbers_count_from_the_device_start(mapper, images):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    # offset 8 sectors = one 4096-byte block: the target's first block is device block 1
    mapper.create("d", f"0 {SECTORS - 8} dust {img} 8 4096")
    dev = mapper.open_device("d", write=False)
    try:
        mapper.message("d", 0, "addbadblock 1")
        mapper.message("d", 0, "enable")
        assert err(dev.read, 0, 512).errno == errno.EIO
        assert dev.read(4096, 512) == data[8192:8192 + 512]
    finally:
        dev.close()


def test_dust_status_and_table_round_trip(mapper, images):
    (img,) = images(1, 8 * MiB)
    mapper.create("d", f"0 {SECTORS - 16} dust {img} 16 1024")
    assert round_trip(mapper, "d") == [[0, SECTORS - 16, "dust", f"{img} 16 1024"]]
    mapper.message("d", 0, "enable")
    mapper.message("d", 0, "quiet")
    assert mapper.status("d") == [[0, SECTORS - 16, "dust", f"{img} fail_read_on_bad_block quiet"]]


def nbd_tools() -> None:
    for tool in ("qemu-io", "nbdinfo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt: qemu-utils, libnbd-bin)")


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    res = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    return res.stdout + res.stderr


@pytest.mark.interop
def test_dust_bad_blocks_give_eio_over_nbd(daemon, images):
    nbd_tools()
    img, other = images(2, 8 * MiB)
    run = daemon.run
    run("create", "dust1", "--table", f"0 {SECTORS} dust {img} 0 4096")
    run("create", "other", "--table", f"0 {SECTORS} linear {other} 0")
    sock = daemon.runtime / "nbd.sock"
    uri = f"nbd+unix:///dust1?socket={sock}"
    out = qemu_io(uri, "write -P 0x5a 0 64k")
    assert "wrote 65536/65536 bytes" in out, out
    assert run("message", "dust1", "0", "addbadblock", "5").stdout == ""
    assert run("message", "dust1", "0", "queryblock", "5").stdout == \
        "dust_query_block: block 5 found in badblocklist\n"
    run("message", "dust1", "0", "addbadblock", "9")
    # a response that ends with a newline is printed as it is (dmsetup's _message)
    assert run("message", "dust1", "0", "listbadblocks").stdout == "5\n9\n"
    run("message", "dust1", "0", "removebadblock", "9")
    bad = run("message", "dust1", "0", "addbadblock", "5", check=False)
    assert bad.returncode != 0 and "EINVAL" in bad.stderr \
        and "dust_add_block: block 5 already in badblocklist" in bad.stderr
    out = qemu_io(uri, "read -P 0x5a 20480 4096")
    assert "read 4096/4096 bytes" in out, out  # bypass mode
    run("message", "dust1", "0", "enable")
    assert run("status", "dust1").stdout == f"0 {SECTORS} dust {img} fail_read_on_bad_block verbose\n"
    out = qemu_io(uri, "read 20480 4096")
    assert "Input/output error" in out, out
    out = qemu_io(uri, "read -P 0x5a 16384 4096", "read -P 0x5a 24576 4096")
    assert out.count("read 4096/4096 bytes") == 2, out
    # the daemon keeps serving: nbdinfo, another device, info
    info = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and info.stdout.strip() == str(8 * MiB)
    out = qemu_io(f"nbd+unix:///other?socket={sock}", "write -P 7 0 4k", "read -P 7 0 4k")
    assert "read 4096/4096 bytes" in out, out
    assert "dust1" in run("info", "dust1").stdout
    # a write remaps the bad block, and reads work again
    out = qemu_io(uri, "write -P 0x66 20480 4096", "read -P 0x66 20480 4096")
    assert "read 4096/4096 bytes" in out, out
    assert run("message", "dust1", "0", "countbadblocks").stdout == "countbadblocks: 0 badblock(s) found\n"


# ---- flakey ------------------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(FlakeyTarget, "clock", fake)
    return fake


@pytest.mark.parametrize("args, sentence", [
    ("{img} 0 1", "Invalid argument count"),
    ("{img} x 1 1", "Invalid device sector"),
    ("{img} 0 x 1", "Invalid up interval"),
    ("{img} 0 1 -1", "Invalid down interval"),
    ("{img} 0 4294967296 1", "Invalid up interval"),
    ("{img} 0 0 0", "Total (up + down) interval is zero"),
    ("{img} 0 4294967295 1", "Total (up + down) interval is zero"),  # the sum wraps, as in C
    ("{img} 0 4294967295 2", "Interval overflow"),
    ("{img} 0 1 1 12", "Invalid number of feature args"),
    ("{img} 0 1 1 2 drop_writes", "Invalid number of feature args"),
    ("{img} 0 1 1 x", "Invalid number of feature args"),
    ("{img} 0 1 1 1 frob", "Unrecognised flakey feature requested"),
    ("{img} 0 1 1 2 error_reads error_reads", "Feature error_reads duplicated"),
    ("{img} 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
    ("{img} 0 1 1 2 error_writes drop_writes", "Feature drop_writes conflicts with feature error_writes"),
    ("{img} 0 1 1 2 drop_writes error_writes", "Feature error_writes conflicts with feature drop_writes"),
    ("{img} 0 1 1 4 corrupt_bio_byte 1 r 0", "Feature corrupt_bio_byte requires 4 parameters"),
    ("{img} 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Invalid corrupt bio byte"),
    ("{img} 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"),
    ("{img} 0 1 1 5 corrupt_bio_byte 1 r 256 0", "Invalid corrupt value to write into bio byte (0-255)"),
    ("{img} 0 1 1 5 corrupt_bio_byte 1 r 0 x", "Invalid corrupt bio flags mask"),
    ("{img} 0 1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 r 0 0", "Feature corrupt_bio_byte duplicated"),
    ("{img} 0 1 1 1 random_read_corrupt", "Feature random_read_corrupt requires a parameter"),
    ("{img} 0 1 1 2 random_write_corrupt 1000000001", "Invalid random corrupt argument"),
    ("{img} 0 1 1 4 random_read_corrupt 1 random_read_corrupt 2", "Feature random_read_corrupt duplicated"),
    ("{img} 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0",
     "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"),
    ("{img} 0 1 1 3 error_writes random_write_corrupt 5",
     "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"),
    ("{img} 0 1 1 6 error_reads corrupt_bio_byte 1 r 0 0",
     "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set"),
    ("/nonexistent/disk.img 0 1 1", "Device lookup failed"),
])
def test_flakey_refuses_bad_arguments(mapper, images, args, sentence):
    (img,) = images(1, 8 * MiB)
    e = err(mapper.create, "f", f"0 {SECTORS} flakey " + args.format(img=img))
    assert f"table line 1: flakey: {sentence}" in e.message
    assert e.errno == (errno.ENOENT if "lookup" in sentence else errno.EINVAL)


@pytest.mark.parametrize("features, table", [
    ("", "2 error_reads error_writes"),
    (" 0", "2 error_reads error_writes"),
    (" 1 DROP_WRITES", "1 drop_writes"),
    (" 1 error_writes", "1 error_writes"),
    (" 2 error_writes error_reads", "2 error_reads error_writes"),
    (" 5 corrupt_bio_byte 32 r 1 0", "5 corrupt_bio_byte 32 r 1 0"),
    (" 6 error_reads corrupt_bio_byte 224 W 0 32", "6 error_reads corrupt_bio_byte 224 w 0 32"),
    (" 4 random_read_corrupt 10 random_write_corrupt 20", "4 random_read_corrupt 10 random_write_corrupt 20"),
    (" 2 random_read_corrupt 0", "2 error_reads error_writes"),
])
def test_flakey_table_lines_load_again(mapper, images, features, table):
    (img,) = images(1, 8 * MiB)
    mapper.create("f", f"0 {SECTORS - 8} flakey {img} 8 60 5{features}")
    assert round_trip(mapper, "f") == [[0, SECTORS - 8, "flakey", f"{img} 8 60 5 {table}"]]
    assert mapper.status("f") == [[0, SECTORS - 8, "flakey", ""]]


def test_flakey_up_and_down_intervals_follow_the_clock(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("f", f"0 {SECTORS} flakey {img} 0 2 3")
    dev = mapper.open_device("f", write=True)
    try:
        for elapsed, down in ((0, False), (1.99, False), (2, True), (4.99, True), (5, False),
                              (6.5, False), (7, True), (9.99, True), (10, False)):
            clock.now = 1000.0 + elapsed
            assert target_of(mapper, "f").is_down() is down, elapsed
            if down:  # no features: every read and write fails
                assert err(dev.read, 0, 512).errno == errno.EIO
                assert err(dev.write, 0, b"x" * 512).errno == errno.EIO
                assert err(dev.flush).errno == errno.EIO
                assert err(dev.discard, 0, 512).errno == errno.EIO
            else:
                assert dev.read(0, 512) == data[:512]
                dev.write(512, b"up" * 256)
                dev.flush()
        # the intervals count from the table load: a reload starts them again
        clock.now = 1000.0 + 2
        assert target_of(mapper, "f").is_down()
        mapper.load("f", f"0 {SECTORS} flakey {img} 0 2 3")
        mapper.resume("f")
        assert not target_of(mapper, "f").is_down()
        assert dev.read(0, 512) == data[:512]
    finally:
        dev.close()


def test_flakey_always_up_and_always_down(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    mapper.create("up", f"0 {SECTORS} flakey {img} 0 1 0")
    mapper.create("down", f"0 {SECTORS} flakey {img} 0 0 1")
    for seconds in (0, 1, 59, 3600):
        clock.now = 1000.0 + seconds
        assert not target_of(mapper, "up").is_down()
        assert target_of(mapper, "down").is_down()


def test_flakey_drop_writes_really_drops(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("f", f"0 {SECTORS} flakey {img} 0 10 10 1 drop_writes")
    dev = mapper.open_device("f", write=True)
    try:
        clock.now += 10  # down
        dev.write(4096, b"\xee" * 4096)  # succeeds ...
        dev.write_zeroes(0, 4096)
        dev.discard(0, 4096)
        dev.flush()
        assert on_disk(img, 0, 8192) == data[:8192]  # ... and nothing reached the disk
        assert dev.read(4096, 4096) == data[4096:8192]  # reads work while down
        clock.now += 10  # up again
        dev.write(4096, b"\xee" * 4096)
        assert on_disk(img, 4096, 4096) == b"\xee" * 4096
    finally:
        dev.close()


def test_flakey_error_writes_and_error_reads(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("w", f"0 {SECTORS} flakey {img} 0 10 10 1 error_writes")
    mapper.create("r", f"0 {SECTORS} flakey {img} 0 10 10 1 error_reads")
    w = mapper.open_device("w", write=True)
    r = mapper.open_device("r", write=True)
    try:
        clock.now += 10
        e = err(w.write, 0, b"x" * 512)
        assert e.errno == errno.EIO and "down interval" in e.message
        assert err(w.flush).errno == errno.EIO
        assert w.read(0, 512) == data[:512]
        assert err(r.read, 0, 512).errno == errno.EIO
        r.write(0, b"r" * 512)
        assert on_disk(img, 0, 512) == b"r" * 512
    finally:
        w.close()
        r.close()


def test_flakey_corrupt_bio_byte_on_reads(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("f", f"0 {SECTORS} flakey {img} 0 10 10 5 corrupt_bio_byte 32 r 1 0")
    dev = mapper.open_device("f", write=True)
    try:
        assert dev.read(4096, 4096) == data[4096:8192]  # up: untouched
        clock.now += 10
        got = dev.read(4096, 4096)
        expected = bytearray(data[4096:8192])
        expected[31] = 1
        assert got == bytes(expected)  # exactly the 32nd byte of the request
        assert dev.read(4096, 31) == data[4096:4096 + 31]  # a request shorter than 32 bytes is intact
        assert on_disk(img, 4096, 4096) == data[4096:8192]  # the disk is never touched
        dev.write(0, b"\x09" * 512)  # writes pass untouched
        assert on_disk(img, 0, 512) == b"\x09" * 512
    finally:
        dev.close()


def test_flakey_corrupt_bio_byte_on_writes_with_flags(mapper, images, clock):
    (img,) = images(1, 8 * MiB)
    mapper.create("any", f"0 {SECTORS // 2} flakey {img} 0 10 10 5 corrupt_bio_byte 224 w 0 0")
    mapper.create("fua", f"0 {SECTORS // 2} flakey {img} {SECTORS // 2} 10 10 "
                  f"5 corrupt_bio_byte 1 w 255 {REQ_FUA}")
    anydev = mapper.open_device("any", write=True)
    fuadev = mapper.open_device("fua", write=True)
    try:
        clock.now += 10
        payload = bytearray(b"\x42" * 4096)
        anydev.write(8192, payload)
        assert payload == b"\x42" * 4096  # the caller's buffer is not touched
        written = on_disk(img, 8192, 4096)
        assert written[223] == 0 and written[:223] + written[224:] == b"\x42" * 4095
        half = SECTORS // 2 * 512
        fuadev.write(0, b"\x10" * 512)  # no REQ_FUA: not corrupted
        assert on_disk(img, half, 512) == b"\x10" * 512
        fuadev.write(512, b"\x10" * 512, fua=True)
        assert on_disk(img, half + 512, 512) == b"\xff" + b"\x10" * 511
    finally:
        anydev.close()
        fuadev.close()


@pytest.mark.parametrize("direction", ["read", "write"])
def test_flakey_random_corruption_changes_at_most_one_byte(mapper, images, clock, direction):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("f", f"0 {SECTORS} flakey {img} 0 10 10 2 random_{direction}_corrupt 1000000000")
    target_of(mapper, "f").random = random.Random(7)
    dev = mapper.open_device("f", write=True)
    try:
        clock.now += 10
        changed = 0
        for i in range(64):
            offset = i * 4096
            if direction == "read":
                got = dev.read(offset, 4096)
            else:
                dev.write(offset, data[offset:offset + 4096])
                got = on_disk(img, offset, 4096)
            diff = sum(a != b for a, b in zip(got, data[offset:offset + 4096]))
            assert diff <= 1
            changed += diff
        assert changed > 32  # a random value equals the old byte 1 time in 256
        if direction == "read":
            assert on_disk(img, 0, 64 * 4096) == data[:64 * 4096]
    finally:
        dev.close()


# ---- delay -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, sentence", [
    ("{img} 0", "Requires exactly 3, 6 or 9 arguments"),
    ("{img} 0 1 {img}", "Requires exactly 3, 6 or 9 arguments"),
    ("{img} 0 1 {img} 0 1 {img} 0 1 x", "Requires exactly 3, 6 or 9 arguments"),
    ("{img} x 1", "Invalid device sector"),
    ("{img} 0 x", "Invalid delay"),
    ("{img} 0 -5", "Invalid delay"),
    ("{img} 0 4294967296", "Invalid delay"),
    ("{img} 0 1 {img} 0 y", "Invalid delay"),
    ("{img} 0 1 {img} 0 1 {img} z 1", "Invalid device sector"),
    ("/nonexistent/disk.img 0 1", "Device lookup failed"),
])
def test_delay_refuses_bad_arguments(mapper, images, args, sentence):
    (img,) = images(1, 8 * MiB)
    e = err(mapper.create, "l", f"0 {SECTORS} delay " + args.format(img=img))
    assert f"table line 1: delay: {sentence}" in e.message
    assert e.errno == (errno.ENOENT if "lookup" in sentence else errno.EINVAL)


def test_delay_table_lines_load_again(mapper, images):
    a, b, c = images(3, 8 * MiB)
    n = SECTORS - 8
    for args in (f"{a} 0 0", f"{a} 8 5 {b} 0 7", f"{a} 0 1 {b} 8 2 {c} 4 3"):
        mapper.create("l", f"0 {n} delay {args}")
        assert round_trip(mapper, "l") == [[0, n, "delay", args]]
        assert mapper.status("l") == [[0, n, "delay", "0 0 0"]]
        assert [d["name"] for d in mapper.deps("l")] == list(dict.fromkeys(args.split()[::3]))
        mapper.remove("l")


def test_delay_sends_writes_to_the_write_device(mapper, images):
    a, b = images(2, 8 * MiB)
    da, db = fill(a), fill(b)
    mapper.create("l", f"0 {SECTORS - 8} delay {a} 8 0 {b} 0 0")
    dev = mapper.open_device("l", write=True)
    try:
        assert dev.read(0, 512) == da[4096:4096 + 512]
        dev.write(0, b"w" * 512)
        assert on_disk(b, 0, 512) == b"w" * 512 and on_disk(a, 4096, 512) == da[4096:4096 + 512]
        dev.write_zeroes(512, 512)
        assert on_disk(b, 512, 512) == bytes(512) and db[512:1024] != bytes(512)
    finally:
        dev.close()


def test_short_delays_complete_by_themselves(mapper, images):
    (img,) = images(1, 8 * MiB)
    data = fill(img)
    mapper.create("l", f"0 {SECTORS} delay {img} 0 5")
    dev = mapper.open_device("l", write=True)
    try:
        dev.write(0, b"z" * 512)
        assert dev.read(0, 1024) == b"z" * 512 + data[512:1024]
        dev.flush()
        assert mapper.status("l")[0][3] == "0 0 0"
    finally:
        dev.close()


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn(*args))
        except DMError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_delayed_writes_are_held_without_blocking_reads_or_other_devices_and_suspend_flushes_them(
        mapper, images):
    img, other = images(2, 8 * MiB)
    data = fill(img)
    # reads undelayed, writes held for ten minutes: only the suspend can release them
    mapper.create("l", f"0 {SECTORS} delay {img} 0 0 {img} 0 600000")
    mapper.create("other", f"0 {SECTORS} linear {other} 0")
    dev = mapper.open_device("l", write=True)
    odev = mapper.open_device("other", write=True)
    writers = []
    try:
        writer, outcome = in_thread(dev.write, 0, b"held" * 128)
        writers.append(writer)
        assert wait_until(lambda: mapper.status("l")[0][3] == "0 1 0")
        assert dev.read(0, 512) == data[:512]  # the write is held, the read passes it
        odev.write(0, b"other" * 100)  # other devices are not blocked
        assert odev.read(0, 500) == b"other" * 100
        assert writer.is_alive() and on_disk(img, 0, 512) == data[:512]
        mapper.suspend("l")  # presuspend submits every held request; the drain waits for it
        assert not writer.is_alive() and outcome == [None]
        assert on_disk(img, 0, 512) == b"held" * 128
        assert mapper.status("l")[0][3] == "0 0 0"
        mapper.resume("l")  # delays again
        writer, outcome = in_thread(dev.write, 512, b"again" * 100 + bytes(12))
        writers.append(writer)
        assert wait_until(lambda: mapper.status("l")[0][3] == "0 1 0")
        assert writer.is_alive()
        mapper.suspend("l")
        assert outcome == [None] and on_disk(img, 512, 500) == b"again" * 100
        mapper.resume("l")
    finally:
        if any(w.is_alive() for w in writers):
            mapper.suspend("l")
        dev.close()
        odev.close()


def test_delayed_flush_goes_to_the_flush_device(mapper, images):
    a, b, c = images(3, 8 * MiB)
    mapper.create("l", f"0 {SECTORS} delay {a} 0 0 {b} 0 0 {c} 0 600000")
    target = target_of(mapper, "l")
    flushed: list[str] = []
    for group in (target.reads, target.writes, target.flushes):
        real_flush = group.dev.open.flush
        group.dev.open.flush = (lambda real=real_flush, name=group.dev.name: (flushed.append(name), real())[1])
    dev = mapper.open_device("l", write=True)
    try:
        flusher, outcome = in_thread(dev.flush)
        assert wait_until(lambda: mapper.status("l")[0][3] == "0 0 1")
        dev.write(0, b"not held" * 64)  # writes do not wait for the held flush
        assert on_disk(b, 0, 512) == b"not held" * 64
        assert flusher.is_alive() and flushed == []
        target.presuspend()  # as a suspend does first
        flusher.join(30)
        assert not flusher.is_alive() and outcome == [None]
        assert flushed == [c]
        target.resume()
    finally:
        target.presuspend()
        dev.close()


def test_removing_a_delay_device_releases_held_requests(mapper, images):
    (img,) = images(1, 8 * MiB)
    # writes held (reads are not: a resume's partition scan reads the device)
    mapper.create("l", f"0 {SECTORS} delay {img} 0 0 {img} 0 600000")
    dev = mapper.open_device("l", write=True)
    writer, outcome = in_thread(dev.write, 0, b"w" * 512)
    assert wait_until(lambda: mapper.status("l")[0][3] == "0 1 0")
    dev.close()
    mapper.remove("l")
    writer.join(30)
    assert not writer.is_alive() and len(outcome) == 1
