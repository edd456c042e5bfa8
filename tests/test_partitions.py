"""Partitions: MBR (with logical partitions) and GPT tables written by sfdisk/fdisk, read by
`userdm.block.partitions`; partition devices of mapped devices in `ls`, tables, FUSE and NBD;
the kernel's claim rules between a whole disk and its partitions; partprobe; removal; failures
on the disk reaching the holders of the partitions it overlaps."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from userdm.block import FileDisk, MemoryDisk
from userdm.block.device import HolderOps
from userdm.block.partitions import Partition, partition_name, partitions_of, read_partition_table
from userdm import Mapper
from userdm.dm.partitioned import BLKEXT_MAJOR
from userdm.errors import DMError

MiB = 1 << 20
SECTOR = 512

MBR_LAYOUT = """label: dos
start=2048, size=8192, type=83
start=10240, size=40960, type=5
start=12288, size=4096, type=83
start=18432, size=6144, type=82
start=26624, size=2048, type=83
start=51200, size=10240, type=83
"""

GPT_LAYOUT = """label: gpt
start=2048, size=8192, name=alpha
start=10240, size=20480, name=beta, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
start=40960, size=4096, name=gamma
"""


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt: fdisk, libnbd-bin)")


def sfdisk(image: str, script: str) -> list[dict]:
    """Write a partition table with sfdisk; return sfdisk's own view of it (sectors)."""
    need("sfdisk")
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", image], input=script,
                   text=True, check=True, capture_output=True)
    dump = subprocess.run(["sfdisk", "--json", image], text=True, check=True, capture_output=True)
    table = json.loads(dump.stdout)["partitiontable"]
    for p in table["partitions"]:
        p["number"] = int(p["node"][len(image):])
    return table["partitions"]


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


def busy(fn, *args, **kwargs) -> DMError:
    e = err(fn, *args, **kwargs)
    assert e.errno == errno.EBUSY, e
    return e


def fill(image: str, parts: list[dict]) -> None:
    """A distinct byte pattern in the first and last MiB-ish of every data partition."""
    with open(image, "r+b") as f:
        for p in parts:
            f.seek(p["start"] * SECTOR)
            f.write(bytes([p["number"]]) * 4096 + os.urandom(4096))
            f.seek((p["start"] + p["size"]) * SECTOR - 4096)
            f.write(os.urandom(4096))


def disk_bytes(image: str, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def table_of(image: str):
    disk = FileDisk(image)
    with disk.open() as handle:
        return read_partition_table(handle)


# ---- the parsers ------------------------------------------------------------------------------

def test_mbr_with_logical_partitions_matches_sfdisk(images):
    image = images(1, 64 * MiB)[0]
    expected = sfdisk(image, MBR_LAYOUT)
    table = table_of(image)
    assert table.scheme == "dos"
    got = {e.number: e for e in table.entries}
    assert sorted(got) == sorted(p["number"] for p in expected) == [1, 2, 3, 5, 6, 7]
    for p in expected:
        e = got[p["number"]]
        assert e.start == p["start"] * SECTOR and e.type == f"0x{int(p['type'], 16):02x}"
        # the extended partition shows as two sectors, as the kernel's msdos.c makes it
        assert e.size == (2 * SECTOR if p["type"] == "5" else p["size"] * SECTOR)


def test_gpt_matches_sfdisk(images):
    image = images(1, 64 * MiB)[0]
    expected = sfdisk(image, GPT_LAYOUT)
    table = table_of(image)
    assert table.scheme == "gpt" and not table.notes
    assert [(e.number, e.start, e.size, e.type, e.uuid, e.name) for e in table.entries] == \
        [(p["number"], p["start"] * SECTOR, p["size"] * SECTOR, p["type"].lower(), p["uuid"].lower(),
          p.get("name", "")) for p in expected]


@pytest.mark.parametrize("damage", ["header", "entries"])
def test_gpt_with_a_corrupt_primary_uses_the_backup(images, damage):
    image = images(1, 64 * MiB)[0]
    expected = sfdisk(image, GPT_LAYOUT)
    good = table_of(image)
    with open(image, "r+b") as f:
        at = SECTOR + 60 if damage == "header" else 2 * SECTOR + 200  # disk GUID / entry 2's GUID
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    table = table_of(image)
    assert table.entries == good.entries and len(table.entries) == len(expected)
    assert "primary GPT header is invalid" in table.notes[0] and "backup" in table.notes[0]
    assert ("header CRC32" if damage == "header" else "entry array CRC32") in table.notes[0]
    size = os.path.getsize(image)
    with open(image, "r+b") as f:  # now the backup too: no partitions, and no MBR ones either
        f.seek(size - SECTOR)
        f.write(b"\0" * 8)
    assert table_of(image) is None


def test_gpt_with_4096_byte_logical_blocks(tmp_path):
    need("fdisk")
    image, script = tmp_path / "4k.img", tmp_path / "4k.sfdisk"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    script.write_text("label: gpt\nstart=256, size=1024, name=four\nstart=2048, size=1536\n")
    subprocess.run(["fdisk", "-b", "4096", str(image)], input=f"I\n{script}\nw\n", text=True,
                   check=True, capture_output=True)
    data = image.read_bytes()
    disk = MemoryDisk(len(data), logical_block_size=4096)
    with disk.open(write=True) as h:
        h.write(0, data)
        table = read_partition_table(h)
    assert table.scheme == "gpt"
    assert [(e.number, e.start, e.size, e.name) for e in table.entries] == \
        [(1, 256 * 4096, 1024 * 4096, "four"), (2, 2048 * 4096, 1536 * 4096, "")]
    # the same bytes seen with 512-byte blocks hold no valid GPT (and msdos ignores EFI disks)
    small = MemoryDisk(len(data))
    with small.open(write=True) as h:
        h.write(0, data)
        assert read_partition_table(h) is None


def test_no_table_on_a_blank_disk_or_a_boot_sector(images):
    image = images(1, 8 * MiB)[0]
    assert table_of(image) is None
    with open(image, "r+b") as f:  # 55AA with garbage boot indicators is a boot sector
        f.seek(0x1BE)
        f.write(b"\x13" * 64)
        f.seek(510)
        f.write(b"\x55\xaa")
    assert table_of(image) is None


def test_partition_names_follow_the_kernel():
    assert partition_name("sda", 1) == "sda1"
    assert partition_name("disk", 12) == "disk12"
    assert partition_name("nvme0n1", 2) == "nvme0n1p2"
    assert partition_name("vol0", 1) == "vol0p1"


# ---- partition devices and the claim rules -----------------------------------------------------

@pytest.fixture
def gpt_memory_disk(images):
    """(disk, partitions) over a MemoryDisk holding an sfdisk GPT image."""
    image = images(1, 64 * MiB)[0]
    sfdisk(image, GPT_LAYOUT)
    disk = MemoryDisk(64 * MiB, name="mem")
    with disk.open(write=True) as h:
        h.write(0, disk_bytes(image, 0, MiB))
        h.write(63 * MiB, disk_bytes(image, 63 * MiB, MiB))
        table = read_partition_table(h)
    return disk, partitions_of(disk, table, "mem")


def test_partition_io_is_the_same_range_of_the_disk(gpt_memory_disk):
    disk, parts = gpt_memory_disk
    p2 = parts[1]
    assert (p2.name, p2.start, p2.size) == ("mem2", 10240 * SECTOR, 20480 * SECTOR)
    payload = os.urandom(3 * 4096)
    with p2.open(write=True) as h, disk.open() as whole:
        h.write(p2.size - len(payload), payload)
        assert whole.read(p2.start + p2.size - len(payload), len(payload)) == payload
        assert h.read(p2.size - len(payload), len(payload)) == payload
        assert err(h.read, p2.size - 512, 1024).errno == errno.EINVAL  # not past its end
        assert disk.open_count == 2  # the partition's open is also an open of the disk


def test_claim_rules_between_the_whole_disk_and_its_partitions(gpt_memory_disk):
    disk, (p1, p2, p3) = gpt_memory_disk
    a = p1.open(holder="A")
    # (1) while a partition is claimed, nobody can claim the whole disk, not even its holder
    busy(disk.open, holder="A")
    assert "one of its partitions" in str(busy(disk.open, holder="B"))
    # (2) other partitions can be claimed by other holders; the same holder nests
    b = p2.open(holder="B")
    a2 = p1.open(holder="A")
    busy(p1.open, holder="B")
    # non-exclusive opens are never blocked
    for dev in (disk, p1, p2, p3):
        dev.open(write=True).close()
    a.close()
    busy(disk.open, holder="A")  # p1 is still claimed (nested) and p2 too
    a2.close()
    busy(disk.open, holder="B")
    b.close()
    # (3) while the whole disk is claimed by H, no partition can be claimed by anyone, even H
    h = disk.open(holder="H")
    for part in (p1, p2, p3):
        busy(part.open, holder="H")
        e = busy(part.open, holder="A")
        assert f"whole disk {disk.ref} is claimed exclusively by H" in str(e)
        part.open(write=True).close()
    h2 = disk.open(holder="H")  # the whole disk's own holder nests
    h.close()
    h2.close()
    p3.open(holder="C").close()  # all free again
    assert disk.holder is None and disk.open_count == 0


# ---- partitions of mapped devices --------------------------------------------------------------

@pytest.fixture
def gpt_disk(mapper, images):
    """(mapper, image, sfdisk's partitions): mapped device `disk` over a GPT image."""
    image = images(1, 64 * MiB)[0]
    parts = sfdisk(image, GPT_LAYOUT)
    fill(image, parts)
    mapper.create("disk", f"0 {64 * MiB // SECTOR} linear {image} 0")
    return mapper, image, parts


def test_partitions_of_a_mapped_device_appear_after_resume(gpt_disk):
    m, image, parts = gpt_disk
    listed = {i["name"]: i for i in m.list()}
    assert sorted(listed) == ["disk", "disk1", "disk2", "disk3"]
    for p in parts:
        info = m.info(f"disk{p['number']}")
        assert info == listed[info["name"]]
        assert (info["major"], info["size"], info["open_count"], info["live"]) == \
            (BLKEXT_MAJOR, p["size"] * SECTOR, 0, True)
        assert info["partition"]["start"] == p["start"] * SECTOR and info["partition"]["disk"] == "disk"
        assert info["partition"]["label"] == p["name"]
    assert len({listed[f"disk{n}"]["minor"] for n in (1, 2, 3)}) == 3
    assert m.export_names() == ["disk", "disk1", "disk2", "disk3"]
    assert m.table("disk2") == [] and m.status("disk2") == []
    with m.open_device("disk2", write=False) as h:
        p = parts[1]
        assert h.read(0, 8192) == disk_bytes(image, p["start"] * SECTOR, 8192)
        assert h.read(h.size - 4096, 4096) == disk_bytes(image, (p["start"] + p["size"]) * SECTOR - 4096, 4096)
        assert (m.info("disk2")["open_count"], m.info("disk")["open_count"]) == (1, 1)
    # a device whose name ends in a digit gets NAMEpN partitions
    m.create("vol0", f"0 {64 * MiB // SECTOR} linear {image} 0", shared=True)
    assert [n for n in m.export_names() if n.startswith("vol0")] == ["vol0", "vol0p1", "vol0p2", "vol0p3"]
    assert m.find_name(major=BLKEXT_MAJOR, minor=m.info("vol0p2")["minor"]) == "vol0p2"


def test_a_partition_in_a_table_and_the_names_it_takes(gpt_disk):
    m, image, parts = gpt_disk
    p1 = parts[0]
    m.create("top", f"0 2048 linear /dev/mapper/disk1 1024\n2048 2048 linear {BLKEXT_MAJOR}:"
             f"{m.info('disk3')['minor']} 0")
    assert m.info("disk1")["holders"] == ["top"] and m.info("disk1")["holder"] == "device-mapper"
    assert m.info("disk")["holder"] == "the holder of one of its partitions"
    assert "disk1" not in m.info("disk")["holders"]
    assert m.table("top")[0][3] == f"{BLKEXT_MAJOR}:{m.info('disk1')['minor']} 1024"
    payload = os.urandom(2048 * SECTOR)
    with m.open_device("top", write=True) as h:
        h.write(0, payload)
        h.flush()
    assert disk_bytes(image, (p1["start"] + 1024) * SECTOR, len(payload)) == payload
    # the disk cannot be claimed by the device-mapper (or anyone) while disk1 is
    busy(m.create, "whole", "0 2048 linear /dev/mapper/disk 0")
    # names: a mapped device cannot take a partition's name
    busy(m.create, "disk2", "0 8 zero")
    m.create("other", "0 8 zero")
    busy(m.rename, "other", "disk3")
    e = err(m.remove, "disk1")
    assert e.errno == errno.ENXIO and "partition 1 of disk" in str(e)


def test_claims_between_outside_holders_and_the_device_mapper(gpt_disk):
    m, image, parts = gpt_disk
    mkfs = m.open_device("disk", write=False, holder="mkfs")
    assert "claimed exclusively by mkfs" in str(busy(m.create, "top", "0 8 linear /dev/mapper/disk2 0"))
    mkfs.close()
    m.create("top", "0 8 linear /dev/mapper/disk2 0")
    m.create("top2", "0 8 linear /dev/mapper/disk3 0")  # another partition, the same DM holder
    busy(m.open_device, "disk", write=False, holder="mkfs")
    busy(m.open_device, "disk2", write=False, holder="mkfs")
    m.open_device("disk1", write=False, holder="mkfs").close()  # a partition nobody holds
    m.open_device("disk", write=True).close()  # plain opens are never blocked


def test_remove_is_ebusy_while_a_partition_is_open(gpt_disk):
    m, image, parts = gpt_disk
    h = m.open_device("disk3", write=True)
    part = m.device("disk3")
    e = busy(m.remove, "disk")
    assert "open count 1" in str(e)
    h.close()
    m.remove("disk")
    assert m.list() == [] and m.export_names() == []
    assert err(part.open).errno == errno.ENXIO
    assert err(m.info, "disk3").errno == errno.ENXIO


def test_partprobe_reads_the_rewritten_table(gpt_disk):
    m, image, parts = gpt_disk
    m.create("top", "0 2048 linear /dev/mapper/disk2 0")
    e = busy(m.partprobe, "disk")
    assert "disk2" in str(e)
    m.remove("top")
    new = sfdisk(image, MBR_LAYOUT)
    assert m.export_names() == ["disk", "disk1", "disk2", "disk3"]  # nothing changes by itself
    found = m.partprobe("disk")
    assert [i["name"] for i in found] == [f"disk{p['number']}" for p in new]
    assert {i["name"]: i["size"] for i in found}["disk6"] == 6144 * SECTOR
    assert all(i["partition"]["scheme"] == "dos" for i in found)
    assert m.export_names() == ["disk"] + [i["name"] for i in found]
    assert err(m.partprobe, "disk5").errno == errno.ENXIO  # a partition has no partitions
    # a wiped table: partprobe drops them all
    with open(image, "r+b") as f:
        f.write(bytes(SECTOR))
    assert m.partprobe("disk") == [] and m.export_names() == ["disk"]


def test_a_reload_rescans_unless_a_partition_is_open(gpt_disk, images):
    m, image, parts = gpt_disk
    other = images(1, 32 * MiB)[0]
    sfdisk(other, "label: dos\nstart=2048, size=4096, type=83\n")
    h = m.open_device("disk1", write=False)
    m.load("disk", f"0 {32 * MiB // SECTOR} linear {other} 0")
    m.resume("disk")
    assert m.export_names() == ["disk", "disk1", "disk2", "disk3"]  # disk1 is open: they stay
    h.close()
    m.load("disk", f"0 {32 * MiB // SECTOR} linear {other} 0")
    m.resume("disk")
    assert m.export_names() == ["disk", "disk1"] and m.info("disk1")["size"] == 4096 * SECTOR
    m.rename("disk", "renamed7")
    assert m.export_names() == ["renamed7", "renamed7p1"]
    with m.open_device("renamed7p1", write=False) as h:
        assert h.device.ref == "/dev/mapper/renamed7p1"


def test_a_disk_failure_reaches_the_holders_of_the_partitions_it_overlaps(gpt_disk):
    m, image, parts = gpt_disk
    got: dict[str, list] = {"disk1": [], "disk2": [], "disk3": []}
    dead: list[str] = []
    opens = [m.device(name).open(holder=f"fs-{name}", holder_ops=HolderOps(
        notify_failure=lambda off, n, flags, name=name: got[name].append((off, n)),
        mark_dead=lambda surprise, name=name: dead.append(name))) for name in got]
    p1, p2 = parts[0], parts[1]
    # 8 sectors before the end of disk1 up to 8 sectors into disk2 (they touch)
    offset, length = (p2["start"] - 8) * SECTOR, 16 * SECTOR
    m.device("disk").notify_failure(offset, length)
    assert got == {"disk1": [((p1["size"] - 8) * SECTOR, 8 * SECTOR)], "disk2": [(0, 8 * SECTOR)], "disk3": []}
    # a failure of the image file travels file -> disk -> partition, in partition offsets
    got["disk2"].clear()
    m.notify_failure(image, (p2["start"] + 100) * SECTOR, 4096)
    assert got["disk2"] == [(100 * SECTOR, 4096)] and got["disk3"] == []
    # a failure outside every partition reaches none of their holders
    assert err(m.device("disk").notify_failure, SECTOR, SECTOR).errno == errno.EOPNOTSUPP
    assert got["disk3"] == []
    # the disk dies: so do its partitions, and their holders are told
    m.device("disk").mark_dead()
    assert sorted(dead) == ["disk1", "disk2", "disk3"]
    assert err(opens[0].read, 0, 512).errno == errno.EIO
    for h in opens:
        h.close()


def test_partitions_in_the_fuse_directory(gpt_disk):
    from userdm.export.fuse.files import DeviceFiles
    m, image, parts = gpt_disk
    files = DeviceFiles(m)
    listed = dict(files.listdir())
    assert sorted(listed) == ["disk", "disk1", "disk2", "disk3"]
    p3 = parts[2]
    assert listed["disk3"].size == p3["size"] * SECTOR
    fh = files.open(listed["disk3"].ino, write=False)
    try:
        assert bytes(files.read(fh, 0, 8192)) == disk_bytes(image, p3["start"] * SECTOR, 8192)
        assert m.info("disk3")["open_count"] == 1
    finally:
        files.release(fh)


# ---- through the daemon: CLI, NBD --------------------------------------------------------------

def test_partitions_over_nbd_and_the_cli(daemon, images, tmp_path):
    need("nbdinfo", "nbdcopy")
    image = images(1, 64 * MiB)[0]
    parts = sfdisk(image, GPT_LAYOUT)
    fill(image, parts)
    daemon.run("create", "disk", "--table", f"0 {64 * MiB // SECTOR} linear {image} 0")
    ls = daemon.run("ls").stdout.splitlines()
    assert [line.split("\t")[0] for line in ls] == ["disk", "disk1", "disk2", "disk3"]
    assert "(259:" in ls[1]
    sock = daemon.runtime / "nbd.sock"
    uri = f"nbd+unix:///disk2?socket={sock}"
    size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, check=True, timeout=60)
    assert int(size.stdout) == parts[1]["size"] * SECTOR
    out = tmp_path / "disk2.copy"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=60, capture_output=True)
    assert out.read_bytes() == disk_bytes(image, parts[1]["start"] * SECTOR, parts[1]["size"] * SECTOR)
    # a table over a partition; the disk is then busy for partprobe and remove
    daemon.run("create", "top", "--table", "0 4096 linear /dev/mapper/disk1 0")
    assert daemon.run("table", "top").stdout.split()[3].startswith("259:")
    for verb in ("partprobe", "remove"):
        res = daemon.run(verb, "disk", check=False)
        assert res.returncode == 1 and "EBUSY" in res.stderr, res.stderr
    daemon.run("remove", "top")
    sfdisk(image, "label: dos\nstart=4096, size=2048, type=83\n")
    listed = daemon.run("partprobe", "-v", "disk").stdout
    assert listed.split("\t")[0] == "disk1"
    with daemon.connect() as client:
        assert client.info("disk1")["size"] == 2048 * SECTOR
        assert [i["name"] for i in client.list()] == ["disk", "disk1"]
    daemon.run("remove", "disk")
    assert daemon.run("ls").stdout.strip() == "No devices found"


def test_read_only_disk_gives_read_only_partitions(mapper, images):
    image = images(1, 64 * MiB)[0]
    sfdisk(image, GPT_LAYOUT)
    mapper.create("ro", f"0 {64 * MiB // SECTOR} linear {image} 0", readonly=True)
    assert mapper.info("ro1")["readonly"]
    assert err(mapper.open_device, "ro1", write=True).errno == errno.EACCES
    assert isinstance(mapper.device("ro1"), Partition)


def test_fault_injection_stacks_are_read_only_by_partprobe(mapper, images):
    image = images(1, 64 * MiB)[0]
    sfdisk(image, GPT_LAYOUT)
    sectors = 64 * MiB // SECTOR
    mapper.create("dusty", f"0 {sectors} dust {image} 0 512")
    mapper.create("above", f"0 {sectors} linear /dev/mapper/dusty 0")
    assert mapper.export_names() == ["above", "dusty"]  # a resume reads neither
    assert [i["name"] for i in mapper.partprobe("above")] == ["above1", "above2", "above3"]
    mapper.create("plain", f"0 {sectors} linear {image} 0", shared=True)
    assert "plain1" in mapper.export_names()


def test_partitions_and_tables_on_them_come_back_after_a_restart(images, tmp_path):
    from userdm import Mapper
    image = images(1, 64 * MiB)[0]
    sfdisk(image, GPT_LAYOUT)
    state = tmp_path / "state"
    m = Mapper(state)
    try:
        m.create("top", "0 8 zero")  # created first: restored before its partition exists
        m.create("disk", f"0 {64 * MiB // SECTOR} linear {image} 0")
        m.load("top", "0 8192 linear /dev/mapper/disk2 0")
        m.resume("top")
    finally:
        m.close()
    m = Mapper(state)
    try:
        assert m.export_names() == ["disk", "disk1", "disk2", "disk3", "top"]
        assert m.info("disk2")["holders"] == ["top"] and m.info("disk2")["open_count"] == 1
        assert m.table("top")[0][3] == f"{BLKEXT_MAJOR}:{m.info('disk2')['minor']} 0"
    finally:
        m.close()


def test_a_disk_cannot_map_onto_its_own_partition(images):
    (image,) = images(1, 64 * MiB)
    sfdisk(image, GPT_LAYOUT)
    m = Mapper()
    try:
        m.create("disk", f"0 {64 * MiB // SECTOR} linear {image} 0")
        e = err(m.load, "disk", "0 8 linear /dev/mapper/disk1 0")
        assert e.errno == errno.ELOOP and e.message.startswith("disk -> disk1 -> disk: ")
    finally:
        m.close()
