"""The era target: table parsing and refusals, status and table lines, exact changed ranges
across checkpoints, messages, metadata snapshots, resize, crash safety (a torn superblock, a
copy of the metadata taken right after a write, SIGKILL of the daemon), the CLI's JSON and
XML outputs, and fio writing over NBD whose every write the changed ranges cover."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from userdm.block.file import FileDisk
from userdm import Mapper
from userdm.errors import DMError
from userdm.targets._era_metadata import BLOCK, EraMetadata, layout

MiB = 1 << 20
ORIGIN = 8 * MiB                 # 16384 sectors
SECTORS = ORIGIN // 512
BS = 16                          # era block size in sectors (8 KiB)
BB = BS * 512


@pytest.fixture
def disks(images):
    """(metadata path, origin path): a 1 MiB metadata device and an 8 MiB origin."""
    meta = images(1, MiB)[0]
    origin = images(1, ORIGIN)[0]
    return meta, origin


def era_table(meta: str, origin: str, bs: int = BS, sectors: int = SECTORS) -> str:
    return f"0 {sectors} era {meta} {origin} {bs}"


def status(m: Mapper, name: str) -> list[str]:
    return m.status(name)[0][3].split()


def current_era(m: Mapper, name: str) -> int:
    return int(status(m, name)[2])


def runs(m: Mapper, name: str, since: int, **kw) -> list[tuple[int, int]]:
    """Changed runs as (first era block, end era block)."""
    return [(r["block_begin"], r["block_end"]) for r in m.era_changed(name, since, **kw)]


def write(m: Mapper, name: str, offset: int, data: bytes) -> None:
    with m.open_device(name, write=True) as o:
        o.write(offset, data)


def refusal(m: Mapper, table: str, *, readonly: bool = False) -> DMError:
    with pytest.raises(DMError) as info:
        m.create("bad", table, readonly=readonly)
    return info.value


# ---- construction ------------------------------------------------------------------------

def test_constructor_refusals(mapper, disks, images):
    meta, origin = disks
    for args, err, text in [
        (f"{meta} {origin}", errno.EINVAL, "Invalid argument count"),
        (f"{meta} {origin} 16 extra", errno.EINVAL, "Invalid argument count"),
        (f"/nonexistent/meta {origin} 16", None, "Error opening metadata device"),
        (f"{meta} /nonexistent/origin 16", None, "Error opening data device"),
        (f"{meta} {origin} abc", errno.EINVAL, "Error parsing block size"),
        (f"{meta} {origin} -8", errno.EINVAL, "Error parsing block size"),
        (f"{meta} {origin} 0", errno.EINVAL, "Invalid block size"),
        (f"{meta} {origin} 12", errno.EINVAL, "Invalid block size"),
    ]:
        exc = refusal(mapper, f"0 {SECTORS} era {args}")
        assert text in exc.message, (args, exc)
        assert err is None or exc.errno == err, (args, exc)
    small = images(1, 1 * MiB)[0]   # refused when resumed, as the kernel's dm_calculate_queue_limits
    assert "too small for target" in refusal(mapper, f"0 {SECTORS} era {meta} {small} 16").message
    assert refusal(mapper, era_table(meta, origin), readonly=True).errno == errno.EINVAL
    assert mapper.list() == []  # every refused create left nothing behind


def test_block_size_need_not_be_a_power_of_two(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin, bs=24))
    write(mapper, "e", 24 * 512 * 5 + 100, b"x")  # era block 5
    assert runs(mapper, "e", 1) == [(5, 6)]
    assert mapper.era_changed("e", 1)[0] == {"begin": 120, "length": 24, "block_begin": 5, "block_end": 6}


def test_metadata_of_another_block_size_or_garbage_is_refused(mapper, disks, images):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    mapper.remove("e")
    exc = refusal(mapper, era_table(meta, origin, bs=32))
    assert exc.errno == errno.EINVAL
    assert "Error reading metadata" in exc.message and "from 16 to 32" in exc.message
    junk = images(1, MiB)[0]
    with open(junk, "r+b") as f:
        f.write(os.urandom(2 * BLOCK))
    exc = refusal(mapper, era_table(junk, origin))
    assert exc.errno == errno.EILSEQ and "no valid era superblock" in exc.message


def test_metadata_device_too_small(mapper, images, disks):
    _, origin = disks
    tiny = images(1, 3 * BLOCK)[0]
    exc = refusal(mapper, era_table(tiny, origin))
    assert exc.errno == errno.ENOSPC and "Error reading metadata" in exc.message
    four = images(1, 4 * BLOCK)[0]  # room for the superblocks and little else
    big = images(1, 256 * MiB)[0]    # its first era needs an era index, a writeset index, 2 bitmaps
    exc = refusal(mapper, era_table(four, big, sectors=256 * MiB // 512, bs=8))
    assert exc.errno == errno.ENOSPC and "is full" in exc.message and four in exc.message


# ---- status and table --------------------------------------------------------------------

def test_status_and_table_lines(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    # fresh: 2 superblocks + era index + writeset index + 1 bitmap block; era array all zero
    assert mapper.status("e") == [[0, SECTORS, "era", f"8 5/{MiB // BLOCK} 1 -"]]
    assert mapper.table("e") == [[0, SECTORS, "era", f"{meta} {origin} {BS}"]]
    assert [d["name"] for d in mapper.deps("e")] == [meta, origin]
    write(mapper, "e", 0, b"a" * 512)
    mapper.message("e", 0, "checkpoint")  # era array block 0 now stored: one more block
    assert status(mapper, "e") == ["8", f"6/{MiB // BLOCK}", "2", "-"]
    mapper.message("e", 0, "take_metadata_snap")
    st = status(mapper, "e")
    assert st[2] == "3" and st[3].isdigit() and int(st[3]) >= 2
    assert int(st[1].split("/")[0]) == 7  # + the snapshot's superblock copy
    mapper.message("e", 0, "drop_metadata_snap")
    assert status(mapper, "e")[1:] == [f"6/{MiB // BLOCK}", "3", "-"]


def test_used_blocks_count_what_the_layout_needs(mapper, images):
    meta = images(1, 4 * MiB)[0]
    origin = images(1, 64 * MiB)[0]
    n = 64 * MiB // 4096  # 16384 blocks of 8 sectors: 16 era array blocks, one bitmap block
    mapper.create("e", f"0 {n * 8} era {meta} {origin} 8")
    era_blocks, era_index, ws_blocks, ws_index = layout(n)
    assert (era_blocks, era_index, ws_blocks, ws_index) == (16, 1, 1, 1)
    with mapper.open_device("e", write=True) as o:
        for i in range(era_blocks):
            o.write(i * 1024 * 4096, b"w")  # one write into each era array block's range
    mapper.message("e", 0, "checkpoint")
    assert status(mapper, "e")[1] == f"{2 + era_index + era_blocks + ws_index + ws_blocks}/1024"


# ---- changed ranges ----------------------------------------------------------------------

def test_changed_ranges_across_checkpoints(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    assert current_era(mapper, "e") == 1 and runs(mapper, "e", 1) == []
    write(mapper, "e", 0, b"a")                      # block 0
    write(mapper, "e", 3 * BB - 1, b"bb")            # straddles blocks 2 and 3
    write(mapper, "e", 10 * BB, b"c" * (3 * BB))     # blocks 10..12
    era1 = [(0, 1), (2, 4), (10, 13)]
    assert runs(mapper, "e", 1) == era1
    mapper.message("e", 0, "checkpoint")
    assert current_era(mapper, "e") == 2
    assert runs(mapper, "e", 2) == [] and runs(mapper, "e", 1) == era1
    write(mapper, "e", 4 * BB, b"d")                 # block 4 joins the run 2..4
    write(mapper, "e", 11 * BB, b"e")                # block 11 again, now in era 2
    with mapper.open_device("e", write=True) as o:
        o.discard(20 * BB, BB)                       # discards and zeroes change data too
        o.write_zeroes(30 * BB + 512, 512)
    assert runs(mapper, "e", 2) == [(4, 5), (11, 12), (20, 21), (30, 31)]
    assert runs(mapper, "e", 1) == [(0, 1), (2, 5), (10, 13), (20, 21), (30, 31)]
    mapper.message("e", 0, "CheckPoint")
    write(mapper, "e", 0, b"f")
    assert runs(mapper, "e", 3) == [(0, 1)]
    assert runs(mapper, "e", 2) == [(0, 1), (4, 5), (11, 12), (20, 21), (30, 31)]
    assert runs(mapper, "e", 4) == []                # the future: nothing yet
    assert runs(mapper, "e", 0) == [(0, SECTORS // BS)]  # era 0: before tracking, all of it
    assert mapper.era_changed("e", 2)[1] == {"begin": 4 * BS, "length": BS, "block_begin": 4, "block_end": 5}


def test_last_partial_block_is_clipped_to_the_device(mapper, disks):
    meta, origin = disks
    sectors = 100 * BS + 8                          # 101 era blocks, the last one half used
    mapper.create("e", era_table(meta, origin, sectors=sectors))
    write(mapper, "e", sectors * 512 - 512, b"z")
    assert mapper.era_changed("e", 1) == [{"begin": 100 * BS, "length": 8, "block_begin": 100,
                                           "block_end": 101}]


def test_reads_pass_through_and_mark_nothing(mapper, disks):
    meta, origin = disks
    with open(origin, "r+b") as f:
        f.seek(5 * BB)
        f.write(b"origin data")
    mapper.create("e", era_table(meta, origin))
    with mapper.open_device("e", write=False) as o:
        assert o.read(5 * BB, 11) == b"origin data"
    write(mapper, "e", 6 * BB, b"new data")
    with open(origin, "rb") as f:
        f.seek(6 * BB)
        assert f.read(8) == b"new data"
    assert runs(mapper, "e", 1) == [(6, 7)]


# ---- messages and snapshots ----------------------------------------------------------------

def test_message_refusals(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    mapper.create("lin", f"0 8 linear {origin} 0")
    for msg, text in [("checkpoint now", "take no arguments"), ("rollover", "unsupported message"),
                      ("drop_metadata_snap", "no metadata snapshot is held")]:
        with pytest.raises(DMError) as info:
            mapper.message("e", 0, msg)
        assert info.value.errno == errno.EINVAL and text in info.value.message
    mapper.message("e", 0, "TAKE_METADATA_SNAP")
    with pytest.raises(DMError) as info:
        mapper.message("e", 0, "take_metadata_snap")
    assert info.value.errno == errno.EINVAL and "already held" in info.value.message
    mapper.message("e", 0, "drop_metadata_snap")
    with pytest.raises(DMError) as info:
        mapper.era_changed("e", 1, metadata_snapshot=True)
    assert info.value.errno == errno.EINVAL and "take_metadata_snap" in info.value.message
    for since in (-1, 1 << 32, "1", True):
        with pytest.raises(DMError) as info:
            mapper.era_changed("e", since)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(DMError) as info:
        mapper.era_changed("lin", 1)
    assert info.value.errno == errno.EINVAL and "no live era target" in info.value.message
    with pytest.raises(DMError) as info:
        mapper.era_changed("nosuch", 1)
    assert info.value.errno == errno.ENXIO


def test_metadata_snapshot_is_the_era_array_as_of_the_take(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    write(mapper, "e", 1 * BB, b"1")
    mapper.message("e", 0, "checkpoint")            # era 2
    write(mapper, "e", 2 * BB, b"2")
    mapper.message("e", 0, "take_metadata_snap")    # rolls over: era 3, snapshot of eras <= 2
    held = status(mapper, "e")[3]
    assert current_era(mapper, "e") == 3
    write(mapper, "e", 3 * BB, b"3")
    write(mapper, "e", 1 * BB, b"1 again")
    mapper.message("e", 0, "checkpoint")            # copies on write: the snapshot is unchanged
    mapper.message("e", 0, "checkpoint")
    assert runs(mapper, "e", 1, metadata_snapshot=True) == [(1, 3)]
    assert runs(mapper, "e", 2, metadata_snapshot=True) == [(2, 3)]
    assert runs(mapper, "e", 3, metadata_snapshot=True) == []
    assert runs(mapper, "e", 2) == [(1, 4)]
    assert status(mapper, "e")[3] == held
    mapper.suspend("e")
    mapper.resume("e")                               # a held snapshot survives a resume
    assert status(mapper, "e")[3] == held and runs(mapper, "e", 2, metadata_snapshot=True) == [(2, 3)]


# ---- suspend, resume, reload, resize -------------------------------------------------------

def test_every_resume_starts_a_new_era(mapper, disks):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    write(mapper, "e", 7 * BB, b"x")
    mapper.suspend("e")
    assert current_era(mapper, "e") == 1           # suspend archives, resume rolls over
    mapper.resume("e")
    assert current_era(mapper, "e") == 2
    mapper.load("e", era_table(meta, origin))       # a new table over the same metadata
    write(mapper, "e", 8 * BB, b"y")                # ... while the old one still writes
    mapper.resume("e")
    assert current_era(mapper, "e") == 3
    assert runs(mapper, "e", 1) == [(7, 9)] and runs(mapper, "e", 2) == [(8, 9)]


def test_resize_keeps_eras_and_new_blocks_have_era_zero(mapper, disks, images):
    meta, origin = disks
    half = SECTORS // 2
    mapper.create("e", era_table(meta, origin, sectors=half))
    write(mapper, "e", half * 512 - 1, b"x")         # the last block of the small device
    mapper.load("e", era_table(meta, origin))
    mapper.resume("e")
    last = half // BS - 1
    assert runs(mapper, "e", 1) == [(last, last + 1)]
    assert runs(mapper, "e", 0) == [(0, SECTORS // BS)]
    write(mapper, "e", (SECTORS - 1) * 512, b"y")
    mapper.load("e", era_table(meta, origin, sectors=half - BS))  # shrink past the written block
    mapper.resume("e")
    assert runs(mapper, "e", 1) == []
    mapper.load("e", era_table(meta, origin))        # and grow again: no stale eras come back
    mapper.resume("e")
    assert runs(mapper, "e", 1) == []


# ---- persistence and crash safety -----------------------------------------------------------

def test_metadata_survives_a_new_mapper(disks):
    meta, origin = disks
    m = Mapper()
    try:
        m.create("e", era_table(meta, origin))
        write(m, "e", 0, b"a")
        m.message("e", 0, "checkpoint")
        write(m, "e", 9 * BB, b"b")                  # still only in the current writeset
        before = {e: runs(m, "e", e) for e in (1, 2)}
        era = current_era(m, "e")
    finally:
        m.close()                                    # no suspend: like a crash of the daemon
    m = Mapper()
    try:
        m.create("e", era_table(meta, origin))
        assert current_era(m, "e") == era + 1       # the activation is a resume: a new era
        assert {e: runs(m, "e", e) for e in (1, 2)} == before
        assert runs(m, "e", era + 1) == []
    finally:
        m.close()


def test_a_write_is_marked_on_disk_before_it_is_acknowledged(mapper, disks, tmp_path):
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    write(mapper, "e", 42 * BB, b"x")
    crash = tmp_path / "meta-at-crash"
    shutil.copyfile(meta, crash)                    # the metadata as a crash right now leaves it
    disk = FileDisk(str(crash))
    with disk.open(write=True) as o:
        md = EraMetadata(o, BS)
        assert md.marked(42) and not md.marked(41) and md.state.era == 1
    disk.close_backing()


def test_a_torn_superblock_falls_back_to_the_previous_commit(disks):
    meta, origin = disks
    m = Mapper()
    try:
        m.create("e", era_table(meta, origin))
        write(m, "e", 3 * BB, b"a")
        m.message("e", 0, "checkpoint")               # era 2, committed in the newer slot
    finally:
        m.close()
    with open(meta, "r+b") as f:
        gens = []
        for slot in (0, 1):
            f.seek(slot * BLOCK + 20)
            gens.append(struct.unpack("<Q", f.read(8))[0])
        newest = gens.index(max(gens))
        f.seek(newest * BLOCK + 100)
        f.write(b"torn!")
    m = Mapper()
    try:
        m.create("e", era_table(meta, origin))
        # back at era 1 with block 3 in its writeset, which this activation archives
        assert current_era(m, "e") == 2 and runs(m, "e", 1) == [(3, 4)] and runs(m, "e", 2) == []
    finally:
        m.close()


def nbd_write(sock: Path, name: str, offset: int, data: bytes) -> None:
    from userdm.nbd.client import RemoteDevice
    dev = RemoteDevice(f"nbd+unix:///{name}?socket={sock}")
    try:
        dev.write(offset, data)
    finally:
        dev.close_backing()


@pytest.mark.parametrize("how", ["restart", "sigkill"])
def test_daemon_restart_and_sigkill_keep_eras_and_changed_ranges(daemon, disks, how):
    meta, origin = disks
    sock = daemon.runtime / "nbd.sock"
    daemon.run("create", "e", "--table", era_table(meta, origin))
    nbd_write(sock, "e", 5 * BB, b"a" * 4096)
    daemon.run("message", "e", "0", "checkpoint")
    nbd_write(sock, "e", 6 * BB + 512, b"b" * 512)   # acknowledged: its mark is durable
    nbd_write(sock, "e", 40 * BB, b"c" * BB * 2)
    with daemon.connect() as c:
        before = {e: c.era_changed("e", since=e) for e in (1, 2, 3)}
        era = int(c.status("e")[0][3].split()[2])
    assert [(r["block_begin"], r["block_end"]) for r in before[2]] == [(6, 7), (40, 42)]
    daemon.stop(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    daemon.start()
    with daemon.connect() as c:
        assert int(c.status("e")[0][3].split()[2]) == era + 1
        assert {e: c.era_changed("e", since=e) for e in (1, 2, 3)} == before
    with open(origin, "rb") as f:
        f.seek(40 * BB)
        assert f.read(BB * 2) == b"c" * BB * 2


# ---- the command line ---------------------------------------------------------------------

def test_cli_json_and_xml(daemon, disks):
    meta, origin = disks
    sock = daemon.runtime / "nbd.sock"
    daemon.run("create", "e", "--table", era_table(meta, origin))
    nbd_write(sock, "e", 0, b"x")
    nbd_write(sock, "e", 7 * BB, b"y" * (3 * BB))
    out = json.loads(daemon.run("era", "changed", "e", "--since", "1").stdout)
    assert out == [{"begin": 0, "length": BS, "block_begin": 0, "block_end": 1},
                   {"begin": 7 * BS, "length": 3 * BS, "block_begin": 7, "block_end": 10}]
    xml = daemon.run("era", "changed", "e", "--since", "1", "--xml").stdout
    assert xml == '<blocks>\n  <block block="0"/>\n  <range begin="7" end="10"/>\n</blocks>\n'
    daemon.run("message", "e", "0", "take_metadata_snap")
    nbd_write(sock, "e", 100 * BB, b"z")
    snap = daemon.run("era", "changed", "e", "--since", "1", "--xml", "--metadata-snapshot").stdout
    assert snap == xml
    assert "100" in daemon.run("era", "changed", "e", "--since", "2").stdout
    assert json.loads(daemon.run("era", "changed", "e", "--since", "9").stdout) == []
    for bad, text in [(["era", "changed", "e"], "--since"), (["era", "e", "--since", "1"], "usage"),
                      (["era", "changed", "nosuch", "--since", "1"], "ENXIO"),
                      (["era", "changed", "e", "--since", "-1"], "EINVAL")]:
        res = daemon.run(*bad, check=False)
        assert res.returncode == 1 and text in res.stderr, (bad, res.stderr)


# ---- fio over NBD -------------------------------------------------------------------------

def fio_writes(iolog: Path) -> list[tuple[int, int]]:
    """(offset, length) of every write in a fio v2/v3 iolog."""
    out = []
    for line in iolog.read_text().splitlines():
        words = line.split()
        if "write" in words:
            at = words.index("write")
            out.append((int(words[at + 1]), int(words[at + 2])))
    return out


def test_fio_writes_over_nbd_are_all_reported(daemon, images, tmp_path):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (apt: fio)")
    meta = images(1, MiB)[0]
    origin = images(1, 32 * MiB)[0]
    bs = 128                                          # 64 KiB era blocks, 4 KiB fio blocks
    daemon.run("create", "e", "--table", f"0 {32 * MiB // 512} era {meta} {origin} {bs}")
    nbd_write(daemon.runtime / "nbd.sock", "e", 0, b"before the checkpoint")
    daemon.run("message", "e", "0", "checkpoint")
    iolog = tmp_path / "fio.iolog"
    uri = f"nbd+unix:///e?socket={daemon.runtime / 'nbd.sock'}"
    proc = subprocess.run(["fio", "--name=era", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                           "--bs=4k", "--offset=4M", "--size=16M", "--io_size=3M", "--iodepth=8",
                           "--randseed=1234", "--verify=crc32c", "--do_verify=1",
                           "--verify_state_save=0", f"--write_iolog={iolog}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    writes = fio_writes(iolog)
    assert len(writes) == 3 * MiB // 4096
    with daemon.connect() as c:
        reported = c.era_changed("e", since=2)
    sectors = set()
    for r in reported:
        sectors.update(range(r["begin"], r["begin"] + r["length"]))
    written = set()
    for offset, length in writes:
        written.update(range(offset // 512, (offset + length) // 512))
    assert written <= sectors, "a block fio wrote is missing from the changed ranges"
    blocks = {s // bs for s in written}
    assert {s // bs for s in sectors} == blocks       # and nothing fio did not touch
    assert 0 not in blocks                            # the write before the checkpoint is era 1
    print(f"\nera changed: {len(reported)} ranges, {len(sectors)} sectors reported / "
          f"{len(written)} sectors written by fio = ratio {len(sectors) / len(written):.2f} "
          f"(era blocks of {bs} sectors, fio blocks of 8)")


def test_concurrent_writes_and_checkpoints_each_land_in_one_era(mapper, disks):
    """A write belongs to an era between the ones seen when it started and when it returned."""
    import random
    import threading
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    seen: dict[int, tuple[int, int]] = {}
    blocks = list(range(SECTORS // BS))
    random.Random(7).shuffle(blocks)

    def writer(mine: list[int]) -> None:
        with mapper.open_device("e", write=True) as o:
            for b in mine:
                start = current_era(mapper, "e")
                o.write(b * BB + 512, b"w" * 1024)
                seen[b] = (start, current_era(mapper, "e"))

    threads = [threading.Thread(target=writer, args=(blocks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        mapper.message("e", 0, "checkpoint")
    for t in threads:
        t.join()
    last = current_era(mapper, "e")
    assert last > 2
    era_of: dict[int, int] = {}
    for e in range(1, last + 1):
        for first, end in runs(mapper, "e", e):
            for b in range(first, end):
                era_of[b] = e
    assert set(era_of) == set(blocks)
    for b, (start, end) in seen.items():
        assert start <= era_of[b] <= end, (b, start, era_of[b], end)


def test_a_block_marked_by_another_writer_meanwhile_stays_in_its_era(mapper, disks, monkeypatch):
    """Two writers of one block: the second looks (unlocked) before the first's mark is durable,
    and finds it durable once it takes the lock. That block belongs to this era only; it must
    not wait in the group commit's queue and be marked again in the next era (seen as a block
    of fio's first run reported as changed after a checkpoint)."""
    meta, origin = disks
    mapper.create("e", era_table(meta, origin))
    real = EraMetadata.marked
    raced = []

    def marked(self, block):
        if block == 14 and not raced:
            raced.append(block)
            self.mark([14])             # the other writer's mark of block 14 becomes durable now
            return False                # ... after this writer saw it unmarked
        return real(self, block)

    monkeypatch.setattr(EraMetadata, "marked", marked)
    write(mapper, "e", 14 * BB, b"a")
    assert raced == [14]
    mapper.message("e", 0, "checkpoint")
    era = current_era(mapper, "e")
    write(mapper, "e", 20 * BB, b"b")
    assert runs(mapper, "e", era) == [(20, 21)]
