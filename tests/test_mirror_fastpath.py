"""The mirror's collapsed read path (`Target.remaps_reads`, `userdm.dm.collapse`): a mirror
whose legs and log are files reads an in-sync region with one region check and one system
call, alternating over the healthy legs, also from a device stacked on it. What must stay
true there: a region out of sync is read from the default mirror only, a failed leg is never
read, a suspend holds the I/O of the stack above, and a reload is used at once."""

from __future__ import annotations

import os
import threading

from conftest import wait_until
from test_state_full_disk import small_fs  # noqa: F401 (a fixture: a 2 MiB tmpfs)

MiB = 1 << 20
SECTORS = 8 * MiB // 512
REGION = 512 * 1024      # 1024 sectors


def fill(path: str, byte: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(byte * (8 * MiB))


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sinks(mapper, name: str) -> list[str]:
    """The kinds of sink of the device's Flat (after one request built it)."""
    md = mapper.device(name)
    md.readinto(0, memoryview(bytearray(512)))
    flat = md._flat
    return [type(seg[2]).__name__ for seg in flat.segments] if flat is not None else []


def firsts(dev, offset: int, n: int = 6) -> set[bytes]:
    return {dev.read(offset, 4096)[:1] for _ in range(n)}


def test_in_sync_reads_alternate_on_the_collapsed_path_also_from_above(mapper, images):
    a, b = images(2, 8 * MiB)
    fill(a, b"a")
    fill(b, b"b")                        # nosync says they agree: the reads show which leg
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    mapper.create("top", f"0 {SECTORS} linear /dev/mapper/mir 0")
    assert sinks(mapper, "mir") == ["TargetSink"]
    assert sinks(mapper, "top") == ["TargetSink"]             # followed down into the mirror
    with mapper.open_device("mir", write=False) as dev:
        assert firsts(dev, 3 * REGION) == {b"a", b"b"}
        assert dev.read(REGION - 2048, 4096) in (b"a" * 4096, b"b" * 4096)   # over two regions
    with mapper.open_device("top", write=True) as top:
        assert firsts(top, 5 * REGION) == {b"a", b"b"}
        top.write(5 * REGION, b"w" * 4096)                    # a write reaches every leg
        assert firsts(top, 5 * REGION) == {b"w"}
    assert read_file(a, 5 * REGION, 4096) == read_file(b, 5 * REGION, 4096) == b"w" * 4096


def test_a_region_out_of_sync_is_read_from_the_default_mirror_only(mapper, images):
    a, b = images(2, 8 * MiB)
    fill(a, b"a")
    fill(b, b"b")
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    assert sinks(mapper, "mir") == ["TargetSink"]
    target = mapper.device("mir").live.targets[0]
    with target._cond:                  # as a write that missed a leg leaves it, until a resync
        target.log.set_sync(2, False)
    with mapper.open_device("mir", write=False) as dev:
        assert firsts(dev, 2 * REGION) == {b"a"}               # leg 0, the default mirror
        assert firsts(dev, 2 * REGION - 2048, 8) == {b"a"}     # a read that ends in it too
        assert firsts(dev, 3 * REGION) == {b"a", b"b"}         # its neighbours still alternate
    assert mapper.status("mir")[0][3].split()[3] == "15/16"


def test_a_dirty_region_reads_as_the_default_mirror_while_the_resync_copies_it(mapper, images):
    a, b = images(2, 8 * MiB)
    (log,) = images(1, 64 * 1024)
    fill(a, b"a")
    fill(b, b"b")
    table = f"0 {SECTORS} mirror disk 2 {log} 1024 2 {a} 0 {b} 0 1 handle_errors"
    mapper.create("mir", f"0 {SECTORS} mirror disk 3 {log} 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    mapper.remove("mir")                                       # a log with every region clean
    with open(log, "r+b") as f:                                # ... but regions 4 and 5 dirty,
        f.seek(1024)                                           # as a crash leaves them
        f.write(bytes([0xCF]) + b"\xff")
    mapper.create("mir", table)
    with mapper.open_device("mir", write=False) as dev:     # before or after their copy: leg 0's data
        for region in (4, 5):
            assert firsts(dev, region * REGION + 8192) == {b"a"}
        assert wait_until(lambda: mapper.status("mir")[0][3].split()[3] == "16/16")
        assert firsts(dev, 4 * REGION) == {b"a"}
        assert firsts(dev, 6 * REGION) == {b"a", b"b"}         # clean: never copied, alternates
    assert read_file(b, 4 * REGION, REGION) == b"a" * REGION


def test_a_leg_that_failed_a_write_is_never_read_though_it_still_reads(mapper, images, small_fs):
    (a,) = images(1, 8 * MiB)
    fill(a, b"a")
    b = str(small_fs / "b.img")
    with open(b, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"b" * REGION)                                 # a quarter of the filesystem
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    assert sinks(mapper, "mir") == ["TargetSink"]
    with mapper.open_device("mir", write=True) as dev:
        assert firsts(dev, 0) == {b"a", b"b"}
        dev.write(2 * REGION, b"n" * (4 * REGION))             # leg 1 runs out of space
        assert mapper.status("mir")[0][3].split()[3:6] == ["12/16", "1", "AD"]
        assert read_file(b, 0, 1) == b"b"                      # it would still answer a read
        assert firsts(dev, 0, 8) == {b"a"}
        assert firsts(dev, 2 * REGION) == {b"n"}
    mapper.remove("mir")


def test_a_leg_whose_file_is_deleted_is_never_read(mapper, images):
    a, b = images(2, 8 * MiB)
    fill(a, b"a")
    fill(b, b"b")
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    with mapper.open_device("mir", write=True) as dev:
        assert firsts(dev, 0) == {b"a", b"b"}
        os.unlink(b)                                           # leg 1's file is gone: dead
        assert wait_until(lambda: mapper.status("mir")[0][3].split()[5] == "AD")
        assert sinks(mapper, "mir") == ["TargetSink"]
        assert firsts(dev, 0, 8) == {b"a"}
        dev.write(REGION, b"n" * 4096)                         # leg 0 only: out of sync
        assert firsts(dev, REGION) == {b"n"}
    assert mapper.status("mir")[0][3].split()[3] == "15/16"


def test_suspend_holds_reads_from_above_and_a_reload_is_used_at_once(mapper, images):
    a, b = images(2, 8 * MiB)
    fill(a, b"a")
    fill(b, b"b")
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    mapper.create("top", f"0 {SECTORS} linear /dev/mapper/mir 0")
    with mapper.open_device("top", write=True) as top:
        assert firsts(top, 0) == {b"a", b"b"}
        mapper.suspend("mir")
        done = threading.Event()
        seen = []

        def reader() -> None:
            seen.append(top.read(0, 1))
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        try:
            assert not done.wait(0.3)            # held at the mirror, not read past it
            mapper.load("mir", f"0 {SECTORS} linear {b} 0")
        finally:
            mapper.resume("mir")
            t.join(10)
        assert seen == [b"b"]                    # the new table, at once
        assert firsts(top, 0) == {b"b"}
        mapper.load("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
        mapper.resume("mir")
        assert firsts(top, 0) == {b"a", b"b"}
        assert sinks(mapper, "top") == ["TargetSink"]
