"""snapshot-origin, snapshot and snapshot-merge: copy-on-write semantics, the kernel's on-disk
exception store (parsed here with struct), status and table lines, refusals, restart and
SIGKILL of the daemon, merging while the origin is read and written, and seed 003 (an origin
without snapshots passes a write through whole)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import struct
import threading
from pathlib import Path

import pytest
from conftest import wait_until

from userdm.block.device import BlockDevice
from userdm.block.file import FileDisk
from userdm.block.memory import MemoryDisk
from userdm.errors import DMError
from userdm.targets import snapshot

MiB = 1 << 20
ORIGIN_SECTORS = 16384          # 8 MiB
CHUNK = 8                        # sectors
CB = CHUNK * 512                 # chunk bytes
SNAP_MAGIC = 0x70416E53


@pytest.fixture
def disks(tmp_path):
    """An 8 MiB origin full of random data and a 4 MiB empty COW file (make more with cow())."""
    origin = tmp_path / "origin.img"
    origin.write_bytes(random.Random(1).randbytes(ORIGIN_SECTORS * 512))

    def cow(name: str = "cow.img", size: int = 4 * MiB) -> str:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)
    return str(origin), cow


def contents(path: str) -> bytes:
    return Path(path).read_bytes()


def chunk_sums(data: bytes, cb: int = CB) -> list[str]:
    return [hashlib.sha256(data[i:i + cb]).hexdigest() for i in range(0, len(data), cb)]


def read_all(mapper, name: str) -> bytes:
    with mapper.open_device(name, write=False) as dev:
        return dev.read(0, dev.size)


def write(mapper, name: str, offset: int, data: bytes) -> None:
    with mapper.open_device(name, write=True) as dev:
        dev.write(offset, data)


def status(mapper, name: str) -> str:
    return mapper.status(name)[0][3]


def usage(mapper, name: str) -> tuple[int, int, int]:
    used, meta = status(mapper, name).split()
    allocated, total = used.split("/")
    return int(allocated), int(total), int(meta)


def parse_cow(path: str) -> tuple[tuple[int, int, int, int], list[tuple[int, int]]]:
    """The kernel's persistent format: header, then areas of {le64 old, le64 new} at chunk
    1 + (per_area + 1) * i, each list ending at the first new_chunk == 0."""
    raw = contents(path)
    header = struct.unpack_from("<IIII", raw, 0)
    chunk_bytes = header[3] * 512
    per_area = chunk_bytes // 16
    entries: list[tuple[int, int]] = []
    area = 0
    while True:
        at = (1 + (per_area + 1) * area) * chunk_bytes
        full = True
        for old, new in struct.iter_unpack("<QQ", raw[at:at + chunk_bytes]):
            if new == 0:
                full = False
                break
            entries.append((old, new))
        if not full:
            return header, entries
        area += 1


# ---- copy-on-write --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["P", "N"])
def test_origin_writes_leave_the_snapshot_as_it_was(mapper, disks, kind):
    origin, cow = disks
    original = contents(origin)
    before = chunk_sums(original)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow()} {kind} {CHUNK}")
    rng = random.Random(2)
    expected_origin = bytearray(original)
    for _ in range(40):  # unaligned writes, some across chunk boundaries
        offset, data = rng.randrange(0, ORIGIN_SECTORS * 512 - 20000), rng.randbytes(rng.randrange(1, 20000))
        write(mapper, "base", offset, data)
        expected_origin[offset:offset + len(data)] = data
    assert chunk_sums(read_all(mapper, "snap")) == before
    assert read_all(mapper, "base") == expected_origin == contents(origin)
    allocated, total, meta = usage(mapper, "snap")
    assert total == 4 * MiB // 512 and allocated > (meta if kind == "P" else 0)


@pytest.mark.parametrize("kind", ["P", "N"])
def test_snapshot_writes_do_not_touch_the_origin(mapper, disks, kind):
    origin, cow = disks
    original = contents(origin)
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow()} {kind} {CHUNK}")
    expected = bytearray(original)
    for offset, size in [(0, CB), (100, 50), (CB * 7 - 10, 30), (MiB, 3 * CB + 512)]:
        data = os.urandom(size)
        write(mapper, "snap", offset, data)
        expected[offset:offset + size] = data
    assert read_all(mapper, "snap") == expected
    assert contents(origin) == original


def test_many_snapshots_of_one_origin_each_keep_their_moment(mapper, disks):
    origin, cow = disks
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    moments = []
    for i, (kind, chunk) in enumerate([("P", 8), ("N", 16), ("PO", 32), ("P", 128), ("N", 8)]):
        mapper.suspend("base")  # as lvcreate does: no origin write is half done
        mapper.create(f"s{i}", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow(f'c{i}.img')} {kind} {chunk}")
        mapper.resume("base")
        moments.append(chunk_sums(read_all(mapper, "base")))
        rng = random.Random(i)
        for _ in range(10):
            write(mapper, "base", rng.randrange(0, ORIGIN_SECTORS * 512 - 9000), rng.randbytes(9000))
    assert len(snapshot.snapshots_of(mapper.device("base").live.targets[0].dev.device)) == 5
    for i, sums in enumerate(moments):
        assert chunk_sums(read_all(mapper, f"s{i}")) == sums
    for i in range(5):
        mapper.remove(f"s{i}")
    mapper.remove("base")
    assert snapshot._origins == {}


def test_concurrent_writes_to_one_chunk_copy_it_once(mapper, disks):
    origin, cow = disks
    cow_path = cow()
    original = contents(origin)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_path} P {CHUNK}")
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        with mapper.open_device("base", write=True) as dev:
            barrier.wait()
            for chunk in (5, 6, 5, 9):
                dev.write(chunk * CB + i * 512, bytes([i + 1]) * 512)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _header, entries = parse_cow(cow_path)
    assert sorted(old for old, _new in entries) == [5, 6, 9]
    assert read_all(mapper, "snap") == original
    data = read_all(mapper, "base")
    assert all(data[5 * CB + i * 512:5 * CB + (i + 1) * 512] == bytes([i + 1]) * 512 for i in range(8))


def test_snapshot_reads_racing_origin_writes_always_see_the_old_data(mapper, disks):
    origin, cow = disks
    original = contents(origin)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow()} N {CHUNK}")
    stop = threading.Event()
    bad: list[int] = []
    passes = [0]

    def reader() -> None:
        with mapper.open_device("snap", write=False) as dev:
            while not stop.is_set():
                for offset in range(0, 2 * MiB, 64 * 1024):
                    if dev.read(offset, 64 * 1024) != original[offset:offset + 64 * 1024]:
                        bad.append(offset)
                passes[0] += 1
    t = threading.Thread(target=reader)
    t.start()
    try:
        with mapper.open_device("base", write=True) as dev:
            for chunk in random.Random(3).sample(range(2 * MiB // CB), 300):
                dev.write(chunk * CB, b"\xee" * CB)
        start = passes[0]
        assert wait_until(lambda: passes[0] > start + 1)
    finally:
        stop.set()
        t.join()
    assert bad == []


# ---- on-disk format, status and table --------------------------------------------------------

def test_on_disk_layout_is_the_kernels(mapper, disks):
    origin, cow = disks
    cow_path = cow()
    original = contents(origin)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_path} P {CHUNK}")
    header, entries = parse_cow(cow_path)
    assert header == (SNAP_MAGIC, 1, 1, CHUNK) and entries == []
    assert contents(cow_path)[:4] == b"SnAp"
    for chunk in (0, 5, 3):
        write(mapper, "base", chunk * CB + 1, b"new")
    _header, entries = parse_cow(cow_path)
    assert entries == [(0, 2), (5, 3), (3, 4)]
    raw = contents(cow_path)
    for old, new in entries:
        assert raw[new * CB:(new + 1) * CB] == original[old * CB:(old + 1) * CB]
    assert status(mapper, "snap") == f"{5 * CHUNK}/{4 * MiB // 512} {2 * CHUNK}"
    # fill area 0 (256 exceptions of 16 bytes in a 4 KiB chunk) and go on into area 1
    with mapper.open_device("base", write=True) as dev:
        for chunk in range(10, 310):
            dev.write(chunk * CB, b"x")
    _header, entries = parse_cow(cow_path)
    per_area = CB // 16
    assert len(entries) == 303
    assert entries[255] == (262, 257)      # the last data chunk before area 1 (chunk 258)
    assert entries[256] == (263, 259)      # allocation skips the metadata chunk
    area1 = contents(cow_path)[(1 + per_area + 1) * CB:(2 + per_area + 1) * CB]
    assert struct.unpack_from("<QQ", area1, 0) == (263, 259)
    assert status(mapper, "snap") == f"{(259 + 47) * CHUNK}/{4 * MiB // 512} {3 * CHUNK}"
    # the snapshot reads the same after a fresh load of the store
    mapper.remove("snap")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_path} P {CHUNK}")
    assert read_all(mapper, "snap") == original
    assert status(mapper, "snap") == f"{(259 + 47) * CHUNK}/{4 * MiB // 512} {3 * CHUNK}"


def test_status_and_table_lines(mapper, disks):
    origin, cow = disks
    c1, c2, c3, c4 = cow("c1"), cow("c2"), cow("c3"), cow("c4")
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    assert mapper.status("base") == [[0, ORIGIN_SECTORS, "snapshot-origin", ""]]
    assert mapper.table("base") == [[0, ORIGIN_SECTORS, "snapshot-origin", origin]]
    mapper.create("p", f"0 {ORIGIN_SECTORS} snapshot {origin} {c1} p 8")
    mapper.create("po", f"0 {ORIGIN_SECTORS} snapshot {origin} {c2} Po 16 2 discard_zeroes_cow "
                  "DISCARD_PASSDOWN_ORIGIN")
    mapper.create("n", f"0 {ORIGIN_SECTORS} snapshot {origin} {c3} n 8 1 discard_zeroes_cow")
    mapper.create("dflt", f"0 {ORIGIN_SECTORS} snapshot {origin} {c4} P 0")
    assert mapper.table("p")[0][3] == f"{origin} {c1} P 8"
    assert mapper.table("po")[0][3] == f"{origin} {c2} PO 16 2 discard_zeroes_cow discard_passdown_origin"
    assert mapper.table("n")[0][3] == f"{origin} {c3} N 8 1 discard_zeroes_cow"
    assert mapper.table("dflt")[0][3] == f"{origin} {c4} P 32"
    total = 4 * MiB // 512
    assert [status(mapper, n) for n in ("p", "po", "n", "dflt")] == [
        f"16/{total} 16", f"32/{total} 32", f"0/{total} 0", f"64/{total} 64"]
    write(mapper, "base", 0, b"z")
    assert [status(mapper, n) for n in ("p", "po", "n", "dflt")] == [
        f"24/{total} 16", f"48/{total} 32", f"8/{total} 0", f"96/{total} 64"]
    # an existing header's chunk size wins over the table's
    mapper.remove("p")
    mapper.create("p", f"0 {ORIGIN_SECTORS} snapshot {origin} {c1} P 64")
    assert mapper.table("p")[0][3] == f"{origin} {c1} P 8"
    assert status(mapper, "p") == f"24/{total} 16"


def test_discard_zeroes_cow(mapper, disks):
    origin, cow = disks
    original = contents(origin)
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow()} P 8 1 discard_zeroes_cow")
    write(mapper, "snap", 0, b"\x55" * (2 * CB))
    with mapper.open_device("snap", write=True) as dev:
        dev.discard(0, CB)            # an exception covered whole: zeroed
        dev.discard(4 * CB, CB)       # no exception: nothing to do
        assert dev.read(0, 2 * CB) == bytes(CB) + b"\x55" * CB
        assert dev.read(4 * CB, CB) == original[4 * CB:5 * CB]
    assert contents(origin) == original


# ---- overflow ----------------------------------------------------------------------------------

def test_overflow_invalidates_the_snapshot_and_the_origin_carries_on(mapper, disks):
    origin, cow = disks
    cow_path = cow(size=8 * CB)   # header, area 0, 6 data chunks
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_path} P {CHUNK}")
    event = mapper.info("snap")["event_nr"]
    expected = bytearray(contents(origin))
    for chunk in range(10):
        write(mapper, "base", chunk * CB, bytes([chunk]) * CB)
        expected[chunk * CB:(chunk + 1) * CB] = bytes([chunk]) * CB
    assert status(mapper, "snap") == "Invalid"
    assert mapper.info("snap")["event_nr"] > event
    with mapper.open_device("snap", write=True) as dev:
        for op in (lambda: dev.read(0, 512), lambda: dev.write(0, b"x" * 512)):
            with pytest.raises(DMError) as exc:
                op()
            assert exc.value.errno == errno.EIO and "invalid" in exc.value.message
    assert read_all(mapper, "base") == expected
    header, _entries = parse_cow(cow_path)
    assert header == (SNAP_MAGIC, 0, 1, CHUNK)   # the kernel writes valid = 0
    mapper.remove("snap")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_path} P {CHUNK}")
    assert status(mapper, "snap") == "Invalid"   # an invalid snapshot stays invalid


def test_overflow_by_snapshot_writes_with_po_keeps_it_readable(mapper, disks):
    origin, cow = disks
    original = contents(origin)
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow(size=8 * CB)} PO {CHUNK}")
    mapper.create("snapn", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow('n.img', size=4 * CB)} N {CHUNK}")
    for chunk in range(6):
        write(mapper, "snap", chunk * CB, b"\x01" * CB)
    with pytest.raises(DMError) as exc:
        write(mapper, "snap", 6 * CB, b"\x01" * CB)
    assert exc.value.errno == errno.EIO
    assert status(mapper, "snap") == "Overflow"
    assert read_all(mapper, "snap") == b"\x01" * 6 * CB + original[6 * CB:]
    with pytest.raises(DMError):
        write(mapper, "snap", 0, b"\x02")
    for chunk in range(4):
        write(mapper, "snapn", chunk * CB, b"\x03" * 100)
    with pytest.raises(DMError):
        write(mapper, "snapn", 4 * CB, b"\x03")
    assert status(mapper, "snapn") == "Invalid"     # without O, a full snapshot is invalid


# ---- refusals ------------------------------------------------------------------------------------

@pytest.fixture
def mem4k(mapper):
    """`mem4k://NAME`: an 8 MiB memory disk with 4096-byte logical blocks (a test instrument)."""
    mapper.backing.register_scheme("mem4k", lambda ref: MemoryDisk(8 * MiB, name=ref, logical_block_size=4096))


def test_bad_arguments_are_refused(mapper, disks, mem4k, tmp_path):
    origin, cow = disks
    c = cow()
    bad_magic = cow("bad.img")
    with open(bad_magic, "r+b") as f:
        f.write(b"NOPE")
    bad_version = cow("v2.img")
    with open(bad_version, "r+b") as f:
        f.write(struct.pack("<IIII", SNAP_MAGIC, 1, 2, 8))
    n = ORIGIN_SECTORS
    cases = [
        (f"snapshot {origin} {c} P", errno.EINVAL, "requires 4 or more arguments"),
        (f"snapshot {origin} {c} X 8", errno.EINVAL, "Exception store type is not P or N"),
        (f"snapshot {origin} {c} P eight", errno.EINVAL, "Invalid chunk size"),
        (f"snapshot {origin} {c} P 12", errno.EINVAL, "Chunk size is not a power of 2: 12"),
        (f"snapshot {origin} mem4k://c P 4", errno.EINVAL, "Chunk size is not a multiple of device blocksize"),
        (f"snapshot {origin} {c} P 8388608", errno.EINVAL, "Chunk size is too high"),
        (f"snapshot {origin} {c} PX 8", errno.EINVAL, "Unsupported persistent store option"),
        (f"snapshot {origin} {c} N 0", errno.EINVAL, "Chunk size not set"),
        (f"snapshot {origin} {origin} P 8", errno.EINVAL, "COW device cannot be the same as origin device"),
        (f"snapshot {tmp_path}/missing {c} P 8", errno.ENOENT, "Cannot get origin device"),
        (f"snapshot {origin} {tmp_path}/missing P 8", errno.ENOENT, "Cannot get COW device"),
        (f"snapshot {origin} {c} P 8 1 bogus", errno.EINVAL, "Unrecognised feature requested: 'bogus'"),
        (f"snapshot {origin} {c} P 8 3 a b c", errno.EINVAL, "Invalid number of feature arguments"),
        (f"snapshot {origin} {c} P 8 2 discard_zeroes_cow", errno.EINVAL, "Invalid number of feature arguments"),
        (f"snapshot {origin} {c} P 8 1 discard_passdown_origin", errno.EINVAL, "depends on discard_zeroes_cow"),
        (f"snapshot {origin} {bad_magic} P 8", errno.ENXIO, "Invalid or corrupt snapshot"),
        (f"snapshot {origin} {bad_version} P 8", errno.EINVAL, "unable to handle snapshot disk version 2"),
        (f"snapshot {origin} {cow('tiny.img', 2048)} P 8", errno.EIO, "cannot hold the snapshot header"),
        (f"snapshot-origin {origin} {c}", errno.EINVAL, "origin: incorrect number of arguments"),
        (f"snapshot-merge {origin} {c} N 8", errno.EINVAL, "needs a persistent exception store"),
    ]
    for args, err, text in cases:
        with pytest.raises(DMError) as exc:
            mapper.create("bad", f"0 {n} {args}")
        assert exc.value.errno == err, (args, exc.value)
        assert text in exc.value.message and "table line 1" in exc.value.message, (args, exc.value)
    with pytest.raises(DMError) as exc:
        mapper.create("bad", f"0 {n + 8} snapshot {origin} {c} P 8")
    # the origin is too small for the target: refused at resume, as the kernel's
    # dm_calculate_queue_limits does, after the constructor wrote the new COW's header (as the
    # kernel's persistent store does at load); the create is reverted
    assert exc.value.errno == errno.EINVAL and "too small for target" in exc.value.message
    assert mapper.list() == [] and snapshot._origins == {}
    assert contents(c)[:4] == b"SnAp"


# ---- handover and merge ----------------------------------------------------------------------------

def test_reload_hands_the_exceptions_over(mapper, disks):
    origin, cow = disks
    c = cow()
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} N {CHUNK}")
    original = contents(origin)
    write(mapper, "base", 0, b"\x11" * 3 * CB)
    write(mapper, "snap", 10 * CB, b"\x22" * CB)
    mapper.load("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} N {CHUNK}")
    mapper.resume("snap")   # transient: only the handover can keep the exceptions
    expected = original[:10 * CB] + b"\x22" * CB + original[11 * CB:]
    assert read_all(mapper, "snap") == expected
    write(mapper, "base", 3 * CB, b"\x33" * CB)
    assert read_all(mapper, "snap") == expected
    # a second table for a COW that is being handed over is refused
    mapper.load("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} N {CHUNK}")
    with pytest.raises(DMError) as exc:
        mapper.create("other", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} N {CHUNK}")
    assert "handover failed" in exc.value.message
    mapper.clear("snap")


def _merge_setup(mapper, disks, writes: int = 600):
    """base (origin) + snap; the origin changed in `writes` chunks, the snapshot in a few.
    Returns (COW path, the snapshot's content)."""
    origin, cow = disks
    c = cow(size=8 * MiB)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} P {CHUNK}")
    rng = random.Random(4)
    with mapper.open_device("base", write=True) as dev:
        for chunk in rng.sample(range(ORIGIN_SECTORS * 512 // CB), writes):
            dev.write(chunk * CB, rng.randbytes(CB))
    write(mapper, "snap", 7 * CB + 3, b"snapshot's own write")
    return c, read_all(mapper, "snap")


def _start_merge(mapper, origin: str, cow: str) -> None:
    mapper.suspend("snap")
    mapper.load("base", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {cow} P {CHUNK}")
    mapper.resume("base")


def _merged(mapper) -> bool:
    allocated, _total, meta = usage(mapper, "base")
    return allocated == meta


def test_merge_brings_the_origin_back_while_it_is_read(mapper, disks):
    origin, _cow = disks
    cow, expected = _merge_setup(mapper, disks)
    assert read_all(mapper, "base") != expected
    event = mapper.info("base")["event_nr"]
    stop, merging = threading.Event(), threading.Event()
    bad: list[int] = []
    checked: list[int] = []
    reads = [0]

    def reader() -> None:
        with mapper.open_device("base", write=False) as dev:
            while not stop.is_set():
                for offset in range(0, ORIGIN_SECTORS * 512, 256 * 1024):
                    check = merging.is_set()  # the read starts after the merge target is live
                    got = dev.read(offset, 256 * 1024)
                    if check:
                        checked.append(offset)
                        if got != expected[offset:offset + len(got)]:
                            bad.append(offset)
                reads[0] += 1
    mapper.suspend("snap")
    mapper.load("base", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {cow} P {CHUNK}")
    t = threading.Thread(target=reader)
    t.start()
    try:
        assert wait_until(lambda: reads[0] >= 1)
        mapper.resume("base")   # from here on every read must show the snapshot
        merging.set()
        assert wait_until(lambda: _merged(mapper), 60)
        mapper.wait("base", event, timeout=10)
        done = reads[0]
        assert wait_until(lambda: reads[0] > done + 1)
    finally:
        stop.set()
        t.join()
    assert bad == [] and len(checked) > 2 * ORIGIN_SECTORS * 512 // (256 * 1024)
    assert read_all(mapper, "base") == expected == contents(origin)
    assert status(mapper, "base") == f"16/{8 * MiB // 512} 16"
    assert parse_cow(cow)[1] == []
    assert status(mapper, "snap") == "Invalid"   # the old snapshot handed its store over
    mapper.resume("snap")
    with mapper.open_device("snap", write=False) as dev, pytest.raises(DMError) as exc:
        dev.read(0, 512)
    assert exc.value.errno == errno.EIO
    mapper.remove("snap")
    # LVM then puts the origin back to a plain table
    mapper.load("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.resume("base")
    assert read_all(mapper, "base") == expected


def test_writes_during_a_merge_land_and_other_snapshots_keep_theirs(mapper, disks):
    origin, cow_factory = disks
    cow, expected = _merge_setup(mapper, disks)
    expected = bytearray(expected)
    mapper.create("other", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow_factory('o.img', 8 * MiB)} P 16")
    other_expected = read_all(mapper, "other")
    _start_merge(mapper, origin, cow)
    rng = random.Random(5)
    with mapper.open_device("base", write=True) as dev:
        for _ in range(300):
            offset, data = rng.randrange(0, ORIGIN_SECTORS * 512 - 5000), rng.randbytes(rng.randrange(1, 5000))
            dev.write(offset, data)
            expected[offset:offset + len(data)] = data
    assert wait_until(lambda: _merged(mapper), 60)
    assert read_all(mapper, "base") == expected == contents(origin)
    assert read_all(mapper, "other") == other_expected


def test_merge_stops_on_suspend_and_goes_on_after_resume(mapper, disks):
    origin, _cow = disks
    cow, expected = _merge_setup(mapper, disks)
    _start_merge(mapper, origin, cow)
    mapper.suspend("base")
    assert not mapper.device("base").live.targets[0]._thread
    mapper.resume("base")
    assert wait_until(lambda: _merged(mapper), 60)
    assert read_all(mapper, "base") == expected


def test_a_transient_snapshot_cannot_be_merged(mapper, disks):
    origin, cow = disks
    c = cow()
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} N {CHUNK}")
    with pytest.raises(DMError) as exc:
        mapper.load("base", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {c} P {CHUNK}")
    assert exc.value.errno == errno.EINVAL and "does not support snapshot-merge" in exc.value.message
    # the handover needs the source suspended
    c2 = cow("c2.img")
    mapper.create("snap2", f"0 {ORIGIN_SECTORS} snapshot {origin} {c2} P {CHUNK}")
    mapper.load("base", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {c2} P {CHUNK}")
    with pytest.raises(DMError) as exc:
        mapper.resume("base")
    assert exc.value.errno == errno.EINVAL and "until source snap2 is suspended" in exc.value.message


# ---- seed 003: an origin without snapshots does not split ------------------------------------------

class CountingDisk(BlockDevice):
    """A file disk that records every write it gets (a test instrument)."""

    def __init__(self, ref: str) -> None:
        self.inner = FileDisk(ref.split("://", 1)[1])
        super().__init__(ref, self.inner.size)
        self.writes: list[tuple[int, int]] = []

    def readinto(self, offset, buf):
        self.inner.readinto(offset, buf)

    def write(self, offset, data, fua=False):
        self.writes.append((offset, len(data)))
        self.inner.write(offset, data, fua)

    def flush(self):
        self.inner.flush()

    def close_backing(self):
        self.inner.close_backing()


def test_origin_without_snapshots_passes_a_write_through_whole(mapper, disks):
    origin, cow = disks
    made: list[CountingDisk] = []
    mapper.backing.register_scheme("counted", lambda ref: made.append(CountingDisk(ref)) or made[-1])
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin counted://{origin}")
    data = os.urandom(MiB)
    write(mapper, "base", 3 * 512, data)
    assert made[0].writes == [(3 * 512, MiB)]
    assert contents(origin)[3 * 512:3 * 512 + MiB] == data
    # with a snapshot the old data is copied first
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot counted://{origin} {cow()} P {CHUNK}")
    write(mapper, "base", 0, b"\xff" * CB)
    assert read_all(mapper, "snap")[3 * 512:3 * 512 + MiB] == data


# ---- the daemon: restart and SIGKILL ---------------------------------------------------------------

def test_persistent_snapshot_survives_restart_and_sigkill(daemon, disks):
    from userdm.nbd.client import RemoteDevice
    origin, cow = disks
    c = cow()
    original = contents(origin)
    daemon.run("create", "base", "--table", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    daemon.run("create", "snap", "--table", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} P {CHUNK}")

    def nbd(name: str) -> RemoteDevice:
        return RemoteDevice(f"nbd+unix:///{name}?socket={daemon.runtime / 'nbd.sock'}")

    def io(name: str, offset: int, data: bytes | None = None, length: int = 0) -> bytes:
        dev = nbd(name)
        try:
            if data is not None:
                dev.write(offset, data)
                return b""
            buf = bytearray(length)
            dev.readinto(offset, memoryview(buf))
            return bytes(buf)
        finally:
            dev.close_backing()

    snap_expected = bytearray(original)
    rng = random.Random(6)
    for _ in range(20):
        io("base", rng.randrange(0, ORIGIN_SECTORS * 512 - 10000), rng.randbytes(10000))
    io("snap", 12345, b"written to the snapshot")
    snap_expected[12345:12345 + 23] = b"written to the snapshot"
    before = daemon.run("status", "snap").stdout
    assert io("snap", 0, length=ORIGIN_SECTORS * 512) == snap_expected

    daemon.stop()
    daemon.start()
    assert daemon.run("status", "snap").stdout == before
    assert io("snap", 0, length=ORIGIN_SECTORS * 512) == snap_expected

    for _ in range(20):
        io("base", rng.randrange(0, ORIGIN_SECTORS * 512 - 10000), rng.randbytes(10000))
    io("snap", 3 * MiB + 7, b"before the kill")
    snap_expected[3 * MiB + 7:3 * MiB + 22] = b"before the kill"
    before = daemon.run("status", "snap").stdout
    base_expected = io("base", 0, length=ORIGIN_SECTORS * 512)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert daemon.run("status", "snap").stdout == before
    assert io("snap", 0, length=ORIGIN_SECTORS * 512) == snap_expected
    assert io("base", 0, length=ORIGIN_SECTORS * 512) == base_expected


def test_merge_goes_on_after_a_sigkill_of_the_daemon(daemon, disks):
    """The merge commits each run only after the origin holds it, so a killed daemon merges
    the rest after its restart and the origin ends up as the snapshot was."""
    from userdm.nbd.client import RemoteDevice
    origin, cow = disks
    c = cow(size=8 * MiB)
    run = daemon.run
    run("create", "base", "--table", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    run("create", "snap", "--table", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} P {CHUNK}")
    original = contents(origin)
    dev = RemoteDevice(f"nbd+unix:///base?socket={daemon.runtime / 'nbd.sock'}")
    try:
        rng = random.Random(7)
        for chunk in rng.sample(range(ORIGIN_SECTORS * 512 // CB), 800):
            dev.write(chunk * CB, rng.randbytes(CB))
    finally:
        dev.close_backing()
    assert contents(origin) != original
    run("suspend", "snap")
    run("load", "base", "--table", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {c} P {CHUNK}")
    run("resume", "base")
    run("remove", "snap")   # as LVM does once the merge has started
    daemon.stop(signal.SIGKILL)
    daemon.start()

    def merged() -> bool:
        used, meta = run("status", "base").stdout.split()[3:5]
        return used.split("/")[0] == meta
    assert wait_until(merged, 60)
    assert run("table", "base").stdout == f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {c} P {CHUNK}\n"
    assert contents(origin) == original


def test_failures_travel_through_snapshots_to_the_chunks_they_hit(mapper, disks):
    """A failed COW range hits the snapshot chunks whose copies live there; a failed origin
    range hits the snapshot only where it has no copy (and the origin device one-to-one)."""
    from userdm.block.device import HolderOps
    origin, cow = disks
    c = cow()
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {c} P {CHUNK}")
    write(mapper, "base", 5 * CB, b"\x01" * CB)       # exception 5 -> COW chunk 2
    got: dict[str, list] = {"snap": [], "base": []}
    holds = [mapper.open_device(name, write=False, holder=f"fs-{name}",
                                holder_ops=HolderOps(notify_failure=lambda o, n, f, name=name: got[name].append((o, n))))
             for name in ("snap", "base")]
    try:
        mapper.notify_failure(c, 2 * CB + 100, 10)
        mapper.notify_failure(origin, 5 * CB, 2 * CB)
    finally:
        for h in holds:
            h.close()
    assert got == {"snap": [(5 * CB + 100, 10), (6 * CB, CB)], "base": [(5 * CB, 2 * CB)]}


def test_a_read_only_snapshot_still_takes_the_origins_copies(mapper, disks):
    origin, cow = disks
    original = contents(origin)
    mapper.create("base", f"0 {ORIGIN_SECTORS} snapshot-origin {origin}")
    mapper.create("snap", f"0 {ORIGIN_SECTORS} snapshot {origin} {cow()} P {CHUNK}", readonly=True)
    write(mapper, "base", 0, b"\x77" * MiB)
    assert read_all(mapper, "snap") == original
    with pytest.raises(DMError) as exc:
        mapper.open_device("snap", write=True)
    assert exc.value.errno == errno.EACCES
    with pytest.raises(DMError) as exc:
        mapper.create("merge", f"0 {ORIGIN_SECTORS} snapshot-merge {origin} {cow('m')} P {CHUNK}", readonly=True)
    assert "cannot be read-only" in exc.value.message
