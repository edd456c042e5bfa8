"""The block layer: opens, claims (bd_may_claim rules), file and memory disks, backing stores."""

import errno
import os

import pytest

from userdm.block import STATUS_HOLE, STATUS_ZERO, BackingStores, FileDisk, MemoryDisk
from userdm.errors import DMError


def test_exclusive_claims_follow_the_kernel_rules():
    disk = MemoryDisk(1 << 20)
    a = disk.open(write=True, holder="fs")
    nested = disk.open(write=True, holder="fs")         # same holder nests
    with pytest.raises(DMError) as exc:
        disk.open(write=True, holder="other")            # another holder: EBUSY
    assert exc.value.errno == errno.EBUSY and "claimed exclusively by fs" in str(exc.value)
    plain = disk.open(write=True)                        # non-exclusive opens are never blocked
    assert disk.holder == "fs" and disk.holder_count == 2 and disk.open_count == 3
    a.close()
    assert disk.holder == "fs"
    nested.close()
    assert disk.holder is None
    disk.open(holder="other").close()                    # the claim is free again
    plain.close()
    assert disk.open_count == 0


def test_opens_closed_in_any_order_and_twice():
    """Opens are kept in a list whose entries know their place (a close moves the last one
    there): whatever order they close in, the list holds exactly the open ones, the last
    close fires once, and closing a handle again changes nothing."""
    disk = MemoryDisk(1 << 20)
    last_closes = []
    disk.on_last_close(last_closes.append)
    handles = [disk.open(write=bool(i % 2)) for i in range(7)]
    for i in (3, 0, 6, 1):
        handles[i].close()
        handles[i].close()
        assert disk.open_count == len([h for h in handles if not h.closed])
        assert set(map(id, disk.opens)) == {id(h) for h in handles if not h.closed}
        assert all(disk.opens[h.slot] is h for h in disk.opens)
    assert last_closes == []
    for i in (5, 2, 4):
        handles[i].close()
    assert disk.open_count == 0 and disk.opens == [] and last_closes == [disk]
    handles[4].close()
    assert disk.open_count == 0 and last_closes == [disk]
    disk.open().close()
    assert last_closes == [disk, disk]


def test_open_modes_and_bounds():
    disk = MemoryDisk(4096, read_only=True)
    with pytest.raises(DMError) as exc:
        disk.open(write=True)
    assert exc.value.errno == errno.EACCES
    rw = MemoryDisk(4096).open(write=False)
    with pytest.raises(DMError) as exc:
        rw.write(0, b"x")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DMError) as exc:
        rw.read(4000, 200)
    assert exc.value.errno == errno.EINVAL and "beyond the end" in str(exc.value)
    rw.close()
    rw.close()  # idempotent
    with pytest.raises(DMError):
        rw.read(0, 1)


def test_memory_disk_is_sparse():
    disk = MemoryDisk(1 << 20)
    h = disk.open(write=True)
    assert h.block_status(0, 1 << 20) == [(1 << 20, STATUS_HOLE | STATUS_ZERO)]
    h.write(70000, b"abc")
    assert h.read(69999, 5) == b"\0abc\0"
    assert h.block_status(0, 1 << 20)[1] == (65536, 0)
    h.discard(65536, 65536)
    assert h.read(70000, 3) == b"\0\0\0"


def test_file_disk_io_discard_and_holes(tmp_path):
    path = tmp_path / "f.img"
    path.write_bytes(b"")
    os.truncate(path, 1 << 20)
    disk = FileDisk(str(path))
    h = disk.open(write=True)
    assert disk.size == 1 << 20
    h.write(4096, b"A" * 8192, fua=True)
    assert h.read(4096, 4) == b"AAAA"
    assert h.block_status(0, 1 << 20)[0] == (4096, STATUS_HOLE | STATUS_ZERO)
    assert h.block_status(4096, 8192) == [(8192, 0)]
    h.discard(4096, 4096)
    assert h.read(4096, 4096) == bytes(4096)
    h.write_zeroes(8192, 4096, may_unmap=False)
    assert h.read(8192, 4096) == bytes(4096)
    h.close()
    disk.close_backing()
    with open(path, "rb") as f:
        assert f.read() == bytes(1 << 20)


def test_file_disk_direct_io_unaligned(tmp_path):
    path = tmp_path / "d.img"
    os.truncate(path, 1 << 20) if path.exists() else path.write_bytes(bytes(1 << 20))
    disk = FileDisk(str(path), direct=True)
    h = disk.open(write=True)
    h.write(1000, b"hello")
    assert h.read(998, 9) == b"\0\0hello\0\0"
    h.close()
    disk.close_backing()


def test_backing_stores_share_one_device_per_file(tmp_path):
    path = tmp_path / "s.img"
    path.write_bytes(bytes(65536))
    link = tmp_path / "link.img"
    link.symlink_to(path)
    stores = BackingStores()
    a = stores.open(str(path), write=True, holder="dm")
    b = stores.open(str(link), write=True, holder="dm")
    assert a.device is b.device
    with pytest.raises(DMError) as exc:
        stores.open(str(path), write=True, holder="mount")
    assert exc.value.errno == errno.EBUSY
    a.close()
    b.close()
    assert stores.devices() == []          # the last close drops the device and its fd
    with pytest.raises(DMError) as exc:
        stores.open("relative/path", write=True)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(DMError) as exc:
        stores.open(str(tmp_path), write=True)
    assert exc.value.errno == errno.ENOTBLK
    with pytest.raises(DMError) as exc:
        stores.open("/nonexistent/file", write=True)
    assert exc.value.errno == errno.ENOENT


@pytest.fixture
def loop_device(tmp_path):
    """A real block device node: a loop device over a 4 MiB file (root only)."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    img = tmp_path / "loop.img"
    img.write_bytes(bytes(4 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev, img
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_block_device_node_as_underlying_device(loop_device, mapper):
    node, img = loop_device
    st = os.stat(node)
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    disk = FileDisk(node)
    assert disk.is_block and disk.size == 4 << 20 and disk.devno == (os.major(st.st_rdev), os.minor(st.st_rdev))
    disk.close_backing()
    mapper.create("onloop", f"0 4096 linear {node} 2048")
    assert mapper.table("onloop") == [[0, 4096, "linear", f"{devno} 2048"]]   # printed as MAJOR:MINOR
    assert mapper.deps("onloop")[0]["devno"] == [os.major(st.st_rdev), os.minor(st.st_rdev)]
    with mapper.open_device("onloop", write=True) as dev:
        dev.write(0, b"through-the-loop")
        dev.flush()
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(16) == b"through-the-loop"
    mapper.create("bynumber", f"0 2048 linear {devno} 0")   # MAJOR:MINOR references work too
    assert mapper.info("bynumber")["live"]
