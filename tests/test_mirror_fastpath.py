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


def mirror_with_a_small_leg(mapper, images, small_fs) -> str:
    """Device "mir" (core log, nosync) over a file of "a" bytes and one of "b" bytes on the
    2 MiB tmpfs, which a write of four regions fills up; the second file's path."""
    (a,) = images(1, 8 * MiB)
    fill(a, b"a")
    b = str(small_fs / "b.img")
    with open(b, "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"b" * REGION)                                 # a quarter of the filesystem
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors")
    return b


def test_a_leg_that_failed_a_write_is_never_read_though_it_still_reads(mapper, images, small_fs):
    b = mirror_with_a_small_leg(mapper, images, small_fs)
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


# ---- the plain-read flag: a whole mirror's collapsed read is linear's -----------------------

def plain(mapper, name: str) -> bool:
    """Whether the mirror's collapsed reads are plain remaps now (every region in sync, no
    leg failed)."""
    return mapper.device(name).live.targets[0]._plain is not None


def whole_mirror(mapper, images) -> tuple[str, object]:
    """Device "mir": a whole two-leg mirror (core log, nosync) over files of "a" and "b"
    bytes; its table and its target."""
    a, b = images(2, 8 * MiB)
    fill(a, b"a")
    fill(b, b"b")
    table = f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors"
    mapper.create("mir", table)
    return table, mapper.device("mir").live.targets[0]


def test_the_plain_read_flag_follows_regions_going_out_of_and_back_into_sync(mapper, images):
    _table, target = whole_mirror(mapper, images)
    assert plain(mapper, "mir")
    with mapper.open_device("mir", write=False) as dev:
        assert firsts(dev, 2 * REGION) == {b"a", b"b"}
        with target._cond:
            target.log.set_sync(2, False)
            target.log.set_sync(3, False)
        assert not plain(mapper, "mir")
        assert firsts(dev, 2 * REGION, 8) == {b"a"}            # the default mirror only
        assert firsts(dev, 5 * REGION) == {b"a", b"b"}
        with target._cond:
            target.log.set_sync(2, True)
        assert not plain(mapper, "mir")                        # region 3 still out of sync
        assert firsts(dev, 3 * REGION, 8) == {b"a"}
        with target._cond:
            target.log.set_sync(3, True)
        assert plain(mapper, "mir")
        assert firsts(dev, 3 * REGION) == {b"a", b"b"}


def test_the_flag_is_off_while_a_resync_runs_and_on_once_it_completes(mapper, images):
    size = 64 * MiB                      # 8192 regions of 8 KiB: the resync takes a while
    a, b = images(2, size)
    with open(a, "r+b") as f:
        f.write(b"a" * size)
    with open(b, "r+b") as f:
        f.write(b"b" * size)
    last = size - 8192
    mapper.create("mir", f"0 {size // 512} mirror core 1 16 2 {a} 0 {b} 0 1 handle_errors")
    target = mapper.device("mir").live.targets[0]
    during = 0
    with mapper.open_device("mir", write=False) as dev:
        # reads during the resync: the last region, copied last, reads as leg 0, never leg 1
        while target.log.sync_count < 8192:
            assert dev.read(last, 4096)[:1] == b"a"
            during += 1
        assert wait_until(lambda: plain(mapper, "mir"))
        assert firsts(dev, last) == {b"a"}                     # leg 1 has leg 0's data now
    assert during > 0
    assert read_file(b, last, 8192) == b"a" * 8192


def test_a_leg_failing_while_reads_run_turns_the_flag_off_and_is_never_read_again(mapper, images, small_fs):
    mirror_with_a_small_leg(mapper, images, small_fs)
    assert plain(mapper, "mir")
    stop = threading.Event()
    after: list[bytes] = []
    failed = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with mapper.open_device("mir", write=False) as dev:
                while not stop.is_set():
                    marked = failed.is_set()      # the leg was marked before this read began
                    got = dev.read(0, 4096)[:1]
                    if marked:
                        after.append(got)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        with mapper.open_device("mir", write=True) as dev:
            dev.write(2 * REGION, b"n" * (4 * REGION))         # leg 1 runs out of space
        assert mapper.status("mir")[0][3].split()[5] == "AD"
        failed.set()
        assert wait_until(lambda: len(after) >= 50)
    finally:
        stop.set()
        t.join(30)
    assert not errors
    assert not plain(mapper, "mir")
    assert set(after) == {b"a"}
    mapper.remove("mir")


def test_a_reload_of_a_whole_mirror_reads_plainly_again(mapper, images):
    table, target = whole_mirror(mapper, images)
    with target._cond:
        target.log.set_sync(0, False)
    assert not plain(mapper, "mir")
    mapper.suspend("mir")
    mapper.load("mir", table)
    mapper.resume("mir")
    assert plain(mapper, "mir")
    with mapper.open_device("mir", write=False) as dev:
        assert firsts(dev, 0) == {b"a", b"b"}


def test_a_leg_marked_failed_by_a_flush_error_leaves_the_plain_path(mapper, images):
    from userdm.errors import DMError
    _table, target = whole_mirror(mapper, images)
    with mapper.open_device("mir", write=False) as dev:
        assert firsts(dev, 0) == {b"a", b"b"}
        target._fail(1, "F", DMError(5, "flush failed"))     # no region went out of sync
        assert mapper.status("mir")[0][3].split()[3:6] == ["16/16", "1", "AF"]
        assert not plain(mapper, "mir")
        assert firsts(dev, 0, 8) == {b"a"}                     # the file still reads: never read
