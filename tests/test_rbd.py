"""Ceph RBD images as underlying devices (`rbd:POOL/IMAGE[@SNAP][:OPTION=VALUE]...`), against a
real single-node Ceph started by the test (tests/ceph_cluster.py: one monitor, one memstore OSD,
auth off, localhost). Data written through the daemon's NBD export (nbdcopy) is checked with
`rbd export`; killing the OSD gives the reader EIO and a `dead` event, and the daemon keeps
serving its other devices; malformed and dangling references are refused with errno and
sentence."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from userdm import Mapper
from userdm.block.rbd_image import parse_ref
from userdm.errors import DMError

sys.path.insert(0, str(Path(__file__).parent))
from ceph_cluster import Cluster  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
# the fixtures `ceph` (one cluster for the whole run) and `image` are in conftest.py


def run(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def rbd_export(ceph: Cluster, name: str, path: Path) -> bytes:
    ceph.rbd("export", "--no-progress", name, str(path))
    return path.read_bytes()


def err(fn, *args) -> DMError:
    with pytest.raises(DMError) as info:
        fn(*args)
    return info.value


# ---- references ----------------------------------------------------------------------------

def test_parse_ref_spells_references_as_qemu_does():
    s = parse_ref("rbd:pool/img")
    assert (s.pool, s.namespace, s.image, s.snapshot, s.conf, s.user) == ("pool", "", "img", None, None, None)
    s = parse_ref("rbd:pool/ns/img@snap:conf=/etc/ceph/x.conf:id=admin:rbd_cache=false")
    assert (s.pool, s.namespace, s.image, s.snapshot) == ("pool", "ns", "img", "snap")
    assert (s.conf, s.user, s.options) == ("/etc/ceph/x.conf", "admin", (("rbd_cache", "false"),))
    # a colon inside a value: escaped as qemu does, or simply continuing the value
    assert parse_ref(r"rbd:p/i:mon_host=127.0.0.1\:3300").options == (("mon_host", "127.0.0.1:3300"),)
    assert parse_ref("rbd:p/i:mon_host=[v2:127.0.0.1:3300]:id=u").options == (("mon_host", "[v2:127.0.0.1:3300]"),)
    assert parse_ref(r"rbd:p/we\@ird").image == "we@ird"


def test_backing_stores_know_opaque_schemes_spelled_without_slashes():
    from userdm.block.backing import BackingStores
    from userdm.block.memory import MemoryDisk
    stores = BackingStores()
    made: list[str] = []
    stores.register_scheme("mem", lambda ref: made.append(ref) or MemoryDisk(MiB, name=ref), opaque=True)
    assert stores.scheme_of("mem:x/y") == "mem" and stores.is_scheme("mem:x/y")
    assert stores.scheme_of("other:x/y") is None and stores.scheme_of("nbd://h/e") == "nbd"
    first = stores.open("mem:x/y", write=True)
    again = stores.open("mem:x/y", write=False)       # one device per reference
    assert first.device is again.device and made == ["mem:x/y"]
    e = err(lambda: stores.open("other:x/y", write=False))   # not a scheme: a relative path
    assert e.errno == errno.EINVAL and "not an absolute path" in e.message
    first.close()
    again.close()


@pytest.mark.parametrize("ref, words", [
    ("rbd:img", "no pool"),
    ("rbd://pool/img", "no '//'"),
    ("rbd:pool/", "empty pool, namespace or image"),
    ("rbd:/img", "empty pool, namespace or image"),
    ("rbd:pool/img@", "empty snapshot name"),
    ("rbd:a/b/c/d", "4 names"),
    ("rbd:pool/img:novalue", "'novalue' is not KEY=VALUE"),
    ("rbd:pool/img:=x", "'=x' is not KEY=VALUE"),
    ("rbd:pool/im\x00g", "NUL"),
    ("rbd:" + "p/" * 2000 + "i", "2001 names"),
    ("rbd:p/" + "i" * 5000, "longer than 4096 characters"),
])
def test_malformed_references_are_refused_with_einval(ref, words):
    e = err(parse_ref, ref)
    assert e.errno == errno.EINVAL and words in e.message and "rbd:POOL/" in e.message


def test_dangling_references_are_refused_with_errno_and_sentence(ceph, image, mapper, tmp_path):
    name = image(4 * MiB)
    conf = f":conf={ceph.conf}"
    for ref, code, words in [
            (f"rbd:nopool/{name}{conf}", errno.ENOENT, "pool 'nopool' does not exist"),
            (f"rbd:rbd/missing{conf}", errno.ENOENT, "image 'missing' does not exist in pool 'rbd'"),
            (f"rbd:rbd/{name}@nosnap{conf}", errno.ENOENT, f"snapshot 'nosnap' of image '{name}' does not exist"),
            (f"rbd:rbd/{name}:conf={tmp_path}/none.conf", errno.ENOENT, "cannot read the Ceph configuration"),
            (f"rbd:rbd/{name}{conf}:no_such_option=1", errno.EINVAL, "'no_such_option' is not a Ceph option"),
            (f"rbd:img{conf}", errno.EINVAL, "no pool"),
            # nothing listens on port 1: the monitors are unreachable, within client_mount_timeout
            (f"rbd:rbd/{name}:mon_host=127.0.0.1:1:client_mount_timeout=2", errno.ENXIO,
             "cannot reach the Ceph cluster")]:
        e = err(mapper.create, "bad", f"0 8 linear {ref} 0")
        assert e.errno == code and words in e.message, (ref, e)
    assert mapper.list() == []


# ---- I/O --------------------------------------------------------------------------------------

def test_read_write_flush_discard_zeroes_and_block_status(ceph, image, mapper, tmp_path):
    name = image(SIZE)
    mapper.create("r", f"0 {SIZE // 512} linear {ceph.ref(name)} 0")
    dev = mapper.open_device("r", write=True)
    try:
        data = os.urandom(12 * MiB)                    # more than one librbd piece: the aio path
        dev.write(MiB, data)
        dev.write(20 * MiB + 512, b"s" * 1024)         # sector-sized, unaligned to 4 KiB
        dev.flush()
        assert dev.read(MiB, len(data)) == data
        dev.write_zeroes(2 * MiB, 4096)
        dev.write_zeroes(3 * MiB, 8192, may_unmap=False)     # librbd's thick-provision flag
        dev.discard(8 * MiB, 4 * MiB)                  # whole 4 MiB objects: holes again
        status = dev.block_status(0, SIZE)
        assert sum(n for n, _ in status) == SIZE
        holes = [(off, n) for off, (n, flags) in zip(_offsets(status), status) if flags & 3 == 3]
        assert (8 * MiB, 4 * MiB) in holes and holes[-1][0] + holes[-1][1] == SIZE
    finally:
        dev.close()
    mapper.remove("r")
    want = bytearray(SIZE)
    want[MiB:13 * MiB] = data
    want[2 * MiB:2 * MiB + 4096] = bytes(4096)
    want[3 * MiB:3 * MiB + 8192] = bytes(8192)
    want[8 * MiB:12 * MiB] = bytes(4 * MiB)
    want[20 * MiB + 512:20 * MiB + 1536] = b"s" * 1024
    assert rbd_export(ceph, name, tmp_path / "out.raw") == bytes(want)
    assert all(want[off:off + n] == bytes(n) for off, n in holes)   # holes read as zeroes


def _offsets(extents):
    pos = 0
    for n, _ in extents:
        yield pos
        pos += n


def test_a_snapshot_is_read_only(ceph, image, mapper):
    name = image(4 * MiB)
    ceph.rbd("snap", "create", f"{name}@s")
    ref = ceph.ref(name, "s")
    e = err(mapper.create, "w", f"0 8 linear {ref} 0")
    assert e.errno == errno.EROFS and "snapshot 's'" in e.message and "read-only" in e.message
    mapper.create("ro", f"0 8 linear {ref} 0", readonly=True)
    mapper.remove("ro")


# ---- through the daemon, with real clients ------------------------------------------------------

@pytest.fixture
def served(daemon):
    """(daemon, uri(name)) with the daemon's NBD Unix socket."""
    sock = daemon.runtime / "nbd.sock"
    return daemon, lambda name: f"nbd+unix:///{name}?socket={sock}"


def test_striped_device_over_two_rbd_images_checked_with_rbd_export(ceph, image, served, tmp_path):
    daemon, uri = served
    a, b = image(SIZE), image(SIZE)
    chunk = 64                                            # sectors: 32 KiB stripes
    daemon.run("create", "st", "--table",
               f"0 {2 * SIZE // 512} striped 2 {chunk} {ceph.ref(a)} 0 {ceph.ref(b)} 0")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(2 * SIZE))
    run("nbdcopy", str(src), uri("st"))
    back = tmp_path / "back.raw"
    run("nbdcopy", uri("st"), str(back))
    assert back.read_bytes() == src.read_bytes()
    daemon.run("remove", "st")                           # closes the images: everything is flushed
    data, step = src.read_bytes(), chunk * 512
    want_a = b"".join(data[i:i + step] for i in range(0, len(data), 2 * step))
    want_b = b"".join(data[i + step:i + 2 * step] for i in range(0, len(data), 2 * step))
    assert rbd_export(ceph, a, tmp_path / "a.raw") == want_a
    assert rbd_export(ceph, b, tmp_path / "b.raw") == want_b


def test_snapshot_read_through_the_daemon(ceph, image, served, tmp_path):
    daemon, uri = served
    name = image(SIZE)
    first = tmp_path / "first.raw"
    first.write_bytes(os.urandom(SIZE))
    daemon.run("create", "live", "--table", f"0 {SIZE // 512} linear {ceph.ref(name)} 0")
    run("nbdcopy", str(first), uri("live"))
    daemon.run("remove", "live")
    ceph.rbd("snap", "create", f"{name}@before")
    daemon.run("create", "live", "--table", f"0 {SIZE // 512} linear {ceph.ref(name)} 0")
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE}", uri("live"))
    daemon.run("create", "snap", "--readonly", "--table",
               f"0 {SIZE // 512} linear {ceph.ref(name, 'before')} 0")
    back = tmp_path / "back.raw"
    run("nbdcopy", uri("snap"), str(back))
    assert back.read_bytes() == first.read_bytes()
    # the snapshot device refuses writes; the live image has the new data
    res = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4096", uri("snap"), check=False)
    assert res.returncode != 0 and "Permission denied" in res.stderr   # a read-only export
    daemon.run("remove", "live")
    daemon.run("remove", "snap")
    assert rbd_export(ceph, name, tmp_path / "now.raw") == b"\x5a" * SIZE
    assert rbd_export(ceph, f"{name}@before", tmp_path / "then.raw") == first.read_bytes()


def test_killing_the_osd_gives_eio_and_a_dead_event_and_the_daemon_serves_on(served, images, tmp_path):
    daemon, uri = served
    other = images(1, 4 * MiB)[0]
    daemon.run("create", "local", "--table", f"0 {4 * MiB // 512} linear {other} 0")
    with Cluster() as own:                                # its own cluster: this test kills its OSD
        own.rbd("create", "--size", "16M", "victim")
        # no client cache (the read must reach the OSD), and short waits for the lost OSD
        ref = own.ref("victim", rbd_cache="false", rados_osd_op_timeout="3", rados_mon_op_timeout="3")
        daemon.run("create", "remote", "--table", f"0 {16 * MiB // 512} linear {ref} 0")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", uri("remote"))
        own.kill_osd()
        outcome: list = []
        reader = threading.Thread(target=lambda: outcome.append(
            run("qemu-io", "-f", "raw", "-c", "read 64k 64k", uri("remote"), check=False)), daemon=True)
        reader.start()
        reader.join(90)                                   # a guard against a hang, not a measurement
        assert not reader.is_alive(), "a read from an RBD image whose OSD died hangs"
        res = outcome[0]
        assert "read failed: Input/output error" in res.stdout + res.stderr
        [info] = json.loads(daemon.run("info", "--json", "remote").stdout)
        events = [json.loads(line) for line in daemon.run("events").stdout.splitlines()]
        dead = [r for r in events if r["event"] == "dead"]
        assert [(r["name"], r["path"]) for r in dead] == [("remote", [ref, "remote"])]
        assert info["dead"] is True
        res = run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri("remote"), check=False)
        assert res.returncode != 0 and "can't open" in res.stderr   # a dead device takes no new opens
        # the daemon keeps serving its other devices
        run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "read -P 0x44 0 64k", uri("local"))
        daemon.run("remove", "remote")
    assert daemon.run("info", "local").returncode == 0


def test_the_daemon_refuses_bad_references_and_answers_on(ceph, served):
    daemon, _ = served
    for ref, words in [("rbd:img", "EINVAL"), (f"rbd:rbd/missing:conf={ceph.conf}", "ENOENT"),
                       ("rbd:" + "x" * 3000, "EINVAL")]:
        res = daemon.run("create", "bad", "--table", f"0 8 linear {ref} 0", check=False)
        assert res.returncode == 1 and words in res.stderr and "rbd:" in res.stderr, res.stderr
    assert daemon.run("ls").returncode == 0
