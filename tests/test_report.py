"""dmsetup's report engine: userdm's against Debian's `dmsetup splitname` (which needs no kernel
device-mapper) on the same names, fields and options; then `info -c` on a real daemon."""

import contextlib
import io
import re
import shutil
import subprocess
import sys

import pytest

from userdm.cli import report
from userdm.errors import DMError
from userdm.cli.main import main

DMSETUP = shutil.which("dmsetup") or "/sbin/dmsetup"
USERDM = [sys.executable, "-m", "userdm"]

NAMES = ["vg-lv", "vg-lv-layer", "v g-lv--x-layer", "a", "a--", "a---b", "a-b-", "a-b-c-d",
         "very_long_volume_group-very_long_logical_volume-cow", "x-y--z--w"]
OPTIONS = [[], ["--noheadings"], ["--separator", ","], ["--noheadings", "--separator", "|"],
           ["--nameprefixes"], ["--nameprefixes", "--unquoted"], ["--nameprefixes", "--noheadings"],
           ["--rows"], ["--rows", "--noheadings"], ["--rows", "--separator", ";"],
           ["--rows", "--nameprefixes"], ["--separator", "::", "--nameprefixes", "--unquoted"]]
FIELDS = [None, "subsystem,vg_name,lv_name,lv_layer", "lv_layer,vg_name", "splitname_all",
          "+subsystem", "LV_NAME,Vg_Name", "vg_name,vg_name", "selected,lv_name", ""]


def need_dmsetup() -> None:
    if not shutil.which(DMSETUP):
        pytest.skip("dmsetup is not installed (apt: dmsetup; scripts/setup.sh installs it)")


def userdm(*args: str) -> subprocess.CompletedProcess:
    """userdm's command line in this process (splitname needs no daemon): fast enough to
    compare hundreds of cases."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def both(*args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    ours = userdm(*args)
    theirs = subprocess.run([DMSETUP, *args], capture_output=True, text=True, timeout=60)
    return ours, theirs


def test_splitname_matches_dmsetup_on_every_option_and_field_list():
    need_dmsetup()
    for fields in FIELDS:
        for options in OPTIONS:
            for name in NAMES[:4] if options else NAMES:
                args = ["splitname", *options, *(["-o", fields] if fields is not None else []), "--", name]
                ours, theirs = both(*args)
                assert theirs.returncode == 0, (args, theirs.stderr)
                assert (ours.returncode, ours.stdout) == (0, theirs.stdout), (args, ours.stderr)


def test_splitname_subsystems_sort_and_selection_match_dmsetup():
    need_dmsetup()
    cases = [
        ["splitname", "a-b", "XYZ"], ["splitname", "a-b", "LVM"], ["splitname", "a-b", "lvm"],
        ["splitname", "-o", "subsystem,vg_name", "--noheadings", "a-b", "CRYPT"],
        ["splitname", "-O", "lv_name", "vg-lv"], ["splitname", "-O", "-vg_name,+lv_layer", "vg-lv"],
        ["splitname", "-S", "vg_name=vg", "vg-lv"], ["splitname", "-S", "vg_name=xx", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=xx", "vg-lv"],
        ["splitname", "-o", "selected,vg_name", "-S", "vg_name=~^v", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name!~^v", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=\"v g\"", "v g-lv"],
        ["splitname", "-o", "selected", "-S", "lv_name=lv && vg_name!=a", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "lv_name=x || vg_name=vg", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "lv_name=x # vg_name=vg", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "lv_name=lv, vg_name=x", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "!(lv_name=lv)", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "!(lv_name=x) && (vg_name=vg || lv_layer=q)", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "selected=1", "vg-lv"],
        # dmsetup's fields are strings and numbers only: brackets are part of a string, a regular
        # expression may be enclosed in (), {} or [], a number's fraction is dropped, no `==`
        ["splitname", "-o", "selected", "-S", "vg_name=[a]", "[a]-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name!=[a]", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name={vg}", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=~[a-z]", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=~[a-z]", "a-z-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=~(v)", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=~ {g$}", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name==vg", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name==vg", "=vg-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=a&b", "a&b-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=a!b|c(d", "a!b|c(d-lv"],
        ["splitname", "-o", "selected", "-S", "vg_name=\"a,b\"", "a,b-lv"],
        ["splitname", "-o", "selected", "-S", "selected=1.5", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "selected=.5", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "selected=1.", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "selected=0001", "vg-lv"],
        ["splitname", "-o", "selected", "-S", "selected= 1 && vg_name =vg", "vg-lv"],
    ]
    for args in cases:
        ours, theirs = both(*args)
        assert theirs.returncode == 0, (args, theirs.stderr)
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout), (args, ours.stderr)


def test_refusals_match_dmsetup():
    """Unknown fields and sort keys, a string field compared with <, a field without data:
    dmsetup and userdm both fail (exit 1) and print nothing on stdout."""
    need_dmsetup()
    for args, ours_says in [
        (["splitname", "-o", "bogus", "vg-lv"], "Unrecognised field: bogus"),
        (["splitname", "-o", "vg_name,", "vg-lv"], "Unrecognised field: "),
        (["splitname", "-o", "vg_name lv_name", "vg-lv"], "Unrecognised field: vg_name lv_name"),
        (["splitname", "-O", "bogus", "vg-lv"], "Unrecognised field: bogus"),
        (["splitname", "-S", "vg_name<a", "vg-lv"], "operator < can be used only with number fields"),
        (["splitname", "-S", "vg_name", "vg-lv"], "expecting an operator after field 'vg_name'"),
        (["splitname", "-S", "bogus=1", "vg-lv"], "Unrecognised selection field: bogus"),
        (["splitname", "-S", "(vg_name=a", "vg-lv"], "expecting ')'"),
        (["splitname", "-S", "vg_name=[a,b]", "vg-lv"], "Unrecognised selection field: b\n"),
        (["splitname", "-S", "vg_name={a,b}", "vg-lv"], "Unrecognised selection field: b\n"),
        (["splitname", "-S", "selected=1k", "vg-lv"], "a size unit is not accepted"),
        (["splitname", "-S", "selected=1%", "vg-lv"], "a percent value is not accepted"),
        (["splitname", "-S", "selected=-1", "vg-lv"], "expecting a non-negative number"),
        (["splitname", "-S", "selected=0x1", "vg-lv"], "expecting a logical operator"),
        (["splitname", "-S", "vg_name since 1", "vg-lv"], "can be used only with time fields"),
        (["splitname", "-S", "!vg_name=x", "vg-lv"], "expecting '('"),
        (["splitname", "-S", "vg_name=~", "vg-lv"], "a regular expression is expected"),
        (["splitname", "-S", "vg_name=~[a", "vg-lv"], "missing closing ]"),
        (["splitname", "-S", "vg_name=vg)", "vg-lv"], "expecting a logical operator"),
        (["splitname", "-o", "name", "vg-lv"], "field 'name' has no data here"),
        (["splitname", "-o", "devno", "vg-lv"], "field 'devno' has no data here"),
        (["splitname"], "splitname needs a device name"),
    ]:
        ours, theirs = both(*args)
        assert theirs.returncode == 1 and theirs.stdout == "", (args, theirs)
        assert ours.returncode == 1 and ours.stdout == "", (args, ours)
        assert ours.stderr.splitlines()[-1].startswith("splitname: EINVAL: "), (args, ours.stderr)
        assert ours_says in ours.stderr, (args, ours.stderr)


def test_every_dmsetup_field_is_known():
    """`-o help` lists the same fields as dmsetup's, except the statistics ones (userdm keeps no
    I/O statistics: those are refused with a sentence), plus userdm's `flags` and `diskseq`."""
    need_dmsetup()
    theirs = subprocess.run([DMSETUP, "splitname", "-o", "help", "x"], capture_output=True, text=True)
    ours = subprocess.run(USERDM + ["splitname", "-o", "help", "x"], capture_output=True, text=True)
    assert ours.returncode == 0 and ours.stdout == ""

    def ids(text: str) -> list[str]:
        return re.findall(r"^  (\S+)\s+- ", text, re.M)
    theirs_ids = [i for i in ids(theirs.stderr) if i not in report.STATS_FIELDS]
    ours_ids = ids(ours.stderr)
    assert ours_ids == theirs_ids[:len(theirs_ids) - 3] + ["flags", "diskseq"] + theirs_ids[-3:]
    refused = subprocess.run(USERDM + ["splitname", "-o", "read_count", "x"], capture_output=True, text=True)
    assert refused.returncode == 1 and "userdm keeps no I/O statistics" in refused.stderr


def test_options_semantics_without_dmsetup():
    """libdm's rules, checked on the engine itself (so they hold where dmsetup is absent)."""
    row = report.Row(None, report.split_name("vg-lv-l", "LVM"))
    fields = report.parse_fields("vg_name,lv_name")
    assert report.render([row], fields, report.Options.from_args()) == "VG   LV  \nvg   lv  \n"
    assert report.render([row], fields, report.Options.from_args(noheadings=True)) == "vg:lv\n"
    assert report.render([row], fields, report.Options.from_args(headings="none")) == "vg   lv  \n"
    with pytest.raises(DMError, match="--headings 'long'"):
        report.Options.from_args(headings="long")
    with pytest.raises(DMError, match="Only one of --headings and --noheadings"):
        report.Options.from_args(headings="abbrev", noheadings=True)


def test_full_headings_are_field_ids():
    """`--headings full` (2): libdm's DM_REPORT_OUTPUT_FIELD_IDS_IN_HEADINGS, the field ids head
    the columns, each column at least as wide as its id (Debian's dmsetup 1.02.185 predates the
    option, so the expected text is written out from libdm-report.c)."""
    for value in ("full", "FULL", "2"):
        out = userdm("splitname", "--headings", value, "vg-lv-l")
        assert (out.returncode, out.stdout) == (0, "vg_name lv_name lv_layer\nvg      lv      l       \n")
    out = userdm("splitname", "--headings", "full", "-o", "subsystem,selected", "vg-lv")
    assert out.stdout == "subsystem selected\nLVM              1\n"
    out = userdm("splitname", "--headings", "2", "--separator", ",", "vg-lv")
    assert out.stdout == "vg_name,lv_name,lv_layer\nvg,lv,\n"
    out = userdm("splitname", "--headings", "full", "--rows", "vg-lv")
    assert out.stdout == "vg_name vg\nlv_name lv\nlv_layer \n"
    for value, first in (("abbrev", "VG   LV   LVLayer"), ("1", "VG   LV   LVLayer"), ("none", "vg   lv")):
        assert userdm("splitname", "--headings", value, "vg-lv").stdout.splitlines()[0].rstrip() == first
    both_ = userdm("splitname", "--headings", "full", "--noheadings", "vg-lv")
    assert both_.returncode == 1 and "Only one of --headings and --noheadings permitted" in both_.stderr


def test_info_columns_report(daemon, images):
    (a,) = images(1, 16 << 20)
    run = daemon.run
    run("create", "vg-lv", "-u", "LVM-abcdef", "--table", f"0 2048 linear {a} 0")
    run("create", "top", "--table", "0 2048 linear /dev/mapper/vg-lv 0")
    run("create", "plain", "--notable")
    assert run("info", "-c", "--noheadings", "-o", "open", "top").stdout == "0\n"
    assert run("info", "-c", "--noheadings", "-o", "open", "vg-lv").stdout == "1\n"
    assert run("info", "-c", "--noheadings", "-o", "major,minor", "vg-lv").stdout == "253:0\n"
    assert run("info", "-c", "-o", "name,devno", "--separator", ",").stdout == \
        "Name,DevNo\nplain,253:2\ntop,253:1\nvg-lv,253:0\n"
    out = run("info", "-c", "--noheadings", "-o", "name,subsystem,vg_name,lv_name,tables_loaded,"
              "suspended,readonly,blkdevname,device_count,devs_used,devnos_used,device_ref_count,"
              "names_using_dev,devnos_using_dev", "-O", "-name").stdout
    assert out.splitlines() == [
        "vg-lv:LVM:vg:lv:Live:Active:Writeable:dm-0:1:::1:top:253:1",
        "top::::Live:Active:Writeable:dm-1:1:vg-lv:253:0:0::",
        "plain::::None:Active:Writeable:dm-2:0:::0::",
    ]
    assert run("info", "-c", "--noheadings", "-o", "name", "-S", "segments>0 && name=~^v").stdout == "vg-lv\n"
    assert run("info", "-c", "--noheadings", "-o", "name", "-S", "device_ref_count=1").stdout == "vg-lv\n"
    # dmsetup's list-like fields are strings in a selection, read_ahead a number without units
    assert run("info", "-c", "--noheadings", "-o", "name", "-S", "names_using_dev=top").stdout == "vg-lv\n"
    assert run("info", "-c", "--noheadings", "-o", "name", "-S", "devs_used=~^vg").stdout == "top\n"
    assert run("info", "-c", "--noheadings", "-o", "name", "-S",
               "read_ahead>=256 && devnos_used=253:0").stdout == "top\n"
    assert run("info", "-c", "--noheadings", "-o", "name", "-S", "devs_used=[vg-lv]").stdout == ""
    units = run("info", "-c", "-S", "read_ahead=128k", check=False)
    assert units.returncode == 1 and "read_ahead is a number field: a size unit is not accepted" in units.stderr
    assert run("info", "-c", "--nameprefixes", "--noheadings", "-o", "name,open", "top").stdout == \
        "DM_NAME='top':DM_OPEN='0'\n"
    assert run("info", "-c", "--rows", "-o", "name,minor", "-O", "minor").stdout == \
        "Name vg-lv top plain\nMin 0 1 2\n"
    aligned = run("info", "-c", "-o", "name,minor,attr", "-O", "name").stdout.splitlines()
    assert aligned == ["Name             Min Stat",
                       "plain              2 ---w",
                       "top                1 L--w",
                       "vg-lv              0 L--w"]
    bad = run("info", "-c", "-o", "bogus", check=False)
    assert bad.returncode == 1 and "info: EINVAL: Unrecognised field: bogus" in bad.stderr
    bad = run("info", "--sort", "name", check=False)
    assert bad.returncode == 1 and "--sort is a report option" in bad.stderr


def test_info_inactive_reports_the_inactive_table(daemon, images):
    """`--inactive` is the kernel's DM_QUERY_INACTIVE_TABLE_FLAG (__dev_status): the number of
    targets and the read-only flag come from the inactive table (0 and writeable without one);
    `table`, `status` and `deps` show the inactive table, and so do `info -c`'s deps fields."""
    a, b = images(2, 1 << 20)
    run = daemon.run
    run("create", "vol", "--table", f"0 8 linear {a} 0")
    run("create", "other", "--table", f"0 8 linear {a} 8")
    run("load", "vol", "-r", "--table", f"0 8 linear {b} 0\n8 8 linear /dev/mapper/other 0")

    def block(*args):
        return dict(line.split(":", 1) for line in run("info", *args, "vol").stdout.splitlines() if line)
    live, inactive = block(), block("--inactive")
    assert (live["Number of targets"].strip(), live["State"].strip()) == ("1", "ACTIVE")
    assert (inactive["Number of targets"].strip(), inactive["State"].strip()) == ("2", "ACTIVE (READ-ONLY)")
    assert inactive["Tables present"].strip() == live["Tables present"].strip() == "LIVE & INACTIVE"
    fields = ["-c", "--noheadings", "-o", "name,attr,segments,device_count,devs_used", "vol"]
    assert run("info", *fields).stdout == "vol:LI-w:1:1:\n"
    assert run("info", "--inactive", *fields).stdout == "vol:LI-r:2:2:other\n"
    assert run("info", "--inactive", "--json", "vol").stdout.count('"target_count": 2') == 1
    # without an inactive table: no targets, writeable (the live table's state is not reported)
    run("create", "ro", "-r", "--table", f"0 8 linear {a} 16")
    assert run("info", "-c", "--noheadings", "-o", "attr,segments", "ro").stdout == "L--r:1\n"
    assert run("info", "-c", "--noheadings", "--inactive", "-o", "attr,segments", "ro").stdout == "L--w:0\n"
    assert run("table", "--inactive", "vol").stdout == f"0 8 linear {b} 0\n8 8 linear 253:1 0\n"
    assert run("status", "--inactive", "vol").stdout == "0 8 linear \n8 8 linear \n"
    assert run("deps", "--inactive", "-o", "devname", "vol").stdout == f"2 dependencies\t: ({b}) (other)\n"
    assert run("table", "--inactive", "other").stdout == "\n"   # no inactive table: an empty line
