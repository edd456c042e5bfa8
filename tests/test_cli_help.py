"""The command line for newcomers and programs: help for every verb, "did you mean", options a
verb does not take refused with a sentence, and `--json` output that parses."""

import json

import userdm
import os
import shutil
import subprocess
import sys
from pathlib import Path

from userdm.cli import verbs


def test_every_verb_has_help(daemon):
    for verb, spec in verbs.VERBS.items():
        for args in (["help", verb], [verb, "--help"], [verb, "-h"]):
            res = daemon.run(*args)
            assert res.stdout.startswith(f"Usage: userdm {spec.synopsis}\n\n{spec.summary}\n"), args
        assert spec.summary.endswith(".") and verb in spec.synopsis
    overview = daemon.run("help").stdout
    assert all(f"  {spec.synopsis}\n" in overview for spec in verbs.VERBS.values())
    assert daemon.run("--help").stdout == overview
    # each option a verb takes is described in its help
    assert "  --showkeys" in daemon.run("help", "table").stdout
    assert "--showkeys" not in daemon.run("help", "ls").stdout
    assert daemon.run("help", "-c").stdout.startswith("Mapped Device Name Fields\n")


def test_mistyped_verbs_and_refused_options(daemon, images):
    (a,) = images(1, 1 << 20)
    for args, says in [
        (["crate", "x"], "userdm: EINVAL: unknown command 'crate'; did you mean 'create'?"),
        (["help", "stauts"], "help: EINVAL: unknown command 'stauts'; did you mean 'status'?"),
        (["frobnicate"], "userdm: EINVAL: unknown command 'frobnicate' (`userdm help`"),
        (["info", "--tree"], "info: EINVAL: option --tree does not apply to info"),
        (["ls", "--inactive"], "ls: EINVAL: option --inactive does not apply to ls"),
        (["status", "--showkeys"], "status: EINVAL: option --showkeys does not apply to status"),
        (["ls", "--sort", "name"], "ls: EINVAL: option --sort does not apply to ls"),
        (["version", "-c"], "version: EINVAL: option --columns does not apply to version"),
        (["info", "--sort", "name"], "info: EINVAL: --sort is a report option: use it with info -c"),
        (["create", "x", "--notable", "--table", "0 8 zero"],
         "create: EINVAL: --notable and a table (--table or a table file) exclude each other"),
        (["ls", "vol"], "ls: EINVAL: ls takes no device name ('vol')"),
        (["ls", "--tree", "-o", "asci"], "ls: EINVAL: Tree option not recognised: asci."),
        (["ls", "-o", "bogus"], "ls: EINVAL: Option not recognised: bogus. (choose devno, blkdevname or devname)"),
        (["deps", "-o", "names"], "deps: EINVAL: Option not recognised: names."),
    ]:
        res = daemon.run(*args, check=False)
        assert res.returncode == 1 and res.stdout == "", (args, res)
        assert says in res.stderr, (args, res.stderr)
    assert daemon.run("ls").stdout == "No devices found\n"   # nothing was created by a refusal
    daemon.run("create", "vol", "--table", f"0 8 linear {a} 0")
    assert daemon.run("ls", "-o", "devname").stdout == "vol\t(vol)\n"
    assert daemon.run("ls", "-o", "blkdevname").stdout == "vol\t(dm-0)\n"
    assert daemon.run("ls", "-o", "devno").stdout == "vol\t(253:0)\n"


def test_every_json_output_parses(daemon, images):
    a, b = images(2, 1 << 20)
    run = daemon.run
    empty = {verb: json.loads(run(verb, "--json").stdout) for verb in ("info", "ls", "table", "status", "deps")}
    assert empty == {"info": [], "ls": [], "table": [], "status": [], "deps": []}
    run("create", "lin", "-u", "U-1", "--table", f"0 8 linear {a} 0")
    run("create", "str", "--table", f"0 16 striped 2 8 {a} 8 {b} 0")
    run("create", "top", "--table", "0 8 linear /dev/mapper/lin 0")
    run("create", "none", "--notable")
    info = json.loads(run("info", "--json", "lin").stdout)
    assert [(i["name"], i["uuid"], i["minor"], i["live"]) for i in info] == [("lin", "U-1", 0, True)]
    assert [i["name"] for i in json.loads(run("info", "--json").stdout)] == ["lin", "none", "str", "top"]
    assert json.loads(run("ls", "--json").stdout) == [
        {"name": "lin", "uuid": "U-1", "major": 253, "minor": 0},
        {"name": "none", "uuid": "", "major": 253, "minor": 3},
        {"name": "str", "uuid": "", "major": 253, "minor": 1},
        {"name": "top", "uuid": "", "major": 253, "minor": 2}]
    tree = json.loads(run("ls", "--tree", "--json").stdout)
    assert [d["device"] for t in tree if t["name"] == "top" for d in t["deps"]] == ["lin"]
    assert json.loads(run("table", "--json", "top").stdout) == [
        {"name": "top", "table": [{"start": 0, "length": 8, "type": "linear", "params": "253:0 0"}]}]
    assert json.loads(run("table", "--json", "none").stdout) == [{"name": "none", "table": []}]
    status = json.loads(run("status", "--json", "--target", "striped").stdout)
    assert [(s["name"], [t["status"] for t in s["status"]]) for s in status] == [
        ("lin", []), ("none", []), ("str", [f"2 {a} {b} 1 AA"]), ("top", [])]
    deps = json.loads(run("deps", "--json", "top").stdout)
    assert [(d["name"], [x["devno"] for x in d["deps"]]) for d in deps] == [("top", [[253, 0]])]
    targets = json.loads(run("targets", "--json").stdout)
    assert {"linear", "striped", "zero", "error"} <= {t["name"] for t in targets}
    assert all(len(t["version"]) == 3 for t in targets)
    version = json.loads(run("version", "--json").stdout)
    assert set(version) == {"library", "driver"}
    for verb in ("create", "remove", "message", "rename", "splitname"):
        res = run(verb, "--json", "x", check=False)
        assert res.returncode == 1 and f"option --json does not apply to {verb}" in res.stderr


def test_udev_options_are_no_ops_and_the_extra_verbs(daemon, images):
    (a,) = images(1, 1 << 20)
    run = daemon.run
    # dmsetup scripts pass udev and node options: accepted, and the device is as without them
    run("create", "vol", "--noudevsync", "--noudevrules", "--verifyudev", "--udevcookie", "0x0d4d",
        "--addnodeoncreate", "--readahead", "auto", "--manglename", "none", "--checks",
        "-U", "0", "-G", "0", "-M", "0600", "--table", f"0 8 linear {a} 0")
    run("create", "plain", "-u", "CRYPT-x", "--table", "0 8 zero", "--addnodeonresume")
    assert run("table", "vol").stdout == f"0 8 linear {a} 0\n"
    assert run("target-version", "linear", "zero").stdout.splitlines() == \
        [f"{t['name']:<16} v{'.'.join(map(str, t['version']))}"
         for t in json.loads(run("targets", "--json").stdout) if t["name"] in ("linear", "zero")]
    bad = run("target-version", "linear", "nosuch", check=False)
    assert bad.returncode == 1 and bad.stdout == "" and "target type 'nosuch' is not registered" in bad.stderr
    assert run("mangle").stdout == ("plain: CRYPT-x: name and UUID already in correct form\n"
                                    "vol: [no UUID]: name already in correct form\n")
    assert run("mknodes", "vol").stdout == ""
    missing = run("mknodes", "nosuch", check=False)
    assert missing.returncode == 1 and "mknodes: ENXIO: device 'nosuch' does not exist" in missing.stderr
    assert run("udevcookies").stdout == "userdm runs without udev: there are no udev cookies\n"
    assert "cookie 77" in run("udevcomplete", "77").stdout
    assert run("--version").stdout == run("version").stdout
    assert run("--version").stdout.startswith(f"Library version:   {userdm.__version__} (userdm)\n")


ROOT = Path(__file__).resolve().parent.parent


def test_man_page_names_every_verb_and_renders():
    page = (ROOT / "docs" / "userdm.8").read_text()
    assert f".SH COMMANDS\n{verbs.man_commands()}.SH " in page   # python -m userdm.cli.verbs regenerates it
    for verb, spec in verbs.VERBS.items():
        assert f".B {spec.synopsis.replace('-', chr(92) + '-')}\n" in page, verb
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(ROOT / "docs" / "userdm.8")], capture_output=True,
                               text=True, env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""})
        assert shown.returncode == 0 and "splitname NAME [SUBSYSTEM]" in shown.stdout, shown.stderr
        assert "warning" not in shown.stderr


def complete(daemon, line: str) -> list[str]:
    """What bash offers for the last word of `line` with userdm's completion loaded."""
    script = (f"source {ROOT / 'scripts' / 'userdm.bash-completion'}\n"
              f"COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n"
              "_userdm; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    bindir = Path(sys.executable).parent
    env = {**daemon.env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return sorted(w for w in res.stdout.splitlines() if w)


def test_bash_completion(daemon):
    daemon.run("create", "alpha", "--table", "0 8 zero")
    daemon.run("create", "alps", "--table", "0 8 zero")
    assert complete(daemon, "userdm cre") == ["create"]
    assert complete(daemon, "userdm help sta") == ["status"]
    assert complete(daemon, "userdm table --sh") == ["--showkeys"]
    assert complete(daemon, "userdm info -c --nameprefix") == ["--nameprefixes"]
    assert complete(daemon, "userdm info -c --headings \"\"") == ["abbrev", "full", "none"]
    assert complete(daemon, "userdm info -c --headings f") == ["full"]
    assert complete(daemon, "userdm remove al") == ["alpha", "alps"]
    assert complete(daemon, "userdm remove alph") == ["alpha"]


def test_output_shapes_as_dmsetup(daemon, images):
    (a,) = images(1, 1 << 20)
    run = daemon.run
    for verb in ("table", "status", "deps", "info", "ls"):
        assert run(verb).stdout == "No devices found\n", verb
    run("create", "x", "--table", f"0 8 linear {a} 0")
    run("create", "y", "--notable")
    # a blank line after each info block
    blocks = run("info").stdout
    assert blocks.endswith("\n\n") and blocks.count("\n\n") == 2 and blocks.startswith("Name:              x\n")
    # -v: the info block after a change
    shown = run("-v", "suspend", "x").stdout
    assert shown.startswith("Name:              x\nState:             SUSPENDED\n") and shown.endswith("\n\n")
    assert run("-v", "rename", "x", "z").stdout.startswith("Name:              z\n")
    assert run("-v", "create", "w", "--table", "0 8 zero").stdout.startswith("Name:              w\n")
    assert run("resume", "z").stdout == ""                      # without -v: nothing


def test_mistyped_device_names_and_repeated_reports(daemon):
    run = daemon.run
    run("create", "volume0", "--table", "0 8 zero")
    res = run("info", "volumeO", check=False)
    assert res.returncode == 1
    assert res.stderr == "info: ENXIO: device 'volumeO' does not exist; did you mean 'volume0'?\n"
    res = run("remove", "zzz", check=False)
    assert res.stderr == "remove: ENXIO: device 'zzz' does not exist\n"
    # --count N --interval 0: the report N times
    assert run("info", "-c", "--noheadings", "-o", "name", "--count", "3", "--interval", "0").stdout == \
        "volume0\n" * 3
    assert run("splitname", "--noheadings", "--count", "2", "--interval", "0", "a-b").stdout == "a:b:\n" * 2
    bad = run("info", "-c", "--count", "0", check=False)
    assert bad.returncode == 1 and "--count must be at least 1" in bad.stderr
    bad = run("backup", "copy", "volume0", "/nonexistent", "-p", "-q", check=False)
    assert bad.returncode == 1 and "--progress and --quiet exclude each other" in bad.stderr
    bad = run("ls", "--exec", check=False)
    assert bad.returncode == 1 and bad.stderr == "ls: EINVAL: ls --exec needs a command\n"
    # ls --exec: the command once per device, with its node as last argument
    run("create", "other", "--table", "0 8 linear /dev/mapper/volume0 0")
    mapper = daemon.runtime / "mapper"
    assert run("ls", "--exec", "echo node:").stdout == f"node: {mapper}/other\nnode: {mapper}/volume0\n"
    assert run("ls", "--target", "linear", "--exec", "echo").stdout == f"{mapper}/other\n"
    bad = run("ls", "--exec", "false", check=False)
    assert bad.returncode == 1 and "ls: EIO: ls --exec: false failed for other, volume0" in bad.stderr
    bad = run("info", "--exec", "echo", check=False)
    assert bad.returncode == 1 and "option --exec does not apply to info" in bad.stderr


def test_dmsetup_options_do_what_dmsetup_does(daemon, images):
    """The dmsetup options not shown elsewhere, each with its effect: -j/-m (--major/--minor)
    name a device, -C/--columns are -c, --noopencount drops the open count, suspend
    --noflush/--nolockfs reach the device (its suspend event says so), status --noflush is
    status, remove -f wipes the table of a device still open (EBUSY) and remove --retry waits
    for the last close; -y is accepted (userdm asks nothing)."""
    from conftest import wait_until
    (a,) = images(1, 1 << 20)
    run = daemon.run
    run("-y", "create", "vol", "--table", f"0 8 linear {a} 0")
    assert run("info", "-j", "253", "-m", "0").stdout.startswith("Name:              vol\n")
    assert run("table", "--major", "253", "--minor", "0").stdout == f"0 8 linear {a} 0\n"
    assert run("info", "-m", "0").stdout == run("info", "vol").stdout
    missing = run("info", "-j", "253", "-m", "9", check=False)
    assert missing.returncode == 1 and "ENXIO" in missing.stderr
    for flag in ("-c", "-C", "--columns"):
        assert run("info", flag, "--noheadings", "-o", "name,minor").stdout == "vol:0\n"
    assert "Open count:        0\n" in run("info", "vol").stdout
    assert "Open count" not in run("info", "--noopencount", "vol").stdout
    run("suspend", "--noflush", "--nolockfs", "vol")
    run("resume", "vol")
    run("suspend", "vol")
    run("resume", "vol")
    suspends = [json.loads(line) for line in run("events", "vol").stdout.splitlines()]
    assert [(e["noflush"], e["nolockfs"]) for e in suspends if e["event"] == "suspend"] == \
        [(True, True), (False, False)]
    assert run("status", "--noflush", "vol").stdout == run("status", "vol").stdout
    holder = subprocess.Popen([sys.executable, "-m", "userdm", "open", "vol", "--", "sleep", "600"],
                              env=daemon.env, start_new_session=True)
    try:
        with daemon.connect() as client:
            assert wait_until(lambda: client.info("vol")["open_count"] == 1)
        busy = run("remove", "-f", "vol", check=False)
        assert busy.returncode == 1 and "EBUSY" in busy.stderr
        assert run("table", "vol").stdout.split() == ["0", "8", "error"]   # wiped while open
        remover = subprocess.Popen([sys.executable, "-m", "userdm", "remove", "--retry", "vol"],
                                   env=daemon.env, stderr=subprocess.PIPE, text=True)
        try:
            remover.wait(2)   # without --retry it fails at once, the device being open
            raise AssertionError(f"remove --retry did not wait: {remover.stderr.read()}")
        except subprocess.TimeoutExpired:
            pass
        os.killpg(holder.pid, 9)
        holder.wait()
        assert remover.wait(60) == 0, remover.stderr.read()
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, 9)
            holder.wait()
    assert run("ls").stdout == "No devices found\n"
