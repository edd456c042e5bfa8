"""dmsetup's report engine (libdm's `dm_report`), for `info -c` and `splitname`.

A report is a list of objects (one per device, or one split name), the fields chosen with `-o`,
sorted with `-O` and filtered with `-S`, printed as libdm prints them:

- aligned columns (numbers right, text left, headings left, every column padded to its width,
  the last one too) with the separator " " by default;
- `--noheadings` alone: no headings, no alignment, separator ":" (dmsetup's old behaviour);
- `--separator S`: no alignment;
- `--nameprefixes`: `DM_FIELD='value'` (no alignment), `--unquoted` drops the quotes;
- `--rows`: one line per field, the heading first, then each object's value (no alignment).

Field names are case-insensitive; `name_all`, `info_all`, `deps_all` and `splitname_all` stand
for their sections. An unknown field prints the list of fields on stderr and is refused, as
dmsetup refuses it. Selection (`-S`) understands a subset of libdm's grammar, see `Selection`.
"""

from __future__ import annotations

import errno
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from ..errors import DMError
from . import format as fmt

DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid"
SPLITNAME_FIELDS = "vg_name,lv_name,lv_layer"


@dataclass(frozen=True)
class Field:
    id: str
    heading: str
    width: int
    number: bool
    section: str
    #: which data the field needs: "info" (a device), "split" (name components), "deps", "tree"
    needs: str
    value: Callable[["Row"], Any]
    desc: str


class Row:
    """One reported object: a device's info (None for `splitname`), its name components, and
    its dependencies and users (fetched only when a field asks for them)."""

    def __init__(self, info: dict[str, Any] | None, split: tuple[str, str, str, str],
                 deps: Callable[[], list[dict[str, Any]]] | None = None,
                 users: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.info = info
        self.split = split
        self._deps, self._users = deps, users
        self.selected = True

    @property
    def i(self) -> dict[str, Any]:
        assert self.info is not None
        return self.info

    def deps(self) -> list[dict[str, Any]]:
        return self._deps() if self._deps is not None else []

    def users(self) -> list[dict[str, Any]]:
        return self._users() if self._users is not None else []


# ---- name components (libdm's dm_split_lvm_name and dmsetup's _get_split_name) ---------------

def _unquote(text: str) -> tuple[str, str]:
    """One LVM name component: `--` is a hyphen, a single `-` ends it (a `-` at the very end is
    kept). Returns the component and the rest."""
    out: list[str] = []
    n = 0
    while n < len(text):
        c = text[n]
        if n + 1 < len(text) and c == "-":
            if text[n + 1] != "-":
                return "".join(out), text[n + 1:]
            n += 1
        out.append(text[n])
        n += 1
    return "".join(out), ""


def split_lvm_name(name: str) -> tuple[str, str, str]:
    """VG, LV and layer of an LVM device name (`vg-lv--with--hyphens-layer`)."""
    vg, rest = _unquote(name)
    lv, rest = _unquote(rest)
    layer, _ = _unquote(rest)
    return vg, lv, layer


def split_name(name: str, subsystem: str) -> tuple[str, str, str, str]:
    """Subsystem, VG, LV, layer: only an LVM name is split."""
    if subsystem == "LVM":
        return (subsystem, *split_lvm_name(name))
    return subsystem, "", "", ""


def device_split(info: dict[str, Any]) -> tuple[str, str, str, str]:
    """A device's name components: the subsystem is its uuid's prefix before the first `-`."""
    uuid = info.get("uuid") or ""
    subsystem = uuid.split("-", 1)[0] if "-" in uuid else ""
    return split_name(info["name"], subsystem)


# ---- the fields ------------------------------------------------------------------------------

def _devno(dep: dict[str, Any]) -> str | None:
    return f"{dep['devno'][0]}:{dep['devno'][1]}" if dep.get("devno") else None


def _blkdev(dep: dict[str, Any]) -> str:
    if dep.get("device"):
        return f"dm-{dep['devno'][1]}" if dep.get("devno") else str(dep["device"])
    return str(dep.get("name"))


def _deps_list(values: list[str | None]) -> str:
    return ",".join(v for v in values if v)


def _yes_no(value: bool, yes: str, no: str) -> str:
    return yes if value else no


SECTIONS = {
    "name": "Mapped Device Name Fields",
    "info": "Mapped Device Information Fields",
    "deps": "Mapped Device Relationship Information Fields",
    "splitname": "Mapped Device Name Components Fields",
    "userdm": "userdm Fields",
}

_F = Field
FIELDS: list[Field] = [
    _F("name", "Name", 16, False, "name", "info", lambda r: r.i["name"], "Name of mapped device."),
    _F("mangled_name", "MangledName", 16, False, "name", "info", lambda r: r.i["name"],
       "Mangled name of mapped device."),
    _F("unmangled_name", "UnmangledName", 16, False, "name", "info", lambda r: r.i["name"],
       "Unmangled name of mapped device."),
    _F("uuid", "UUID", 32, False, "name", "info", lambda r: r.i["uuid"] or "",
       "Unique (optional) identifier for mapped device."),
    _F("mangled_uuid", "MangledUUID", 32, False, "name", "info", lambda r: r.i["uuid"] or "",
       "Mangled unique (optional) identifier for mapped device."),
    _F("unmangled_uuid", "UnmangledUUID", 32, False, "name", "info", lambda r: r.i["uuid"] or "",
       "Unmangled unique (optional) identifier for mapped device."),
    _F("read_ahead", "RAhead", 6, True, "name", "info", lambda r: 256 if r.i["live"] else 0,
       "Read ahead value."),
    _F("blkdevname", "BlkDevName", 16, False, "info", "info", lambda r: f"dm-{r.i['minor']}",
       "Name of block device."),
    _F("attr", "Stat", 4, False, "info", "info", lambda r: fmt.attr(r.i),
       "(L)ive, (I)nactive, (s)uspended, (r)ead-only, read-(w)rite."),
    _F("tables_loaded", "Tables", 6, False, "info", "info",
       lambda r: {(True, True): "Live & Inactive", (True, False): "Live",
                  (False, True): "Inactive", (False, False): "None"}[(r.i["live"], r.i["inactive"])],
       "Which of the live and inactive table slots are filled."),
    _F("suspended", "Suspended", 9, False, "info", "info",
       lambda r: _yes_no(r.i["suspended"], "Suspended", "Active"), "Whether the device is suspended."),
    _F("readonly", "Read-only", 9, False, "info", "info",
       lambda r: _yes_no(r.i["readonly"], "Read-only", "Writeable"),
       "Whether the device is read-only or writeable."),
    _F("devno", "DevNo", 5, False, "info", "info", lambda r: f"{r.i['major']}:{r.i['minor']}",
       "Device major and minor numbers"),
    _F("major", "Maj", 3, True, "info", "info", lambda r: r.i["major"], "Block device major number."),
    _F("minor", "Min", 3, True, "info", "info", lambda r: r.i["minor"], "Block device minor number."),
    _F("open", "Open", 4, True, "info", "info", lambda r: r.i["open_count"],
       "Number of references to open device, if requested."),
    _F("segments", "Targ", 4, True, "info", "info", lambda r: r.i["target_count"],
       "Number of segments in live table, if present."),
    _F("events", "Event", 6, True, "info", "info", lambda r: r.i["event_nr"],
       "Number of most recent event."),
    _F("device_count", "#Devs", 5, True, "deps", "deps", lambda r: len(r.deps()),
       "Number of devices used by this one."),
    _F("devs_used", "DevNamesUsed", 16, False, "deps", "deps",
       lambda r: _deps_list([d.get("device") for d in r.deps()]),
       "List of names of mapped devices used by this one."),
    _F("devnos_used", "DevNosUsed", 16, False, "deps", "deps",
       lambda r: _deps_list([_devno(d) for d in r.deps()]),
       "List of device numbers of devices used by this one."),
    _F("blkdevs_used", "BlkDevNamesUsed", 16, False, "deps", "deps",
       lambda r: _deps_list([_blkdev(d) for d in r.deps()]),
       "List of names of block devices used by this one."),
    _F("device_ref_count", "#Refs", 5, True, "deps", "tree", lambda r: len(r.users()),
       "Number of mapped devices referencing this one."),
    _F("names_using_dev", "RefNames", 8, False, "deps", "tree",
       lambda r: _deps_list([u["name"] for u in r.users()]),
       "List of names of mapped devices using this one."),
    _F("devnos_using_dev", "RefDevNos", 9, False, "deps", "tree",
       lambda r: _deps_list([f"{u['major']}:{u['minor']}" for u in r.users()]),
       "List of device numbers of mapped devices using this one."),
    _F("subsystem", "Subsys", 6, False, "splitname", "split", lambda r: r.split[0],
       "Userspace subsystem responsible for this device."),
    _F("vg_name", "VG", 4, False, "splitname", "split", lambda r: r.split[1], "LVM Volume Group name."),
    _F("lv_name", "LV", 4, False, "splitname", "split", lambda r: r.split[2], "LVM Logical Volume name."),
    _F("lv_layer", "LVLayer", 7, False, "splitname", "split", lambda r: r.split[3], "LVM device layer."),
    _F("flags", "Flags", 5, False, "userdm", "info", lambda r: ",".join(fmt.userdm_flags(r.i)),
       "userdm's ownership flags (shared, autoclear, no-open, max-opens N, interposing DEV)."),
    _F("diskseq", "DiskSeq", 7, True, "userdm", "info", lambda r: r.i.get("diskseq", ""),
       "Disk sequence number (never reused)."),
]
SELECTED = Field("selected", "Selected", 8, True, "special", "split", lambda r: int(r.selected),
                 "Set if item passes selection criteria.")
BY_ID = {f.id: f for f in FIELDS + [SELECTED]}

#: dmsetup's statistics fields: userdm keeps no I/O statistics (no `dmsetup stats`)
STATS_FIELDS = frozenset("""stats_all read_count reads_merged_count read_sector_count read_time
write_count writes_merged_count write_sector_count write_time in_progress_count io_ticks queue_ticks
read_ticks write_ticks reads_merged_per_sec writes_merged_per_sec reads_per_sec writes_per_sec
read_size_per_sec write_size_per_sec avg_request_size queue_size await read_await write_await
throughput service_time util hist_count hist_count_bounds hist_count_ranges hist_percent
hist_percent_bounds hist_percent_ranges interval_ns interval region_all region_id region_start
region_len area_id area_start area_len area_offset area_count group_id program_id user_data
precise hist_bins hist_bounds hist_ranges stats_name obj_type""".split())


def field_help() -> str:
    """The list of fields, as `-o help` prints it."""
    out = []
    for key, title in SECTIONS.items():
        fields = [f for f in FIELDS if f.section == key]
        out += [title, "-" * len(title)]
        if key != "userdm":
            out.append(f"  {key + '_all':<21} - All fields in this section.")
        out += [f"  {f.id:<21} - {f.desc}" for f in fields]
        out.append(" ")
    out += ["Special Fields", "--------------",
            f"  {'selected':<21} - Set if item passes selection criteria.",
            f"  {'help':<21} - Show help.", f"  {'?':<21} - Show help.", " "]
    return "\n".join(out) + "\n"


def _lookup(name: str, what: str) -> Field:
    key = name.lower()
    if key in BY_ID:
        return BY_ID[key]
    if key in STATS_FIELDS:
        raise DMError(errno.EINVAL, f"field {name!r} is a statistics field: userdm keeps no "
                      "I/O statistics (dmsetup stats)")
    sys.stderr.write(field_help())
    raise DMError(errno.EINVAL, f"Unrecognised {what}: {name}")


class HelpShown(Exception):
    """`-o help`: the list of fields was printed; the command succeeds without a report."""


def parse_fields(spec: str | None, default: str = DEFAULT_FIELDS) -> list[Field]:
    """`-o`: a comma list (`+f,g` appends to the defaults; `name_all` ... expand)."""
    text = default if spec is None else default + "," + spec[1:] if spec.startswith("+") else spec
    if text == "":
        return []
    names = text.split(",")
    if any(n.lower() in ("help", "?") for n in names):
        sys.stderr.write(field_help())
        raise HelpShown()
    out: list[Field] = []
    for name in names:
        key = name.lower()
        if key.endswith("_all") and key[:-4] in SECTIONS:
            out += [f for f in FIELDS if f.section == key[:-4]]
        else:
            out.append(_lookup(name, "field"))
    return out


def parse_sort(spec: str | None) -> list[tuple[Field, bool]]:
    """`-O`: fields with an optional `+` (ascending, the default) or `-` (descending)."""
    if not spec:
        return []
    keys = []
    for name in spec.split(","):
        descending = name.startswith("-")
        keys.append((_lookup(name.lstrip("+-"), "field"), descending))
    return keys


# ---- selection ---------------------------------------------------------------------------------

class Selection:
    """`-S`: libdm's selection grammar for dmsetup's field types, which are strings and numbers.

    Conditions are `FIELD OP VALUE` with the operators `=`, `!=`, `=~`, `!~` (regular
    expressions, Python's syntax) on every field and `<`, `<=`, `>`, `>=` on numeric ones (libdm
    has no `==`: `f==x` compares with the string `=x`); `&&` or `,` (and), `||` or `#` (or),
    `!(...)` and parentheses. A string is quoted with ' or " or bare, ending at a space, `&&`,
    `,`, `||`, `#` or `)`; a regular expression may also be enclosed in `()`, `{}` or `[]`. A
    number is digits with at most one `.`, its integer part compared (libdm's strtoull).

    dmsetup declares no string-list, size, percent or time fields (`devs_used`, `devnos_used`,
    `blkdevs_used`, `names_using_dev` and `devnos_using_dev` are strings, `read_ahead` a
    number), so as in dmsetup `[a]` and `{a}` are plain strings, a list `[a,b]` splits at its
    comma, a size unit or `%` after a number is refused, and so are the time operators
    `since`, `after`, `until` and `before`."""

    OPS = ("=~", "!~", "=", "!=", ">=", ">", "<=", "<")
    TIME_OPS = ("since", "after", "until", "before")
    #: libdm's dm_units_to_factor letters (a size unit after a number)
    UNITS = "hHrRbBsSkmgtpeKMGTPE"
    #: what ends a bare value: the logical operators that may follow it (and a space)
    VALUE_END = ("&&", ",", "||", "#", ")")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.tree = self._or()
        self._space()
        if self.pos < len(text):
            self._fail("expecting a logical operator (&&, ||, ',' or '#')")

    def _fail(self, why: str) -> NoReturn:
        raise DMError(errno.EINVAL, f"selection {self.text!r}: {why} at {self.text[self.pos:]!r}")

    def _space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _take(self, *tokens: str) -> str | None:
        self._space()
        for tok in tokens:
            if self.text.startswith(tok, self.pos):
                self.pos += len(tok)
                return tok
        return None

    def _or(self) -> Any:
        node = self._and()
        while self._take("||", "#"):
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._unary()
        while self._take("&&", ","):
            node = ("and", node, self._unary())
        return node

    def _unary(self) -> Any:
        if self._take("!"):
            if not self._take("("):
                self._fail("'!' negates a parenthesised expression: expecting '('")
            return ("not", self._group())
        if self._take("("):
            return self._group()
        return self._condition()

    def _group(self) -> Any:
        node = self._or()
        if not self._take(")"):
            self._fail("expecting ')'")
        return node

    def _bare(self) -> str:
        """A value up to a space or a logical operator that may follow it."""
        begin = self.pos
        while self.pos < len(self.text) and not self.text[self.pos].isspace() \
                and not self.text.startswith(self.VALUE_END, self.pos):
            self.pos += 1
        return self.text[begin:self.pos]

    def _enclosed(self, closing: str) -> str:
        end = self.text.find(closing, self.pos + 1)
        if end < 0:
            self._fail(f"missing closing {closing}")
        value = self.text[self.pos + 1:end]
        self.pos = end + 1
        return value

    def _condition(self) -> Any:
        self._space()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.text, self.pos)
        if m is None:
            self._fail("expecting a field name")
        self.pos = m.end()
        field = _lookup(m[0], "selection field")
        self._space()
        if self.text.startswith(self.TIME_OPS, self.pos):
            self._fail(f"operator can be used only with time fields, and {field.id} is not one")
        op = self._take(*self.OPS)
        if op is None:
            self._fail(f"expecting an operator after field {m[0]!r}")
        self._space()
        if op in ("<", "<=", ">", ">=") and not field.number:
            self._fail(f"operator {op} can be used only with number fields, not {field.id}")
        first = self.text[self.pos:self.pos + 1]
        if op in ("=~", "!~"):
            if not first:
                self._fail(f"a regular expression is expected for {field.id}")
            closing = {"(": ")", "{": "}", "[": "]", "'": "'", '"': '"'}.get(first)
            value = self._enclosed(closing) if closing else self._bare()
            try:
                return ("re", field, op, re.compile(value))
            except re.error as exc:
                self._fail(f"invalid regular expression {value!r} ({exc})")
        if field.number:
            return ("num", field, op, self._number(field))
        value = self._enclosed(first) if first in ("'", '"') else self._bare()
        return ("str", field, op, value)

    def _number(self, field: Field) -> int:
        m = re.compile(r"\d*\.?\d*").match(self.text, self.pos)
        assert m is not None
        if m[0] in ("", "."):
            self._fail(f"{field.id} is a number field: expecting a non-negative number")
        self.pos = m.end()
        after = self.text[self.pos:self.pos + 1]
        if after == "%" or after and after in self.UNITS:
            what = "percent value" if after == "%" else "size unit"
            self._fail(f"{field.id} is a number field: a {what} is not accepted")
        whole = m[0].split(".")[0]
        return int(whole) if whole else 0

    def fields(self) -> list[Field]:
        out: list[Field] = []

        def walk(node: Any) -> None:
            if node[0] in ("or", "and"):
                walk(node[1])
                walk(node[2])
            elif node[0] == "not":
                walk(node[1])
            else:
                out.append(node[1])
        walk(self.tree)
        return out

    def match(self, row: Row) -> bool:
        return self._eval(self.tree, row)

    def _eval(self, node: Any, row: Row) -> bool:
        kind = node[0]
        if kind == "or":
            return self._eval(node[1], row) or self._eval(node[2], row)
        if kind == "and":
            return self._eval(node[1], row) and self._eval(node[2], row)
        if kind == "not":
            return not self._eval(node[1], row)
        _, field, op, want = node
        got = field.value(row)
        if kind == "re":
            found = want.search(str(got)) is not None
            return found if op == "=~" else not found
        if kind == "num":
            got = int(got) if str(got).isdigit() else -1
        else:
            got = str(got)
        return {"=": got == want, "==": got == want, "!=": got != want, "<": got < want,
                "<=": got <= want, ">": got > want, ">=": got >= want}[op]


# ---- output -------------------------------------------------------------------------------------

@dataclass
class Options:
    """How to print: from the command line's report options."""
    headings: bool = True
    #: `--headings full`: the field ids (`vg_name`) head the columns instead of `VG`
    field_ids: bool = False
    separator: str | None = None
    aligned: bool = True
    nameprefixes: bool = False
    quoted: bool = True
    rows: bool = False

    @classmethod
    def from_args(cls, *, noheadings: bool = False, separator: str | None = None,
                  nameprefixes: bool = False, unquoted: bool = False, rows: bool = False,
                  headings: str | None = None) -> "Options":
        """dmsetup's `_report_init`: `--noheadings` alone means separator ':' and no alignment;
        `--separator` and `--nameprefixes` turn alignment off; `--rows` never aligns."""
        o = cls(quoted=not unquoted, rows=rows, nameprefixes=nameprefixes)
        sep = " "
        if noheadings and headings is not None:
            raise DMError(errno.EINVAL, "Only one of --headings and --noheadings permitted.")
        if noheadings:
            sep, o.aligned, o.headings = ":", False, False
        if headings is not None:
            value = headings.lower()
            if value in ("none", "0"):
                o.headings = False
            elif value in ("abbrev", "1"):
                o.headings = True
            elif value in ("full", "2"):
                o.headings = o.field_ids = True
            else:
                raise DMError(errno.EINVAL, f"--headings {headings!r}: choose none (0), abbrev (1) "
                              "or full (2)")
        if nameprefixes:
            o.aligned = False
        if separator is not None:
            sep, o.aligned = separator, False
        if rows:
            o.aligned = False
        o.separator = sep
        return o


def _data(row: Row, field: Field) -> Any:
    if field.needs in ("info", "deps", "tree") and row.info is None:
        raise DMError(errno.EINVAL, f"field {field.id!r} has no data here: splitname reports only "
                      "the name components (subsystem, vg_name, lv_name, lv_layer, selected)")
    return field.value(row)


def render(rows: list[Row], fields: list[Field], opts: Options, *,
           sort: list[tuple[Field, bool]] | None = None, selection: Selection | None = None) -> str:
    """The report's text (empty when no object is reported, headings included)."""
    if selection is not None:
        for row in rows:
            row.selected = selection.match(row)
        if SELECTED not in fields:
            rows = [r for r in rows if r.selected]
    cells = [[_data(r, f) for f in fields] for r in rows]
    if sort:
        keyed = list(zip(rows, cells))
        for field, descending in reversed(sort):
            keyed.sort(key=lambda rc: _sort_key(field, _data(rc[0], field)), reverse=descending)
        cells = [c for _, c in keyed]
    if not cells:
        return ""
    text = [[str(v) for v in row] for row in cells]
    sep = opts.separator if opts.separator is not None else " "

    def value(field: Field, s: str, width: int) -> str:
        if opts.aligned:
            s = s.rjust(width) if field.number else s.ljust(width)
        if opts.nameprefixes:
            q = "'" if opts.quoted else ""
            return f"DM_{field.id.upper()}={q}{s}{q}"
        return s

    def heading(field: Field) -> str:
        return field.id if opts.field_ids else field.heading

    lines = []
    if opts.rows:
        for n, f in enumerate(fields):
            parts = [value(f, row[n], 0) for row in text]
            lines.append((heading(f) + sep if opts.headings else "") + sep.join(parts))
        return "".join(line + "\n" for line in lines)
    # libdm widens a column to its field id with full headings, and cuts an abbreviated heading
    widths = [max([f.width, len(f.id) if opts.field_ids else 0] + [len(row[n]) for row in text])
              for n, f in enumerate(fields)]
    if opts.headings:
        lines.append(sep.join(heading(f).ljust(w)[:w] if opts.aligned else heading(f)
                              for f, w in zip(fields, widths)))
    lines += [sep.join(value(f, s, w) for f, s, w in zip(fields, row, widths)) for row in text]
    return "\n".join(lines) + "\n"


def _sort_key(field: Field, value: Any) -> Any:
    if field.number:
        return int(value) if str(value).isdigit() else -1
    return str(value).encode()
