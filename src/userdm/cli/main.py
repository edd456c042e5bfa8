"""The `userdm` command: dmsetup's verbs, options and output, plus `userdm daemon`.

Options may come before or after the verb, as with dmsetup. Devices are named by name, by
`-u UUID` or by `-j MAJOR -m MINOR`. Tables come from `--table`, a file argument or stdin.
Every refusal prints `VERB: ERRNO: sentence` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ..errors import DMError
from . import format as fmt
from . import verbs

#: the verbs, with their synopses and options in `verbs.VERBS`
VERBS = tuple(verbs.VERBS)
#: verbs after which -v prints the info block of the devices they changed
VERBOSE_INFO = ("create", "load", "reload", "clear", "suspend", "resume", "rename", "wipe_table")
#: verbs that need no daemon
LOCAL_VERBS = ("splitname", "udevcookies", "udevcomplete", "udevcomplete_all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userdm", description="The Linux device-mapper in userspace "
                                "(dmsetup-compatible).", allow_abbrev=False,
                                epilog="'--' ends the options: `userdm remove -- --help` removes the "
                                "device named --help. For `open NAME -- CMD` and `create NAME --exec -- "
                                "CMD` it introduces the command; with two, the first ends the options "
                                "and the second introduces the command.", add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="help on the command (userdm help VERB)")
    p.add_argument("verb", metavar="COMMAND", help=" ".join(VERBS))
    p.add_argument("args", nargs="*", help="device names and command arguments")
    p.add_argument("--runtime-dir", help="the daemon's runtime directory (env USERDM_RUNTIME_DIR)")
    p.add_argument("--state-dir", help="daemon: where devices are saved (env USERDM_STATE_DIR)")
    p.add_argument("--table", help="the table, one target per line")
    p.add_argument("-n", "--notable", action="store_true", help="create without a table")
    p.add_argument("--concise", action="store_true",
                   help="create/table: dmsetup's concise format (name,uuid,minor,flags,table;...)")
    p.add_argument("-u", "--uuid", help="the uuid (create) or the device to act on")
    p.add_argument("-j", "--major", type=int, help="device major number")
    p.add_argument("-m", "--minor", type=int, help="device minor number")
    p.add_argument("-r", "--readonly", action="store_true", help="load the table read-only")
    p.add_argument("-c", "-C", "--columns", action="store_true", help="info: one line per device")
    p.add_argument("-o", "--options", help="info -c fields; ls/deps device name format")
    p.add_argument("--noheadings", action="store_true",
                   help="report: no headings, no alignment, fields separated by ':'")
    p.add_argument("--separator", help="report: fields separated by this string (no alignment)")
    p.add_argument("-O", "--sort", help="report: sort by these fields (-FIELD: descending)")
    p.add_argument("-S", "--select", help="report: only the objects that match this selection")
    p.add_argument("--nameprefixes", action="store_true", help="report: DM_FIELD='value' pairs")
    p.add_argument("--unquoted", action="store_true", help="report: no quotes with --nameprefixes")
    p.add_argument("--rows", action="store_true", help="report: one line per field")
    p.add_argument("--headings", metavar="none|abbrev|full", help="report: no headings, abbreviated ones or field ids")
    p.add_argument("--count", type=int, metavar="N", help="report: print the report N times")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="report: wait this long between reports (with no --count: until interrupted)")
    p.add_argument("-p", "--progress", action="store_true", help="backup copy: a progress bar even off a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="backup copy: no progress bar")
    p.add_argument("--noopencount", action="store_true")
    p.add_argument("--noflush", action="store_true")
    p.add_argument("--nolockfs", action="store_true")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("--retry", action="store_true")
    p.add_argument("--deferred", action="store_true")
    p.add_argument("--tree", action="store_true")
    p.add_argument("--target", help="only devices/targets of this type")
    p.add_argument("--showkeys", action="store_true")
    p.add_argument("--inactive", action="store_true", help="report on the inactive table")
    p.add_argument("--setuuid", help="rename: set the uuid")
    # userdm's ownership and lifetime options (DESIGN.md section 4)
    p.add_argument("--shared", action="store_true", help="create: claim no underlying device")
    p.add_argument("--autoclear", action="store_true", help="create: remove the device at its last close")
    p.add_argument("--max-opens", type=int, metavar="N", help="create: at most N opens at once")
    p.add_argument("--exec", action="store_true", dest="exec_",
                   help="create: open the new device and run the command after '--' with it on fd 3")
    p.add_argument("--interpose", action="store_true",
                   help="create: the table may take over a device in use, named [interpose]DEV")
    p.add_argument("--blockdev", action="store_true",
                   help="create: give the device a kernel block device at RUNTIME/dev/NAME (a loop device)")
    p.add_argument("--no-open", action="store_true", help="remove --deferred: refuse new opens")
    p.add_argument("--exclusive", action="store_true", help="open: claim the device exclusively")
    p.add_argument("--holder", help="open: claim the device for this holder id (implies --exclusive)")
    p.add_argument("--hook", metavar="SCRIPT",
                   help="open: the holder's ops: the daemon runs SCRIPT freeze|thaw|sync|notify-failure|mark-dead")
    p.add_argument("--hook-timeout", type=float, metavar="SECONDS",
                   help="open --hook: how long the hook may run (default 30)")
    p.add_argument("--diskseq", type=int, metavar="N",
                   help="open: only the device with this disk sequence number (ENXIO otherwise)")
    p.add_argument("--since", type=int, metavar="ERA", help="era changed: blocks written since this era")
    p.add_argument("--xml", action="store_true", help="era changed: era_invalidate's XML (era blocks)")
    p.add_argument("--metadata-snapshot", action="store_true",
                   help="era changed: read the held metadata snapshot (take_metadata_snap)")
    p.add_argument("--store", metavar="DIR", help="backup start: where the COW store and era metadata go")
    p.add_argument("--cow-size", metavar="SIZE", help="backup start: size of the COW store (K/M/G)")
    p.add_argument("--all", action="store_true", dest="all_", help="backup drop: stop change tracking too")
    p.add_argument("--follow", action="store_true", help="events: keep printing events as they happen")
    p.add_argument("--json", action="store_true",
                   help="info, ls, table, status, deps, targets, version: print JSON for programs")
    # dmsetup's udev and node options: userdm has no udev and no /dev nodes (its nodes are the
    # FUSE files in RUNTIME/mapper), so they are accepted and do nothing (userdm(8) says so)
    p.add_argument("--noudevsync", action="store_true", help="no-op: userdm has no udev")
    p.add_argument("--noudevrules", action="store_true", help="no-op: userdm has no udev")
    p.add_argument("--verifyudev", action="store_true", help="no-op: userdm has no udev")
    p.add_argument("--udevcookie", metavar="COOKIE", help="no-op: userdm has no udev")
    p.add_argument("--addnodeoncreate", action="store_true", help="no-op: nodes are FUSE files")
    p.add_argument("--addnodeonresume", action="store_true", help="no-op: nodes are FUSE files")
    p.add_argument("--readahead", metavar="SECTORS", help="no-op: userdm has no page cache read-ahead")
    p.add_argument("--manglename", choices=("none", "hex", "auto"), help="no-op: names are not mangled")
    p.add_argument("--checks", action="store_true", help="no-op: tables are always checked")
    p.add_argument("-U", "--uid", help="no-op: nodes are FUSE files owned by the daemon")
    p.add_argument("-G", "--gid", help="no-op: nodes are FUSE files owned by the daemon")
    p.add_argument("-M", "--mode", help="no-op: nodes are FUSE files owned by the daemon")
    p.add_argument("-y", "--yes", action="store_true", help="accepted for dmsetup compatibility")
    p.add_argument("-v", "--verbose", action="count", default=0)
    # daemon options
    p.add_argument("--nbd-listen", help="daemon: also serve NBD on TCP HOST:PORT (needs TLS, see --tls)")
    p.add_argument("--no-fuse", action="store_true", help="daemon: no FUSE directory")
    p.add_argument("--no-nbd", action="store_true", help="daemon: no NBD socket")
    p.add_argument("--fuse-passthrough", action="store_true",
                   help="daemon: the kernel does the I/O of FUSE files of devices that map one file byte "
                        "for byte (their suspends are refused while such a file is open; docs/fuse.md)")
    p.add_argument("--fuse-uring", action="store_true",
                   help="daemon: FUSE requests come through io_uring when the kernel offers it "
                        "(/sys/module/fuse/parameters/enable_uring): no faster than /dev/fuse at 4 KiB, slower at 1 MiB "
                        "(docs/fuse.md)")
    p.add_argument("--poll-us", type=int, metavar="US", default=200,
                   help="daemon: microseconds a thread serving NBD or FUSE may poll for the next request "
                        "before it sleeps, adapted to the client as the kernel's haltpoll does; the CPU "
                        "is yielded to anyone else who could run (default 200; 0: never poll; docs/polling.md)")
    p.add_argument("--block-devices", action="store_true",
                   help="daemon: a kernel block device (RUNTIME/dev/NAME) for every device with a live table")
    p.add_argument("--example", action="store_true",
                   help="daemon: create the device 'example' (linear over a sparse file)")
    p.add_argument("--max-control-connections", type=int, metavar="N", default=64,
                   help="daemon: control connections served at once; one more is answered EAGAIN "
                   "and closed (default 64)")
    p.add_argument("--max-message-size", metavar="SIZE", default="64M",
                   help="daemon: largest control request, K/M/G suffixes; a larger one is answered "
                   "E2BIG (default 64M: a 1,000,000-line table is ~40 MiB)")
    p.add_argument("--control-message-timeout", type=float, metavar="SECONDS", default=60.0,
                   help="daemon: a control request must arrive in full, and a reply be taken, "
                   "within this time, else the connection closes (default 60)")
    from . import luks
    luks.add_options(p)
    from ..export.nbd import limits as nbd_limits, tls as nbd_tls  # daemon: NBD costs and TLS
    nbd_limits.add_arguments(p)
    nbd_tls.add_arguments(p)
    return p


def usage(message: str) -> NoReturn:
    raise DMError(22, message)


def has_lines(table: str) -> bool:
    """Whether a table has a line that is not blank or a `#` comment."""
    return any(line.strip() and not line.strip().startswith("#") for line in table.splitlines())


def read_table(opts: argparse.Namespace, rest: list[str]) -> str:
    if opts.table is not None:
        if rest:
            usage(f"both --table and a table file {rest[0]!r} given")
        return opts.table
    if rest:
        try:
            with open(rest[0], encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise DMError.from_os(exc, f"cannot read table file {rest[0]}") from None
    return sys.stdin.read()


class Commands:
    """One method per verb; `self.dm` is a Mapper-like object (the daemon's client)."""

    def __init__(self, dm: Any, opts: argparse.Namespace, command: list[str] | None = None) -> None:
        self.dm = dm
        self.o = opts
        self.args: list[str] = opts.args
        #: the command after '--' (create --exec, open)
        self.command = command or []

    # ---- device selection ---------------------------------------------------------------

    def selected(self) -> list[str] | None:
        """Named devices, or None for 'all devices'."""
        if self.o.uuid is not None and self.o.verb not in ("create",):
            return [self.dm.find_name(uuid=self.o.uuid)]
        if self.o.minor is not None and self.o.verb != "create":
            return [self.dm.find_name(major=self.o.major, minor=self.o.minor)]
        return list(self.args) or None

    def one(self) -> tuple[str, list[str]]:
        if self.o.uuid is not None or self.o.minor is not None:
            return self.selected()[0], list(self.args)  # type: ignore[index]
        if not self.args:
            usage(f"{self.o.verb} needs a device name")
        return self.args[0], self.args[1:]

    def all_or_selected(self) -> list[str]:
        names = self.selected()
        if names is None:
            names = [d["name"] for d in self.dm.list()]
        return names

    def verbose_info(self) -> None:
        """`-v` after a change: the devices' info blocks, as dmsetup -v prints them."""
        if self.o.verb == "create" and self.o.concise:
            return
        if self.o.verb == "rename" and self.o.setuuid is None:
            names = [self.args[1]]
        elif self.o.verb == "create":
            names = [self.args[0]]
        else:
            names = self.selected() or []
        sys.stdout.write("".join(fmt.info_long(self.dm.info(n)) + "\n" for n in names))

    # ---- verbs ------------------------------------------------------------------------------

    def create(self) -> None:
        if self.o.concise:
            return self.create_concise()
        if not self.args:
            usage("create needs a device name")
        name, rest = self.args[0], self.args[1:]
        if self.o.notable and (self.o.table is not None or rest):
            usage("--notable and a table (--table or a table file) exclude each other")
        table = None if self.o.notable else read_table(self.o, rest)
        if table is not None and self.o.table is None and not has_lines(table):
            table = None   # as dmsetup: empty input (or only comments) makes a device without a table
        if self.o.exec_ and not self.command:
            usage("create --exec needs a command after '--'")
        if self.command and not self.o.exec_:
            usage(f"create: unexpected command {self.command[0]!r} after '--' without --exec")
        info = self.dm.create(name, table, uuid=self.o.uuid, readonly=self.o.readonly,
                              minor=self.o.minor, shared=self.o.shared, autoclear=self.o.autoclear,
                              max_opens=self.o.max_opens, open_fd=self.o.exec_,
                              interpose=self.o.interpose, blockdev=self.o.blockdev)
        if self.o.exec_:
            run_with_open(info, self.command)

    def create_concise(self) -> None:
        """`create --concise [SPEC]` (SPEC from stdin if absent): every device in order; the
        first refusal stops, naming the device (those before it stay created, as with dmsetup)."""
        from . import concise
        for opt in ("table", "uuid", "minor", "notable", "exec_"):
            if getattr(self.o, opt) not in (None, False):
                usage(f"create --concise takes no --{opt.rstrip('_')}: the specification carries it")
        if len(self.args) > 1:
            usage("create --concise takes one specification (quote it)")
        devices = concise.parse(self.args[0] if self.args else sys.stdin.read())
        for dev in devices:
            try:
                self.dm.create(dev.name, dev.table, uuid=dev.uuid, minor=dev.minor,
                               readonly=dev.readonly or self.o.readonly)
            except DMError as exc:
                raise DMError(exc.errno, f"device {dev.name}: {exc.message}") from None

    def open(self) -> None:
        """`userdm open NAME [--exclusive [--holder ID]] [--readonly] -- CMD ARGS`."""
        name, rest = self.one()
        if rest or not self.command:
            usage("open needs a device name, then '--' and the command to run with the open")
        import os
        info = self.dm.open(name, readonly=self.o.readonly, exclusive=self.o.exclusive,
                            holder=self.o.holder, diskseq=self.o.diskseq,
                            hook=os.path.abspath(self.o.hook) if self.o.hook else None,
                            hook_timeout=self.o.hook_timeout)
        run_with_open(info, self.command)

    def load(self) -> None:
        name, rest = self.one()
        self.dm.load(name, read_table(self.o, rest), readonly=self.o.readonly)

    reload = load

    def clear(self) -> None:
        self.dm.clear(self.one()[0])

    def suspend(self) -> None:
        for name in self.selected() or usage("suspend needs a device name"):
            self.dm.suspend(name, noflush=self.o.noflush, nolockfs=self.o.nolockfs)

    def resume(self) -> None:
        for name in self.selected() or usage("resume needs a device name"):
            self.dm.resume(name)

    def remove(self) -> None:
        for name in self.selected() or usage("remove needs a device name"):
            self.dm.remove(name, force=self.o.force, deferred=self.o.deferred, retry=self.o.retry,
                           no_open=self.o.no_open)

    def remove_all(self) -> None:
        left = self.dm.remove_all(force=self.o.force, deferred=self.o.deferred)["left_open"]
        if left and self.o.force:
            print(f"Unable to remove {len(left)} device(s).", file=sys.stderr)
            raise SystemExit(1)

    def wipe_table(self) -> None:
        for name in self.selected() or usage("wipe_table needs a device name"):
            self.dm.wipe_table(name)

    def partprobe(self) -> None:
        """`partprobe NAME...`: read the devices' partition tables again (BLKRRPART: EBUSY while
        a partition is open); with -v, list the partitions found as `ls` does."""
        for name in self.selected() or usage("partprobe needs a device name"):
            for part in self.dm.partprobe(name):
                if self.o.verbose:
                    print(fmt.ls_line(part))

    def report_options(self) -> "report.Options":
        from . import report
        return report.Options.from_args(noheadings=self.o.noheadings, separator=self.o.separator,
                                        nameprefixes=self.o.nameprefixes, unquoted=self.o.unquoted,
                                        rows=self.o.rows, headings=self.o.headings)

    def print_report(self, rows: list[Any], default: str) -> None:
        """dmsetup's report (`info -c`, `splitname`): fields, sort and selection checked first."""
        from . import report
        try:
            fields = report.parse_fields(self.o.options, default)
        except report.HelpShown:
            return
        sort = report.parse_sort(self.o.sort)
        selection = report.Selection(self.o.select) if self.o.select else None
        count, interval = self.o.count, self.o.interval
        if count is not None and count < 1 or interval is not None and interval < 0:
            usage("--count must be at least 1 and --interval not negative")
        if count is None:
            count = 1 if interval is None else 0   # 0: until interrupted
        n = 0
        try:
            while True:
                sys.stdout.write(report.render(rows, fields, self.report_options(), sort=sort,
                                               selection=selection))
                sys.stdout.flush()
                n += 1
                if count and n >= count:
                    return
                import time
                time.sleep(1.0 if interval is None else interval)
                rows = self.refresh_rows(rows)
        except KeyboardInterrupt:
            pass

    def refresh_rows(self, rows: list[Any]) -> list[Any]:
        """The report's objects again, for the next --count/--interval round."""
        if self.o.verb == "splitname":
            return rows
        return self.device_rows()

    def info(self) -> None:
        from . import report
        infos = self.infos()
        if self.o.json:
            self.print_json(infos)
            return
        if self.o.columns:
            if not infos:
                print("No devices found")
                return
            self.print_report(self.device_rows(infos), report.DEFAULT_FIELDS)
            return
        for opt in ("sort", "select", "separator", "headings"):
            if getattr(self.o, opt) is not None:
                usage(f"--{opt} is a report option: use it with info -c")
        if not infos:
            print("No devices found")
            return
        # as dmsetup: a blank line after each block
        sys.stdout.write("".join(fmt.info_long(i, opencount=not self.o.noopencount) + "\n" for i in infos))

    def infos(self) -> list[dict[str, Any]]:
        """The named devices' info (all devices' without names); with --inactive as the kernel
        answers DM_QUERY_INACTIVE_TABLE_FLAG."""
        names = self.selected()
        infos = [self.dm.info(n) for n in names] if names else self.dm.list()
        return [fmt.query_inactive(i) for i in infos] if self.o.inactive else infos

    def device_rows(self, infos: list[dict[str, Any]] | None = None) -> list[Any]:
        """`info -c`'s report objects: the devices, with their dependencies (of the live table,
        or the inactive one with --inactive) and users (one `tree` call) fetched only if a
        field asks for them."""
        from . import report
        if infos is None:
            infos = self.infos()
        tree: list[dict[str, Any]] | None = None

        def whole_tree() -> list[dict[str, Any]]:
            nonlocal tree
            if tree is None:
                tree = self.dm.tree()
            return tree

        def deps_of(name: str) -> Any:
            return lambda: self.dm.deps(name, inactive=self.o.inactive)

        def users_of(name: str) -> Any:
            return lambda: [d for d in whole_tree() if any(dep.get("device") == name for dep in d["deps"])]

        return [report.Row(i, report.device_split(i), deps_of(i["name"]), users_of(i["name"])) for i in infos]

    def splitname(self) -> None:
        """`splitname NAME [SUBSYSTEM]`: the name's LVM components (VG, LV, layer) as a report;
        a subsystem other than LVM (the default) is not split."""
        from . import report
        if not 1 <= len(self.args) <= 2:
            usage("splitname needs a device name and optionally a subsystem")
        subsystem = self.args[1] if len(self.args) == 2 else "LVM"
        self.print_report([report.Row(None, report.split_name(self.args[0], subsystem))],
                          report.SPLITNAME_FIELDS)

    def print_json(self, value: Any) -> None:
        """`--json`: one JSON document on stdout (an empty list when there are no devices)."""
        import json
        print(json.dumps(value, indent=2))

    def ls(self) -> None:
        if self.args:
            usage(f"ls takes no device name ({self.args[0]!r}): use info or --target")
        if self.o.json and self.o.tree:
            if self.o.options is not None:
                usage("ls --tree --json takes no tree options (-o)")
            self.print_json(self.dm.tree())
            return
        if self.o.tree:
            from . import tree
            tree.parse_options(self.o.options)   # refuse a bad option before asking the daemon
            sys.stdout.write(tree.draw(self.dm.tree(), self.o.options) or "No devices found\n")
            return
        name_type = self.dev_name_type()
        infos = self.dm.list()
        if self.o.ls_exec is not None:
            return self.ls_exec(infos)
        if self.o.target:
            infos = [i for i in infos if any(line[2] == self.o.target for line in self.dm.table(i["name"]))]
        if self.o.json:
            self.print_json([{k: i[k] for k in ("name", "uuid", "major", "minor")} for i in infos])
            return
        if not infos:
            print("No devices found")
            return
        for info in infos:
            if name_type == "devno":
                print(fmt.ls_line(info))
            else:   # a mapped device's kernel name is dm-MINOR, its map name its name
                shown = f"dm-{info['minor']}" if name_type == "blkdevname" else info["name"]
                print(f"{info['name']}\t({shown})")

    def dev_name_type(self) -> str:
        """`ls`/`deps -o devno|blkdevname|devname`: how devices are named. As dmsetup, a comma
        list whose last word wins, each word a prefix of one of the three."""
        choice = "devno"
        for word in self.o.options.split(",") if self.o.options else []:
            found = next((t for t in ("devno", "blkdevname", "devname") if t.startswith(word)), None)
            if found is None:
                usage(f"Option not recognised: {word}. (choose devno, blkdevname or devname)")
            choice = found
        return choice

    def ls_exec(self, infos: list[dict[str, Any]]) -> None:
        """`ls [--target TYPE] --exec COMMAND`: run COMMAND (split at spaces, as dmsetup
        does) for each device with its node, the FUSE file RUNTIME/mapper/NAME, as last
        argument; a failing command fails ls (after the others ran)."""
        import shlex
        import subprocess
        from ..control import paths
        if self.o.tree or self.o.json or self.o.options:
            usage("ls --exec does not go with --tree, --json or -o")
        command = shlex.split(self.o.ls_exec)
        if not command:
            usage("ls --exec needs a command")
        mapper = paths.fuse_dir(paths.runtime_dir(self.o.runtime_dir))
        failed = []
        for info in infos:
            if self.o.target and not any(line[2] == self.o.target for line in self.dm.table(info["name"])):
                continue
            sys.stdout.flush()
            try:
                rc = subprocess.run(command + [str(mapper / info["name"])]).returncode
            except OSError as exc:
                raise DMError.from_os(exc, f"ls --exec: cannot run {command[0]}") from None
            if rc:
                failed.append(info["name"])
        if failed:
            raise DMError(5, f"ls --exec: {command[0]} failed for {', '.join(failed)}")

    def _per_device(self, fetch: Any, show: Any, key: str = "", to_json: Any = None) -> None:
        names = self.selected()
        if self.o.json:
            self.print_json([{"name": name, key: to_json(fetch(name))}
                             for name in names or [d["name"] for d in self.dm.list()]])
            return
        if names is None and not self.dm.list():
            print("No devices found")
            return
        prefix = names is None or len(names) > 1
        for name in names or [d["name"] for d in self.dm.list()]:
            texts = show(fetch(name))   # one write: a million-line table prints in one go
            if isinstance(texts, str):  # lines already joined, each with its newline
                if not prefix:
                    sys.stdout.write(texts)
                    continue
                texts = texts.splitlines()
            sys.stdout.write("".join(f"{name}: {text}\n" for text in texts) if prefix
                             else "".join(text + "\n" for text in texts))

    def table(self) -> None:
        if self.o.concise:
            from . import concise
            for opt in ("inactive", "target", "json"):
                if getattr(self.o, opt):
                    usage(f"table --concise prints live tables only: --{opt} does not go with it")
            names = self.selected()
            order = concise.dependency_order(self.dm.tree())
            infos = [self.dm.info(n) for n in (names if names else order)]
            parts = [concise.format_device(i, [fmt.table_line(line) for line in self.dm.table(
                i["name"], showkeys=self.o.showkeys)]) for i in infos]
            if parts:
                print(";".join(parts))
            else:
                print("No devices found")
            return
        if self.o.json:
            self._per_device(lambda n: self.dm.table(n, inactive=self.o.inactive, showkeys=self.o.showkeys), None,
                             "table", self._lines_json("params"))
            return

        def show(text: str) -> str:
            if self.o.target:
                return "".join(line + "\n" for line in text.splitlines() if line.split(" ", 3)[2] == self.o.target)
            return text or "\n"   # as dmsetup: a device without a table is an empty line (`name: `)
        self._per_device(lambda n: self.dm.table_text(n, inactive=self.o.inactive, showkeys=self.o.showkeys), show)

    def _lines_json(self, what: str) -> Any:
        def convert(lines: list[list[Any]]) -> list[dict[str, Any]]:
            return [{"start": start, "length": length, "type": ttype, what: text}
                    for start, length, ttype, text in lines if not self.o.target or ttype == self.o.target]
        return convert

    def status(self) -> None:
        def show(lines: list[list[Any]]) -> list[str]:
            if not lines and not self.o.target:
                return [""]   # as dmsetup: a device without a table is an empty line (`name: `)
            return [fmt.table_line(line) for line in lines if not self.o.target or line[2] == self.o.target]
        self._per_device(lambda n: self.dm.status(n, inactive=self.o.inactive), show,
                         "status", self._lines_json("status"))

    def deps(self) -> None:
        name_type = self.dev_name_type()
        self._per_device(lambda n: self.dm.deps(n, inactive=self.o.inactive),
                         lambda d: [fmt.deps_line(d, name_type)], "deps", lambda d: d)

    def message(self) -> None:
        name, rest = self.one()
        if len(rest) < 2:
            usage("message needs a device, a sector and a message")
        if not rest[0].isdigit():
            usage(f"message sector {rest[0]!r} is not a number")
        out = self.dm.message(name, int(rest[0]), " ".join(rest[1:]))
        if out:  # as dmsetup: no second newline after a response that ends with one
            print(out, end="" if out.endswith("\n") else "\n")

    def rename(self) -> None:
        if self.o.setuuid is not None:
            self.dm.rename(self.one()[0], uuid=self.o.setuuid)
            return
        if len(self.args) != 2:
            usage("rename needs a device name and a new name (or --setuuid UUID)")
        self.dm.rename(self.args[0], self.args[1])

    def wait(self) -> None:
        name, rest = self.one()
        event_nr = int(rest[0]) if rest else 0
        self.dm.wait(name, event_nr)

    def target_version(self) -> None:
        """`target-version TARGET...`: each target type's version, as `targets` prints it."""
        if not self.args:
            usage("target-version needs one or more target types")
        known = {t["name"]: t for t in self.dm.targets()}
        for name in self.args:
            if name not in known:
                raise DMError(22, f"target type {name!r} is not registered (`userdm targets` lists them)")
        for name in self.args:
            print("{:<16} v{}.{}.{}".format(name, *known[name]["version"]))

    def mangle(self) -> None:
        """`mangle [DEVICE...]`: userdm never mangles names, so each is in its correct form."""
        names = self.selected()
        infos = [self.dm.info(n) for n in names] if names else self.dm.list()
        for i in infos:
            uuid = i["uuid"] or "[no UUID]"
            print(f"{i['name']}: {uuid}: name {'and UUID ' if i['uuid'] else ''}already in correct form")

    def mknodes(self) -> None:
        """`mknodes [DEVICE...]`: the nodes are the daemon's FUSE files, always present; this
        checks that the devices exist."""
        for name in self.selected() or []:
            self.dm.info(name)

    def udevcookies(self) -> None:
        print("userdm runs without udev: there are no udev cookies")

    def udevcomplete(self) -> None:
        if len(self.args) != 1:
            usage("udevcomplete needs a cookie")
        print(f"userdm runs without udev: there is nothing to complete for cookie {self.args[0]}")

    def udevcomplete_all(self) -> None:
        print("userdm runs without udev: there are no udev cookies")

    def targets(self) -> None:
        if self.o.json:
            self.print_json(self.dm.targets())
            return
        for t in self.dm.targets():
            major, minor, patch = t["version"]
            print(f"{t['name']:<16} v{major}.{minor}.{patch}")

    def version(self) -> None:
        v = self.dm.version()
        if self.o.json:
            self.print_json(v)
            return
        print(f"Library version:   {v['library']} (userdm)")   # numeric first, as scripts parse it
        print("Driver version:    {}.{}.{}".format(*v["driver"]))

    def era(self) -> None:
        """`era changed NAME --since ERA [--xml] [--metadata-snapshot]`: the blocks written since
        era ERA, as JSON `[{"begin": SECTOR, "length": SECTORS, "block_begin": B, "block_end": E}]`
        (device sectors; era blocks, end exclusive), or with --xml as thin-provisioning-tools'
        era_invalidate prints them: `<blocks>` of `<range begin= end=/>` and `<block block=/>`."""
        if len(self.args) != 2 or self.args[0] != "changed" or self.o.since is None:
            usage("usage: era changed NAME --since ERA [--xml] [--metadata-snapshot]")
        runs = self.dm.era_changed(self.args[1], since=self.o.since,
                                   metadata_snapshot=self.o.metadata_snapshot)
        if not self.o.xml:
            import json
            print(json.dumps(runs))
            return
        print("<blocks>")
        for run in runs:
            begin, end = run["block_begin"], run["block_end"]
            print(f'  <block block="{begin}"/>' if end == begin + 1 else f'  <range begin="{begin}" end="{end}"/>')
        print("</blocks>")

    def backup(self) -> None:
        """`backup start DEV --store DIR`, `backup copy DEV DEST [--since ERA]`,
        `backup drop DEV [--all]` (see `userdm.cli.backup`)."""
        from . import backup
        sub, rest = (self.args[0], self.args[1:]) if self.args else ("", [])
        if sub == "start" and len(rest) == 1 and self.o.store:
            cow_size = parse_bytes(self.o.cow_size) if self.o.cow_size else None
            got = backup.start(self.dm, rest[0], self.o.store, cow_size=cow_size, nolockfs=self.o.nolockfs)
            print(f"snapshot {got['snapshot']} taken at era {got['era']}; copy it with "
                  f"`userdm backup copy {rest[0]} DEST`; next time copy only the changes with "
                  f"`--since {got['era']}`")
        elif sub == "copy" and len(rest) == 2:
            from ..control import paths
            sock = paths.nbd_socket(paths.runtime_dir(self.o.runtime_dir))
            if self.o.progress and self.o.quiet:
                usage("backup copy: --progress and --quiet exclude each other")
            bar = self.o.progress or (sys.stderr.isatty() and not self.o.quiet)   # a bar only on a terminal
            got = backup.copy(self.dm, str(sock), rest[0], rest[1], since=self.o.since,
                              progress=sys.stderr if bar else None)
            print(f"copied {got['copied']} of {got['size']} bytes in {got['ranges']} ranges to {rest[1]}")
        elif sub == "drop" and len(rest) == 1:
            for name in backup.drop(self.dm, rest[0], everything=self.o.all_):
                print(f"removed {name}")
        else:
            usage("usage: backup start DEV --store DIR [--cow-size SIZE] | "
                  "backup copy DEV DEST [--since ERA] | backup drop DEV [--all]")

    def luks(self) -> None:
        """`luks open|close|dump` (see `userdm.cli.luks`)."""
        from . import luks
        luks.main(self.dm, self.o, self.args, self.o.runtime_dir)

    def notify_failure(self) -> None:
        """`notify-failure DEV OFFSET LENGTH`: report a failed byte range (K/M/G/T suffixes) of a
        mapped device or of a device a table uses; print every device the failure reached."""
        if len(self.args) != 3:
            usage("notify-failure needs a device, an offset and a length (bytes; K, M, G, T suffixes)")
        dev, offset, length = self.args[0], parse_bytes(self.args[1]), parse_bytes(self.args[2])
        for d in self.dm.notify_failure(dev, offset, length):
            taken = "taken by its holder" if d["handled"] else \
                f"refused by its holder: {d['holder_error']}" if d.get("holder_error") else "no holder ops"
            print(f"{d['name']}: bytes {d['offset']}+{d['length']} (path {' -> '.join(d['path'])}): {taken}")

    def events(self) -> None:
        """`events [--follow] [NAME]`: the recent events as JSON lines; with --follow, then every
        new one as it happens, until interrupted."""
        import json
        if len(self.args) > 1:
            usage("events takes at most one device name")
        name = self.args[0] if self.args else None
        if not self.o.follow:
            for record in self.dm.recent_events(name):
                print(json.dumps(record))
            return
        try:
            with self.dm.events(name=name, recent=True) as stream:
                for record in stream:
                    print(json.dumps(record), flush=True)
        except KeyboardInterrupt:
            pass


def parse_bytes(text: str) -> int:
    """A byte count: digits with an optional K, M, G or T (powers of 1024; `KiB`, `k` also)."""
    import re
    match = re.fullmatch(r"(\d+)(?:([KMGT])(?:i?B)?)?", text, re.IGNORECASE | re.ASCII)
    if match is None:
        usage(f"{text!r} is not a byte count (digits with an optional K, M, G or T suffix)")
    return int(match[1]) << 10 * (" KMGT".index(match[2].upper()) if match[2] else 0)


OPEN_FD = 3


def run_with_open(info: dict[str, Any], command: list[str]) -> NoReturn:
    """Replace this process by `command`, holding the open (an NBD socket) on fd 3 with
    `USERDM_FD=3` and `USERDM_DEVICE=NAME` in its environment. The command's exit (even by
    SIGKILL) closes the open; for an autoclear device that last close removes it."""
    import os
    fd = info["fd"]
    if fd != OPEN_FD:
        os.dup2(fd, OPEN_FD, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    env = {**os.environ, "USERDM_FD": str(OPEN_FD), "USERDM_DEVICE": info["name"],
           "USERDM_DISKSEQ": str(info.get("diskseq", ""))}
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"userdm: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


def run_daemon(opts: argparse.Namespace) -> int:
    import logging

    from ..control import paths
    from ..control.daemon import Daemon
    from ..export import busypoll
    from ..export.nbd import limits as nbd_limits
    nbd_limits_ = nbd_limits.from_options(opts)
    busypoll.configure(opts.poll_us)
    logging.basicConfig(level=logging.DEBUG if opts.verbose > 1 else logging.INFO,
                        format="userdm: %(name)s: %(message)s")
    from ..export.nbd import tls as nbd_tls
    tls = nbd_tls.from_options(opts)   # after basicConfig: it may warn (TCP without TLS)
    from ..control.server import ControlLimits
    limits = ControlLimits(max_connections=opts.max_control_connections,
                           max_message=parse_bytes(opts.max_message_size),
                           message_timeout=opts.control_message_timeout)
    Daemon(paths.runtime_dir(opts.runtime_dir), paths.state_dir(opts.state_dir),
           nbd_listen=opts.nbd_listen, fuse=not opts.no_fuse, nbd=not opts.no_nbd,
           example=opts.example, control_limits=limits, nbd_limits=nbd_limits_,
           block_devices=opts.block_devices, nbd_tls=tls, fuse_passthrough=opts.fuse_passthrough,
           fuse_uring=opts.fuse_uring).run()
    return 0


def device_hint(exc: DMError, opts: argparse.Namespace) -> str:
    """`; did you mean 'vol0'?` when a device name was mistyped."""
    import errno
    import re
    match = re.fullmatch(r"device '(.+)' does not exist", exc.message)
    if exc.errno != errno.ENXIO or match is None or opts.verb in LOCAL_VERBS:
        return ""
    try:
        from ..control.client import connect
        with connect(opts.runtime_dir) as client:
            names = [d["name"] for d in client.list()]
    except DMError:
        return ""
    return verbs.suggest(match[1], names)


def show_help(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> int:
    """`help [VERB]`; `help -c` lists the report fields, as dmsetup's does."""
    if opts.columns:
        from . import report
        sys.stdout.write(report.field_help())
    elif opts.args:
        verbs.check_verb(opts.args[0])
        sys.stdout.write(verbs.verb_help(parser, opts.args[0]))
    else:
        sys.stdout.write(verbs.all_help())
    return 0


def split_dashes(argv: list[str]) -> tuple[list[str], list[str] | None, list[str]]:
    """Options, names after a first '--' (None if there is none before the command), command.

    `--` ends the options: `userdm remove -- --help` removes the device named `--help`. For
    `open NAME -- CMD` and `create NAME --exec -- CMD` it also introduces the command; with two
    `--`, the first ends the options and the second introduces the command
    (`userdm open -- -x -- CMD`). Which case applies depends on the verb: see `takes_command`."""
    if "--" not in argv:
        return argv, None, []
    at = argv.index("--")
    head, tail = argv[:at], argv[at + 1:]
    if "--" in tail:
        second = tail.index("--")
        return head, tail[:second], tail[second + 1:]
    return head, None, tail


#: report options whose value may begin with '-' (`-O -name`, `--separator -`), as getopt takes it
GLUED = {"-O": "--sort", "--sort": "--sort", "-S": "--select", "--select": "--select",
         "-o": "--options", "--options": "--options", "--separator": "--separator"}


def glue_values(argv: list[str]) -> list[str]:
    """`-O -name` -> `--sort=-name`: argparse would take `-name` for an option."""
    out, n = [], 0
    while n < len(argv):
        if argv[n] in GLUED and n + 1 < len(argv):
            out.append(f"{GLUED[argv[n]]}={argv[n + 1]}")
            n += 2
        else:
            out.append(argv[n])
            n += 1
    return out


def take_ls_exec(argv: list[str]) -> tuple[list[str], str | None]:
    """`ls --exec COMMAND`: dmsetup's --exec takes a command, create's --exec does not, so
    it is taken out before parsing when the verb is ls."""
    verb = next((a for a in argv if a in verbs.VERBS), None)   # option values are no verbs in practice
    if verb != "ls" or "--exec" not in argv:
        return argv, None
    at = argv.index("--exec")
    if at + 1 >= len(argv):
        usage("ls --exec needs a command")
    return argv[:at] + argv[at + 2:], argv[at + 1]


def takes_command(opts: argparse.Namespace) -> bool:
    """Whether the verb runs a command after '--' (`open`, `create --exec`)."""
    return opts.verb == "open" or (opts.verb == "create" and opts.exec_)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, names, command = split_dashes(argv)
    argv = glue_values(argv)
    try:
        argv, ls_exec = take_ls_exec(argv)
    except DMError as exc:
        print(f"ls: {exc}", file=sys.stderr)
        return 1
    if argv == ["--version"]:  # dmsetup --version: the versions, as `version` prints them
        argv = ["version"]
    if "-h" in argv or "--help" in argv:  # `userdm VERB --help`, `userdm --help`
        verb = next((a for a in argv if a in verbs.VERBS), None)
        sys.stdout.write(verbs.verb_help(parser, verb) if verb else verbs.all_help())
        return 0
    opts = parser.parse_intermixed_args(argv)
    opts.ls_exec = ls_exec
    if ls_exec is not None and opts.verb != "ls":
        print(f"{opts.verb}: EINVAL: --exec COMMAND is an option of ls", file=sys.stderr)
        return 1
    if names is not None or command:
        if takes_command(opts):
            names, command = (names or []), command
        else:  # `remove -- --help`: everything after the one '--' is names and arguments
            names, command = (names or []) + command, []
        opts.args = list(opts.args) + names
    try:
        verbs.check_verb(opts.verb)
    except DMError as exc:
        print(f"userdm: {exc}", file=sys.stderr)
        return 1
    try:
        verbs.check_options(parser, opts)
        if opts.verb == "help":
            return show_help(parser, opts)
        if opts.verb == "daemon":
            return run_daemon(opts)
        if opts.verb in LOCAL_VERBS:  # no daemon needed
            getattr(Commands(None, opts, command), opts.verb.replace("-", "_"))()
            return 0
        from ..control.client import connect
        with connect(opts.runtime_dir) as client:
            commands = Commands(client, opts, command)
            getattr(commands, opts.verb.replace("-", "_"))()
            if opts.verbose and opts.verb in VERBOSE_INFO:
                commands.verbose_info()
    except DMError as exc:
        print(f"{opts.verb}: {exc}{device_hint(exc, opts)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
