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
    ("0 10 error x", "table line 1: error: Invalid argument count"),
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
