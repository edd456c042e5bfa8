"""dmsetup's concise format: the man page's CONCISE FORMAT examples run as written (loop devices
replaced by files), `table --concise` recreates every device through `create --concise`, and
escapes, comments and empty input behave as dmsetup's do."""

import pytest

from userdm.cli import concise
from userdm.errors import DMError


def test_parse_escapes_and_refusals():
    devs = concise.parse(r"a\,b,U-1,7,ro,0 8 zero,8 8 error;c,,,,")
    assert [(d.name, d.uuid, d.minor, d.readonly, d.lines) for d in devs] == [
        ("a,b", "U-1", 7, True, ["0 8 zero", "8 8 error"]), ("c", None, None, False, [])]
    assert devs[1].table is None and devs[0].table == "0 8 zero\n8 8 error\n"
    for bad, says in [("x,,", "expected <name>,<uuid>,<minor>,<flags>"), ("x,,z,,0 8 zero", "minor 'z'"),
                      ("x,,,rx,0 8 zero", "flags 'rx'"), ("x,,,,0 8 zero\\", "lone backslash"),
                      (",,,,0 8 zero", "the name is empty"), ("", "empty concise")]:
        with pytest.raises(DMError, match=says):
            concise.parse(bad)
    info = {"name": "a;b", "uuid": "", "minor": 3, "readonly": False}
    assert concise.format_device(info, ["0 8 linear /x,y 0"]) == r"a\;b,,3,rw,0 8 linear /x\,y 0"


def test_man_page_examples_and_round_trip(daemon, images):
    loop0, loop1, loop2 = images(3, 2 << 30)   # sparse stand-ins for /dev/loop0..2 (1 GiB each used)
    run = daemon.run
    # "A simple linear read-only device"
    run("create", "--concise", f"test-linear-small,,,ro,0 2097152 linear {loop0} 0, "
        f"2097152 2097152 linear {loop1} 0")
    # "Two linear devices"
    run("create", "--concise", f"test-linear-small2,,,,0 2097152 linear {loop0} 0;"
        f"test-linear-large,,,,0 2097152 linear {loop1} 0, 2097152 2097152 linear {loop2} 0")
    assert "READ-ONLY" in run("info", "test-linear-small").stdout
    assert run("table", "test-linear-large").stdout == \
        f"0 2097152 linear {loop1} 0\n2097152 2097152 linear {loop2} 0\n"
    run("create", "top", "-u", "TOP-1", "--table", "0 100 linear /dev/mapper/test-linear-large 0")
    run("create", "bare", "--notable")
    dump = run("table", "--concise").stdout
    assert dump.count("\n") == 1 and dump.count(";") == 4
    assert dump.index("top,TOP-1,") > dump.index("test-linear-large,")   # users after what they use
    assert "bare,,4,rw;" in dump or dump.startswith("bare,,4,rw;")
    run("remove_all")
    assert run("ls").stdout == "No devices found\n"
    run("create", "--concise", input=dump)
    assert run("table", "--concise").stdout == dump
    bad = run("create", "--concise", "ok,,,,0 8 zero;ok,,,,0 8 zero", check=False)
    assert bad.returncode == 1 and "device ok: a device named 'ok' already exists" in bad.stderr
    bad = run("table", "--concise", "--inactive", check=False)
    assert bad.returncode == 1 and "--inactive does not go with it" in bad.stderr


def test_comments_and_empty_input(daemon, images):
    (a,) = images(1, 1 << 20)
    run = daemon.run
    run("create", "c", input=f"# a linear device\n\n   # indented comment\n0 8 linear {a} 0\n")
    assert run("table", "c").stdout == f"0 8 linear {a} 0\n"
    run("create", "empty", input="")
    assert "Tables present:    None" in run("info", "empty").stdout
    run("create", "comments-only", input="# nothing yet\n")
    assert run("table", "comments-only").stdout == "\n"          # dmsetup: an empty line
    assert run("status", "comments-only").stdout == "\n"
    assert run("table", "--target", "linear", "comments-only").stdout == ""
    assert run("table").stdout == f"c: 0 8 linear {a} 0\ncomments-only: \nempty: \n"
