"""thin-pool and thin: the kernel's metadata format checked by thin-provisioning-tools, the data
path (provisioning, zeroing, sharing with snapshots, discards), tables, status lines, messages and
their refusals, running out of data space and growing by reload, the low water mark event,
metadata written by `thin_restore`, SIGKILL of the daemon under writes with flushes, and the
Qubes OS flow (snapshot a template, fio with verify on the snapshot over NBD, delete)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from userdm import Mapper
from userdm.block.file import FileDisk
from userdm.errors import DMError
from userdm.targets import _pdata
from userdm.targets._thin_metadata import ThinMetadata

MiB = 1 << 20
BS = 128                 # data block size in sectors (64 KiB)
BB = BS * 512

for _tool in ("thin_check", "thin_dump", "thin_restore"):
    if shutil.which(_tool) is None:
        pytest.skip(f"needs {_tool} (apt: thin-provisioning-tools)", allow_module_level=True)


# ---- helpers ----------------------------------------------------------------------------------

def thin_check(meta: str) -> None:
    res = subprocess.run(["thin_check", meta], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def thin_dump(meta: str, *extra: str) -> tuple[ET.Element, dict[int, dict[int, int]]]:
    """The superblock element and {device: {virtual block: data block}} as thin_dump lists them."""
    res = subprocess.run(["thin_dump", *extra, meta], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    root = ET.fromstring(res.stdout)
    devices: dict[int, dict[int, int]] = {}
    for dev in root.iter("device"):
        maps = devices[int(dev.get("dev_id"))] = {}
        for m in dev:
            if m.tag == "single_mapping":
                maps[int(m.get("origin_block"))] = int(m.get("data_block"))
            else:
                o, d, n = (int(m.get(k)) for k in ("origin_begin", "data_begin", "length"))
                maps.update(zip(range(o, o + n), range(d, d + n)))
    return root, devices


def pool_table(meta: str, data: str, blocks: int, *features: str, lwm: int = 0) -> str:
    feats = f" {len(features)} {' '.join(features)}" if features else ""
    return f"0 {blocks * BS} thin-pool {meta} {data} {BS} {lwm}{feats}"


def pool_status(m: Mapper, name: str = "pool") -> list[str]:
    return m.status(name)[0][3].split()


def used_data(m: Mapper, name: str = "pool") -> int:
    return int(pool_status(m, name)[2].split("/")[0])


def stamp(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words).ljust(4096, b"s")


def read_block(m: Mapper, name: str, block: int, length: int = BB) -> bytes:
    buf = bytearray(length)
    with m.open_device(name, write=False) as o:
        o.readinto(block * BB, memoryview(buf))
    return bytes(buf)


@pytest.fixture
def pool_files(images):
    """(metadata path, data path): 4 MiB of metadata, 64 MiB of data (1024 blocks)."""
    return images(1, 4 * MiB)[0], images(1, 64 * MiB)[0]


# ---- persistent-data pieces ---------------------------------------------------------------------

def test_bitmap_and_node_round_trip_and_checksums_are_checked():
    counts = np.array([0, 1, 2, 3, 0, 3, 1], np.uint32)
    buf = _pdata.encode_bitmap(counts, 7)
    _pdata.check(buf, 7, _pdata.BITMAP_CSUM_XOR, "bitmap")
    assert _pdata.decode_bitmap(buf)[:7].tolist() == counts.tolist()
    assert buf[16] == 0b11_01_10_00  # two bits per entry, the high bit first: 0, 1, 2, 3
    node = _pdata.Node(9, True, np.array([1, 5, 9], np.uint64), np.array([10, 50, 90], _pdata.U64))
    raw = node.pack()
    back = _pdata.unpack_node(raw, 9, _pdata.U64)
    assert back.keys.tolist() == [1, 5, 9] and back.values.tolist() == [10, 50, 90]
    raw[100] ^= 1
    with pytest.raises(DMError) as exc:
        _pdata.unpack_node(raw, 9, _pdata.U64)
    assert exc.value.errno == errno.EILSEQ and "checksum" in exc.value.message
    with pytest.raises(DMError, match="claims to be block 9"):
        _pdata.unpack_node(node.pack(), 10, _pdata.U64)


def test_metadata_model_workload_passes_thin_check_and_reopens(tmp_path):
    """Random creates, snapshots of snapshots, deletes, inserts, removals and metadata snapshots
    against a model: after each commit thin_check passes and thin_dump lists the model."""
    path = str(tmp_path / "meta.img")
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    nr = 60000
    md = ThinMetadata(FileDisk(path).open(write=True), BS, nr)
    rng = random.Random(7)
    model: dict[int, dict[int, int]] = {}
    next_id = 0

    def verify() -> None:
        md.commit()
        thin_check(path)
        assert thin_dump(path)[1] == model
        assert md.dump() == model
        for sm in (md.data, md.tm.meta):  # the free counts kept in step equal a recount
            assert sm.nr_free() == int(np.count_nonzero(sm.counts == 0))

    for step in range(250):
        op = rng.random()
        devs = list(model)
        if op < 0.05 or not devs:
            md.create_thin(next_id)
            model[next_id] = {}
            next_id += 1
        elif op < 0.12:
            origin = rng.choice(devs)
            md.create_snap(next_id, origin)
            model[next_id] = dict(model[origin])
            next_id += 1
        elif op < 0.16 and len(devs) > 1:
            dev = rng.choice(devs)
            md.delete(dev)
            del model[dev]
        elif op < 0.6:
            dev, first, n = rng.choice(devs), rng.randrange(20000), rng.randrange(1, 2000)
            blocks = md.alloc_data(n)
            if blocks is None:
                continue
            md.insert(dev, np.arange(first, first + n), blocks)
            model[dev].update(zip(range(first, first + n), blocks.tolist()))
        else:
            dev, first, n = rng.choice(devs), rng.randrange(20000), rng.randrange(1, 3000)
            md.remove(dev, first, n)
            for k in range(first, first + n):
                model[dev].pop(k, None)
        if step % 25 == 0:
            verify()
        if step % 60 == 30:
            if md.held_root:
                md.release_metadata_snap()
            else:
                md.reserve_metadata_snap()
    verify()
    assert sum(len(m) for m in model.values()) > 10000
    held = md.held_root
    reopened = ThinMetadata(FileDisk(path).open(write=True), BS, nr)
    assert reopened.dump() == model and reopened.held_root == held
    # the data space map counts one reference per leaf that holds a block: what thin_check checked
    assert reopened.data.nr_blocks - reopened.data.nr_free() == md.data.nr_blocks - md.data.nr_free()


# ---- tables, status, messages ------------------------------------------------------------------

def test_status_and_table_lines(mapper, pool_files):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 1024, "skip_block_zeroing", "error_if_no_space", lwm=10))
    assert mapper.table("pool")[0][3] == (f"{meta} {data} {BS} 10 2 skip_block_zeroing "
                                          "error_if_no_space ")
    # 4 MiB = 1024 metadata blocks; the kernel counts its reserve (a tenth) as used
    st = pool_status(mapper)
    assert st[0] == "0" and st[1].endswith("/1024") and st[2] == "0/1024"
    assert st[3:] == ["-", "rw", "discard_passdown", "error_if_no_space", "-", "256"]
    mapper.message("pool", 0, "create_thin 7")
    mapper.message("pool", 0, "set_transaction_id 0 5")
    mapper.create("t", f"0 {4096 * BS} thin /dev/mapper/pool 7")
    assert mapper.status("t")[0][3] == "0 -"
    assert mapper.table("t")[0][3].endswith(" 7")
    with mapper.open_device("t", write=True) as o:
        o.write(3 * BB + 512, b"x" * 512)
        o.write(9 * BB, b"y" * 4096)
    assert mapper.status("t")[0][3] == f"{2 * BS} {10 * BS - 1}"
    assert pool_status(mapper)[0] == "5" and pool_status(mapper)[2] == "2/1024"
    mapper.message("pool", 0, "reserve_metadata_snap")
    assert pool_status(mapper)[3].isdigit()
    mapper.message("pool", 0, "release_metadata_snap")
    assert pool_status(mapper)[3] == "-"


def test_metadata_snapshot_is_what_thin_dump_reads_while_the_pool_goes_on(mapper, pool_files):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {BS * 64} thin /dev/mapper/pool 1")
    with mapper.open_device("t", write=True) as o:
        for b in (1, 2, 3):
            o.write(b * BB, stamp(b))
    mapper.message("pool", 0, "reserve_metadata_snap")
    with mapper.open_device("t", write=True) as o:
        o.write(9 * BB, stamp(9))
        o.discard(BB, BB)
        o.flush()
    _, held = thin_dump(meta, "--metadata-snap")
    _, live = thin_dump(meta)
    assert sorted(held[1]) == [1, 2, 3] and sorted(live[1]) == [2, 3, 9]
    assert held[1][2] == live[1][2]  # still shared
    thin_check(meta)
    mapper.message("pool", 0, "release_metadata_snap")
    thin_check(meta)


def test_features_in_status_and_read_only_pool(mapper, pool_files):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {BS * 64} thin /dev/mapper/pool 1")
    with mapper.open_device("t", write=True) as o:
        o.write(0, stamp(0))
    for features, words in [(("ignore_discard",), ["rw", "ignore_discard", "queue_if_no_space"]),
                            (("no_discard_passdown",), ["rw", "no_discard_passdown", "queue_if_no_space"]),
                            (("read_only",), ["ro", "discard_passdown", "queue_if_no_space"])]:
        mapper.load("pool", pool_table(meta, data, 1024, *features))
        mapper.resume("pool")
        assert pool_status(mapper)[4:7] == words, features
        assert mapper.table("pool")[0][3].endswith(f" 1 {features[0]} ")
    with mapper.open_device("t", write=True) as o:
        o.write(512, b"own block")  # writes to blocks the device owns go on
        with pytest.raises(DMError) as exc:
            o.write(5 * BB, stamp(5))
        assert exc.value.errno == errno.EIO
    assert read_block(mapper, "t", 0, 521)[512:] == b"own block"
    with pytest.raises(DMError) as exc:
        mapper.message("pool", 0, "create_thin 2")
    assert exc.value.errno == errno.EOPNOTSUPP and "READ_ONLY" in exc.value.message
    mapper.load("pool", pool_table(meta, data, 1024))
    mapper.resume("pool")
    assert pool_status(mapper)[4] == "rw"
    with mapper.open_device("t", write=True) as o:
        o.write(5 * BB, stamp(5))
    assert read_block(mapper, "t", 5, 4096) == stamp(5)


@pytest.mark.hostile
def test_constructor_refusals(mapper, pool_files, images):
    meta, data = pool_files
    for args, err, text in [
        (f"{meta} {data} {BS}", errno.EINVAL, "Invalid argument count"),
        (f"{meta} {data} 100 0", errno.EINVAL, "Invalid block size"),
        (f"{meta} {data} 64 0", errno.EINVAL, "Invalid block size"),
        (f"{meta} {data} x 0", errno.EINVAL, "Invalid block size"),
        (f"{meta} {data} {BS} -1", errno.EINVAL, "Invalid low water mark"),
        (f"{meta} {data} {BS} 0 1", errno.EINVAL, "Invalid number of pool feature arguments"),
        (f"{meta} {data} {BS} 0 1 bogus", errno.EINVAL, "Unrecognised pool feature requested"),
        (f"/nonexistent/meta {data} {BS} 0", None, "Error opening metadata block device"),
        (f"{meta} /nonexistent/data {BS} 0", None, "Error getting data device"),
    ]:
        with pytest.raises(DMError) as exc:
            mapper.create("bad", f"0 {1024 * BS} thin-pool {args}")
        assert text in exc.value.message, (args, exc.value)
        if err is not None:
            assert exc.value.errno == err, (args, exc.value)
    garbage = images(1, 4 * MiB)[0]
    with open(garbage, "r+b") as f:
        f.write(b"\x01" * 4096)
    with pytest.raises(DMError, match="Error creating metadata object.*bad superblock magic"):
        mapper.create("bad", pool_table(garbage, data, 1024))
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.remove("pool")
    with pytest.raises(DMError, match="changing the data block size"):
        mapper.create("bad", f"0 {512 * 256} thin-pool {meta} {data} 256 0")
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.message("pool", 0, "create_thin 1")
    for args, err, text in [
        ("/dev/mapper/pool", errno.EINVAL, "Invalid argument count"),
        ("/dev/mapper/pool x", errno.EINVAL, "Invalid device id"),
        ("/dev/mapper/pool 16777216", errno.EINVAL, "Invalid device id"),
        ("/dev/mapper/pool 2", errno.ENODATA, "Couldn't open thin internal device"),
        (f"{data} 1", errno.EINVAL, "Couldn't find pool object"),
        ("/dev/mapper/pool 1 /nonexistent/origin", None, "Error opening origin device"),
    ]:
        with pytest.raises(DMError) as exc:
            mapper.create("bad", f"0 {BS * 16} thin {args}")
        assert text in exc.value.message, (args, exc.value)
        if err is not None:
            assert exc.value.errno == err, (args, exc.value)


@pytest.mark.hostile
def test_message_refusals(mapper, pool_files):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t1", f"0 {BS * 16} thin /dev/mapper/pool 1")
    for msg, err, text in [
        ("create_thin", errno.EINVAL, "received with 0 arguments instead of 1"),
        ("create_thin 1 2", errno.EINVAL, "received with 2 arguments instead of 1"),
        ("create_thin -1", errno.EINVAL, "invalid device id"),
        ("create_thin 16777216", errno.EINVAL, "invalid device id"),
        ("create_thin 1", errno.EEXIST, "Creation of new thinly-provisioned device with id 1 failed"),
        ("create_snap 2 9", errno.ENODATA, "Creation of new snapshot 2 of device 9 failed"),
        ("create_snap 1 1", errno.EEXIST, "Creation of new snapshot 1 of device 1 failed"),
        ("delete 1", errno.EBUSY, "Deletion of thin device 1 failed: thin device 1 is open"),
        ("delete 5", errno.ENODATA, "Deletion of thin device 5 failed"),
        ("set_transaction_id 3 4", errno.EINVAL, "mismatched transaction id"),
        ("set_transaction_id x 4", errno.EINVAL, "Unrecognised id 'x'"),
        ("release_metadata_snap", errno.EINVAL, "No pool metadata snapshot found"),
        ("frobnicate", errno.EINVAL, "Unrecognised thin pool target message received"),
    ]:
        with pytest.raises(DMError) as exc:
            mapper.message("pool", 0, msg)
        assert exc.value.errno == err and text in exc.value.message, (msg, exc.value)
    mapper.message("pool", 0, "reserve_metadata_snap")
    with pytest.raises(DMError) as exc:
        mapper.message("pool", 0, "RESERVE_METADATA_SNAP")
    assert exc.value.errno == errno.EBUSY and "already exists" in exc.value.message
    thin_check(meta)


# ---- the data path ------------------------------------------------------------------------------

def test_provisioning_zeroing_sharing_and_discard(mapper, pool_files, images):
    meta, data = pool_files
    with open(data, "r+b") as f:  # stale data in the pool's blocks must never show through
        f.write(b"\xee" * (8 * BB))
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("a", f"0 {BS * 64} thin /dev/mapper/pool 1")
    assert read_block(mapper, "a", 0) == bytes(BB)
    with mapper.open_device("a", write=True) as o:
        o.write(100, b"A" * 200)
        o.write(2 * BB, b"B" * BB)
    assert read_block(mapper, "a", 0) == bytes(100) + b"A" * 200 + bytes(BB - 300)
    assert used_data(mapper) == 2
    mapper.message("pool", 0, "create_snap 2 1")
    mapper.message("pool", 0, "create_snap 3 2")  # a snapshot of a snapshot
    mapper.create("s", f"0 {BS * 64} thin /dev/mapper/pool 2")
    mapper.create("ss", f"0 {BS * 64} thin /dev/mapper/pool 3")
    with mapper.open_device("s", write=True) as o:
        o.write(0, b"S" * 4)  # breaks sharing: the rest of the block is copied
    assert read_block(mapper, "s", 0) == b"SSSS" + bytes(96) + b"A" * 200 + bytes(BB - 300)
    assert read_block(mapper, "a", 0)[:4] == bytes(4)
    assert read_block(mapper, "ss", 0)[:4] == bytes(4)
    assert used_data(mapper) == 3
    with mapper.open_device("a", write=True) as o:
        o.discard(BB + 512, 3 * BB)  # only block 2 is whole inside it
    assert read_block(mapper, "a", 2) == bytes(BB)
    assert read_block(mapper, "s", 2) == b"B" * BB and read_block(mapper, "ss", 2) == b"B" * BB
    assert used_data(mapper) == 3   # block 2 is still the snapshots'
    mapper.remove("s")
    mapper.remove("ss")
    mapper.message("pool", 0, "delete 2")
    mapper.message("pool", 0, "delete 3")
    assert used_data(mapper) == 1
    mapper.remove("a")
    mapper.remove("pool")
    thin_check(meta)
    assert thin_dump(meta)[1] == {1: {0: 0}}


def test_skip_block_zeroing_and_external_origin(mapper, pool_files, images):
    meta, data = pool_files
    origin = images(1, 4 * BB)[0]
    with open(origin, "r+b") as f:
        f.write(b"O" * (4 * BB))
    with open(data, "r+b") as f:
        f.write(b"\xee" * (8 * BB))
    mapper.create("pool", pool_table(meta, data, 1024, "skip_block_zeroing"))
    mapper.message("pool", 0, "create_thin 1")
    mapper.message("pool", 0, "create_thin 2")
    mapper.create("plain", f"0 {BS * 8} thin /dev/mapper/pool 1")
    mapper.create("ext", f"0 {BS * 8} thin /dev/mapper/pool 2 {origin}")
    with mapper.open_device("plain", write=True) as o:
        o.write(0, b"p" * 512)
    assert read_block(mapper, "plain", 0)[512:1024] == b"\xee" * 512  # not zeroed, as asked
    assert read_block(mapper, "ext", 1) == b"O" * BB and read_block(mapper, "ext", 5) == bytes(BB)
    with mapper.open_device("ext", write=True) as o:
        o.write(BB + 512, b"e" * 512)  # provisioning copies the origin's block around it
    assert read_block(mapper, "ext", 1) == b"O" * 512 + b"e" * 512 + b"O" * (BB - 1024)
    assert mapper.table("ext")[0][3].endswith(f" 2 {origin}")
    with open(origin, "rb") as f:
        assert f.read() == b"O" * (4 * BB)  # the external origin is never written


def test_workload_with_10000_mappings_matches_thin_dump(mapper, images):
    """Thin devices, snapshots of snapshots, broken sharing, discards and deletes: afterwards
    thin_check passes, and thin_dump lists exactly the blocks that read back non-zero through
    each device, each with the data block whose contents the device returns."""
    nr = 16384
    meta, data = images(1, 16 * MiB)[0], images(1, nr * BB)[0]
    mapper.create("pool", pool_table(meta, data, nr, "skip_block_zeroing"))
    rng = random.Random(14)
    live: dict[int, str] = {}

    def add(dev: int, snap_of: int | None = None) -> None:
        mapper.message("pool", 0, f"create_snap {dev} {snap_of}" if snap_of is not None else f"create_thin {dev}")
        live[dev] = f"t{dev}"
        mapper.create(live[dev], f"0 {BS * 8192} thin /dev/mapper/pool {dev}")

    def scribble(dev: int, blocks: list[int]) -> None:
        with mapper.open_device(live[dev], write=True) as o:
            for b in blocks:
                o.write(b * BB, stamp(dev, b, rng.randrange(1 << 30)))

    add(1)
    scribble(1, rng.sample(range(8192), 6000))
    add(2, 1)
    scribble(2, rng.sample(range(8192), 2000))
    add(3, 2)
    scribble(3, rng.sample(range(8192), 1500))
    with mapper.open_device(live[1], write=True) as o:
        for first in rng.sample(range(0, 8000, 50), 20):
            o.discard(first * BB, 40 * BB)
    add(4)
    scribble(4, rng.sample(range(8192), 3000))
    mapper.remove(live.pop(2))
    mapper.message("pool", 0, "delete 2")
    mapper.suspend("pool")  # commits
    thin_check(meta)
    _, dumped = thin_dump(meta)
    assert set(dumped) == set(live) and sum(len(v) for v in dumped.values()) > 10000
    with open(data, "rb") as f:
        for dev, name in live.items():
            with mapper.open_device(name, write=False) as o:
                whole = bytearray(8192 * BB)
                o.readinto(0, memoryview(whole))
            stamps = np.frombuffer(whole, np.uint64).reshape(8192, BB // 8)[:, :3]
            nonzero = set(np.flatnonzero(stamps.any(axis=1)).tolist())
            assert nonzero == set(dumped[dev]), dev
            for vb, db in rng.sample(sorted(dumped[dev].items()), 200):
                f.seek(db * BB)
                assert f.read(4096) == bytes(whole[vb * BB:vb * BB + 4096])
    mapper.resume("pool")


def test_concurrent_writers_discards_and_snapshots(mapper, images):
    """Four writers on disjoint blocks of one device (partial writes, discards, flushes and
    reads that check what they wrote) while snapshots of it are taken and deleted: every read
    returns what the writer last wrote (or zeroes), and thin_check passes."""
    nb = 512
    meta, data = images(1, 16 * MiB)[0], images(1, 512 * MiB)[0]
    mapper.create("pool", pool_table(meta, data, 8192))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t1", f"0 {nb * BS} thin /dev/mapper/pool 1")
    errors: list[tuple] = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        mine = list(range(k, nb, 4))
        model: dict[int, dict[int, bytes]] = {}
        try:
            with mapper.open_device("t1", write=True) as o:
                for it in range(1200):
                    b, op, off = rng.choice(mine), rng.random(), rng.randrange(16) * 4096
                    if op < 0.5:
                        payload = stamp(k, b, it)
                        o.write(b * BB + off, payload)
                        model.setdefault(b, {})[off] = payload
                    elif op < 0.6:
                        o.discard(b * BB, BB)
                        model.pop(b, None)
                    elif op < 0.65:
                        o.flush()
                    else:
                        buf = bytearray(4096)
                        o.readinto(b * BB + off, memoryview(buf))
                        if bytes(buf) != model.get(b, {}).get(off, bytes(4096)):
                            errors.append(("mismatch", k, b, off, it))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(("exception", k, repr(exc)))

    def snapshots() -> None:
        try:
            for i in range(15):
                mapper.message("pool", 0, f"create_snap {100 + i} 1")
                if i % 2:
                    mapper.message("pool", 0, f"delete {99 + i}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(("snapshot", repr(exc)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=snapshots))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    mapper.suspend("pool")  # commits
    thin_check(meta)
    assert set(thin_dump(meta)[1]) == {1, 114} | {100 + i for i in range(1, 15, 2)}
    mapper.resume("pool")


def test_metadata_from_thin_restore_reads_the_blocks_it_maps(mapper, images, tmp_path):
    nr = 256
    xml = tmp_path / "pool.xml"
    xml.write_text(f"""<superblock uuid="" time="1" transaction="7" flags="0" version="2" data_block_size="{BS}" nr_data_blocks="{nr}">
  <device dev_id="1" mapped_blocks="21" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="20" time="0"/>
    <single_mapping origin_block="50" data_block="100" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="15" transaction="0" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="10" time="0"/>
    <range_mapping origin_begin="12" data_begin="200" length="5" time="1"/>
  </device>
</superblock>
""")
    meta, data = images(1, 4 * MiB)[0], images(1, nr * BB)[0]
    subprocess.run(["thin_restore", "-i", str(xml), "-o", meta], check=True, capture_output=True)
    with open(data, "r+b") as f:
        f.writelines(struct.pack("<Q", b) * (BB // 8) for b in range(nr))
    expect = {1: {**{v: 10 + v for v in range(20)}, 50: 100},
              2: {**{v: 10 + v for v in range(10)}, **{12 + i: 200 + i for i in range(5)}}}
    mapper.create("pool", pool_table(meta, data, nr))
    assert pool_status(mapper)[0] == "7" and pool_status(mapper)[2] == f"{20 + 1 + 5}/{nr}"
    for dev in (1, 2):
        mapper.create(f"t{dev}", f"0 {BS * 64} thin /dev/mapper/pool {dev}")
        for vb in range(64):
            want = struct.pack("<Q", expect[dev][vb]) * (BB // 8) if vb in expect[dev] else bytes(BB)
            assert read_block(mapper, f"t{dev}", vb) == want, (dev, vb)
    # block 3 is shared (time 0 < snap_time 1): writing it through 1 leaves 2's copy alone
    with mapper.open_device("t1", write=True) as o:
        o.write(3 * BB, b"new" * 100)
    assert read_block(mapper, "t2", 3) == struct.pack("<Q", 13) * (BB // 8)
    assert read_block(mapper, "t1", 3)[:300] == b"new" * 100
    mapper.remove("t1")
    mapper.remove("t2")
    mapper.remove("pool")
    thin_check(meta)
    sb, dumped = thin_dump(meta)
    assert dumped[2] == expect[2] and dumped[1][3] != 13 and len(dumped[1]) == 21
    assert sb.get("transaction") == "7" and sb.get("version") == "2"
    # a superblock flagged NEEDS_CHECK (as a kernel leaves it after a metadata error): read-only
    xml.write_text(xml.read_text().replace('flags="0"', 'flags="1"'))
    subprocess.run(["thin_restore", "-i", str(xml), "-o", meta], check=True, capture_output=True)
    mapper.create("pool", pool_table(meta, data, nr))
    assert pool_status(mapper)[4] == "ro" and pool_status(mapper)[7] == "needs_check"
    mapper.create("t2", f"0 {BS * 64} thin /dev/mapper/pool 2")
    assert read_block(mapper, "t2", 12) == struct.pack("<Q", 200) * (BB // 8)
    with mapper.open_device("t2", write=True) as o, pytest.raises(DMError) as exc:
        o.write(40 * BB, b"new")
    assert exc.value.errno == errno.EIO


@pytest.mark.hostile
def test_corrupt_metadata_is_refused_and_other_devices_carry_on(mapper, pool_files, images):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 1024))
    for dev in (1, 2):
        mapper.message("pool", 0, f"create_thin {dev}")
        mapper.create(f"t{dev}", f"0 {BS * 16} thin /dev/mapper/pool {dev}")
        with mapper.open_device(f"t{dev}", write=True) as o:
            o.write(0, stamp(dev))
    for name in ("t1", "t2", "pool"):
        mapper.remove(name)
    md = ThinMetadata(FileDisk(meta).open(write=False), BS, 1024)
    leaf = md.top.lookup(md.mapping_root, 1)  # device 1's mapping tree is one leaf
    with open(meta, "r+b") as f:  # a flipped byte in it, as thin_check's own test does
        f.seek(int(leaf) * 4096 + 100)
        byte = f.read(1)
        f.seek(int(leaf) * 4096 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert subprocess.run(["thin_check", meta], capture_output=True).returncode != 0
    mapper.create("pool", pool_table(meta, data, 1024))
    mapper.create("t1", f"0 {BS * 16} thin /dev/mapper/pool 1")
    mapper.create("t2", f"0 {BS * 16} thin /dev/mapper/pool 2")
    with pytest.raises(DMError) as exc:
        read_block(mapper, "t1", 0, 4096)
    assert exc.value.errno == errno.EILSEQ and "bad checksum in btree node" in exc.value.message
    assert read_block(mapper, "t2", 0, 4096) == stamp(2)
    with open(meta, "r+b") as f:  # and a superblock that is not one
        f.write(b"\xff" * 8)
    mapper.remove("t1")
    mapper.remove("t2")
    mapper.remove("pool")
    with pytest.raises(DMError) as exc:
        mapper.create("pool", pool_table(meta, data, 1024))
    assert "Error creating metadata object" in exc.value.message


# ---- running out of space -------------------------------------------------------------------------

def test_error_if_no_space_fails_writes(mapper, pool_files):
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 4, "error_if_no_space"))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {BS * 16} thin /dev/mapper/pool 1")
    with mapper.open_device("t", write=True) as o:
        for b in range(4):
            o.write(b * BB, b"x" * 512)
        with pytest.raises(DMError) as exc:
            o.write(4 * BB, b"x" * 512)
        assert exc.value.errno == errno.ENOSPC
        assert pool_status(mapper)[4:6] == ["out_of_data_space", "discard_passdown"]
        o.discard(0, BB)  # a discard gives a block back: the next write gets it
        o.write(4 * BB, b"y" * 512)
    assert pool_status(mapper)[4] == "rw"


def test_out_of_space_queues_until_reload_grows_the_pool_and_low_water_event(mapper, pool_files):
    """The data device is a linear device (as LVM's -tdata): it grows by reload, then the pool."""
    meta, data = pool_files
    mapper.create("tdata", f"0 {8 * BS} linear {data} 0")
    mapper.create("pool", pool_table(meta, "/dev/mapper/tdata", 8, lwm=2))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {BS * 64} thin /dev/mapper/pool 1")
    event_nr = mapper.info("pool")["event_nr"]
    payload = {b: stamp(b, 42) for b in range(12)}
    done = threading.Event()
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            with mapper.open_device("t", write=True) as o:
                for b, data_ in payload.items():
                    o.write(b * BB, data_)
                o.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)
        finally:
            done.set()

    def grow(blocks: int) -> None:
        mapper.load("tdata", f"0 {blocks * BS} linear {data} 0")
        mapper.resume("tdata")
        mapper.load("pool", pool_table(meta, "/dev/mapper/tdata", blocks, lwm=2))
        mapper.resume("pool")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_until(lambda: pool_status(mapper)[4] == "out_of_data_space")
        assert not done.is_set() and used_data(mapper) == 8
        assert mapper.wait("pool", event_nr, timeout=30)["event_nr"] > event_nr  # low water + full
        # the data device is checked first, when the table is swapped in at resume (the
        # kernel's dm_calculate_queue_limits): the pool stays suspended, the table is dropped
        mapper.load("pool", pool_table(meta, "/dev/mapper/tdata", 64, lwm=2))
        with pytest.raises(DMError, match="pool: 253:0 too small for target: start=0, len=8192, dev_size=1024"):
            mapper.resume("pool")
        assert mapper.info("pool")["suspended"] and not mapper.info("pool")["inactive"]
        grow(64)
    finally:
        if not done.wait(60):
            grow(1024)
        thread.join()
    assert not failed, failed
    assert pool_status(mapper)[2] == "12/64" and pool_status(mapper)[4] == "rw"
    for b, data_ in payload.items():
        assert read_block(mapper, "t", b, 4096) == data_
    with pytest.raises(DMError, match="too small"):
        mapper.load("pool", pool_table(meta, "/dev/mapper/tdata", 32))
        mapper.resume("pool")
    thin_check(meta)


def test_no_space_timeout_turns_waiting_writes_into_errors(mapper, pool_files, monkeypatch):
    from userdm.targets import thin
    monkeypatch.setattr(thin, "NO_SPACE_TIMEOUT", 0.2)  # the kernel's no_space_timeout, shortened
    meta, data = pool_files
    mapper.create("pool", pool_table(meta, data, 2))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {BS * 16} thin /dev/mapper/pool 1")
    with mapper.open_device("t", write=True) as o:
        o.write(0, stamp(0))
        o.write(BB, stamp(1))
        with pytest.raises(DMError) as exc:  # waits, then fails instead of waiting forever
            o.write(2 * BB, stamp(2))
        assert exc.value.errno == errno.ENOSPC
        assert pool_status(mapper)[4:7] == ["out_of_data_space", "discard_passdown", "error_if_no_space"]
        mapper.load("pool", pool_table(meta, data, 4))
        mapper.resume("pool")
        assert pool_status(mapper)[4:7] == ["rw", "discard_passdown", "queue_if_no_space"]
        o.write(2 * BB, stamp(2))
    assert read_block(mapper, "t", 2, 4096) == stamp(2)


@pytest.mark.hostile
def test_full_metadata_device_goes_back_to_the_last_commit_and_read_only(mapper, images):
    """The metadata device is a linear device (as LVM's -tmeta): once it is full the pool is
    read-only at its last commit; growing it and reloading the pool makes it writable again."""
    meta, data = images(1, 4 * MiB)[0], images(1, 256 * MiB)[0]
    mapper.create("tmeta", f"0 {20 * 8} linear {meta} 0")  # 20 metadata blocks
    mapper.create("pool", pool_table("/dev/mapper/tmeta", data, 4096))
    mapper.message("pool", 0, "create_thin 1")
    mapper.create("t", f"0 {4096 * BS} thin /dev/mapper/pool 1")
    flushed = -1
    with mapper.open_device("t", write=True) as o, pytest.raises(DMError) as exc:
        for b in range(4096):
            o.write(b * BB, stamp(b))
            if b % 50 == 49:
                o.flush()
                flushed = b
    assert exc.value.errno == errno.ENOSPC and "metadata device" in exc.value.message
    assert 0 < flushed < 4095
    st = pool_status(mapper)
    assert st[4] == "ro" and int(st[2].split("/")[0]) == flushed + 1
    for b in (0, flushed):  # everything flushed is still there; nothing new is provisioned
        assert read_block(mapper, "t", b, 4096) == stamp(b)
    with pytest.raises(DMError) as exc:
        mapper.message("pool", 0, "create_thin 2")
    assert exc.value.errno == errno.EOPNOTSUPP
    with mapper.open_device("t", write=True) as o:
        o.write(0, stamp(7))  # a block the device owns can still be overwritten
        with pytest.raises(DMError):
            o.write((flushed + 1) * BB, stamp(flushed + 1))
    assert read_block(mapper, "t", 0, 4096) == stamp(7)
    mapper.load("tmeta", f"0 {1024 * 8} linear {meta} 0")
    mapper.resume("tmeta")
    mapper.load("pool", pool_table("/dev/mapper/tmeta", data, 4096))
    mapper.resume("pool")
    assert pool_status(mapper)[4] == "rw" and pool_status(mapper)[1].endswith("/1024")
    with mapper.open_device("t", write=True) as o:
        o.write((flushed + 1) * BB, stamp(flushed + 1))
    mapper.message("pool", 0, "create_thin 2")
    mapper.remove("t")
    mapper.remove("pool")
    thin_check(meta)
    assert flushed + 1 in thin_dump(meta)[1][1]


# ---- the daemon: SIGKILL, the Qubes flow ------------------------------------------------------------

def nbd_device(daemon, name: str):
    from userdm.nbd.client import RemoteDevice
    return RemoteDevice(f"nbd+unix:///{name}?socket={daemon.runtime / 'nbd.sock'}")


def start_fio(daemon, name: str, cwd: Path, *args: str) -> subprocess.Popen:
    uri = f"nbd+unix:///{name}?socket={daemon.runtime / 'nbd.sock'}"
    # its own process group: fio forks a process per job, and a kill must reach those too
    return subprocess.Popen(["fio", "--name=thin", "--ioengine=nbd", f"--uri={uri}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            start_new_session=True)


def test_sigkill_under_writes_with_flushes_loses_nothing_flushed(daemon, images, tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (apt: fio)")
    meta, data = images(1, 8 * MiB)[0], images(1, 256 * MiB)[0]
    daemon.run("create", "pool", "--table", pool_table(meta, data, 4096))
    daemon.run("message", "pool", "0", "create_thin", "1")
    daemon.run("create", "t", "--table", f"0 {BS * 4096} thin /dev/mapper/pool 1")
    durable: dict[int, bytes] = {}
    rng = random.Random(5)
    for rnd in range(5):
        fio = start_fio(daemon, "t", tmp_path, "--rw=randwrite", "--bs=4k", "--offset=64M", "--size=64M",
                        "--iodepth=4", "--fsync=8", "--time_based", "--runtime=60", f"--randseed={rnd}")
        try:
            dev = nbd_device(daemon, "t")
            try:
                pending: list[tuple[int, bytes]] = []
                for i in range(40):
                    offset = rng.randrange(1000) * BB + 4096 * (i % 4)  # below fio's range
                    payload = stamp(rnd, i, offset)
                    dev.write(offset, payload)
                    pending.append((offset, payload))
                    if i % 5 == 4:
                        dev.flush()  # acknowledged: everything written before must survive
                        durable.update(pending)
                        pending.clear()
            finally:
                dev.close_backing()
            daemon.stop(signal.SIGKILL)
        finally:
            os.killpg(fio.pid, signal.SIGKILL)
            fio.wait()
        thin_check(meta)
        daemon.start()
        assert "queue_if_no_space" in daemon.run("status", "pool").stdout
        dev = nbd_device(daemon, "t")
        try:
            for offset, payload in durable.items():
                buf = bytearray(4096)
                dev.readinto(offset, memoryview(buf))
                assert bytes(buf) == payload, (rnd, offset)
        finally:
            dev.close_backing()


def qubes_cycles(daemon, images, tmp_path, cycles: int) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (apt: fio)")
    meta, data = images(1, 8 * MiB)[0], images(1, 128 * MiB)[0]
    daemon.run("create", "pool", "--table", pool_table(meta, data, 2048))
    daemon.run("message", "pool", "0", "create_thin", "1")
    daemon.run("create", "template", "--table", f"0 {BS * 256} thin /dev/mapper/pool 1")
    dev = nbd_device(daemon, "template")
    try:
        dev.write(0, random.Random(1).randbytes(8 * MiB))
        dev.flush()
        image = bytearray(BS * 256 * 512)
        dev.readinto(0, memoryview(image))
    finally:
        dev.close_backing()
    template_sum = hashlib.sha256(image).hexdigest()
    with daemon.connect() as c:
        used = lambda: int(c.status("pool")[0][3].split()[2].split("/")[0])
        before = used()
        assert before == 128
        for cycle in range(cycles):
            c.message("pool", 0, "create_snap 2 1")
            c.create("vm", f"0 {BS * 256} thin /dev/mapper/pool 2")
            fio = start_fio(daemon, "vm", tmp_path, "--rw=randwrite", "--bs=4k", "--size=12M",
                            "--io_size=2M", "--iodepth=4", "--verify=crc32c", "--do_verify=1",
                            "--verify_state_save=0", f"--randseed={cycle}")
            out, _ = fio.communicate(timeout=300)
            assert fio.returncode == 0, out
            c.remove("vm")
            c.message("pool", 0, "delete 2")
            assert used() == before, cycle
    thin_check(meta)
    dev = nbd_device(daemon, "template")
    try:
        dev.readinto(0, memoryview(image))
    finally:
        dev.close_backing()
    assert hashlib.sha256(image).hexdigest() == template_sum
    assert set(thin_dump(meta)[1]) == {1}


def test_qubes_flow_snapshot_fio_delete(daemon, images, tmp_path):
    qubes_cycles(daemon, images, tmp_path, 10)


@pytest.mark.slow
def test_qubes_flow_100_cycles(daemon, images, tmp_path):
    """The issue's 100 cycles with USERDM_STRESS=1; a bounded 25 otherwise (CI)."""
    qubes_cycles(daemon, images, tmp_path, 100 if os.environ.get("USERDM_STRESS") else 25)
