"""The mirror target with a core log: table and status formats, the initial resync, writes
to every leg, balanced reads, handle_errors (a failed leg is marked, an event raised, I/O goes
on), a reload that resyncs a returned leg, and refused tables."""

from __future__ import annotations

import errno
import os

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
    ("disk 2 {b} 1024 2 {a} 0 {b} 0", "disk log is not implemented"),
    ("ring 1 1024 2 {a} 0 {b} 0", "dirty log type"),
    ("core 1 1024 2 {a} 0 {b} 0 1 keep_log", "requires the handle_errors"),
    ("core 1 1024 2 {a} 0 {b} 0 1 fast", "Unrecognised feature"),
    ("core 1 1024 2 {a} 0 {b} 0 2 handle_errors", "Invalid number of features"),
])
def test_bad_tables_are_refused(mapper, images, args, words):
    a, b = files(images)
    with pytest.raises(DMError) as exc:
        mapper.create("mir", f"0 {SECTORS} mirror {args.format(a=a, b=b)}\n")
    assert exc.value.errno == errno.EINVAL and words in str(exc.value), str(exc.value)
