"""Each verb's synopsis, summary and options: `userdm help VERB`, `userdm VERB --help`,
"did you mean" for a mistyped verb, and the refusal of an option that a verb does not take.

An option is checked only if some verb here claims it, so an option added to the parser for
one verb (say a new daemon option) is accepted until it is listed here under its verb.
"""

from __future__ import annotations

import argparse
import difflib
import errno
from dataclasses import dataclass

from ..errors import DMError

DEV = ("uuid", "major", "minor")
REPORT = ("columns", "options", "noheadings", "separator", "sort", "select", "nameprefixes",
          "unquoted", "rows", "headings", "count", "interval")
#: taken by every verb
GLOBAL = ("help", "verb", "args", "runtime_dir", "verbose", "yes", "noopencount")


@dataclass(frozen=True)
class Verb:
    synopsis: str
    summary: str
    options: tuple[str, ...] = ()


VERBS: dict[str, Verb] = {
    "create": Verb("create NAME [-u UUID] [-j MAJOR -m MINOR] [-r] [--shared] [--autoclear] "
                   "[--max-opens N] [--interpose] [--blockdev] [-n|--notable|--table TABLE|TABLE_FILE] "
                   "[--exec -- CMD ARGS] | create --concise [SPEC]",
                   "Create a device and, with a table (--table, a file or stdin), load and resume it.",
                   ("table", "notable", "concise", *DEV, "readonly", "shared", "autoclear", "max_opens",
                    "exec_", "interpose", "blockdev")),
    "open": Verb("open DEVICE [--exclusive [--holder ID]] [-r] [--diskseq N] [--hook SCRIPT "
                 "[--hook-timeout SECONDS]] -- CMD ARGS",
                 "Run CMD holding an open of the device on fd 3 (USERDM_FD=3).",
                 (*DEV, "readonly", "exclusive", "holder", "diskseq", "hook", "hook_timeout")),
    "load": Verb("load DEVICE [-r] [--table TABLE|TABLE_FILE]",
                 "Load a table into the inactive slot (resume makes it live).",
                 (*DEV, "table", "readonly")),
    "reload": Verb("reload DEVICE [-r] [--table TABLE|TABLE_FILE]", "The same as load.",
                   (*DEV, "table", "readonly")),
    "clear": Verb("clear DEVICE", "Drop the inactive table.", DEV),
    "suspend": Verb("suspend [--noflush] [--nolockfs] DEVICE...",
                    "Hold new I/O and wait for I/O in flight.", (*DEV, "noflush", "nolockfs")),
    "resume": Verb("resume DEVICE...", "Make the inactive table live (if any) and release held I/O.",
                   DEV),
    "remove": Verb("remove [-f] [--retry] [--deferred [--no-open]] DEVICE...",
                   "Remove devices (--deferred: at their last close).",
                   (*DEV, "force", "retry", "deferred", "no_open")),
    "remove_all": Verb("remove_all [-f] [--deferred]", "Remove every device that is not in use.",
                       ("force", "deferred")),
    "info": Verb("info [-c [-o FIELDS] [-O SORT] [-S SELECTION] [--noheadings] [--separator S] "
                 "[--nameprefixes [--unquoted]] [--rows] [--headings none|abbrev|full]] [--noopencount] "
                 "[--inactive] [--json] [DEVICE...]",
                 "Show devices: dmsetup's info block, or with -c one report line each (--inactive: "
                 "the number of targets and read-only state of the inactive table).",
                 (*DEV, *REPORT, "noopencount", "inactive", "json")),
    "ls": Verb("ls [--target TYPE] [--exec COMMAND] [-o devno|devname|blkdevname] [--json] | "
               "ls --tree [-o ascii|utf|vt100,compact,inverted,notrunc,device|nodevice,blkdevname,"
               "active,open,rw,uuid]",
               "List the devices (with --tree, what they are built on, drawn as the -o options say; "
               "with --exec, run COMMAND with each device's node).",
               ("target", "tree", "options", "json")),
    "table": Verb("table [--target TYPE] [--showkeys] [--inactive] [--concise] [--json] [DEVICE...]",
                  "Print the tables.", (*DEV, "target", "showkeys", "inactive", "concise", "json")),
    "status": Verb("status [--target TYPE] [--inactive] [--noflush] [--json] [DEVICE...]",
                   "Print the targets' status lines (never flushing anything: --noflush is how it "
                   "always runs).", (*DEV, "target", "inactive", "noflush", "json")),
    "deps": Verb("deps [-o devno|devname|blkdevname] [--inactive] [--json] [DEVICE...]",
                 "Print the devices each table uses.", (*DEV, "options", "inactive", "json")),
    "message": Verb("message DEVICE SECTOR MESSAGE...",
                    "Send a message to the target at SECTOR (or @cancel_deferred_remove).", DEV),
    "rename": Verb("rename DEVICE NEW_NAME | rename DEVICE --setuuid UUID",
                   "Rename a device, or set the uuid of one that has none.", (*DEV, "setuuid")),
    "wait": Verb("wait [--noflush] DEVICE [EVENT_NR]", "Wait until the device's event number exceeds "
                 "EVENT_NR (never flushing: --noflush is how it always runs).", (*DEV, "noflush")),
    "targets": Verb("targets [--json]", "List the target types and their versions.", ("json",)),
    "version": Verb("version [--json]", "Print the library and driver versions.", ("json",)),
    "wipe_table": Verb("wipe_table DEVICE...", "Replace the table by an error target of the same size.",
                       DEV),
    "splitname": Verb("splitname NAME [SUBSYSTEM] [-o FIELDS] [report options of info -c]",
                      "Split an LVM device name into VG, LV and layer (no daemon needed).", REPORT),
    "partprobe": Verb("partprobe [-v] DEVICE...", "Read the devices' partition tables again.", DEV),
    "era": Verb("era changed DEVICE --since ERA [--xml] [--metadata-snapshot]",
                "The blocks of an era device written since an era.",
                ("since", "xml", "metadata_snapshot")),
    "daemon": Verb("daemon [--runtime-dir DIR] [--state-dir DIR] [--example] [--no-fuse] [--fuse-passthrough] [--fuse-uring] "
                   "[--no-nbd] "
                   "[--nbd-listen HOST:PORT] [--tls off|on|require] [--tls-certificates DIR] [--tls-verify-peer] "
                   "[--block-devices] [--poll-us US] [limits]",
                   "Run the daemon in the foreground (Ctrl-C or SIGTERM stops it).",
                   ("state_dir", "nbd_listen", "no_fuse", "fuse_passthrough", "fuse_uring", "no_nbd", "block_devices", "example",
                    "poll_us",
                    "max_control_connections",
                    "max_message_size", "control_message_timeout", "nbd_max_connections",
                    "nbd_handshake_deadline", "nbd_connection_bytes", "nbd_total_bytes",
                    "nbd_reply_timeout", "nbd_workers", "tls", "tls_certificates", "tls_verify_peer", "tls_psk")),
    "target-version": Verb("target-version TARGET...", "The versions of these target types."),
    "mangle": Verb("mangle [DEVICE...]", "Report that names and uuids are in their correct form "
                   "(userdm never mangles them).", DEV),
    "mknodes": Verb("mknodes [DEVICE...]", "Nothing to make: the nodes are the daemon's FUSE files "
                    "in RUNTIME/mapper (checks that the devices exist).", DEV),
    "udevcookies": Verb("udevcookies", "Report that there is no udev (and so no cookie)."),
    "udevcomplete": Verb("udevcomplete COOKIE", "Report that there is no udev: nothing to complete."),
    "udevcomplete_all": Verb("udevcomplete_all [AGE]", "Report that there is no udev: nothing to complete."),
    "help": Verb("help [VERB]", "Help on every verb, or on one.", ("columns",)),
    "notify-failure": Verb("notify-failure DEVICE OFFSET LENGTH",
                           "Report a failed byte range (K/M/G/T suffixes); print where it reached."),
    "events": Verb("events [--follow] [NAME]", "The recent events as JSON lines (--follow: and new ones).",
                   ("follow",)),
    "backup": Verb("backup start DEV --store DIR [--cow-size SIZE] [--nolockfs] | backup copy DEV DEST [--since ERA] [-p|-q] | "
                   "backup drop DEV [--all]",
                   "Back up a device in use: interpose era and snapshot-origin, copy, drop.",
                   ("store", "cow_size", "since", "all_", "progress", "quiet", "nolockfs")),
    "luks": Verb("luks open DEVICE NAME [--key-file F] [--header F] [--key-slot N] [--allow-discards] [-r] | "
                 "luks close NAME [--deferred [--no-open]] | luks dump DEVICE [--header F]",
                 "Open, close and show cryptsetup's LUKS1/LUKS2 volumes.",
                 ("key_file", "header", "key_slot", "allow_discards", "readonly", "deferred", "no_open")),
}

#: every option some verb claims (the others are never checked)
CLAIMED = {dest for verb in VERBS.values() for dest in verb.options}


def suggest(word: str, choices: list[str]) -> str:
    """`; did you mean 'X'?` or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_verb(verb: str) -> None:
    if verb not in VERBS:
        raise DMError(errno.EINVAL, f"unknown command {verb!r}{suggest(verb, list(VERBS))} "
                      "(`userdm help` lists the commands)")


def check_options(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Refuse an option given to a verb that does not take it (dmsetup would ignore it, and a
    script would get other output than it asked for)."""
    takes = set(VERBS[opts.verb].options) | set(GLOBAL)
    for action in parser._actions:
        dest = action.dest
        if dest in takes or dest not in CLAIMED:
            continue
        if getattr(opts, dest, None) != action.default:
            flag = max(action.option_strings, key=len)
            raise DMError(errno.EINVAL, f"option {flag} does not apply to {opts.verb} "
                          f"(usage: userdm {VERBS[opts.verb].synopsis})")


def verb_help(parser: argparse.ArgumentParser, verb: str) -> str:
    """`userdm help VERB`: the synopsis, what it does, and its options."""
    v = VERBS[verb]
    lines = [f"Usage: userdm {v.synopsis}", "", v.summary]
    rows = []
    for action in parser._actions:
        if action.dest in v.options and action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0:
                flags += " " + (action.metavar or action.dest.upper())
            rows.append((flags, action.help or ""))
    if rows:
        width = max(len(f) for f, _ in rows)
        lines += ["", "Options:"] + [f"  {f:<{width}}  {h}".rstrip() for f, h in rows]
    lines += ["", "Every command also takes --runtime-dir DIR (the daemon's; env USERDM_RUNTIME_DIR), "
              "-v and -y.", "See userdm(8)."]
    return "\n".join(lines) + "\n"


def all_help() -> str:
    """`userdm help` (and `--help`): one synopsis line per verb."""
    lines = ["Usage: userdm COMMAND [OPTIONS] [ARGS]  (`userdm help COMMAND` for one command)", ""]
    lines += [f"  {v.synopsis}" for v in VERBS.values()]
    lines += ["", "DEVICE is a name, or -u UUID, or -j MAJOR -m MINOR. '--' ends the options.",
              "Refusals print `VERB: ERRNO: sentence` and exit 1. See userdm(8)."]
    return "\n".join(lines) + "\n"


def man_commands() -> str:
    """The COMMANDS section of docs/userdm.8 (regenerate it with
    `python -m userdm.cli.verbs`; a test checks that the page has it)."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("-", "\\-")
    lines = []
    for verb in VERBS.values():
        lines += [".TP", f".B {esc(verb.synopsis)}", esc(verb.summary)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(man_commands(), end="")
