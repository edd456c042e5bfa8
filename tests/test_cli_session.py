"""A dmsetup session against a real daemon, as dmsetup's man page and the kernel docs run it;
output shapes as dmsetup prints them. Also: restart, hostile input, a second daemon."""

import re
import signal

from conftest import Daemon


def test_dmsetup_session(daemon, images):
    a, b, c = images(3, 64 << 20)
    run = daemon.run
    # create from stdin
    run("create", "vol0", input=f"0 2048 linear {a} 0\n")
    info = run("info", "vol0").stdout
    assert info == ("Name:              vol0\nState:             ACTIVE\nRead Ahead:        256\n"
                    "Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n"
                    "Major, minor:      253, 0\nNumber of targets: 1\n\n")   # dmsetup: a blank line after
    run("create", "stripes", "-u", "UUID-S", "--table",
        f"0 3072 striped 3 128 {a} 4096 {b} 0 {c} 0")
    cols = run("info", "-c").stdout.splitlines()
    assert cols[0].split() == ["Name", "Maj", "Min", "Stat", "Open", "Targ", "Event", "UUID"]
    # libdm pads every column to its width, the last one too
    assert re.fullmatch(r"stripes\s+253\s+1 L--w\s+0\s+1\s+0 UUID-S {26}", cols[1])
    assert re.fullmatch(r"vol0\s+253\s+0 L--w\s+0\s+1\s+0 {33}", cols[2])
    assert run("ls").stdout == "stripes\t(253:1)\nvol0\t(253:0)\n"
    assert run("table", "vol0").stdout == f"0 2048 linear {a} 0\n"
    assert run("status", "vol0").stdout == "0 2048 linear \n"
    assert run("status", "stripes").stdout == f"0 3072 striped 3 {a} {b} {c} 1 AAA\n"
    assert run("deps", "vol0").stdout == f"1 dependencies\t: ({a})\n"
    run("create", "top", "--table", "0 2048 linear /dev/mapper/vol0 0")
    assert run("table", "top").stdout == "0 2048 linear 253:0 0\n"
    assert run("deps", "top").stdout == "1 dependencies\t: (253, 0)\n"
    assert run("ls", "--tree", "-o", "notrunc").stdout.splitlines() == [
        f"stripes (253:1)", f" ├─{a}", f" ├─{b}", f" └─{c}",
        "top (253:2)", " └─vol0 (253:0)", f"    └─{a}"]
    # load + resume to grow
    run("load", "vol0", "--table", f"0 4096 linear {a} 0")
    assert "Tables present:    LIVE & INACTIVE" in run("info", "vol0").stdout
    run("resume", "vol0")
    assert run("table", "vol0").stdout == f"0 4096 linear {a} 0\n"
    assert "Event number:      1" in run("info", "vol0").stdout
    # suspend / resume
    run("suspend", "vol0")
    assert "State:             SUSPENDED" in run("info", "vol0").stdout
    assert run("info", "-c", "--noheadings", "-o", "name,attr", "vol0").stdout == "vol0:L-sw\n"
    run("resume", "vol0")
    # rename and setuuid
    run("rename", "stripes", "raid0")
    run("rename", "top", "--setuuid", "TOP-UUID")
    assert "UUID: TOP-UUID" in run("info", "top").stdout
    res = run("rename", "raid0", "--setuuid", "again", check=False)
    assert res.returncode == 1 and res.stderr.startswith("rename: EINVAL: ")
    # remove while open (top holds vol0)
    res = run("remove", "vol0", check=False)
    assert res.returncode == 1 and "remove: EBUSY: device vol0 is open (open count 1)" in res.stderr
    # remove --deferred + cancel
    run("remove", "--deferred", "vol0")
    assert "State:             ACTIVE (DEFERRED REMOVE)" in run("info", "vol0").stdout
    run("message", "vol0", "0", "@cancel_deferred_remove")
    assert "DEFERRED" not in run("info", "vol0").stdout
    run("remove", "--deferred", "vol0")
    run("remove", "top")  # the last close of vol0 fires its deferred removal
    assert run("ls").stdout == "raid0\t(253:1)\n"
    run("create", "empty", "--notable")
    assert "Tables present:    None" in run("info", "empty").stdout
    run("remove_all")
    assert run("ls").stdout == "No devices found\n"
    assert "linear           v1.5.0" in run("targets").stdout
    assert "Driver version:    4.50.0" in run("version").stdout


def test_hostile_input_gets_einval_and_the_daemon_keeps_serving(daemon, images):
    (a,) = images(1)
    run = daemon.run
    run("create", "good", "--table", f"0 8 linear {a} 0")
    cases = [
        (["create", "../etc"], "EINVAL: device name '../etc' contains '/'"),
        (["create", "control", "--notable"], "EINVAL: device name 'control' is reserved"),
        (["create", "x" * 200, "--notable"], "EINVAL: device name"),
        (["create", "bad", "--table", "0 10 linear"], "EINVAL: table line 1: linear: Invalid argument count"),
        (["create", "bad", "--table", "0 10 zero\n20 1 zero"], "EINVAL: table line 2: gap at sector 20"),
        (["create", "bad", "--table", "zero 0 0"], "EINVAL: table line 1: invalid start sector 'zero'"),
        (["create", "bad", "--table", f"0 8 linear {a}/../../etc/shadow 0"], "table line 1: linear: Device lookup failed"),
        (["info", "nosuch"], "ENXIO: device 'nosuch' does not exist"),
        (["message", "good", "0", "@nonsense"], "EINVAL: unknown core message"),
    ]
    for args, expected in cases:
        res = run(*args, check=False)
        assert res.returncode == 1, args
        assert expected in res.stderr, (args, res.stderr)
        assert re.match(r"^\w+: E[A-Z]+: ", res.stderr), res.stderr
    assert run("ls").stdout == "good\t(253:0)\n"


def test_restart_brings_back_every_device(tmp_path, images):
    a, b = images(2)
    d = Daemon(tmp_path)
    d.start()
    try:
        d.run("create", "base", "-u", "U-BASE", "--table", f"0 1024 linear {a} 0\n1024 1024 linear {b} 0")
        d.run("create", "upper", "--table", "0 2048 linear /dev/mapper/base 0")
        d.run("create", "ro", "-r", "--table", "0 16 zero")
        d.run("create", "pending", "--notable")
        d.run("load", "pending", "--table", "0 8 zero")
        d.run("suspend", "ro")
        with d.connect() as client:
            client.remove("base", deferred=True)
        before = {n: (d.run("info", n).stdout, d.run("table", n).stdout) for n in ("base", "upper", "ro", "pending")}
        d.stop(signal.SIGKILL)  # a crash: the state file was written at every change
        d.start()
        after = {n: (d.run("info", n).stdout, d.run("table", n).stdout) for n in ("base", "upper", "ro", "pending")}
        assert after == before
        d.stop()
        d.start()
        assert d.run("ls").stdout.count("\n") == 4
    finally:
        d.stop()


def test_second_daemon_on_the_same_runtime_dir_is_refused(daemon):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "userdm", "daemon", "--no-fuse"], env=daemon.env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "EBUSY: another userdm daemon is already listening" in res.stderr
    assert daemon.run("ls").returncode == 0
