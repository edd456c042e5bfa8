"""Mirrors with a Ceph RBD image as a leg, and RBD images resized under a table, against the
single-node Ceph that tests/test_rbd.py uses too (the `ceph` and `image` fixtures of
conftest.py: one cluster for the whole run).

- A mirror over a local file and an RBD image, with a disk log: the first resync copies the
  file to the image, writes reach both, a reload of the same table copies nothing, and
  `rbd export` of the image equals the file.
- `rbd resize` under a device: the table keeps its size until a reload (as dm's), a reload
  of a bigger table then sees the new size at resume, and one past a shrunk image is
  refused with the kernel's EINVAL, leaving the device suspended.
- A mirror whose file and RBD legs both grew: the reload's disk log counts the new regions
  out of sync and the resync copies exactly those.
- A mirror with handle_errors whose RBD leg's OSD is killed (its own cluster): the write that
  meets it succeeds on the file leg, the leg is marked `D` with an event, and reads go on.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest

from ceph_cluster import Cluster
from conftest import wait_until
from userdm.errors import DMError

pytest.importorskip("rbd", reason="needs Ceph's Python bindings (python3-rbd)")

MiB = 1 << 20
REGION = 512 * 1024      # region_size 1024 sectors


def rbd_export(ceph, name: str, path: Path) -> bytes:
    ceph.rbd("export", "--no-progress", name, str(path))
    return path.read_bytes()


def random_file(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return str(path)


def in_sync(mapper, name: str = "mir") -> str:
    return mapper.status(name)[0][3].split()[3]


def resyncs(caplog) -> list[tuple[int, int]]:
    """(regions to copy, of how many) of every resync logged so far."""
    return [(int(a), int(b)) for a, b in re.findall(r"mirror resync of (\d+) of (\d+) regions", caplog.text)]


def test_a_mirror_over_a_file_and_an_rbd_image(ceph, image, mapper, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="userdm.targets.mirror")
    size = 16 * MiB
    leg0 = random_file(tmp_path / "leg0.img", size)
    log = tmp_path / "log.img"
    log.write_bytes(bytes(4096))
    name = image(size)
    table = f"0 {size // 512} mirror disk 2 {log} 1024 2 {leg0} 0 {ceph.ref(name)} 0 1 handle_errors"
    mapper.create("mir", table)
    assert wait_until(lambda: in_sync(mapper) == "32/32", 60)   # a new log: every region copied
    assert resyncs(caplog) == [(32, 32)]
    assert mapper.status("mir")[0][3] == (f"2 {leg0} {ceph.ref(name)} 32/32 1 AA 3 disk {log} A")
    data = os.urandom(MiB + 8192)
    with mapper.open_device("mir", write=True) as dev:
        dev.write(3 * MiB - 4096, data)                          # over three regions
        dev.write(20 * REGION + 512, b"q" * 512)
        dev.flush()
        for _ in range(2):                                       # from either leg
            assert dev.read(3 * MiB - 4096, len(data)) == data
    mapper.load("mir", table)                                    # the same table again: the
    mapper.resume("mir")                                         # log is clean, nothing copied
    assert in_sync(mapper) == "32/32" and resyncs(caplog) == [(32, 32)]
    mapper.remove("mir")                                         # closes the image
    want = Path(leg0).read_bytes()
    assert want[3 * MiB - 4096:4 * MiB + 4096] == data
    assert rbd_export(ceph, name, tmp_path / "out.raw") == want


def test_an_rbd_image_resized_shows_at_the_next_reload(ceph, image, mapper, tmp_path):
    name = image(16 * MiB)
    ref = ceph.ref(name)
    mapper.create("r", f"0 {16 * MiB // 512} linear {ref} 0")
    with mapper.open_device("r", write=True) as dev:
        dev.write(15 * MiB, b"e" * 4096)
    ceph.rbd("resize", "--no-progress", "--size", "32M", name)
    assert mapper.info("r")["size"] == 16 * MiB                  # a table's size is its own
    mapper.load("r", f"0 {32 * MiB // 512} linear {ref} 0")     # the image is open meanwhile:
    mapper.resume("r")                                           # its new size shows at resume
    assert mapper.info("r")["size"] == 32 * MiB
    with mapper.open_device("r", write=True) as dev:
        dev.write(31 * MiB, b"g" * 4096)
        assert dev.read(15 * MiB, 4096) == b"e" * 4096
        assert dev.read(31 * MiB, 4096) == b"g" * 4096
    ceph.rbd("resize", "--no-progress", "--allow-shrink", "--size", "8M", name)
    mapper.load("r", f"0 {16 * MiB // 512} linear {ref} 0")
    with pytest.raises(DMError) as exc:
        mapper.resume("r")
    assert exc.value.errno == errno.EINVAL and "too small for target" in str(exc.value) \
        and "dev_size=16384" in str(exc.value), str(exc.value)
    assert mapper.info("r")["suspended"]                         # as the kernel leaves it
    mapper.load("r", f"0 {8 * MiB // 512} linear {ref} 0")
    mapper.resume("r")
    assert mapper.info("r")["size"] == 8 * MiB
    mapper.remove("r")
    assert len(rbd_export(ceph, name, tmp_path / "out.raw")) == 8 * MiB


def test_a_mirror_whose_file_and_rbd_legs_grew_copies_the_new_regions(ceph, image, mapper, tmp_path,
                                                                       caplog):
    caplog.set_level(logging.INFO, logger="userdm.targets.mirror")
    leg0 = random_file(tmp_path / "leg0.img", 8 * MiB)
    log = tmp_path / "log.img"
    log.write_bytes(bytes(4096))
    name = image(8 * MiB)
    legs = f"2 {leg0} 0 {ceph.ref(name)} 0 1 handle_errors"
    mapper.create("mir", f"0 {8 * MiB // 512} mirror disk 2 {log} 1024 {legs}")
    assert wait_until(lambda: in_sync(mapper) == "16/16", 60)
    with open(leg0, "r+b") as f:                                 # both legs grow to 16 MiB,
        f.seek(8 * MiB)                                          # the file with new data
        f.write(os.urandom(8 * MiB))
    ceph.rbd("resize", "--no-progress", "--size", "16M", name)
    mapper.load("mir", f"0 {16 * MiB // 512} mirror disk 2 {log} 1024 {legs}")
    mapper.resume("mir")
    assert wait_until(lambda: in_sync(mapper) == "32/32", 60)
    assert resyncs(caplog) == [(16, 16), (16, 32)]              # the new regions, no more
    mapper.remove("mir")
    assert rbd_export(ceph, name, tmp_path / "out.raw") == Path(leg0).read_bytes()


@pytest.mark.timeout(180)
def test_a_mirror_goes_on_when_its_rbd_legs_osd_dies(mapper, tmp_path):
    leg0 = random_file(tmp_path / "leg0.img", 8 * MiB)
    with Cluster() as own:                                 # its own cluster: the OSD is killed
        own.rbd("create", "--size", "8M", "leg")
        ref = own.ref("leg", rbd_cache="false", rados_osd_op_timeout="3", rados_mon_op_timeout="3")
        mapper.create("mir", f"0 {8 * MiB // 512} mirror core 2 1024 nosync 2 {leg0} 0 {ref} 0 1 handle_errors")
        events = mapper.info("mir")["event_nr"]
        own.kill_osd()
        data = os.urandom(64 * 1024)
        with mapper.open_device("mir", write=True) as dev:
            dev.write(MiB, data)                           # no error: the file leg took it
            assert mapper.status("mir")[0][3].split()[3:6] == ["15/16", "1", "AD"]
            assert mapper.info("mir")["event_nr"] > events
            for _ in range(3):
                assert dev.read(MiB, len(data)) == data    # never from the lost leg
            dev.flush()
        assert Path(leg0).read_bytes()[MiB:MiB + len(data)] == data
        mapper.remove("mir")
