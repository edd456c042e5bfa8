"""Restore at start: every saved device comes back, and no saved table is ever dropped.

`Restorer.restore` recreates each saved device (name, uuid, minor, flags) at once, then builds
the saved tables in dependency order: a table that names another saved device (`/dev/mapper/X`,
a partition of X, `253:MINOR`, the FUSE file of X, `[interpose]X`, or X's export on the
daemon's own NBD socket) is built after X's; what that order cannot settle is retried in
rounds while rounds make progress. A table that cannot be built (its file was moved away, an
NBD server is not up, a device it names is missing) stays in the state store and in memory
(`MappedDevice.saved_live`/`saved_inactive`): the device is listed, `info` gives the reason in
`restore_error` ("ENOENT: ..."), `table` shows the saved text, and `resume NAME` tries again.

A table that held a key (crypt) was saved without it: it comes back in the inactive slot with
its key wiped, and `info` says it needs the key again (`await_key`).

Tables that wait on an NBD export (or on a device that does) are also retried automatically,
with back-off from `RETRY_FIRST` doubling up to `RETRY_MAX` seconds between rounds, for
`RETRY_WINDOW` seconds after the restore; after that only `resume NAME` retries them.
Restoring commits nothing (the store already says what is restored), except the removals the
kernel's rules call for at start: devices marked for deferred removal and autoclear devices,
none of which is open after a restart.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from ..errors import DMError
from . import state as state_file
from .interposer import PREFIX as INTERPOSE_PREFIX
from .mapped import DM_MAJOR, MappedDevice

log = logging.getLogger("userdm.dm.restore")

#: seconds after the restore during which tables waiting on an NBD export are retried
RETRY_WINDOW = 300.0
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

_NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
_MINOR_REF = re.compile(rf"{DM_MAJOR}:(\d+)")
_PARTITION = re.compile(r"(.*?\D)p?(\d+)")


def describe(exc: DMError, slot: str = "live") -> str:
    """The `restore_error` of a device: errno name and the sentence."""
    return f"{exc.errno_name}: {'inactive table: ' if slot == 'inactive' else ''}{exc.message}"


def saved_texts(md: MappedDevice) -> list[str]:
    return [saved[0] for saved in (md.saved_live, md.saved_inactive) if saved is not None]


def waits_on_nbd(md: MappedDevice) -> bool:
    return any(scheme in text for text in saved_texts(md) for scheme in _NBD_SCHEMES)


def saved_lines(text: str) -> list[list[object]]:
    """A saved table's lines as `table` shows them (`[start, length, type, params]`), unbuilt."""
    out: list[list[object]] = []
    for raw in text.splitlines():
        words = raw.strip().split(None, 3)
        if len(words) >= 3 and not words[0].startswith("#") and words[0].isdigit() and words[1].isdigit():
            out.append([int(words[0]), int(words[1]), words[2], words[3] if len(words) > 3 else ""])
    return out


def await_key(md: MappedDevice, table: Any, *, saved_live: bool) -> None:
    """A saved table that held a key (crypt) comes back with its key wiped, in the inactive
    slot: the store has only the masked text (`Table.text`), keys are never saved. `info`
    says so, and `message NAME 0 key set KEY` + `resume` (or `luks open`) brings it back,
    as after cryptsetup's luksSuspend."""
    for target in table.targets:
        if target.has_keys:
            target.forget_key()
    md.set_inactive(table)
    if saved_live:
        md.keyless_live = table
    kinds = "/".join(sorted({t.name for t in table.targets if t.has_keys}))
    md.restore_error = f"ENOKEY: {kinds} table needs its key again (keys are never saved)"
    log.info("%s: %s", md.name, md.restore_error)


class Restorer:
    """Restores the devices of one Mapper and retries the tables that could not be built."""

    def __init__(self, mapper: Any) -> None:
        #: the `userdm.dm.mapper.Mapper` whose devices this restores (not imported: it imports us)
        self.mapper = mapper
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the order --------------------------------------------------------------------------

    def _referenced(self, text: str, by_name: dict[str, MappedDevice],
                    by_minor: dict[int, MappedDevice]) -> list[MappedDevice]:
        m = self.mapper
        fuse_prefix = m.fuse_dir.rstrip("/") + "/" if m.fuse_dir else None
        out = []
        for token in text.split():
            if token.startswith(INTERPOSE_PREFIX):
                token = token[len(INTERPOSE_PREFIX):]
            name = None
            if token.startswith("/dev/mapper/"):
                name = token[len("/dev/mapper/"):]
            elif fuse_prefix and token.startswith(fuse_prefix):
                name = token[len(fuse_prefix):]
            elif (match := _MINOR_REF.fullmatch(token)) is not None:
                dep = by_minor.get(int(match.group(1)))
                if dep is not None:
                    out.append(dep)
                continue
            else:
                name = m.graph.own_export(token)  # an export on this daemon's own NBD server
            if not name:
                continue
            dep = by_name.get(name)
            if dep is None and (match := _PARTITION.fullmatch(name)) is not None:
                dep = by_name.get(match.group(1))
            if dep is not None:
                out.append(dep)
        return out

    def order(self, devices: list[MappedDevice]) -> list[MappedDevice]:
        """`devices` with every device after the devices its saved tables name (cycles are
        broken anywhere; the rounds of `restore` settle the rest)."""
        by_name = {md.name: md for md in devices}
        by_minor = {md.minor: md for md in devices}
        out: list[MappedDevice] = []
        state: dict[int, int] = {}  # id -> 1 visiting, 2 done
        for root in devices:
            if id(root) in state:
                continue
            stack = [(root, iter(self._deps(root, by_name, by_minor)))]
            state[id(root)] = 1
            while stack:
                md, deps = stack[-1]
                for dep in deps:
                    if id(dep) not in state:
                        state[id(dep)] = 1
                        stack.append((dep, iter(self._deps(dep, by_name, by_minor))))
                        break
                else:
                    stack.pop()
                    state[id(md)] = 2
                    out.append(md)
        return out

    def _deps(self, md: MappedDevice, by_name: dict[str, MappedDevice],
              by_minor: dict[int, MappedDevice]) -> list[MappedDevice]:
        return [dep for text in saved_texts(md) for dep in self._referenced(text, by_name, by_minor) if dep is not md]

    # ---- restore at start -------------------------------------------------------------------

    def restore(self, saved: list[state_file.SavedDevice]) -> None:
        m = self.mapper
        devices = []
        for entry in saved:
            try:
                devices.append(m._restore_shell(entry))
            except DMError as exc:  # only a store edited by hand gets here; the entry stays saved
                log.error("cannot restore device %s: %s", entry.name, exc)
        pending = [md for md in self.order(devices) if saved_texts(md)]
        while pending:
            failed = []
            for md in pending:
                if not self._attempt(md):
                    failed.append(md)
            if len(failed) == len(pending):
                break
            pending = failed
        for md in pending:
            log.error("device %s stays without its saved table: %s (`resume %s` retries it)",
                      md.name, md.restore_error, md.name)
        m._remove_unopened(only_deferred=True)
        # A restart closed every open, and for an autoclear device that is its last close.
        for md in devices:
            if md.autoclear and not md.deleting:
                m._reap(md)
        if any(waits_on_nbd(md) for md in pending):
            self._thread = threading.Thread(target=self._retry_loop, name="restore-retry", daemon=True)
            self._thread.start()

    def _attempt(self, md: MappedDevice) -> bool:
        """One try at `md`'s saved tables, under its lock (skipped if the lock is busy)."""
        m = self.mapper
        if not m._lock_device(md, blocking=False):
            return False
        try:
            if m._devices.get(md.name) is not md or md.deleting:
                return True
            live_before = md.live
            try:
                self.build(md)
                ok = True
            except DMError:
                ok = False
            live_changed = md.live is not live_before and md.live is not None
        finally:
            m._unlock_device(md, reap=False)  # deferred removals wait until every table is back
        if live_changed:
            m.partitions.scan_after_resume(md)  # partitions that later tables may name
        return ok

    @staticmethod
    def _built(md: MappedDevice, saved: tuple[str, bool], *, live: bool) -> Any:
        """A saved table built, or None if it came back without its key (`await_key`)."""
        text, read_only = saved
        table = md.build(text, read_only)
        if table.needs_key:
            await_key(md, table, saved_live=live)
            return None
        return table

    def build(self, md: MappedDevice, *, resumed: bool = False) -> None:
        """Build `md`'s saved tables (its lock is held); the first failure is raised after
        both were tried, and kept in `md.restore_error`. `resumed`: a user's `resume`, which
        leaves the device running even if it was saved suspended."""
        m = self.mapper
        first: DMError | None = None
        if md.saved_live is not None:
            try:
                table = self._built(md, md.saved_live, live=True)
                if table is None:
                    md.saved_live = None
                    return
                try:
                    m._check_interpose(md, table)
                    md.check_table(table, keep_inactive=True)
                    md.resume_with(table)
                except BaseException:
                    if md.live is not table:
                        table.destroy()
                    raise
            except DMError as exc:
                md.restore_error = describe(exc)
                first = exc
            else:
                md.saved_live = None
                m._attach(md)
                if md.saved_suspended and not resumed:
                    md.suspend(noflush=True, nolockfs=True)
                md.saved_suspended = False
                m._emit({"event": "resume", "name": md.name, "resized": True, "size": md.size, "restored": True})
        if md.saved_inactive is not None:
            try:
                table = self._built(md, md.saved_inactive, live=False)
                if table is None:
                    md.saved_inactive = None
                    return
                try:
                    m._check_interpose(md, table)
                except BaseException:
                    table.destroy()
                    raise
                md.set_inactive(table)  # checks for cycles (and destroys the table if refused)
                md.saved_inactive = None
            except DMError as exc:
                if first is None:
                    md.restore_error = describe(exc, "inactive")
                    first = exc
        if first is not None:
            raise first
        md.restore_error = None

    def retry(self, md: MappedDevice, *, resumed: bool) -> None:
        """`resume NAME` of a device whose saved live table is not built (its lock is held):
        try again; a device saved as suspended is resumed, which is committed first."""
        if resumed and md.saved_suspended:
            self.mapper._commit("resume", state_file.flags(md.minor, suspended=False))
            md.saved_suspended = False
        self.build(md, resumed=resumed)

    # ---- automatic retries --------------------------------------------------------------------

    def _retry_loop(self) -> None:
        m = self.mapper
        deadline = time.monotonic() + RETRY_WINDOW
        delay = RETRY_FIRST
        while not self._stop.wait(delay):
            pending = [md for md in m._snapshot() if saved_texts(md) and not md.deleting]
            if not any(waits_on_nbd(md) for md in pending):
                return
            if time.monotonic() > deadline:
                log.warning("giving up automatic retries of %s after %.0f s; `resume NAME` retries",
                            ", ".join(md.name for md in pending), RETRY_WINDOW)
                return
            for md in self.order(pending):
                if self._stop.is_set():
                    return
                if self._attempt(md):
                    log.info("restored the saved table of %s", md.name)
            delay = min(delay * 2, RETRY_MAX)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
