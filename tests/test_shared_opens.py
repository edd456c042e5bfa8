"""Seed 000, Android's case: /system is a mounted dm-verity device, and an APEX file inside it
must become a dm-linear device over a slice of that verity device. The kernel refuses (EBUSY:
the filesystem holds the verity device exclusively); userdm allows it with `create --shared`
(the proposed DM_OPEN_SHARED) or linear's `no_exclusive` (the other proposal of the thread),
and shows the unclaimed edge in `deps`, `tree` and `ls --tree`. Without them, claims conflict
both ways, as in the kernel."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

from userdm.errors import DMError

from conftest import USERDM, wait_until
from test_verity import DATA_SIZE, MiB, pattern, pytestmark, veritysetup_format  # noqa: F401

APEX_START = MiB // 512            # the APEX file's place inside /system, in sectors
APEX_SECTORS = 512 * 1024 // 512   # and its length
APEX_TABLE = f"0 {APEX_SECTORS} linear /dev/mapper/system {APEX_START}"


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


@pytest.fixture
def system(tmp_path):
    """A `veritysetup format`ted system image (data and hash files)."""
    data = tmp_path / "system.img"
    data.write_bytes(pattern(DATA_SIZE))
    return veritysetup_format(str(data), str(tmp_path / "system.hashtree"))


def apex_bytes(system) -> bytes:
    return system.content[APEX_START * 512:(APEX_START + APEX_SECTORS) * 512]


def test_apex_over_a_mounted_verity_system(mapper, system):
    mapper.create("system", system.table(), readonly=True)
    mounted_fs = object()  # stands in for the /system filesystem
    mount = mapper.open_device("system", write=False, holder=mounted_fs)
    try:
        # the kernel's answer today: the filesystem owns the device
        e = err(mapper.create, "apex", APEX_TABLE, readonly=True)
        assert e.errno == errno.EBUSY and "claimed exclusively" in e.message and "table line 1" in e.message
        assert [d["name"] for d in mapper.list()] == ["system"]   # the failed create left nothing

        # DM_OPEN_SHARED: every device of the table is opened without a claim
        mapper.create("apex", APEX_TABLE, readonly=True, shared=True)
        # linear's no_exclusive: the same for this one device only
        mapper.create("apex2", APEX_TABLE + " no_exclusive", readonly=True)
        for name in ("apex", "apex2"):
            with mapper.open_device(name, write=False) as dev:
                assert dev.read(0, APEX_SECTORS * 512) == apex_bytes(system)
        assert mapper.table("apex2") == [[0, APEX_SECTORS, "linear", f"253:0 {APEX_START} no_exclusive"]]
        assert mapper.table("apex") == [[0, APEX_SECTORS, "linear", f"253:0 {APEX_START}"]]
        assert (mapper.info("apex")["shared"], mapper.info("apex2")["shared"]) == (True, False)

        shared_edge = {"name": "253:0", "devno": [253, 0], "device": "system", "shared": True,
                       "size": DATA_SIZE // 512}
        assert mapper.deps("apex") == mapper.deps("apex2") == [shared_edge]
        tree = {d["name"]: d["deps"] for d in mapper.tree()}
        assert tree["apex"] == tree["apex2"] == [shared_edge]
        assert [dep["shared"] for dep in tree["system"]] == [False, False]  # data and hash tree
        assert sorted(mapper.info("system")["holders"]) == ["apex", "apex2"]

        # the filesystem's claim is untouched: it still owns /system, nobody else may claim it
        assert mapper.device("system").holder is mounted_fs
        assert err(mapper.open_device, "system", write=False, holder=object()).errno == errno.EBUSY
        # and a plain (claiming) table is still refused while the shared ones live
        assert err(mapper.create, "apex3", APEX_TABLE, readonly=True).errno == errno.EBUSY
        # system is in use (the mount and two apex devices), so it stays
        assert err(mapper.remove, "system").errno == errno.EBUSY
    finally:
        mount.close()
    mapper.remove("apex")
    mapper.remove("apex2")
    mapper.remove("system")


def test_apex_tables_must_be_read_only_over_verity(mapper, system):
    mapper.create("system", system.table(), readonly=True)
    e = err(mapper.create, "apex", APEX_TABLE, shared=True)
    assert e.errno == errno.EACCES and "read-only" in e.message


def test_claims_conflict_both_ways_without_shared(mapper, system):
    img = system.data
    # an outside exclusive holder makes the load EBUSY ...
    owner = mapper.backing.open(img, write=False, holder="mounted-fs")
    try:
        e = err(mapper.create, "lin", f"0 2048 linear {img} 0", readonly=True)
        assert e.errno == errno.EBUSY and "mounted-fs" in e.message
        e = err(mapper.create, "v", system.table(), readonly=True)
        assert e.errno == errno.EBUSY and "mounted-fs" in e.message
        mapper.create("lin", f"0 2048 linear {img} 0", readonly=True, shared=True)
        mapper.create("lin2", f"0 2048 linear {img} 2048 no_exclusive", readonly=True)
    finally:
        owner.close()
    # ... and the device-mapper's claim makes an outside exclusive open EBUSY
    mapper.create("system", system.table(), readonly=True)
    e = err(mapper.backing.open, img, write=False, holder="mounted-fs")
    assert e.errno == errno.EBUSY and "device-mapper" in e.message
    mapper.create("other", f"0 2048 linear {img} 0", readonly=True)  # all mapped devices share one claim
    mapper.remove("system")
    mapper.remove("other")
    # shared devices claim nothing: the outside holder may come back while they map the file
    mapper.backing.open(img, write=False, holder="mounted-fs").close()
    # the same between mapped devices: a claiming table blocks an exclusive open of its device
    mapper.create("system", system.table(), readonly=True)
    mapper.create("apex", APEX_TABLE, readonly=True)
    assert err(mapper.open_device, "system", write=False, holder=object()).errno == errno.EBUSY
    mapper.remove("apex")
    mapper.open_device("system", write=False, holder=object()).close()


def test_linear_refuses_other_optional_arguments(mapper, system):
    e = err(mapper.create, "lin", f"0 8 linear {system.data} 0 exclusive", readonly=True)
    assert e.errno == errno.EINVAL and "linear: Invalid optional argument 'exclusive'" in e.message
    e = err(mapper.create, "lin", f"0 8 linear {system.data} 0 no_exclusive extra", readonly=True)
    assert e.errno == errno.EINVAL and "linear: Invalid argument count" in e.message


def test_cli_shows_the_shared_edge(daemon, system):
    run = daemon.run
    run("create", "system", "--readonly", "--table", system.table())
    # the mounted filesystem: an exclusive open held by a process, for as long as it runs
    mount = subprocess.Popen(USERDM + ["open", "system", "--readonly", "--holder", "mounted-system",
                                       "--", "sleep", "600"], env=daemon.env, start_new_session=True)
    try:
        with daemon.connect() as client:
            assert wait_until(lambda: client.info("system")["holder"] == "mounted-system")
        res = run("create", "apex", "--readonly", "--table", APEX_TABLE, check=False)
        assert res.returncode == 1 and "EBUSY" in res.stderr and "mounted-system" in res.stderr
        run("create", "apex", "--readonly", "--shared", "--table", APEX_TABLE)
        run("create", "apex2", "--readonly", "--table", APEX_TABLE + " no_exclusive")
        assert run("table", "apex2").stdout == f"{APEX_TABLE.replace('/dev/mapper/system', '253:0')} no_exclusive\n"
        assert run("deps", "apex").stdout == "1 dependencies\t: (253, 0)\n"
        assert run("deps", "apex2").stdout == "1 dependencies\t: (253, 0)\n"
        assert run("ls", "--tree", "-o", "notrunc").stdout.splitlines() == [
            "apex (253:1)", " └─system (253:0) [shared]", f"    ├─{system.data}", f"    └─{system.hash}",
            "apex2 (253:2)", " └─system (253:0) [shared]", f"    ├─{system.data}", f"    └─{system.hash}",
        ]
        assert "userdm flags:      shared\n" in run("info", "apex").stdout
        assert "userdm flags" not in run("info", "apex2").stdout  # only its one edge is shared
        with daemon.connect() as client:
            assert client.info("system")["holder"] == "mounted-system"
            assert client.info("system")["open_count"] == 3
    finally:
        os.killpg(mount.pid, signal.SIGKILL)
        mount.wait()
    with daemon.connect() as client:
        assert wait_until(lambda: client.info("system")["holder"] == "-")
    run("remove", "apex")
    run("remove", "apex2")
    run("remove", "system")
