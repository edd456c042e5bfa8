"""Holder ops and failure notification through device stacks (DESIGN §6, seed 004).

A stack of real files -> striped -> linear with an exclusive holder at the top: a failure on a
file reaches the top holder at offsets the tests compute by the striped arithmetic themselves;
one holder-ops registration per device (EBUSY), dead devices (ENXIO on open, EIO on I/O),
EOPNOTSUPP without holder ops; read errors (the error target, dust bad blocks) become failures;
a deleted backing file and a killed NBD server (nbdkit) mark the whole stack dead; suspend
freezes and resume thaws the holder, unless --nolockfs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userdm.block import HolderOps, MemoryDisk
from userdm.block.failure import MF_ACTION_REQUIRED
from userdm.errors import DMError

from conftest import wait_until

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 16 * 512                 # striped chunk: 16 sectors
STRIPE_SIZE = 8 * MiB            # each file
TOP_START = 4096 * 512           # top maps the striped device from byte 2 MiB on
TOP_SIZE = 8 * MiB


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


class Holder:
    """An exclusive holder that records every holder op called on it."""

    def __init__(self, name: str = "fs") -> None:
        self.name = name
        self.failures: list[tuple[int, int, int]] = []
        self.dead: list[bool] = []
        self.calls: list[str] = []
        self.ops = HolderOps(mark_dead=self.dead.append, sync=lambda: self.calls.append("sync"),
                             freeze=lambda: self.calls.append("freeze"),
                             thaw=lambda: self.calls.append("thaw"),
                             notify_failure=lambda off, n, flags: self.failures.append((off, n, flags)))

    def open(self, mapper, name: str, *, write: bool = True):
        return mapper.open_device(name, write=write, holder=self.name, holder_ops=self.ops)


def stripe_to_target(stripe: int, stripes: int, pos: int) -> int:
    """The striped target's byte offset of byte `pos` of stripe `stripe`'s area, by dm-stripe's
    mapping read backwards: chunk c lives on stripe c % stripes, row c // stripes."""
    row, in_chunk = divmod(pos, CHUNK)
    return (row * stripes + stripe) * CHUNK + in_chunk


def expected_top_ranges(file_offset: int, length: int, stripe: int, stripes: int = 2) -> list[tuple[int, int]]:
    """The top device's byte ranges over a failed range of one stripe's file, sector by sector."""
    covered = []
    for byte in range(file_offset, file_offset + length, 512):
        top = stripe_to_target(stripe, stripes, byte) - TOP_START
        if 0 <= top < TOP_SIZE:
            covered.append(top)
    ranges: list[list[int]] = []
    for top in sorted(covered):
        if ranges and ranges[-1][0] + ranges[-1][1] == top:
            ranges[-1][1] += 512
        else:
            ranges.append([top, 512])
    return [tuple(r) for r in ranges]


@pytest.fixture
def stack(mapper, images):
    """files a, b -> st (striped, 2 x 16 sectors) -> top (linear over st from 2 MiB)."""
    a, b = images(2, STRIPE_SIZE)
    mapper.create("st", f"0 {2 * STRIPE_SIZE // 512} striped 2 16 {a} 0 {b} 0")
    mapper.create("top", f"0 {TOP_SIZE // 512} linear /dev/mapper/st {TOP_START // 512}")
    return a, b


# ---- translation up the stack ------------------------------------------------------------------

def test_a_failure_on_a_file_reaches_the_top_holder_at_the_exact_offsets(mapper, stack):
    a, b = stack
    holder = Holder()
    top = holder.open(mapper, "top")
    events: list[dict] = []
    mapper.subscribe(events.append)
    # a range of file b that starts inside a chunk and crosses four chunk boundaries
    offset, length = 1 * MiB + 1536, 4 * CHUNK + 1024
    want = expected_top_ranges(offset, length, stripe=1)
    assert len(want) == 5 and want[0] == (stripe_to_target(1, 2, offset) - TOP_START, CHUNK - 1536)

    records = mapper.notify_failure(b, offset, length)
    assert [(off, n) for off, n, _flags in holder.failures] == want
    assert all(flags == 0 for *_, flags in holder.failures)
    at_top = [r for r in records if r["name"] == "top"]
    assert [(r["offset"], r["length"]) for r in at_top] == want
    assert all(r["path"] == [b, "st", "top"] and r["handled"] for r in at_top)
    # each mapped device on the way records the failure as an event, in its own offsets
    at_st = [(r["offset"], r["length"]) for r in events if r["event"] == "failure" and r["name"] == "st"]
    assert at_st == [(off + TOP_START, n) for off, n in want]
    # file a's stripe gives other top ranges; a range below the top's window reaches only st
    holder.failures.clear()
    mapper.notify_failure(a, 3 * MiB, 512)
    assert [(o, n) for o, n, _ in holder.failures] == expected_top_ranges(3 * MiB, 512, stripe=0)
    holder.failures.clear()
    e = err(mapper.notify_failure, a, 0, 4 * KiB)
    assert e.errno == errno.EOPNOTSUPP and "reached" in e.message and "st" in e.message
    assert holder.failures == []
    top.close()


def test_notify_failure_names_devices_by_name_path_and_number(mapper, stack):
    a, b = stack
    holder = Holder()
    top = holder.open(mapper, "top")
    mapper.notify_failure("top", 4096, 512)                    # the mapped device itself
    mapper.notify_failure("/dev/mapper/top", 8192, 512)
    minor = mapper.info("top")["minor"]
    mapper.notify_failure(f"253:{minor}", 0, 1)
    link = os.path.join(os.path.dirname(a), "other-name-of-b")
    os.link(b, link)                                           # another name of the same file
    mapper.notify_failure(link, 2 * MiB, 512)
    assert holder.failures[:3] == [(4096, 512, 0), (8192, 512, 0), (0, 1, 0)]
    assert [(o, n) for o, n, _ in holder.failures[3:]] == expected_top_ranges(2 * MiB, 512, stripe=1)
    assert err(mapper.notify_failure, "/nonexistent.img", 0, 512).errno == errno.ENXIO
    assert err(mapper.notify_failure, "top", TOP_SIZE - 512, 1024).errno == errno.EINVAL
    assert err(mapper.notify_failure, "top", 0, 0).errno == errno.EINVAL
    assert err(mapper.notify_failure, "top", -1, 512).errno == errno.EINVAL
    top.close()


@settings(max_examples=60, deadline=None)
@given(stripes=st.integers(1, 4), chunk_sectors=st.sampled_from([1, 8, 16]),
       rows=st.integers(1, 6), begin=st.integers(0, 3), data=st.data())
def test_striped_failure_translation_inverts_the_mapping(stripes, chunk_sectors, rows, begin, data):
    """For every layout and failed range, the ranges striped reports are exactly the target
    sectors whose I/O the striped mapping sends into the failed range (checked sector by sector
    with the target's own forward mapping)."""
    from userdm import Mapper
    mapper = Mapper()
    try:
        disks = {f"mem://{i}": MemoryDisk(1 * MiB) for i in range(stripes)}
        mapper.backing.register_scheme("mem", disks.__getitem__)
        starts = [data.draw(st.integers(0, 64)) for _ in range(stripes)]
        length = stripes * rows * chunk_sectors
        legs = " ".join(f"mem://{i} {s}" for i, s in enumerate(starts))
        mapper.create("s", (f"0 {begin} zero\n" if begin else "")
                      + f"{begin} {length} striped {stripes} {chunk_sectors} {legs}")
        md = mapper.device("s")
        target = md.live.targets[-1]
        victim = data.draw(st.integers(0, stripes - 1))
        fail_start = data.draw(st.integers(0, 200)) * 512 + data.draw(st.sampled_from([0, 100]))
        fail_len = data.draw(st.integers(1, 40)) * 512
        got = md.failure_below(disks[f"mem://{victim}"], fail_start, fail_len)
        hit = set()
        for sector in range(length):
            stripe, dev_off, _left = target._map(sector * 512)
            if stripe == victim and dev_off < fail_start + fail_len and dev_off + 512 > fail_start:
                lo, hi = max(dev_off, fail_start), min(dev_off + 512, fail_start + fail_len)
                hit.update(range((begin + sector) * 512 + lo - dev_off, (begin + sector) * 512 + hi - dev_off))
        covered = set()
        for off, n in got:
            covered.update(range(off, off + n))
        assert covered == hit
        assert all(got[i][0] + got[i][1] < got[i + 1][0] for i in range(len(got) - 1))  # merged, sorted
    finally:
        mapper.close()


def test_a_huge_failure_over_small_chunks_becomes_one_covering_range(mapper, images, monkeypatch):
    import userdm.targets.striped as striped
    monkeypatch.setattr(striped, "MAX_RANGES", 8)
    a, b = images(2, 1 * MiB)
    mapper.create("st", f"0 {2 * MiB // 512} striped 2 16 {a} 0 {b} 0")
    holder = Holder()
    h = holder.open(mapper, "st")
    mapper.notify_failure(b, CHUNK // 2, 8 * CHUNK)             # 9 pieces: more than 8
    first = stripe_to_target(1, 2, CHUNK // 2)
    last = stripe_to_target(1, 2, CHUNK // 2 + 8 * CHUNK - 1)
    assert holder.failures == [(first, last + 1 - first, 0)]
    holder.failures.clear()
    mapper.notify_failure(b, 0, 8 * CHUNK)                      # 8 pieces: exact
    assert len(holder.failures) == 8
    h.close()


def test_shared_unclaimed_edges_propagate_too(mapper, images):
    """A file held exclusively by an outside holder can still be mapped by a --shared device:
    both that holder and the holder on top of the shared device hear of a failure of the file."""
    (img,) = images(1, 4 * MiB)
    owner = Holder("mounted-fs")
    own = mapper.backing.open(img, write=True, holder=owner.name, holder_ops=owner.ops)
    mapper.create("view", f"0 {2 * MiB // 512} linear {img} {1 * MiB // 512}", shared=True)
    viewer = Holder("viewer")
    v = viewer.open(mapper, "view")
    mapper.notify_failure(img, 1 * MiB - 512, 1024)
    assert owner.failures == [(1 * MiB - 512, 1024, 0)]
    assert viewer.failures == [(0, 512, 0)]
    v.close()
    own.close()


def test_a_holder_that_refuses_is_reported_and_others_still_hear(mapper, images):
    (img,) = images(1, 4 * MiB)
    mapper.create("x", f"0 {4 * MiB // 512} linear {img} 0")
    mapper.create("y", f"0 {4 * MiB // 512} linear {img} 0")

    def refuse(off, n, flags):
        raise DMError(errno.EIO, "the filesystem cannot repair this")
    rx = mapper.open_device("x", write=True, holder="fs-x", holder_ops=HolderOps(notify_failure=refuse))
    holder_y = Holder("fs-y")
    ry = holder_y.open(mapper, "y")
    records = mapper.notify_failure(img, 0, 512)
    assert {r["name"]: (r["handled"], r.get("holder_error")) for r in records} == {
        img: (False, None), "x": (False, "EIO"), "y": (True, None)}
    assert holder_y.failures == [(0, 512, 0)]
    ry.close()
    e = err(mapper.notify_failure, img, 0, 512)                 # now nobody takes it
    assert e.errno == errno.EOPNOTSUPP and "refused by the holder of x: EIO" in e.message
    rx.close()


# ---- registration rules --------------------------------------------------------------------------

def test_one_holder_ops_registration_per_device(mapper, stack):
    holder = Holder()
    first = holder.open(mapper, "top")
    other = Holder("other-fs")
    e = err(other.open, mapper, "top")
    assert e.errno == errno.EBUSY and "claimed exclusively by fs" in e.message
    e = err(mapper.open_device, "top", write=True, holder="fs", holder_ops=HolderOps())  # same holder, other ops
    assert e.errno == errno.EBUSY and "already has holder operations" in e.message
    nested = holder.open(mapper, "top")                         # the same registration nests
    plain = mapper.open_device("top", write=False, holder="fs")  # and the holder may open without ops
    e = err(mapper.open_device, "top", write=False, holder_ops=holder.ops)
    assert e.errno == errno.EINVAL and "need an exclusive open" in e.message
    # the underlying devices are claimed by the device-mapper: nobody else registers there
    e = err(mapper.backing.open, stack[0], write=True, holder="someone", holder_ops=holder.ops)
    assert e.errno == errno.EBUSY
    for h in (first, nested, plain):
        h.close()
    assert mapper.device("top").holder_ops is None
    other.open(mapper, "top").close()                           # free again


def test_a_dead_device_refuses_registration_with_enxio_and_io_with_eio(mapper, stack):
    a, _b = stack
    holder = Holder()
    top = holder.open(mapper, "top")
    st_dev = mapper.open_device("st", write=False)
    died = mapper.backing.open(a, write=False)                 # a plain open of the file beneath
    died.device.mark_dead(False)
    assert holder.dead == [False]                              # mark_dead(surprise) reached the top
    assert mapper.info("st")["dead"] and mapper.info("top")["dead"]
    for h in (top, st_dev, died):
        e = err(h.read, 0, 512)
        assert e.errno == errno.EIO and "dead" in e.message
    assert err(top.write, 0, b"x" * 512).errno == errno.EIO
    e = err(Holder("late").open, mapper, "top")
    assert e.errno == errno.ENXIO and "dead" in e.message
    assert err(mapper.open_device, "st", write=False).errno == errno.ENXIO
    assert err(mapper.notify_failure, "top", 0, 512).errno == errno.ENXIO
    assert died.device.mark_dead() == []                        # once dead, nothing more happens
    assert holder.dead == [False]
    for h in (top, st_dev, died):
        h.close()
    mapper.remove("top")                                        # a dead device can still be removed
    mapper.remove("st")
    assert mapper.list() == []


def test_without_holder_ops_the_notifier_gets_eopnotsupp_but_events_are_recorded(mapper, stack):
    _a, b = stack
    plain = mapper.open_device("top", write=True, holder="no-ops")
    e = err(mapper.notify_failure, b, 2 * MiB, 512)
    assert e.errno == errno.EOPNOTSUPP and "top" in e.message
    failures = [r for r in mapper.recent_events("top") if r["event"] == "failure"]
    assert [(r["offset"], r["length"], r["path"], r["handled"]) for r in failures] == [
        (*expected_top_ranges(2 * MiB, 512, stripe=1)[0], [b, "st", "top"], False)]
    plain.close()


# ---- read errors become failures -----------------------------------------------------------------

def test_an_eio_from_an_underlying_device_becomes_a_failure_of_the_range_read(mapper, images):
    (img,) = images(1, 4 * MiB)
    # 'low': a good first MiB and a failing second MiB (the error target)
    mapper.create("low", f"0 2048 linear {img} 0\n2048 2048 error")
    mapper.create("top", f"0 3072 linear /dev/mapper/low 1024")  # top byte 0 = low byte 512 KiB
    holder = Holder()
    top = holder.open(mapper, "top")
    assert top.read(0, 4096) == bytes(4096)
    e = err(top.read, 1 * MiB - 4096, 8192)       # low bytes 1.5 MiB - 4 KiB .. 1.5 MiB + 4 KiB
    assert e.errno == errno.EIO
    # one failure, of the whole read of 'low' (the lowest open that saw the EIO), in top offsets
    assert holder.failures == [(1 * MiB - 4096, 8192, MF_ACTION_REQUIRED)]
    failures = [r for r in mapper.recent_events() if r["event"] == "failure"]
    assert [(r["name"], r["offset"], r["path"]) for r in failures] == [
        ("low", 1536 * KiB - 4096, ["low"]), ("top", 1 * MiB - 4096, ["low", "top"])]
    top.close()


def test_dust_bad_block_reads_reach_the_top_holder_through_striped_and_linear(mapper, images):
    """file -> dust -> striped -> linear: a read that covers a bad block reports exactly the
    block's bytes (not the whole read) at the top."""
    a, b = images(2, STRIPE_SIZE)
    dust_start = 8                                   # sectors: dust blocks count from device sector 0
    mapper.create("d", f"0 {STRIPE_SIZE // 512 - dust_start} dust {b} {dust_start} 4096")
    width = STRIPE_SIZE // 512 - 64
    mapper.create("st", f"0 {2 * width} striped 2 16 {a} 0 /dev/mapper/d 0")
    mapper.create("top", f"0 {TOP_SIZE // 512} linear /dev/mapper/st {TOP_START // 512}")
    holder = Holder()
    top = holder.open(mapper, "top")
    bad = 700                                        # block 700 = b's bytes 700*4096 ..
    assert mapper.message("d", 0, f"addbadblock {bad}") is None
    mapper.message("d", 0, "enable")
    d_offset = bad * 4096 - dust_start * 512         # the block in d's offsets
    t_offset = stripe_to_target(1, 2, d_offset) - TOP_START
    assert 0 <= t_offset and t_offset + 4096 < TOP_SIZE
    start = t_offset - t_offset % (64 * KiB)         # a 64 KiB read around it, several chunks
    e = err(top.read, start, 64 * KiB)
    assert e.errno == errno.EIO
    # 4096 bytes of d = half of one 8 KiB chunk: one range at the top
    assert holder.failures == [(t_offset, 4096, MF_ACTION_REQUIRED)]
    path = {tuple(r["path"]) for r in mapper.recent_events("top") if r["event"] == "failure"}
    assert path == {("d", "st", "top")}
    # and notify-failure on the file beneath dust reaches the top the same way
    holder.failures.clear()
    mapper.notify_failure(b, bad * 4096 + 512, 1024)
    assert holder.failures == [(t_offset + 512, 1024, 0)]
    top.close()


def test_file_gpt_partition_dust_striped_linear_to_the_top_holder(mapper, images):
    """The whole stack of issue 7: an image file with a GPT table -> its mapped disk -> partition
    2 -> dust -> striped (with a plain file as the other stripe) -> linear, an exclusive holder
    on top. A bad block read and a failure reported on the image file each reach the holder
    at the offsets computed here layer by layer."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed (apt: fdisk)")
    image, a = images(1, 32 * MiB)[0], images(1, 16 * MiB)[0]
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", image], check=True, text=True,
                   capture_output=True, input="label: gpt\nstart=2048, size=8192\nstart=10240, size=20480\n")
    part_start, part_size = 10240 * 512, 20480 * 512
    mapper.create("disk", f"0 {32 * MiB // 512} linear {image} 0")
    assert mapper.info("disk2")["size"] == part_size
    mapper.create("d", f"0 {part_size // 512} dust /dev/mapper/disk2 0 4096")
    mapper.create("st", f"0 {2 * part_size // 512} striped 2 16 {a} 0 /dev/mapper/d 0")
    mapper.create("top", f"0 {TOP_SIZE // 512} linear /dev/mapper/st {TOP_START // 512}")
    holder = Holder()
    top = holder.open(mapper, "top")
    bad = 400                                        # dust block: bytes 400 * 4096 of disk2 and of d
    t_offset = stripe_to_target(1, 2, bad * 4096) - TOP_START
    assert 0 <= t_offset < TOP_SIZE - 4096
    mapper.message("d", 0, f"addbadblock {bad}")
    mapper.message("d", 0, "enable")
    assert err(top.read, t_offset - 8192, 32 * KiB).errno == errno.EIO
    assert holder.failures == [(t_offset, 4096, MF_ACTION_REQUIRED)]
    holder.failures.clear()
    records = mapper.notify_failure(image, part_start + bad * 4096 + 512, 1024)
    assert holder.failures == [(t_offset + 512, 1024, 0)]
    assert [r["path"] for r in records if r["name"] == "top"] == [[image, "disk", "disk2", "d", "st", "top"]]
    holder.failures.clear()
    mapper.notify_failure("disk2", bad * 4096, 512)           # the partition named by its name
    assert holder.failures == [(t_offset, 512, 0)]
    holder.failures.clear()
    e = err(mapper.notify_failure, image, part_start - 4096, 4096)  # partition 1's last block
    assert e.errno == errno.EOPNOTSUPP and "disk1" in e.message and holder.failures == []
    top.close()


# ---- device death --------------------------------------------------------------------------------

def test_a_deleted_backing_file_marks_the_stack_dead(mapper, stack):
    _a, b = stack
    holder = Holder()
    top = holder.open(mapper, "top")
    events: list[dict] = []
    mapper.subscribe(events.append)
    os.rename(b, b + ".renamed")                     # a rename is not a deletion
    top.read(0, 4096)
    os.unlink(b + ".renamed")
    assert wait_until(lambda: holder.dead == [True])
    assert err(top.read, 0, 4096).errno == errno.EIO
    dead = [(r["name"], r["path"]) for r in events if r["event"] == "dead"]
    assert dead == [("st", [b, "st"]), ("top", [b, "st", "top"])]
    top.close()


def accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def nbdkit_memory(tmp_path):
    """An `nbdkit memory` export on a Unix socket; yields (url, process)."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "16M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: accepts(str(sock))), "nbdkit did not start"
        yield f"nbd+unix:///?socket={sock}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.timeout(120)
def test_a_killed_nbd_server_marks_the_stack_dead_and_io_fails_without_hanging(mapper, nbdkit_memory):
    url, server = nbdkit_memory
    mapper.create("remote", f"0 {16 * MiB // 512} linear {url} 0")
    mapper.create("top", f"0 {8 * MiB // 512} linear /dev/mapper/remote 2048")
    holder = Holder()
    top = holder.open(mapper, "top")
    top.write(0, b"u" * 4096)
    assert top.read(0, 4096) == b"u" * 4096
    server.send_signal(signal.SIGKILL)
    server.wait()
    outcome: list = []

    def read() -> None:
        try:
            top.read(4096, 4096)
            outcome.append("read succeeded")
        except DMError as exc:
            outcome.append(exc)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)                                   # a guard against a hang, not a measurement
    assert not reader.is_alive(), "I/O on a device whose NBD server died hangs"
    assert isinstance(outcome[0], DMError) and outcome[0].errno == errno.EIO
    assert holder.dead == [True]
    assert mapper.info("remote")["dead"] and mapper.info("top")["dead"]
    assert err(top.read, 0, 512).errno == errno.EIO
    assert err(top.write, 0, b"x" * 512).errno == errno.EIO
    events = mapper.recent_events()
    assert [(r["name"], r["path"]) for r in events if r["event"] == "dead"] == [
        ("remote", [url, "remote"]), ("top", [url, "remote", "top"])]
    assert not [r for r in events if r["event"] == "failure"]  # a death is not a range failure
    top.close()
    mapper.remove("top")
    mapper.remove("remote")


# ---- freeze and thaw -----------------------------------------------------------------------------

def test_suspend_freezes_and_resume_thaws_the_holder_unless_nolockfs(mapper, stack):
    holder = Holder()
    top = holder.open(mapper, "top")
    mapper.suspend("top")
    assert holder.calls == ["freeze"]
    mapper.resume("top")
    assert holder.calls == ["freeze", "thaw"]
    mapper.suspend("top", nolockfs=True)
    mapper.resume("top")
    assert holder.calls == ["freeze", "thaw"]                   # --nolockfs: neither
    mapper.load("top", f"0 {TOP_SIZE // 512} linear /dev/mapper/st 0")
    mapper.resume("top")                                        # the table swap suspends with nolockfs
    assert holder.calls == ["freeze", "thaw"]
    mapper.suspend("top")
    mapper.suspend("top")                                       # already suspended: no second freeze
    mapper.resume("top")
    assert holder.calls == ["freeze", "thaw", "freeze", "thaw"]
    top.close()


def test_a_failing_freeze_fails_the_suspend(mapper, stack):
    def freeze():
        raise DMError(errno.EBUSY, "the filesystem cannot freeze now")
    thawed = []
    h = mapper.open_device("top", write=True, holder="fs",
                           holder_ops=HolderOps(freeze=freeze, thaw=lambda: thawed.append(1)))
    e = err(mapper.suspend, "top")
    assert e.errno == errno.EBUSY and "cannot freeze" in e.message
    assert not mapper.info("top")["suspended"]
    assert h.read(0, 512) == bytes(512)                         # I/O still flows
    mapper.resume("top")
    assert thawed == []
    h.close()
