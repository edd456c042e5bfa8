"""The mirror target with a core log: table and status formats, the initial resync, writes
to every leg, balanced reads, handle_errors (a failed leg is marked, an event raised, I/O goes
on), a reload that resyncs a returned leg, and refused tables."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from conftest import wait_until
from userdm.errors import DMError

MiB = 1 << 20
SECTORS = 8 * MiB // 512


def files(images, n: int = 2) -> list[str]:
    return images(n, 8 * MiB)


def synced(mapper, name: str) -> bool:
    return mapper.status(name)[0][3].split()[3] == "16/16"


def same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_table_status_and_initial_resync(mapper, images):
    a, b = files(images)
    with open(a, "r+b") as f:
        f.write(os.urandom(8 * MiB))
    mapper.create("mir", f"0 {SECTORS} mirror core 1 1024 2 {a} 0 {b} 0\n")
    assert mapper.table("mir") == [[0, SECTORS, "mirror", f"core 1 1024 2 {a} 0 {b} 0"]]
    assert wait_until(lambda: synced(mapper, "mir"))
    assert mapper.status("mir") == [[0, SECTORS, "mirror", f"2 {a} {b} 16/16 1 AA 1 core"]]
    assert same(a, b)                                     # leg 0 was copied to leg 1
    assert wait_until(lambda: mapper.info("mir")["event_nr"] >= 1)   # resync complete: an event
    data = os.urandom(MiB + 4096)
    with mapper.open_device("mir", write=True) as dev:
        dev.write(3 * MiB - 4096, data)
        dev.flush()
        assert dev.read(3 * MiB - 4096, len(data)) == data
    assert same(a, b)


def test_nosync_is_in_sync_at_once_and_reads_are_balanced(mapper, images):
    a, b = files(images)
    with open(a, "r+b") as f:
        f.write(b"\xaa" * 4096)
    with open(b, "r+b") as f:
        f.write(b"\xbb" * 4096)
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors\n")
    assert mapper.status("mir")[0][3] == f"2 {a} {b} 16/16 1 AA 1 core"
    assert mapper.table("mir")[0][3] == f"core 2 1024 nosync 2 {a} 0 {b} 0 1 handle_errors"
    with mapper.open_device("mir", write=False) as dev:      # nosync said the legs agree: they
        seen = {dev.read(0, 4096)[:1] for _ in range(4)}      # do not, and reads alternate
    assert seen == {b"\xaa", b"\xbb"}


def test_handle_errors_marks_the_leg_and_io_goes_on(mapper, images):
    a, b = files(images)
    mapper.create("legb", f"0 {SECTORS} linear {b} 0\n")
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 /dev/mapper/legb 0 1 handle_errors\n")
    mapper.load("legb", f"0 {SECTORS} error\n")               # the second leg dies
    mapper.resume("legb")
    events = mapper.info("mir")["event_nr"]
    data = os.urandom(64 * 1024)
    with mapper.open_device("mir", write=True) as dev:
        dev.write(MiB, data)                                  # no error: leg 0 took it
        for _ in range(3):
            assert dev.read(MiB, len(data)) == data           # reads avoid the dead leg
    status = mapper.status("mir")[0][3].split()
    assert status[-3:] == ["AD", "1", "core"]
    assert mapper.info("mir")["event_nr"] == events + 1
    with open(a, "rb") as f:
        f.seek(MiB)
        assert f.read(len(data)) == data
    # the leg comes back and the mirror is reloaded: a fresh log resyncs every region
    mapper.load("legb", f"0 {SECTORS} linear {b} 0\n")
    mapper.resume("legb")
    mapper.load("mir", f"0 {SECTORS} mirror core 1 1024 2 {a} 0 /dev/mapper/legb 0 1 handle_errors\n")
    mapper.resume("mir")
    assert wait_until(lambda: synced(mapper, "mir"))
    assert mapper.status("mir")[0][3].split()[-3:] == ["AA", "1", "core"]
    assert same(a, b)


def test_without_handle_errors_a_failed_leg_fails_the_write(mapper, images):
    a, b = files(images)
    mapper.create("legb", f"0 {SECTORS} error\n")
    mapper.create("mir", f"0 {SECTORS} mirror core 2 1024 nosync 2 {a} 0 /dev/mapper/legb 0\n")
    with mapper.open_device("mir", write=True) as dev:
        with pytest.raises(DMError) as exc:
            dev.write(0, bytes(4096))
    assert exc.value.errno == errno.EIO and "mirror leg 1" in str(exc.value)
    assert mapper.status("mir")[0][3].split()[-3] == "AA"     # nothing is marked without it


@pytest.mark.parametrize("args, words", [
    ("core 1 1000 2 {a} 0 {b} 0", "Invalid region size"),
    ("core 1 1024 1 {a} 0", "Invalid number of mirrors"),
    ("core 1 1024 10 " + "{a} 0 " * 10, "Invalid number of mirrors"),
    ("core 1 1024 3 {a} 0 {b} 0", "Too few mirror arguments"),
    ("core 2 1024 maybe 2 {a} 0 {b} 0", "sync argument"),
    ("disk 2 {b} 1024 2 {a} 0 {b} 0", "log {b} sectors 0-2 overlaps mirror 1"),
    ("ring 1 1024 2 {a} 0 {b} 0", "dirty log type"),
    ("core 1 1024 2 {a} 0 {b} 0 1 keep_log", "requires the handle_errors"),
    ("core 1 1024 2 {a} 0 {b} 0 1 fast", "Unrecognised feature"),
    ("core 1 1024 2 {a} 0 {b} 0 2 handle_errors", "Invalid number of features"),
])
def test_bad_tables_are_refused(mapper, images, args, words):
    a, b = files(images)
    with pytest.raises(DMError) as exc:
        mapper.create("mir", f"0 {SECTORS} mirror {args.format(a=a, b=b)}\n")
    assert exc.value.errno == errno.EINVAL and words.format(a=a, b=b) in str(exc.value), str(exc.value)


# ---- the disk log ------------------------------------------------------------------------------

MAGIC, VERSION = 0x4D695272, 2


def log_image(path: str) -> tuple[int, int, int, list[int]]:
    """(magic, version, nr_regions, dirty regions) as the disk log's device holds them."""
    with open(path, "rb") as f:
        raw = f.read(4096)
    magic, version, nr = struct.unpack_from("<IIQ", raw)
    bits = raw[1024:]
    return magic, version, nr, [r for r in range(min(nr, 16)) if not bits[r // 8] >> (r % 8) & 1]


def clean_on_disk(path: str) -> bool:
    magic, _, nr, dirty = log_image(path)
    return magic == MAGIC and nr == 16 and not dirty


def corrupt(path: str, region: int) -> None:
    with open(path, "r+b") as f:
        f.seek(region * 512 * 1024)
        f.write(b"\x5a" * 4096)


def region_of(path: str, region: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(region * 512 * 1024)
        return f.read(512 * 1024)


@pytest.fixture
def logfile(images):
    return images(1, 64 * 1024)[0]


def test_disk_log_table_status_and_format(mapper, images, logfile):
    a, b = files(images)
    with open(a, "r+b") as f:
        f.write(os.urandom(8 * MiB))
    mapper.create("mir", f"0 {SECTORS} mirror disk 2 {logfile} 1024 2 {a} 0 {b} 0\n")
    assert mapper.table("mir")[0][3] == f"disk 2 {logfile} 1024 2 {a} 0 {b} 0"
    assert wait_until(lambda: synced(mapper, "mir"))
    assert mapper.status("mir")[0][3] == f"2 {a} {b} 16/16 1 AA 3 disk {logfile} A"
    assert same(a, b)
    assert wait_until(lambda: clean_on_disk(logfile))       # the cleaner marks synced regions clean
    assert log_image(logfile)[:3] == (MAGIC, VERSION, 16)
    with mapper.open_device("mir", write=True) as dev:
        dev.write(5 * 512 * 1024, os.urandom(4096))
        assert log_image(logfile)[3] == [5]                  # dirty on disk before the write returns
    assert wait_until(lambda: clean_on_disk(logfile))
    mapper.suspend("mir")                                    # a suspend leaves the log clean
    assert clean_on_disk(logfile)
    mapper.resume("mir")
    assert synced(mapper, "mir")


def test_disk_log_reload_resyncs_only_what_a_failed_leg_missed(mapper, images, logfile):
    a, b = files(images)
    mapper.create("legb", f"0 {SECTORS} linear {b} 0\n")
    table = f"0 {SECTORS} mirror disk 2 {logfile} 1024 2 {a} 0 /dev/mapper/legb 0 1 handle_errors\n"
    mapper.create("mir", table)
    assert wait_until(lambda: synced(mapper, "mir") and clean_on_disk(logfile))
    mapper.load("legb", f"0 {SECTORS} error\n")               # leg 1 is lost
    mapper.resume("legb")
    data = os.urandom(8192)
    with mapper.open_device("mir", write=True) as dev:
        dev.write(3 * 512 * 1024 + 4096, data)                 # region 3, on leg 0 only
        dev.flush()
    status = mapper.status("mir")[0][3]
    assert status.endswith(f"15/16 1 AD 3 disk {logfile} A"), status
    mapper.suspend("mir")
    assert log_image(logfile)[3] == [3]                       # still dirty: leg 1 missed it
    mapper.resume("mir")
    mapper.load("legb", f"0 {SECTORS} linear {b} 0\n")        # leg 1 is back
    mapper.resume("legb")
    corrupt(b, 9)                                             # a clean region: left alone
    events = mapper.info("mir")["event_nr"]
    mapper.load("mir", table)                                 # the same table again
    mapper.resume("mir")
    assert wait_until(lambda: synced(mapper, "mir"))
    assert mapper.status("mir")[0][3].endswith(f"16/16 1 AA 3 disk {logfile} A")
    assert wait_until(lambda: mapper.info("mir")["event_nr"] > events)
    assert region_of(a, 3) == region_of(b, 3)                 # the dirty region was copied
    assert region_of(a, 9) != region_of(b, 9)                 # the clean one was not
    assert all(region_of(a, r) == region_of(b, r) for r in range(16) if r != 9)


def test_disk_log_sync_and_nosync(mapper, images, logfile):
    a, b = files(images)
    mapper.create("mir", f"0 {SECTORS} mirror disk 3 {logfile} 1024 nosync 2 {a} 0 {b} 0\n")
    assert mapper.status("mir")[0][3].endswith("16/16 1 AA 3 disk " + logfile + " A")
    assert mapper.table("mir")[0][3] == f"disk 3 {logfile} 1024 nosync 2 {a} 0 {b} 0"
    assert clean_on_disk(logfile)                             # written at resume
    corrupt(b, 2)
    mapper.load("mir", f"0 {SECTORS} mirror disk 2 {logfile} 1024 2 {a} 0 {b} 0\n")
    mapper.resume("mir")                                      # the log says clean: nothing copied
    assert synced(mapper, "mir")
    assert region_of(a, 2) != region_of(b, 2)
    mapper.load("mir", f"0 {SECTORS} mirror disk 3 {logfile} 1024 sync 2 {a} 0 {b} 0\n")
    mapper.resume("mir")                                      # sync: a new log, every region
    assert wait_until(lambda: synced(mapper, "mir"))
    assert same(a, b)


@pytest.mark.hostile
def test_disk_log_with_a_bad_version_fails_the_log_and_resyncs_everything(mapper, images, logfile):
    a, b = files(images)
    with open(logfile, "r+b") as f:
        f.write(struct.pack("<IIQ", MAGIC, 7, 16) + b"\xff" * 2048)
    corrupt(b, 4)
    mapper.create("mir", f"0 {SECTORS} mirror disk 2 {logfile} 1024 2 {a} 0 {b} 0 1 handle_errors\n")
    assert wait_until(lambda: synced(mapper, "mir"))
    assert mapper.status("mir")[0][3].endswith(f"3 disk {logfile} D")
    assert same(a, b)
    with mapper.open_device("mir", write=True) as dev:         # writes go on without the log
        dev.write(0, bytes(4096))
    with open(logfile, "rb") as f:
        assert struct.unpack_from("<IIQ", f.read(16))[1] == 7  # the foreign log is left alone
    mapper.load("mir", f"0 {SECTORS} mirror disk 2 {logfile} 1024 2 {a} 0 {b} 0 2 handle_errors keep_log\n")
    mapper.resume("mir")
    with mapper.open_device("mir", write=True) as dev:
        with pytest.raises(DMError) as exc:                   # keep_log: no write without the log
            dev.write(0, bytes(4096))
    assert exc.value.errno == errno.EIO and "keep_log" in str(exc.value)


@pytest.mark.hostile
def test_a_failing_log_device_is_marked_and_keep_log_fails_writes(mapper, images, logfile):
    a, b = files(images)
    mapper.create("logdev", f"0 128 linear {logfile} 0\n")
    mapper.create("mir", f"0 {SECTORS} mirror disk 3 /dev/mapper/logdev 1024 nosync 2 {a} 0 {b} 0 "
                         f"2 handle_errors keep_log\n")
    mapper.load("logdev", "0 128 error\n")
    mapper.resume("logdev")
    events = mapper.info("mir")["event_nr"]
    with mapper.open_device("mir", write=True) as dev:
        with pytest.raises(DMError) as exc:
            dev.write(MiB, bytes(4096))
        assert exc.value.errno == errno.EIO and "keep_log" in str(exc.value)
        assert mapper.info("mir")["event_nr"] == events + 1     # the log failed: an event
        assert mapper.status("mir")[0][3].split()[-6:-1] == ["1", "AA", "3", "disk", "253:0"]
        assert mapper.status("mir")[0][3].split()[-1] == "D"          # the log write failed
        assert dev.read(0, 4096) == bytes(4096)               # reads go on
    mapper.load("mir", f"0 {SECTORS} mirror disk 2 /dev/mapper/logdev 1024 2 {a} 0 {b} 0 1 handle_errors\n")
    mapper.resume("mir")
    with mapper.open_device("mir", write=True) as dev:        # without keep_log, writes go on
        dev.write(MiB, b"\x11" * 4096)
        assert dev.read(MiB, 4096) == b"\x11" * 4096
    assert mapper.status("mir")[0][3].split()[-4:] == ["3", "disk", "253:0", "D"]


@pytest.mark.hostile
def test_too_many_regions_are_refused_before_any_memory_is_taken(mapper, images, logfile):
    a, b = images(2, 1 << 40)                                 # sparse 1 TiB legs, 2-sector regions
    for log in ("core 1 2", f"disk 2 {logfile} 2"):
        with pytest.raises(DMError) as exc:
            mapper.create("mir", f"0 {(1 << 40) // 512} mirror {log} 2 {a} 0 {b} 0\n")
        assert exc.value.errno == errno.EINVAL and "1073741824 regions, at most 16777216" in str(exc.value)


@pytest.mark.hostile
@pytest.mark.parametrize("args, words", [
    ("disk 1 {log} 2 {a} 0 {b} 0", "Invalid disk log argument count"),
    ("disk 4 {log} 1024 sync x 2 {a} 0 {b} 0", "Invalid disk log argument count"),
    ("disk 3 {log} 1024", "Invalid disk log argument count"),
    ("disk 2 {log} 1023 2 {a} 0 {b} 0", "Invalid region size"),
    ("disk 2 {log} x 2 {a} 0 {b} 0", "region size"),
    ("disk 3 {log} 1024 often 2 {a} 0 {b} 0", "sync argument"),
    ("disk 2 {tiny} 2 2 {a} 0 {b} 0", "too small: need 2048 bytes for 8192 regions"),
    ("disk 2 /nonexistent/log 1024 2 {a} 0 {b} 0", "Log device lookup failed"),
    ("disk 2 {a} 1024 2 {a} 0 {b} 0", "log {a} sectors 0-2 overlaps mirror 0"),
    ("disk 2 {log} 1024 2 {a} 0 {b} 0 1 keep_log", "requires the handle_errors"),
    ("disk 2 nbd://127.0.0.1:1/x 1024 2 {a} 0 {b} 0", "Log device lookup failed"),
])
def test_bad_disk_log_tables_are_refused(mapper, images, logfile, args, words):
    a, b = files(images)
    tiny = images(1, 512)[0]
    text = args.format(a=a, b=b, log=logfile, tiny=tiny)
    with pytest.raises(DMError) as exc:
        mapper.create("mir", f"0 {SECTORS} mirror {text}\n")
    assert exc.value.errno in (errno.EINVAL, errno.ENOENT, errno.ENXIO), str(exc.value)
    assert words.format(a=a) in str(exc.value), str(exc.value)
