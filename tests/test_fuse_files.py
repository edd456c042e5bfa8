"""Unit tests of the FUSE directory model (`userdm.export.fuse.files`): no FUSE, no root needed."""

from __future__ import annotations

import errno
import stat

import pytest

from userdm import Mapper
from userdm.errors import DMError
from userdm.export.fuse.files import ROOT_INODE, DeviceFiles

SECTORS = 2048  # 1 MiB


@pytest.fixture
def backing(tmp_path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SECTORS * 512 * 2)
    return str(path)


@pytest.fixture
def mapper(backing):
    m = Mapper()
    yield m
    m.close()


@pytest.fixture
def linear(backing):
    def table(sectors: int = SECTORS) -> str:
        return f"0 {sectors} linear {backing} 0"
    return table


def test_directory_shows_devices_with_live_table(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    mapper.create("empty")
    assert [name for name, _ in files.listdir()] == ["vol"]
    attr = files.lookup("vol")
    assert stat.S_ISREG(attr.mode) and attr.mode & 0o777 == 0o644
    assert attr.size == SECTORS * 512
    assert stat.S_ISDIR(files.getattr(ROOT_INODE).mode)
    with pytest.raises(DMError) as exc:
        files.lookup("empty")
    assert exc.value.errno == errno.ENOENT


def test_read_only_table_gives_mode_0444_and_refuses_write_open(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("ro", linear(), readonly=True)
    attr = files.lookup("ro")
    assert attr.mode & 0o777 == 0o444
    with pytest.raises(DMError) as exc:
        files.open(attr.ino, write=True)
    assert exc.value.errno in (errno.EACCES, errno.EROFS)
    fh = files.open(attr.ino, write=False)
    assert len(files.read(fh, 0, 4096)) == 4096
    files.release(fh)


def test_opens_are_device_opens(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    fh = files.open(files.lookup("vol").ino, write=True)
    assert mapper.info("vol")["open_count"] == 1
    with pytest.raises(DMError) as exc:
        mapper.remove("vol")
    assert exc.value.errno == errno.EBUSY
    mapper.remove("vol", deferred=True)
    assert mapper.info("vol")["deferred_remove"]
    files.release(fh)
    assert "vol" not in mapper.export_names()
    with pytest.raises(DMError):
        mapper.info("vol")


def test_io_is_clamped_at_the_end_of_the_device(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    fh = files.open(files.lookup("vol").ino, write=True)
    size = SECTORS * 512
    assert files.write(fh, size - 100, b"x" * 300) == 100
    assert bytes(files.read(fh, size - 100, 300)) == b"x" * 100
    assert files.read(fh, size, 10) == bytearray()
    with pytest.raises(DMError) as exc:
        files.write(fh, size, b"y")
    assert exc.value.errno == errno.ENOSPC
    files.fsync(fh)
    files.release(fh)


def test_recreated_device_gets_a_new_inode(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    old = files.lookup("vol").ino
    mapper.remove("vol")
    with pytest.raises(DMError) as exc:
        files.getattr(old)
    assert exc.value.errno == errno.ENOENT
    mapper.create("vol", linear())
    assert files.lookup("vol").ino != old
    with pytest.raises(DMError):
        files.open(old, write=False)


def test_size_follows_resize_and_truncate_cannot_change_it(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    ino = files.lookup("vol").ino
    mapper.load("vol", linear(SECTORS * 2))
    mapper.resume("vol")
    assert files.getattr(ino).size == SECTORS * 2 * 512
    files.check_size_change(ino, SECTORS * 2 * 512)
    with pytest.raises(DMError) as exc:
        files.check_size_change(ino, 0)
    assert exc.value.errno == errno.EINVAL


def test_release_all_closes_every_open(mapper, linear):
    files = DeviceFiles(mapper)
    mapper.create("vol", linear())
    ino = files.lookup("vol").ino
    files.open(ino, write=False)
    files.open(ino, write=True)
    assert files.release_all() == 2
    assert mapper.info("vol")["open_count"] == 0
