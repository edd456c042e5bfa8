"""Table language, the kernel's load rules, target constructors, striping and splitting."""

import errno
import os
import random

import pytest

from userdm.dm.table import parse_table, split_args
from userdm.errors import DMError


def test_split_args_backslash_escapes():
    assert split_args(r"a b\ c  d\\e") == ["a", "b c", "d\\e"]
    assert split_args("  ") == []


def test_parse_skips_comments_and_blank_lines():
    lines = parse_table("# a comment\n\n0 10 zero\n10 5 error  \n")
    assert [(l.lineno, l.start, l.length, l.type) for l in lines] == [(3, 0, 10, "zero"), (4, 10, 5, "error")]


@pytest.mark.parametrize("table, message", [
    ("", "table is empty"),
    ("0 10", "table line 1: '0 10' needs at least"),
    ("x 10 zero", "table line 1: invalid start sector 'x'"),
    ("0 -5 zero", "table line 1: invalid length '-5'"),
    ("8 10 zero", "table line 1: first target starts at sector 8, not 0"),
    ("0 10 zero\n20 10 zero", "table line 2: gap at sector 20 (previous target ends at 10)"),
    ("0 10 zero\n5 10 zero", "table line 2: overlap at sector 5 (previous target ends at 10)"),
    ("0 0 zero", "table line 1: zero-length target"),
    ("0 10 frobnicate", "table line 1: unknown target type 'frobnicate'"),
    ("0 10 zero 1", "table line 1: zero: No arguments required"),
    ("0 10 linear /tmp", "table line 1: linear: Invalid argument count"),
    (f"0 {1 << 60} zero", "table line 1: too large device"),
])
def test_malformed_tables_name_the_line(mapper, table, message):
    with pytest.raises(DMError) as exc:
        mapper.create("bad", table)
    assert exc.value.errno == errno.EINVAL
    assert message in str(exc.value)
    assert mapper.list() == []  # the failed create was reverted


def test_linear_constructor_errors(mapper, images):
    (img,) = images(1, 1 << 20)
    cases = {
        f"0 10 linear {img} x": "Invalid device sector",
        f"0 10 linear {img} -1": "Invalid device sector",
        f"0 4096 linear {img} 0": "too small for target",
        "0 10 linear /nonexistent 0": "Device lookup failed",
        "0 10 linear relative 0": "Device lookup failed",
    }
    for table, message in cases.items():
        with pytest.raises(DMError) as exc:
            mapper.create("bad", table)
        assert message in str(exc.value), table
        assert str(exc.value).startswith("E")


def test_striped_constructor_errors(mapper, images):
    a, b = images(2, 1 << 20)
    cases = {
        "0 16 striped": "Not enough arguments",
        f"0 16 striped 0 8 {a} 0": "Invalid stripe count",
        f"0 16 striped 2 0 {a} 0 {b} 0": "Invalid chunk_size",
        f"0 15 striped 2 8 {a} 0 {b} 0": "Target length not divisible by number of stripes",
        f"0 16 striped 2 3 {a} 0 {b} 0": "Target length not divisible by chunk size",
        f"0 16 striped 2 8 {a} 0": "Not enough destinations specified",
        f"0 16 striped 2 8 {a} 0 {b} z": "Couldn't parse stripe destination",
    }
    for table, message in cases.items():
        with pytest.raises(DMError) as exc:
            mapper.create("bad", table)
        assert message in str(exc.value), table


def test_striped_data_lands_where_the_kernel_puts_it(mapper, images):
    """Every 512-byte sector written through the device is found in the file where
    dm-stripe's formula puts it, read back from the files directly."""
    paths = images(3, 4 << 20)
    chunk, stripes, offsets = 16, 3, [0, 128, 2048]
    length = stripes * chunk * 100  # sectors
    legs = " ".join(f"{p} {o}" for p, o in zip(paths, offsets))
    mapper.create("st", f"0 {length} striped {stripes} {chunk} {legs}")
    dev = mapper.open_device("st", write=True)
    data = bytearray(os.urandom(length * 512))
    rng = random.Random(1)
    pos = 0
    while pos < len(data):  # write in requests of random sizes that cross chunk boundaries
        n = min(rng.randrange(512, 40000), len(data) - pos)
        dev.write(pos, memoryview(data)[pos:pos + n])
        pos += n
    dev.flush()
    assert dev.read(0, len(data)) == data
    dev.close()
    files = [open(p, "rb").read() for p in paths]
    for sector in range(length):
        chunk_no, in_chunk = divmod(sector, chunk)
        row, stripe = divmod(chunk_no, stripes)
        dev_sector = offsets[stripe] + row * chunk + in_chunk
        assert files[stripe][dev_sector * 512:(dev_sector + 1) * 512] == data[sector * 512:(sector + 1) * 512]
    assert mapper.table("st") == [[0, length, "striped", f"3 16 {legs}"]]
    assert mapper.status("st") == [[0, length, "striped", f"3 {' '.join(paths)} 1 AAA"]]


def test_io_spanning_targets_is_split(mapper, images):
    a, b = images(2, 1 << 20)
    mapper.create("cat", f"0 8 linear {a} 100\n8 8 zero\n16 8 linear {b} 0\n24 8 error")
    dev = mapper.open_device("cat", write=True)
    dev.write(0, b"\x11" * 12 * 512)          # linear then zero (dropped)
    dev.write(16 * 512 - 100, b"\x22" * 200)  # zero then linear
    buf = dev.read(0, 24 * 512)
    assert buf[:8 * 512] == b"\x11" * 8 * 512
    assert buf[8 * 512:16 * 512] == bytes(8 * 512)
    assert buf[16 * 512:16 * 512 + 100] == b"\x22" * 100
    with open(a, "rb") as f:
        f.seek(100 * 512)
        assert f.read(8 * 512) == b"\x11" * 8 * 512
    with pytest.raises(DMError) as exc:
        dev.read(23 * 512, 1024)              # reaches the error target
    assert exc.value.errno == errno.EIO
    dev.close()


def test_many_targets_lookup(mapper, images):
    (img,) = images(1, 8 << 20)
    n = 5000
    table = "\n".join(f"{i * 2} 2 linear {img} {(n - 1 - i) * 2}" for i in range(n))
    mapper.create("many", table)
    dev = mapper.open_device("many", write=True)
    for i in (0, 1, 2500, n - 1):
        dev.write(i * 1024, i.to_bytes(4, "little") * 256)
    for i in (0, 1, 2500, n - 1):
        with open(img, "rb") as f:
            f.seek((n - 1 - i) * 1024)
            assert f.read(1024) == i.to_bytes(4, "little") * 256
    assert mapper.info("many")["target_count"] == n
    assert len(mapper.deps("many")) == 1  # one device, opened once
    dev.close()


def test_table_lines_are_split_in_chunks_exactly_as_splitlines(monkeypatch):
    """parse_table splits a big table a chunk at a time (so the GIL is not held for one long
    call); every kind of line ending gives the same lines as str.splitlines."""
    import random

    from userdm.dm import table as table_module
    monkeypatch.setattr(table_module, "_LINES_CHUNK", 7)
    rng = random.Random(11)
    for _ in range(3000):
        text = "".join(rng.choice(["a", "b", " ", "\n", "\r", "\r\n", "\x0b", "\x1c", "\u2028", "\x85"])
                       for _ in range(rng.randint(0, 60)))
        assert list(table_module._lines(text)) == text.splitlines(), repr(text)


def test_error_target_with_a_device_as_linux_6_10(mapper, images):
    """error 1.7: `<device> <offset>` is held (deps shows it) and I/O still fails; other
    argument counts are ignored, as the kernel's io_err_ctr ignores them."""
    (a,) = images(1, 1 << 20)
    mapper.create("e2", f"0 8 error {a} 16")
    assert [d["name"] for d in mapper.deps("e2")] == [a]
    assert mapper.table("e2") == [[0, 8, "error", ""]]
    with mapper.open_device("e2", write=False) as dev:
        with pytest.raises(DMError) as exc:
            dev.read(0, 512)
        assert exc.value.errno == errno.EIO
    mapper.create("e1", "0 8 error ignored")
    mapper.create("e3", "0 8 error a b c")
    assert mapper.deps("e1") == [] and mapper.deps("e3") == []
    for table, message in [(f"0 8 error {a} x", "Invalid device sector"),
                           ("0 8 error /nonexistent 0", "Device lookup failed")]:
        with pytest.raises(DMError, match=f"table line 1: error: {message}"):
            mapper.create("bad", table)
    assert "bad" not in [d["name"] for d in mapper.list()]


def test_device_areas_are_checked_at_resume_not_at_load(mapper, images):
    """The kernel checks that each target's area lies on its device (device_area_is_invalid,
    from dm_calculate_queue_limits) when the table is swapped in at resume: a table may load
    before its device grows; a resume that finds it too small fails EINVAL with the kernel's
    message, leaves the device suspended and destroys the table (do_resume), and a create
    that finds it too small is reverted."""
    (img,) = images(1, 1 << 20)                      # 2048 sectors
    mapper.create("vol", f"0 2048 linear {img} 0")
    mapper.load("vol", f"0 2048 linear {img} 0\n2048 2048 linear {img} 1024")
    assert mapper.info("vol")["inactive"]
    with pytest.raises(DMError) as exc:
        mapper.resume("vol")
    assert exc.value.errno == errno.EINVAL
    assert exc.value.message == (f"vol: {img} too small for target: start=1024, len=2048, "
                                 "dev_size=2048 (table line 2)")
    info = mapper.info("vol")
    assert (info["suspended"], info["live"], info["inactive"]) == (True, True, False)
    assert mapper.table("vol") == [[0, 2048, "linear", f"{img} 0"]]
    mapper.resume("vol")                             # the old live table carries on
    # the device grows between load and resume (a mapped device, reloaded): the table fits then
    (big,) = images(1, 4 << 20)
    mapper.create("low", f"0 2048 linear {big} 0")
    mapper.load("vol", "0 4096 linear /dev/mapper/low 0")
    mapper.load("low", f"0 4096 linear {big} 0")
    mapper.resume("low")
    mapper.resume("vol")
    assert mapper.info("vol")["size"] == 2 << 20
    # an area starting at the device's end, and a create: refused and reverted
    for table in (f"0 8 linear {img} 2048", f"0 4096 striped 2 8 {img} 0 {img} 2048"):
        with pytest.raises(DMError, match="too small for target"):
            mapper.create("bad", table)
        assert [d["name"] for d in mapper.list()] == ["low", "vol"]


def test_areas_must_be_aligned_to_the_devices_logical_block_size(mapper, tmp_path):
    """A device with 4 KiB logical blocks (crypt with sector_size:4096) under a linear target
    that starts or ends inside a block: refused at resume with the kernel's message."""
    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    key = "00" * 64
    mapper.create("c", f"0 2048 crypt aes-xts-plain64 {key} 0 {img} 0 1 sector_size:4096")
    for table, message in [("0 8 linear /dev/mapper/c 1", "start=1 not aligned to h/w logical block size 4096"),
                           ("0 4 linear /dev/mapper/c 0", "len=4 not aligned to h/w logical block size 4096")]:
        with pytest.raises(DMError, match=message):
            mapper.create("top", table)
    mapper.create("top", "0 8 linear /dev/mapper/c 8")
    assert mapper.info("top")["live"]


def test_a_resume_refused_at_the_swap_is_saved_as_it_left_the_device(daemon, images):
    """After `resume` refused a table too small for its device, the daemon saved what the
    kernel leaves: the old live table, no inactive table, the device suspended; a restart
    brings back exactly that."""
    import json
    (img,) = images(1, 1 << 20)
    run = daemon.run
    run("create", "vol", "--table", f"0 2048 linear {img} 0")
    run("load", "vol", "--table", f"0 4096 linear {img} 0")
    res = run("resume", "vol", check=False)
    assert res.returncode == 1 and res.stdout == ""
    assert f"resume: EINVAL: vol: {img} too small for target: start=0, len=4096, dev_size=2048" in res.stderr

    def state():
        info = json.loads(run("info", "--json", "vol").stdout)[0]
        return info["suspended"], info["live"], info["inactive"], run("table", "vol").stdout
    assert state() == (True, True, False, f"0 2048 linear {img} 0\n")
    daemon.stop()
    daemon.start()
    assert state() == (True, True, False, f"0 2048 linear {img} 0\n")
    run("resume", "vol")
    assert state()[0] is False
