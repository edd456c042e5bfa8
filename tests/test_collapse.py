"""Collapsed remapping (`userdm.dm.collapse`, issue 18 goal 2): a stack of remap-only targets
is one lookup, and stays correct when anything below it changes: suspend holds the stack's
I/O, a new table below is used at once, and fio's verify over eight NBD connections finds
every block where it wrote it. Writers through a stack while an interposer comes and goes
below it: tests/test_interposer.py."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import threading

import pytest

from userdm.dm import collapse
from userdm.errors import DMError
from userdm.export.nbd.server import NBDServer

MiB = 1 << 20
SIZE = 8 * MiB
SECTORS = SIZE // 512
CHUNK = 64 * 1024        # the striped device's chunk (128 sectors)


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def stack(mapper, images):
    """top -> l2 -> l1 (linear) -> striped over two files; returns the two files."""
    a, b = images(2, SIZE // 2)
    mapper.create("striped", f"0 {SECTORS} striped 2 128 {a} 0 {b} 0")
    mapper.create("l1", f"0 {SECTORS} linear /dev/mapper/striped 0")
    mapper.create("l2", f"0 {SECTORS} linear /dev/mapper/l1 0")
    mapper.create("top", f"0 {SECTORS} linear /dev/mapper/l2 0")
    return a, b


def sinks(mapper, name: str) -> list:
    """The sinks of the device's current Flat (after one request built it)."""
    md = mapper.device(name)
    md.readinto(0, memoryview(bytearray(512)))
    flat = md._flat
    return [seg[2] for seg in flat.segments] if flat is not None else []


def test_a_stack_is_one_lookup_and_lands_where_the_stripes_say(mapper, stack):
    a, b = stack
    assert collapse.ENABLED
    assert [type(s).__name__ for s in sinks(mapper, "top")] == ["TargetSink"]
    top = mapper.open_device("top", write=True)
    for chunk in range(6):                     # chunk k is on stripe k % 2, row k // 2
        top.write(chunk * CHUNK + 4096, bytes([chunk + 1]) * 4096)
    top.write(CHUNK - 2048, b"x" * 4096)       # over two chunks: the striped target splits it
    for chunk in range(6):
        path = (a, b)[chunk % 2]
        assert read_file(path, chunk // 2 * CHUNK + 4096, 4096) == bytes([chunk + 1]) * 4096
        assert top.read(chunk * CHUNK + 4096, 4096) == bytes([chunk + 1]) * 4096
    assert read_file(a, CHUNK - 2048, 2048) == b"x" * 2048
    assert read_file(b, 0, 2048) == b"x" * 2048
    assert top.read(CHUNK - 2048, 4096) == b"x" * 4096
    top.close()


def test_a_read_only_table_above_refuses_writes_through_the_collapsed_path(mapper, images):
    (img,) = images()
    mapper.create("low", f"0 {SECTORS} linear {img} 0")
    mapper.create("ro", f"0 {SECTORS} linear /dev/mapper/low 0", readonly=True)
    assert sinks(mapper, "ro")
    with pytest.raises(DMError) as exc:
        mapper.device("ro").write(0, b"n" * 512)
    assert exc.value.errno == errno.EPERM
    assert read_file(img, 0, 512) == bytes(512)


def test_suspend_below_holds_the_stacks_io_until_resume(mapper, stack):
    top = mapper.open_device("top", write=True)
    top.write(0, b"early")
    assert sinks(mapper, "top")[0] is not None          # collapsed through l1
    mapper.suspend("l1")
    done = threading.Event()
    result = {}

    def writer() -> None:
        top.write(8192, b"late")
        result["data"] = top.read(8192, 4)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert not done.wait(0.3)      # held at l1, not sent past it to the files
        assert read_file(stack[0], 8192, 4) == bytes(4)
    finally:
        mapper.resume("l1")
        t.join(10)
    assert done.is_set() and result["data"] == b"late"
    assert sinks(mapper, "top")[0] is not None          # collapsed again after the resume
    top.close()


def test_a_new_table_below_is_used_at_once(mapper, images):
    old, new = images(2)
    with open(old, "r+b") as f:
        f.write(b"O" * 4096)
    with open(new, "r+b") as f:
        f.write(b"N" * 4096)
    mapper.create("low", f"0 {SECTORS} linear {old} 0")
    mapper.create("mid", f"0 {SECTORS} linear /dev/mapper/low 0")
    mapper.create("top", f"0 {SECTORS} linear /dev/mapper/mid 0")
    top = mapper.open_device("top", write=True)
    assert top.read(0, 4) == b"OOOO"
    mapper.load("low", f"0 {SECTORS} linear {new} 0")
    assert top.read(0, 4) == b"OOOO"       # a load alone changes nothing
    mapper.resume("low")
    assert top.read(0, 4) == b"NNNN"
    top.write(4096, b"w" * 4096)
    assert read_file(new, 4096, 4096) == b"w" * 4096
    assert read_file(old, 4096, 4096) == bytes(4096)
    mapper.load("mid", f"0 {SECTORS // 2} linear /dev/mapper/low {SECTORS // 2}\n"
                       f"{SECTORS // 2} {SECTORS // 2} linear /dev/mapper/low 0")
    mapper.resume("mid")
    assert top.read(SIZE // 2, 4) == b"NNNN"
    top.close()


def test_fio_verify_eight_connections_through_a_collapsed_stack(mapper, stack, tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    sock = tmp_path / "nbd.sock"
    srv = NBDServer(mapper, unix_path=sock)
    srv.start()
    try:
        out = tmp_path / "fio.json"
        proc = subprocess.run(
            ["fio", "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={sock}",
             "--rw=randwrite", "--bs=4k", "--iodepth=8", "--numjobs=8", "--size=512k",
             "--offset_increment=1M", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
             "--group_reporting", f"--output={out}", "--output-format=json"],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        job = json.loads(out.read_text())["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 8 * 512 * 1024
        assert sinks(mapper, "top")[0] is not None
    finally:
        srv.stop()


def test_a_big_table_of_uneven_segments_finds_every_block(mapper, images):
    """More segments than a Flat lists (one file, `_one_file`, with its bucket index): segments
    of 1 to 40 sectors laid out over the file in a shuffled order; every sector read through
    the device, and a write at each segment's first and last sector, lands where the table
    says."""
    import random
    rng = random.Random(5)
    lengths = [rng.choice((1, 1, 2, 3, 8, 40)) for _ in range(collapse.MAX_SEGMENTS + 500)]
    total = sum(lengths)
    (img,) = images(1, total * 512)
    with open(img, "r+b") as f:      # sector k of the file holds k
        f.write(b"".join(k.to_bytes(8, "little") * 64 for k in range(total)))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    place, at = {}, 0
    for j in order:                  # the file holds the segments in a shuffled order
        place[j] = at
        at += lengths[j]
    lines, expect, start = [], [], 0
    for i, n in enumerate(lengths):
        lines.append(f"{start} {n} linear {img} {place[i]}\n")
        expect.extend(range(place[i], place[i] + n))
        start += n
    mapper.create("big", "".join(lines))
    md = mapper.device("big")
    buf = bytearray(512)
    md.readinto(0, memoryview(buf))
    assert isinstance(md._flat, collapse.Flat) and md._flat.segments is None    # the big table's Flat
    for k in range(total):
        md.readinto(k * 512, memoryview(buf))
        assert int.from_bytes(buf[:8], "little") == expect[k], k
    start = 0
    for n in lengths:
        for k in {start, start + n - 1}:
            md.write(k * 512, (10 ** 9 + k).to_bytes(8, "little") * 64)
            assert int.from_bytes(read_file(img, expect[k] * 512, 8), "little") == 10 ** 9 + k
        start += n
