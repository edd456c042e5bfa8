"""Hostile tables (issue 11, classes 2 and 6): dependency cycles and roles that overlap.

A load, create or resume that would make a device depend on itself, through tables (live and
inactive), partitions, interposers, snapshots, `/dev/mapper/NAME`, `253:MINOR`, the FUSE path
or the daemon's own NBD export, is refused with ELOOP and the cycle spelled out; the devices
keep serving I/O and the daemon keeps answering (suspend, resume, ls, SIGTERM). A target that
would use overlapping regions of one device in two roles (era's metadata and origin, a
snapshot's origin and COW, verity's data and hash, two stripes) is refused with EINVAL naming
both; regions that do not overlap, and legitimate stacks, still work.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess

import pytest

from userdm.dm.mapper import Mapper
from userdm.errors import DMError
from userdm.nbd.client import RemoteDevice

pytestmark = pytest.mark.hostile

MiB = 1 << 20
SECTORS = 8192          # 4 MiB devices
GPT_LAYOUT = """label: gpt
start=2048, size=8192, name=alpha
start=10240, size=8192, name=beta
"""


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


def loop_error(fn, *args, **kwargs) -> str:
    e = err(fn, *args, **kwargs)
    assert e.errno == errno.ELOOP, e
    return e.message


def einval(fn, *args, **kwargs) -> str:
    e = err(fn, *args, **kwargs)
    assert e.errno == errno.EINVAL, e
    return e.message


def refused(daemon, *args: str) -> str:
    """Run a CLI command that must fail; its stderr."""
    res = daemon.run(*args, check=False)
    assert res.returncode != 0, f"userdm {' '.join(args)} succeeded: {res.stdout}"
    return res.stderr.strip()


def linear(ref: str, sectors: int = SECTORS, offset: int = 0) -> str:
    return f"0 {sectors} linear {ref} {offset}"


def nbd_url(daemon, name: str) -> str:
    return f"nbd+unix:///{name}?socket={daemon.runtime / 'nbd.sock'}"


def roundtrip(daemon, write_to: str, read_from: str, offset: int, payload: bytes) -> None:
    """Write through one device's NBD export and read the same bytes back through another."""
    writer = RemoteDevice(nbd_url(daemon, write_to))
    reader = RemoteDevice(nbd_url(daemon, read_from)) if read_from != write_to else writer
    try:
        writer.write(offset, payload)
        writer.flush()
        buf = bytearray(len(payload))
        reader.readinto(offset, memoryview(buf))
        assert bytes(buf) == payload
    finally:
        writer.close_backing()
        if reader is not writer:
            reader.close_backing()


def sfdisk(image: str, script: str) -> None:
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed (apt: fdisk)")
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", image], input=script,
                   text=True, check=True, capture_output=True)


# ---- cycles with a real daemon -------------------------------------------------------------

def test_cycles_of_two_and_three_devices_are_refused_and_everything_carries_on(daemon, images):
    (img,) = images()
    daemon.run("create", "cyA", "--table", linear(img))
    daemon.run("create", "cyB", "--table", linear("/dev/mapper/cyA"))
    daemon.run("create", "cyC", "--table", linear("/dev/mapper/cyB"))
    assert "load: ELOOP: cyA -> cyB -> cyA: " in refused(daemon, "load", "cyA", "--table", linear("/dev/mapper/cyB"))
    assert "load: ELOOP: cyA -> cyC -> cyB -> cyA: " in refused(daemon, "load", "cyA", "--table",
                                                                 linear("/dev/mapper/cyC"))
    # a table with a legitimate line first and the cycle further down is refused as a whole
    two_lines = f"0 {SECTORS // 2} linear {img} 0\n{SECTORS // 2} {SECTORS // 2} linear /dev/mapper/cyC 0"
    assert "load: ELOOP: cyA -> cyC -> cyB -> cyA: " in refused(daemon, "load", "cyA", "--table", two_lines)
    # a create whose table names the new device itself
    assert "create: ELOOP: cyD -> cyD: " in refused(daemon, "create", "cyD", "--table", linear("/dev/mapper/cyD"))
    with daemon.connect() as client:
        assert not client.info("cyA")["inactive"]           # nothing was left in the inactive slot
        assert [d["name"] for d in client.list()] == ["cyA", "cyB", "cyC"]
    roundtrip(daemon, "cyA", "cyC", 3 * MiB, os.urandom(64 * 1024))
    for name in ("cyC", "cyB", "cyA"):       # top down, as a flush of the one above needs the one below
        daemon.run("suspend", name)
    for name in ("cyA", "cyB", "cyC"):
        daemon.run("resume", name)
    assert daemon.run("ls").stdout.split()[::2] == ["cyA", "cyB", "cyC"]
    roundtrip(daemon, "cyC", "cyA", 0, os.urandom(4096))
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0      # a bound for a hang, not a timing
    daemon.proc = None


@pytest.mark.timeout(120)
def test_a_cycle_through_the_daemons_own_nbd_export_is_refused_before_connecting(daemon, images):
    (img,) = images()
    daemon.run("create", "cyA", "--table", linear(img))
    own = nbd_url(daemon, "cyA")
    assert "load: ELOOP: cyA -> cyA: " in refused(daemon, "load", "cyA", "--table", linear(own))
    # another spelling of the same socket is the same socket
    other = f"nbd+unix:///cyA?socket={daemon.runtime}/../{daemon.runtime.name}/nbd.sock"
    assert "load: ELOOP: cyA -> cyA: " in refused(daemon, "load", "cyA", "--table", linear(other))
    # a device over the export is legitimate, and works; a table of cyA over it is a cycle
    daemon.run("create", "cyB", "--table", linear(own))
    roundtrip(daemon, "cyB", "cyA", MiB, os.urandom(8192))
    msg = refused(daemon, "load", "cyA", "--table", linear("/dev/mapper/cyB"))
    assert "load: ELOOP: cyA -> cyB -> cyA: " in msg and own in msg
    daemon.run("suspend", "cyA")
    daemon.run("resume", "cyA")
    roundtrip(daemon, "cyA", "cyB", 2 * MiB, os.urandom(8192))


@pytest.mark.timeout(120)
def test_a_cycle_through_the_daemons_own_tcp_export_is_refused(tmp_path, images):
    from conftest import Daemon
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = Daemon(tmp_path)
    d.start("--nbd-listen", f"127.0.0.1:{port}", "--tls=off")
    try:
        (img,) = images()
        d.run("create", "cyA", "--table", linear(img))
        for url in (f"nbd://127.0.0.1:{port}/cyA", f"nbd://localhost:{port}/cyA"):
            msg = refused(d, "load", "cyA", "--table", linear(url))
            assert "load: ELOOP: cyA -> cyA: " in msg and url in msg
        roundtrip(d, "cyA", "cyA", 0, os.urandom(4096))
    finally:
        d.stop()


@pytest.mark.fuse
def test_a_cycle_through_the_daemons_fuse_directory(tmp_path, images):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    from conftest import Daemon
    d = Daemon(tmp_path)
    d.start(fuse=True)
    try:
        (img,) = images()
        fuse_dir = d.runtime / "mapper"
        d.run("create", "cyA", "--table", linear(img))
        d.run("create", "cyB", "--table", linear(str(fuse_dir / "cyA")))     # used in process, not via FUSE
        msg = refused(d, "load", "cyA", "--table", linear(str(fuse_dir / "cyB")))
        assert "load: ELOOP: cyA -> cyB -> cyA: " in msg
        with open(fuse_dir / "cyB", "rb") as f:                                # both still serve I/O
            assert f.read(4096) == bytes(4096)
    finally:
        d.stop()


def test_resume_checks_again_when_an_nbd_name_now_names_the_device(daemon, images):
    (img, img2) = images(2)
    daemon.run("create", "cyX", "--table", linear(img2))
    daemon.run("create", "cyB", "--table", linear(nbd_url(daemon, "cyX")))
    daemon.run("create", "cyA", "--table", linear(img))
    daemon.run("load", "cyA", "--table", linear("/dev/mapper/cyB"))      # cyA -> cyB -> cyX: no cycle
    daemon.run("rename", "cyX", "cyOld")
    daemon.run("rename", "cyA", "cyX")        # cyB's export name now names the device being resumed
    msg = refused(daemon, "resume", "cyX")
    assert "resume: ELOOP: cyX -> cyB -> cyX: " in msg
    with daemon.connect() as client:
        info = client.info("cyX")
        assert not info["suspended"] and info["inactive"] and info["live"]
    roundtrip(daemon, "cyX", "cyX", 0, os.urandom(4096))       # its live table still serves


# ---- every kind of edge (in process) ---------------------------------------------------------

def test_a_cycle_through_an_inactive_table(mapper, images):
    (img, img2) = images(2)
    mapper.create("cyA", linear(img))
    mapper.create("cyB", linear(img2))
    mapper.load("cyB", linear("/dev/mapper/cyA"))          # not resumed: cyB's live table is a file
    assert loop_error(mapper.load, "cyA", linear("/dev/mapper/cyB")).startswith("cyA -> cyB -> cyA: ")
    # the other way round: cyA's inactive table over cyB; resuming cyB's inactive one closes the loop
    mapper.clear("cyB")
    mapper.load("cyA", linear("/dev/mapper/cyB"))
    assert loop_error(mapper.load, "cyB", linear("/dev/mapper/cyA")).startswith("cyB -> cyA -> cyB: ")
    mapper.resume("cyA")                                   # cyA -> cyB -> file: fine
    assert mapper.deps("cyA")[0]["device"] == "cyB"
    mapper.open_device("cyA", write=True).write(0, b"x" * 512)


def test_a_cycle_through_a_partition(mapper, images):
    (img,) = images(1, 16 * MiB)
    sfdisk(img, GPT_LAYOUT)
    mapper.create("cyP", linear(img, 16 * MiB // 512))
    assert "cyP1" in mapper.export_names()
    mapper.create("cyQ", linear("/dev/mapper/cyP1", 4096))
    assert loop_error(mapper.load, "cyP", linear("/dev/mapper/cyQ", 4096)).startswith("cyP -> cyQ -> cyP1 -> cyP: ")
    minor = mapper.info("cyP1")["minor"]
    assert loop_error(mapper.load, "cyP", linear(f"259:{minor}", 4096)).startswith("cyP -> cyP1 -> cyP: ")


def test_a_cycle_through_an_interposer(mapper, images):
    (img,) = images()
    mapper.create("cyX", linear(img))
    # the interposer's own table over [interpose]cyX is no cycle: its I/O reaches cyX's own table
    mapper.create("cyF", linear("[interpose]/dev/mapper/cyX"), interpose=True)
    user = mapper.open_device("cyX", write=True)
    user.write(0, b"i" * 4096)
    assert mapper.open_device("cyF", write=False).read(0, 4096) == b"i" * 4096
    # cyX over its interposer: cyX's I/O -> cyF -> cyX's own mapping -> cyF ...
    assert loop_error(mapper.load, "cyX", linear("/dev/mapper/cyF")).startswith(
        "cyX -> cyF -> [interpose]cyX -> cyX: ")
    # an interposer whose table also uses cyX itself: cyX's I/O now goes to cyF
    half = SECTORS // 2
    both = f"0 {half} linear [interpose]/dev/mapper/cyX 0\n{half} {half} linear /dev/mapper/cyX {half}"
    assert loop_error(mapper.create, "cyG", both, interpose=True).startswith("cyG -> cyX -> cyG: ")
    assert mapper.info("cyX")["interposed_by"] == ["cyF"] and "cyG" not in mapper.export_names()
    user.write(4096, b"j" * 4096)
    assert user.read(0, 8192) == b"i" * 4096 + b"j" * 4096
    user.close()


def test_a_cycle_through_a_snapshot(mapper, images):
    origin, cow_file = images(2)
    mapper.create("cyC", linear(cow_file))
    mapper.create("cyS", f"0 {SECTORS} snapshot {origin} /dev/mapper/cyC P 8")
    # the COW device over the snapshot that keeps its exceptions there
    assert loop_error(mapper.load, "cyC", linear("/dev/mapper/cyS")).startswith("cyC -> cyS -> cyC: ")
    mapper.remove("cyS")
    # snapshot-origin copies into the COW devices of its origin's snapshots: a COW device over
    # the snapshot-origin device would write into itself on every origin write
    mapper.create("cyO", f"0 {SECTORS} snapshot-origin {origin}")
    mapper.load("cyC", linear("/dev/mapper/cyO"))
    mapper.resume("cyC")
    msg = loop_error(mapper.create, "cySnap", f"0 {SECTORS} snapshot {origin} /dev/mapper/cyC P 8")
    assert msg.startswith("cyC -> cyO -> cyC: ") and "snapshot-origin writes into" in msg
    mapper.open_device("cyO", write=True).write(0, b"o" * 4096)   # no snapshot was left registered
    assert "cySnap" not in mapper.export_names()


def test_a_cycle_through_every_name_of_a_mapped_device(tmp_path, images):
    (img,) = images()
    fuse_dir = tmp_path / "run" / "mapper"
    m = Mapper(fuse_dir=fuse_dir)
    try:
        m.create("cyA", linear(img))
        m.create("cyB", linear("/dev/mapper/cyA"))
        minor_b = m.info("cyB")["minor"]
        for ref in ("/dev/mapper/cyB", f"253:{minor_b}", str(fuse_dir / "cyB")):
            assert loop_error(m.load, "cyA", linear(ref)).startswith("cyA -> cyB -> cyA: "), ref
        for ref in ("/dev/mapper/cyA", f"253:{m.info('cyA')['minor']}", str(fuse_dir / "cyA")):
            assert loop_error(m.load, "cyA", linear(ref)).startswith("cyA -> cyA: "), ref
        assert not m.info("cyA")["inactive"]
    finally:
        m.close()


def test_legitimate_stacks_still_work(mapper, images):
    (img,) = images()
    mapper.create("low", linear(img))
    mapper.create("mid", linear("/dev/mapper/low"))
    mapper.create("top", linear("/dev/mapper/mid"))
    minor = mapper.info("low")["minor"]
    mapper.create("side", f"0 {SECTORS // 2} linear /dev/mapper/low 0\n"
                          f"{SECTORS // 2} {SECTORS // 2} linear 253:{minor} {SECTORS // 2}")
    mapper.create("twin", linear("/dev/mapper/low"))
    handle = mapper.open_device("top", write=True)
    handle.write(MiB, b"s" * 4096)
    handle.close()
    for name in ("side", "twin", "mid", "low"):
        assert mapper.open_device(name, write=False).read(MiB, 4096) == b"s" * 4096
    # reloading a device of the stack over something below it is fine
    mapper.load("mid", linear("/dev/mapper/low"))
    mapper.resume("mid")


# ---- roles that overlap ------------------------------------------------------------------------

def test_era_metadata_and_origin_overlapping_are_refused(mapper, images):
    (img,) = images(1, 16 * MiB)
    msg = einval(mapper.create, "e", f"0 {SECTORS} era {img} {img} 8")
    assert f"era: metadata device {img} sectors 0-{16 * MiB // 512 - 1} overlaps origin device {img} " \
           f"sectors 0-{SECTORS - 1}" in msg
    link = img + ".link"
    os.symlink(img, link)
    msg = einval(mapper.create, "e", f"0 {SECTORS} era {link} {img} 8")
    assert f"metadata device {link} sectors" in msg and f"origin device {img} sectors" in msg
    with open(img, "rb") as f:
        assert f.read(4096) == bytes(4096)    # nothing was written


def test_roles_on_a_partition_and_its_disk(mapper, images):
    (img,) = images(1, 16 * MiB)
    sfdisk(img, GPT_LAYOUT)
    mapper.create("disk", linear(img, 16 * MiB // 512))
    # a disk and its partition in one table: only without claims (the kernel's claim rules refuse
    # it otherwise). era: metadata on partition 1 (disk sectors 2048-10239), origin on the disk
    msg = einval(mapper.create, "e", "0 4096 era /dev/mapper/disk1 /dev/mapper/disk 8", shared=True)
    assert "metadata device /dev/mapper/disk1 sectors 0-8191 overlaps origin device /dev/mapper/disk " \
           "sectors 0-4095 (both on /dev/mapper/disk)" in msg
    mapper.create("e", "0 2048 era /dev/mapper/disk1 /dev/mapper/disk 8", shared=True)  # before it
    # snapshot: the COW device on a partition of the origin
    msg = einval(mapper.create, "s", f"0 {SECTORS} snapshot /dev/mapper/disk /dev/mapper/disk1 P 8", shared=True)
    assert "origin device /dev/mapper/disk sectors 0-8191 overlaps COW device /dev/mapper/disk1 " \
           "sectors 0-8191 (both on /dev/mapper/disk)" in msg
    # partition 2 (disk sectors 10240-18431) lies beyond the origin's sectors 0-8191
    mapper.create("s", f"0 {SECTORS} snapshot /dev/mapper/disk /dev/mapper/disk2 N 8", shared=True)


def test_striped_stripes_overlapping_are_refused(mapper, images):
    (img,) = images()
    mapper.create("base", linear(img))
    minor = mapper.info("base")["minor"]
    width = SECTORS // 4
    msg = einval(mapper.create, "st", f"0 {2 * width} striped 2 8 /dev/mapper/base 0 253:{minor} {width // 2}")
    assert f"stripe 0 /dev/mapper/base sectors 0-{width - 1} overlaps stripe 1 253:{minor} sectors " \
           f"{width // 2}-{width // 2 + width - 1} (both on /dev/mapper/base)" in msg
    msg = einval(mapper.create, "st", f"0 {2 * width} striped 2 8 {img} 0 {img} 8")
    assert f"stripe 0 {img} sectors 0-{width - 1} overlaps stripe 1 {img} sectors 8-{width + 7}" in msg
    mapper.create("st", f"0 {2 * width} striped 2 8 /dev/mapper/base 0 253:{minor} {width}")
    handle = mapper.open_device("st", write=True)
    handle.write(0, os.urandom(16 * 4096))
    handle.close()


def test_snapshot_origin_and_cow_on_one_device(mapper, images):
    (img,) = images()
    e = err(mapper.create, "s", f"0 {SECTORS} snapshot {img} {img} P 8")
    assert e.errno == errno.EINVAL and "COW device cannot be the same as origin device" in e.message


def test_delay_may_use_one_region_for_reads_writes_and_flushes(mapper, images):
    (img,) = images()
    mapper.create("d", f"0 {SECTORS} delay {img} 0 0 {img} 0 0 {img} 0 0")
    handle = mapper.open_device("d", write=True)
    handle.write(0, b"d" * 512)
    assert handle.read(0, 512) == b"d" * 512
    handle.close()


def test_verity_data_and_hash_in_one_file(mapper, tmp_path):
    if shutil.which("veritysetup") is None:
        pytest.skip("veritysetup is not installed (apt: cryptsetup-bin)")
    data_size = 4 * MiB
    path = tmp_path / "verity.img"
    with open(path, "wb") as f:
        f.write(os.urandom(data_size))
        f.truncate(data_size + MiB)
    out = subprocess.run(["veritysetup", "format", str(path), str(path), f"--hash-offset={data_size}",
                          "--no-superblock", f"--data-blocks={data_size // 4096}"], capture_output=True, text=True, check=True).stdout
    root = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash"))
    salt = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Salt"))
    blocks = data_size // 4096
    sectors = data_size // 512

    def table(hash_start: int) -> str:
        return f"0 {sectors} verity 1 {path} {path} 4096 4096 {blocks} {hash_start} sha256 {root} {salt}"

    mapper.create("v", table(blocks), readonly=True)           # the tree right after the data
    with open(path, "rb") as f:
        assert mapper.open_device("v", write=False).read(MiB, 4096) == f.read(MiB + 4096)[MiB:]
    msg = einval(mapper.create, "w", table(blocks - 1), readonly=True)   # the tree's first block is data
    assert f"data device {path} sectors 0-{sectors - 1} overlaps hash device {path} sectors " \
           f"{sectors - 8}-" in msg
