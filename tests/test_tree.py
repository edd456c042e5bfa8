"""`ls --tree -o STYLE` and `ls`/`deps -o devno|devname|blkdevname`, drawn as dmsetup.c draws
them (Debian's dmsetup cannot draw a tree without a kernel device-mapper, so the expected texts
are worked out from dmsetup.c's _display_tree_node and libdm's dm_tree by hand)."""

import os

import pytest

from test_block import loop_device  # noqa: F401  (the fixture: a real loop device)
from userdm.cli import tree
from userdm.errors import DMError


def dev(name, minor, deps, suspended=False, readonly=False, open_count=0, uuid="", **extra):
    return {"name": name, "major": 253, "minor": minor, "suspended": suspended, "readonly": readonly,
            "open_count": open_count, "uuid": uuid, "deps": deps, **extra}


def file_dep(path):
    return {"name": path, "devno": None, "device": None, "shared": False}


def dm_dep(name, minor, shared=False):
    return {"name": f"/dev/mapper/{name}", "devno": [253, minor], "device": name, "shared": shared}


def blk_dep(major, minor, shared=False):
    return {"name": f"/dev/blk{minor}", "devno": [major, minor], "device": None, "shared": shared}


DEVICES = [
    dev("stripes", 1, [file_dep("/a"), file_dep("/b")]),
    dev("top", 2, [dm_dep("vol0", 0), blk_dep(7, 99, shared=True)], suspended=True, readonly=True,
        open_count=1, uuid="U-1"),
    dev("vol0", 0, [file_dep("/a")], open_count=1),
    dev("empty", 3, []),
]


def draw(spec):
    return tree.draw(DEVICES, spec, tty=False)


def test_default_and_ascii_styles():
    assert draw("ascii") == (
        "stripes (253:1)\n |-/a\n `-/b\n"
        "top (253:2)\n |-vol0 (253:0)\n |  `-/a\n `- (7:99) [shared]\n"
        "empty (253:3)\n")
    assert draw("utf").splitlines()[1:3] == [" ├─/a", " └─/b"]
    assert draw("vt100").splitlines()[1] == " \033(0\017tq\033(B/a"
    # later options win, as in dmsetup
    assert draw("utf,ascii") == draw("ascii")
    assert draw("nodevice,device,ascii") == draw("ascii")


def test_compact_inverted_and_attributes():
    assert draw("compact,ascii") == (
        "stripes (253:1)-+-/a\n"
        "                `-/b\n"
        "top (253:2)-+-vol0 (253:0)---/a\n"
        "            `- (7:99) [shared]\n"
        "empty (253:3)\n")
    # inverted: from what each device is built on up to its users
    assert draw("inverted,ascii") == (
        "/a\n |-stripes (253:1)\n `-vol0 (253:0)\n    `-top (253:2)\n"
        "/b\n `-stripes (253:1)\n"
        " (7:99)\n `-top (253:2) [shared]\n"
        "empty (253:3)\n")
    assert draw("inverted,compact,ascii").splitlines()[:2] == [
        "/a-+-stripes (253:1)", "   `-vol0 (253:0)---top (253:2)"]
    assert draw("active,rw,open,uuid,ascii").splitlines() == [
        "stripes (253:1) [ACTIVE, RW, 0, ]", " |-/a", " `-/b",
        "top (253:2) [SUSPENDED, RO, 1, U-1]", " |-vol0 (253:0) [ACTIVE, RW, 1, ]", " |  `-/a",
        " `- (7:99) [shared]", "empty (253:3) [ACTIVE, RW, 0, ]"]
    assert draw("open,ascii").splitlines()[0] == "stripes (253:1) [0]"
    # attributes (and table/status) turn compact off, as in dmsetup
    assert draw("compact,uuid,ascii").splitlines()[1] == " |-/a"
    assert draw("compact,table,ascii") == draw("ascii")
    assert draw("status,ascii") == draw("ascii")


def test_nodevice_hides_numbers_and_unnamed_devices():
    assert draw("nodevice,ascii") == (
        "stripes\n |-/a\n `-/b\ntop\n |-vol0\n |  `-/a\nempty\n")
    assert draw("blkdevname,ascii").splitlines()[3:5] == ["top <dm-2> (253:2)", " |-vol0 <dm-0> (253:0)"]
    assert draw("blkdevname,nodevice,ascii").splitlines()[0] == "stripes <dm-1>"


def test_truncation_at_80_columns_off_a_terminal():
    long = [dev("d" * 60, 0, [file_dep("/" + "f" * 90), file_dep("/" + "g" * 76), file_dep("/" + "h" * 75)])]
    lines = tree.draw(long, "ascii", tty=False).splitlines()
    # 79 characters and "..." for a longer line; a line of exactly 80 is kept whole
    assert lines[0] == "d" * 60 + " (253:0)"
    assert lines[1] == " |-/" + "f" * 75 + "..."
    assert lines[2] == " |-/" + "g" * 76 and len(lines[2]) == 80
    assert lines[3] == " `-/" + "h" * 75
    assert tree.draw(long, "ascii,notrunc", tty=False).splitlines()[1] == " |-/" + "f" * 90
    # a non-ASCII character at column 80 is not kept
    utf = tree.draw([dev("x", 0, [file_dep("/" + "g" * 75 + "é")])], "ascii", tty=False)
    assert utf.splitlines()[1] == " `-/" + "g" * 75 + "..."


def test_unknown_tree_option_is_refused():
    for spec in ("bogus", "ascii,", "ascii,,rw", "ASCII"):
        with pytest.raises(DMError, match="Tree option not recognised"):
            tree.parse_options(spec)


@pytest.mark.root
def test_device_names_on_a_real_loop_device(daemon, images, loop_device):  # noqa: F811
    node, _ = loop_device
    (a,) = images(1, 1 << 20)
    kname = os.path.basename(node)
    rdev = os.stat(node).st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    run = daemon.run
    run("create", "low", "--table", f"0 8 linear {a} 0")
    run("create", "top", "--table", f"0 8 linear /dev/mapper/low 0\n8 8 linear {node} 0")
    assert run("deps", "top").stdout == f"2 dependencies\t: (253, 0) ({major}, {minor})\n"
    assert run("deps", "-o", "devname", "top").stdout == f"2 dependencies\t: (low) ({kname})\n"
    assert run("deps", "-o", "blkdevname", "top").stdout == f"2 dependencies\t: (dm-0) ({kname})\n"
    assert run("deps", "-o", "blk", "low").stdout == f"1 dependencies\t: ({a})\n"    # a prefix, as dmsetup
    assert run("deps", "-o", "devname,devno", "top").stdout == run("deps", "top").stdout  # the last wins
    assert run("ls", "-o", "blkdevname").stdout == "low\t(dm-0)\ntop\t(dm-1)\n"
    assert run("ls", "-o", "devn").stdout == "low\t(253:0)\ntop\t(253:1)\n"
    assert run("ls", "--tree", "-o", "ascii,blkdevname").stdout == (
        f"top <dm-1> (253:1)\n |-low <dm-0> (253:0)\n |  `-{a}\n `- <{kname}> ({major}:{minor})\n")
    assert run("ls", "--tree", "-o", "ascii,inverted,compact,notrunc").stdout.splitlines() == [
        f"{a}---low (253:0)---top (253:1)", f" ({major}:{minor})---top (253:1)"]
    for args, says in [(["ls", "--tree", "-o", "bogus"], "Tree option not recognised: bogus."),
                       (["ls", "-o", "bogus"], "Option not recognised: bogus."),
                       (["deps", "-o", "devno,x"], "Option not recognised: x."),
                       (["ls", "--tree", "--json", "-o", "ascii"], "takes no tree options")]:
        res = run(*args, check=False)
        assert res.returncode == 1 and res.stdout == "" and says in res.stderr, (args, res)
