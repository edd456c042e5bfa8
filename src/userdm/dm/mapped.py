"""A mapped device: a `BlockDevice` whose I/O goes through a table, with the kernel's state machine.

It has a live and an inactive table slot. `load` builds a table into the inactive slot (which
already opens and claims the underlying devices), `resume` swaps it in (suspending first),
`suspend` blocks new I/O and drains what is in flight (nothing fails: new I/O waits for the
resume), and the open count decides whether it can be removed. The registry of devices, names
and deferred removal live in `userdm.dm.mapper`.

Locking: `op_lock` serializes the control operations on this one device (load, suspend, resume,
remove ...), as the kernel's per-device `suspend_lock` does; it is held while a table is built
and while a suspend drains, so a slow or stuck device delays only operations on itself. Reads
of its state (`info`) take no lock. I/O takes only `_cond`, briefly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable

from ..block.device import SECTOR, BlockDevice, BlockOpen, describe_holder
from ..block.file import FileDisk
from ..block.failure import merge_ranges
from ..errors import DMError
from . import collapse, interposer
from .table import Table, build_table
from .target import TableDevice, TargetContext

DM_MAJOR = 253

#: Resolves a table's device reference: (ref, write, holder) -> (open, name for `table`).
Resolver = Callable[[str, bool, object | None], tuple[BlockOpen, str]]


class _DMHolder:
    """The single holder shared by every mapped device (the kernel's `_dm_claim_ptr`)."""

    holder_name = "device-mapper"

    def __repr__(self) -> str:
        return "device-mapper"


DM_HOLDER = _DMHolder()


class MappedDevice(BlockDevice):
    """One device-mapper device."""

    def __init__(self, name: str, uuid: str, minor: int, resolver: Resolver, *,
                 shared: bool = False, autoclear: bool = False, max_opens: int | None = None,
                 interpose: bool = False, blockdev: bool = False) -> None:
        super().__init__(f"/dev/mapper/{name}", 0)
        self.name = name
        self.uuid = uuid
        self.minor = minor
        self.shared = shared
        #: removed when its last open closes (LO_FLAGS_AUTOCLEAR; seed 001)
        self.autoclear = autoclear
        #: at most this many opens at once (DM_ENFORCE_OPEN_COUNT_FLAG; seed 002)
        self.max_opens = max_opens
        #: no new opens: set with a deferred remove (DM_DEFERRED_REMOVE_NO_OPEN; seed 002)
        self.no_open = False
        #: may name a device as `[interpose]DEV` in its table (`userdm.dm.interposer`)
        self.interpose = interpose
        #: its disk sequence number: given at create, never given to another device (seed 001)
        self.diskseq = 0
        #: give it a kernel block device (`create --blockdev`; `userdm.export.blockdev`)
        self.blockdev = blockdev
        #: the kernel block device over it ("/dev/loop3"), set by the export layer above
        self.block_device: str | None = None
        #: lockfs from above the core (`userdm.export.blockdev`): `freeze_hook(device)` freezes
        #: the filesystems mounted on it and returns the thaw callable, or raises DMError
        self.freeze_hook: Callable[[MappedDevice], Callable[[], None] | None] | None = None
        self._thaw_fs: Callable[[], None] | None = None
        #: the devices that took over this device's I/O, the last one in front
        self.interposers: list[MappedDevice] = []
        #: finds the mapped device that a reference names (set by the registry)
        self.lookup_mapped: Callable[[str], MappedDevice | None] = lambda ref: None
        #: refuses tables that would make this device depend on itself (`userdm.dm.cycles`;
        #: a `DependencyGraph`, set by the registry)
        self.graph = None
        self.live: Table | None = None
        self.inactive: Table | None = None
        self.suspended = False
        self.deferred_remove = False
        self.deleting = False
        self.event_nr = 0
        self._resolver = resolver
        self._lock = threading.Lock()            # I/O bookkeeping (a C-level lock: cheap)
        self._cond = threading.Condition(self._lock)
        #: the live table collapsed (`userdm.dm.collapse`), None to go through `live`;
        #: rebuilt on the next request while `_flat_stale`
        self._flat: collapse.Flat | None = None
        self._flat_stale = True
        self._blocked = False
        self._in_flight = 0
        #: opens whose I/O the kernel does itself, straight to the file (`pin_kernel_io`), and
        #: a suspend under way, which bars new ones
        self.kernel_io_opens = 0
        self._suspending = False
        #: (ref, write, shared) -> [device, refcount]; shared by live and inactive tables
        self._table_devices: dict[tuple[str, bool, bool], list] = {}
        #: id(device) -> [device, refcount]: dead devices still held by the table that had them
        self._retired_devices: dict[int, list] = {}
        self._event_hook: Callable[[MappedDevice], None] = lambda md: None
        #: the holder was frozen by a suspend (the kernel's DMF_FROZEN)
        self._frozen = False
        #: serializes control operations on this device (see the module docstring)
        self.op_lock = threading.Lock()
        #: the thread that holds `op_lock` (None when free)
        self.op_owner: int | None = None
        #: saved tables not built yet: restore could not open them (`Mapper.restore`)
        self.saved_live: tuple[str, bool] | None = None
        self.saved_inactive: tuple[str, bool] | None = None
        #: the saved state said suspended: a late restore of the live table suspends it again
        self.saved_suspended = False
        #: the saved live table, back without its key in the inactive slot (`restore.await_key`):
        #: while it is there, the store keeps it in the live slot, and the store's inactive slot
        #: is `saved_inactive`'s
        self.keyless_live: Table | None = None
        #: a table was loaded since the restore: `resume` swaps it in rather than retrying the saved one
        self.loaded_since_restore = False
        #: why a saved table is not built ("ENOENT: ..."), shown by `info`
        self.restore_error: str | None = None
        #: a removal from a last close could not take `op_lock`; the holder of the lock does it
        self.reap_pending = False

    @property
    def devno(self) -> tuple[int, int]:
        return (DM_MAJOR, self.minor)

    # ---- opens --------------------------------------------------------------------------

    def check_open(self, write: bool) -> None:
        """Called under the opens lock, so the limits hold against concurrent opens."""
        if self.deleting:
            raise DMError(errno.ENXIO, f"device {self.name} is being removed")
        if self.no_open:
            raise DMError(errno.ENXIO, f"device {self.name} is marked for deferred removal "
                          "and accepts no new opens (--no-open)")
        if self.max_opens is not None and len(self.opens) >= self.max_opens:
            raise DMError(errno.EBUSY, f"device {self.name} already has {len(self.opens)} opens, "
                          f"its limit (--max-opens {self.max_opens})")

    def undo_deletion(self) -> None:
        """The removal that `lock_for_deletion` began was refused after all (its state commit
        failed): the device accepts opens again."""
        with self._opens_lock:
            self.deleting = False

    def lock_for_deletion(self, *, mark_deferred: bool = False, no_open: bool = False) -> bool:
        """The kernel's dm_lock_for_deletion: atomically with respect to opens, either mark the
        device as being removed (True; from now on opens fail with ENXIO) or, if it is open,
        return False (and with `mark_deferred` schedule its removal for the last close, with
        `no_open` also refusing every new open from now on)."""
        with self._opens_lock:
            if self.opens:
                if mark_deferred:
                    self.deferred_remove = True
                    self.no_open = self.no_open or no_open
                return False
            self.deleting = True
            return True

    # ---- tables ------------------------------------------------------------------------

    def _get_device(self, ref: str, write: bool, shared: bool) -> TableDevice:
        shared = shared or self.shared
        key = (ref, write, shared)
        entry = self._table_devices.get(key)
        if entry is not None and entry[0].open.device.dead:
            # the device died (a lost NBD server): the table that holds it keeps it, a new
            # table opens the reference afresh (a mirror reloaded with its leg back)
            self._retired_devices[id(entry[0])] = entry
            del self._table_devices[key]
            entry = None
        if entry is None and self.graph is not None:
            self.graph.check_ref(self, ref)  # before the open: an open of a cycle may hang
        if entry is None and ref.startswith(interposer.PREFIX):
            open_, name = self._open_interposed(ref[len(interposer.PREFIX):], write)
            entry = self._table_devices[key] = [TableDevice(ref, name, open_, True), 0]
        elif entry is None:
            open_, name = self._resolver(ref, write, None if shared else DM_HOLDER)
            if open_.device is self or open_.device.whole is self:
                open_.close()
                raise DMError(errno.EINVAL, f"device {self.name} cannot map onto itself "
                              f"(or one of its partitions: {ref})")
            open_.device.link_holder(self)
            open_.reports_failures = True
            entry = self._table_devices[key] = [TableDevice(ref, name, open_, shared), 0]
        entry[1] += 1
        return entry[0]

    def _open_interposed(self, ref: str, write: bool) -> tuple[BlockOpen, str]:
        if not self.interpose:
            raise DMError(errno.EINVAL, f"{interposer.PREFIX}{ref}: device {self.name} was not created "
                          "with --interpose")
        dev = self.lookup_mapped(ref)
        if dev is None:
            raise DMError(errno.EINVAL, f"{interposer.PREFIX}{ref}: only a mapped device can be "
                          "interposed (map the file or block device with linear first)")
        open_ = interposer.open_view(dev, self, write)
        dev.link_holder(self)
        return open_, f"{interposer.PREFIX}{DM_MAJOR}:{dev.minor}"

    def _put_device(self, dev: TableDevice) -> None:
        key = (dev.ref, dev.open.write_mode, dev.shared)
        entry = self._table_devices.get(key)
        slot: dict = self._table_devices
        if entry is None or entry[0] is not dev:
            key, slot = id(dev), self._retired_devices
            entry = slot.get(key)
            if entry is None:
                return
        entry[1] -= 1
        if entry[1] == 0:
            del slot[key]
            below = dev.open.device
            (below.dev if isinstance(below, interposer.InterposedView) else below).unlink_holder(self)
            dev.open.close()

    def build(self, text: str, read_only: bool) -> Table:
        """Build `text` into a table of this device without installing it (it already opens and
        claims its devices; `Table.destroy` releases them)."""
        ctx = TargetContext(self._get_device, self._put_device, read_only, self.name, self.table_event)
        return build_table(text, ctx)

    def set_inactive(self, table: Table) -> None:
        """Put a built table in the inactive slot, replacing any inactive table; ELOOP (and
        `table` destroyed) if it would close a dependency cycle, checked atomically with the
        install so that two loads cannot each close half of a cycle."""
        try:
            with self._graph_lock():
                if self.graph is not None:
                    self.graph.check_table(self, table, keep=self.live)
                old, self.inactive = self.inactive, table
        except BaseException:
            table.destroy()
            raise
        if old is not None:
            old.destroy()

    def check_table(self, table: Table, keep_inactive: bool = False) -> None:
        """ELOOP if `table`, as this device's next inactive table (or, with `keep_inactive`, its
        next live one beside the inactive one), would close a dependency cycle."""
        if self.graph is not None:
            with self.graph.lock:
                self.graph.check_table(self, table, keep=self.inactive if keep_inactive else self.live)

    def _graph_lock(self):  # noqa: ANN202 - a context manager
        return self.graph.lock if self.graph is not None else contextlib.nullcontext()

    def check_resume(self) -> None:
        """Refuse (ELOOP) to resume an inactive table that would close a dependency cycle now:
        a name that an NBD reference of another table resolves to may have changed since the
        load. Called before the suspend that a resume starts with."""
        table = self.inactive
        if table is not None and self.graph is not None:
            with self.graph.lock:
                self.graph.check_table(self, table)

    def load(self, text: str, read_only: bool) -> None:
        """Build `text` into the inactive slot, replacing any inactive table."""
        self.set_inactive(self.build(text, read_only))

    def clear(self) -> None:
        old, self.inactive = self.inactive, None
        if old is not None:
            old.destroy()

    def suspend(self, *, noflush: bool = False, nolockfs: bool = False) -> None:
        """Block new I/O and wait for in-flight I/O; freeze the holder unless `nolockfs`."""
        if self.begin_suspend(nolockfs=nolockfs):
            self.drain()
            self.end_suspend(noflush=noflush)

    def begin_suspend(self, *, nolockfs: bool = False) -> bool:
        """First step of suspend: freeze the holder, presuspend targets, hold new I/O.

        Returns False if the device is already suspended or suspending. EBUSY while opens do
        I/O that a suspend cannot hold (`pin_kernel_io`)."""
        if self.suspended or self._blocked:
            return False
        with self._cond:
            if self.kernel_io_opens:
                raise DMError(errno.EBUSY, f"device {self.name} has {self.kernel_io_opens} open(s) whose I/O "
                              "the kernel does itself (FUSE passthrough), which a suspend cannot hold: "
                              "close them first")
            self._suspending = True
        try:
            return self._begin_suspend(nolockfs)
        finally:
            with self._cond:
                self._suspending = False

    def _begin_suspend(self, nolockfs: bool) -> bool:
        if self.live is not None and not nolockfs and self.holder_ops and self.holder_ops.freeze:
            self.holder_ops.freeze()
            self._frozen = True  # DMF_FROZEN: resume thaws only what suspend froze
        if self.live is not None and not nolockfs and self.freeze_hook is not None:
            try:
                self._thaw_fs = self.freeze_hook(self)  # freeze_bdev: filesystems mounted outside
            except BaseException:
                self._thaw_holder()
                raise
        else:
            self._thaw_fs = None
        if self.live is not None:
            for target in self.live.targets:
                target.presuspend()
        with self._cond:
            self._blocked = True
        self._drop_collapsed()
        return True

    # ---- opens that do their I/O in the kernel (FUSE passthrough) ----------------------

    def kernel_io_file(self, write: bool) -> int | None:
        """The fd of the regular file that this device maps byte for byte (its live table is
        one linear target at offset 0 of a file as big as the device, with no interposer), so
        that the kernel may do an open's I/O on that file itself; None otherwise."""
        table = self.live
        if table is None or self.interposers or len(table.targets) != 1:
            return None
        through = table.targets[0].passthrough()
        if through is None or through[1] != 0:
            return None
        open_ = through[0].open
        disk = open_.device
        if not isinstance(disk, FileDisk) or disk.dead or \
                (write and (table.read_only or not open_.write_mode or disk.read_only)):
            return None
        try:
            st = os.fstat(disk.fd)
        except OSError:
            return None
        return disk.fd if stat.S_ISREG(st.st_mode) and st.st_size == self.size else None

    def pin_kernel_io(self, write: bool) -> int | None:
        """Count one more open whose reads and writes the kernel does on the file itself (a
        FUSE passthrough open), if the device maps one file byte for byte (`kernel_io_file`)
        and is not suspended or suspending; returns that file's fd, else None. While such
        opens exist, suspends (and so reloads and interposers) are refused with EBUSY: they
        could not hold that I/O. `unpin_kernel_io` when the open closes."""
        with self._cond:
            if self._blocked or self.suspended or self._suspending:
                return None
            fd = self.kernel_io_file(write)
            if fd is not None:
                self.kernel_io_opens += 1
            return fd

    def unpin_kernel_io(self) -> None:
        with self._cond:
            self.kernel_io_opens -= 1

    def drain(self) -> None:
        """Wait until no I/O is in flight (or until the suspend was undone)."""
        with self._cond:
            while self._in_flight and self._blocked:
                self._cond.wait()

    def end_suspend(self, *, noflush: bool = False) -> None:
        if self.suspended or not self._blocked:
            return
        if self.live is not None:
            for target in self.live.targets:
                target.postsuspend()
            if not noflush:
                try:
                    self.live.flush()
                except DMError:
                    pass  # a flush failure is reported by the next flush, not by suspend
        self.suspended = True

    def resume(self) -> bool:
        """Swap in the inactive table if any, then let I/O flow. Returns True if the size changed."""
        if self.inactive is None:
            if self.live is None:
                if self.suspended:
                    raise DMError(errno.EINVAL, f"device {self.name} has no table to resume with; load one first")
                return False
            if not self.suspended:
                return False
        resized = False
        if self.inactive is not None:
            self.check_resume()
            resized = self._swap_in(self.inactive, from_inactive=True)
        elif self.live is not None:
            for target in self.live.targets:
                target.preresume()
        self._release()
        return resized

    def resume_with(self, table: Table) -> bool:
        """Resume with `table` as the live table, leaving the inactive slot alone (a saved
        live table that restore builds late). Returns True if the size changed."""
        resized = self._swap_in(table)
        self._release()
        return resized

    def _swap_in(self, new: Table, *, from_inactive: bool = False) -> bool:
        self.suspend(noflush=True, nolockfs=True)
        try:
            new.check_areas()
        except DMError:
            # as the kernel's do_resume when dm_swap_table fails: the device stays suspended
            # and the inactive table is destroyed
            if from_inactive:
                self.inactive = None
                new.destroy()
            raise
        old = self.live
        for target in new.targets:
            target.preresume()
        self.live, self.inactive = new, None if from_inactive else self.inactive
        self.size = new.size
        self.logical_block_size = new.logical_block_size
        self.read_only = new.read_only
        if old is not None:
            old.destroy()
        return old is None or old.size != new.size

    def _thaw_holder(self) -> None:
        """Undo the holder's freeze of a suspend that failed before it held I/O."""
        thaw = self.holder_ops.thaw if self._frozen and self.holder_ops else None
        self._frozen = False
        if thaw:
            thaw()

    def _release(self) -> None:
        """The end of every resume: let I/O flow, resume the targets, thaw what suspend froze."""
        thaw = self.holder_ops.thaw if self._frozen and self.holder_ops else None
        self._frozen = False
        thaw_fs, self._thaw_fs = self._thaw_fs, None
        with self._cond:
            self._blocked = False
            self._cond.notify_all()
        self.suspended = False
        self._drop_collapsed(wait=False)   # those above may collapse through this one again
        if self.live is not None:
            for target in self.live.targets:
                target.resume()
        if thaw_fs:
            thaw_fs()
        if thaw:
            thaw()

    def destroy(self) -> None:
        """Release both tables (at removal). I/O that still arrives fails with EIO."""
        with self._cond:
            self._blocked = False
            self._cond.notify_all()
        self._drop_collapsed(wait=False)
        for slot in ("inactive", "live"):
            table = getattr(self, slot)
            setattr(self, slot, None)
            if table is not None:
                table.destroy()
        self.size = 0

    def table_event(self) -> None:
        """A target signalled an event (the kernel's `dm_table_event`)."""
        self.event_nr += 1
        self._event_hook(self)

    # ---- collapsed remapping (userdm.dm.collapse) ---------------------------------------

    def _collapse(self) -> collapse.Flat | None:
        """Build the Flat of the live table (with `_lock` held)."""
        self._flat_stale = False
        self._flat = collapse.build(self.live, _flat_below) if self.live is not None else None
        return self._flat

    def flat_for_above(self) -> collapse.Flat | None:
        """This device's Flat for a device stacked on it to follow a chain through, or None
        while it must be entered (suspended or suspending, interposed, dead, no table)."""
        with self._lock:
            if self._blocked or self.interposers or self.dead or self.live is None:
                return None
            return self._flat if not self._flat_stale else self._collapse()

    def _drop_collapsed(self, wait: bool = True) -> None:
        """Drop the Flats of this device and of every device stacked above it; with `wait`,
        until no request uses a dropped one (they may bypass this device's own count)."""
        dropped = []
        for md in [self, *_stacked_above(self)]:
            with md._lock:
                old, md._flat, md._flat_stale = md._flat, None, True
                if old is not None:
                    old.retired = True
                    dropped.append((md, old))
        for _md, old in dropped:
            for watcher in list(old.watchers):
                watcher()
        if wait:
            for md, old in dropped:
                with md._lock:
                    while old.users:
                        md._cond.wait()

    def lend_flat(self, watcher: Callable[[], None]) -> collapse.Flat | None:
        """The live table's Flat, counted as one user until `return_flat`, for I/O done
        elsewhere (an NBD worker process, `userdm.export.nbd.offload`); None while the device
        is suspended or suspending, interposed, dead or without a Flat. When the Flat is
        dropped, `watcher()` is called, and a suspend waits until it is returned: whoever
        borrowed it must stop using it and return it promptly."""
        with self._lock:
            if self._blocked or self.suspended or self.interposers or self.dead or self.live is None:
                return None
            flat = self._flat if not self._flat_stale else self._collapse()
            if flat is None:
                return None
            flat.users += 1
            flat.watchers.append(watcher)
            return flat

    def return_flat(self, flat: collapse.Flat, watcher: Callable[[], None]) -> None:
        """Give back a Flat from `lend_flat`."""
        with self._lock:
            flat.users -= 1
            if watcher in flat.watchers:
                flat.watchers.remove(watcher)
            if flat.retired and not flat.users:
                self._cond.notify_all()

    # ---- the data path ------------------------------------------------------------------

    def _enter(self):  # noqa: ANN202 - Table, or a collapse.Flat of the live one
        with self._lock:
            while self._blocked:
                self._cond.wait()
            if self.interposers:
                table = self.interposers[-1]
            else:
                table = self._flat if not self._flat_stale else self._collapse()
                if table is None:
                    table = self.live
                else:
                    table.users += 1
            if table is None:
                raise DMError(errno.EIO, f"device {self.name} has no live table (mapping table unavailable)")
            self._in_flight += 1
            return table

    def _leave(self, path=None) -> None:  # noqa: ANN001
        with self._lock:
            self._in_flight -= 1
            if path.__class__ is collapse.Flat:
                path.users -= 1
                if path.retired and not path.users:
                    self._cond.notify_all()
            if self._blocked and not self._in_flight:
                self._cond.notify_all()

    def enter_below(self, front: "MappedDevice"):  # noqa: ANN201 - Table or MappedDevice
        """The I/O path just below interposer `front` (its view of this device). Never waits for
        a suspend: the request is part of one that already entered (or of `front`'s own)."""
        with self._cond:
            at = self.interposers.index(front) if front in self.interposers else len(self.interposers)
            below = self.interposers[at - 1] if at else self.live
            if below is None:
                raise DMError(errno.EIO, f"device {self.name} has no live table (mapping table unavailable)")
            self._in_flight += 1
            return below

    def switch(self, change: Callable[[], object]) -> None:
        """Change the I/O path with the device frozen and drained, without swapping tables:
        freeze the holder, hold new I/O, drain, `change()`, then release and thaw. If the device
        is already suspended, its I/O stays held until its own resume."""
        started = self.begin_suspend()
        if started:
            self.drain()
            self.end_suspend(noflush=True)
        try:
            change()
        finally:
            if started:
                for target in self.live.targets if self.live is not None else ():
                    target.preresume()
                self._release()

    def leave_below(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._blocked and not self._in_flight:
                self._cond.notify_all()

    def readinto(self, offset: int, buf: memoryview) -> None:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                if table.read(offset, buf):
                    return
                table = self._through_table(table)
            table.readinto(offset, buf)
        finally:
            self._leave(table)

    def splice_into(self, offset: int, length: int, pipe: int) -> bool:
        """Move the `length` bytes at `offset` into the pipe `pipe` by reference when they lie
        whole in one file below a collapsed table (a FUSE reply then costs one copy, not two);
        False otherwise, and the caller reads them (the pipe may hold a part: drain it)."""
        table = self._enter()
        try:
            where = table.place(offset, length) if table.__class__ is collapse.Flat else None
            return where is not None and collapse.splice_file(where[0], where[1], length, pipe)
        finally:
            self._leave(table)

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                if table.write(offset, data, fua):
                    return
                table = self._through_table(table)
            table.write(offset, memoryview(data), fua)
        finally:
            self._leave(table)

    def _through_table(self, flat: collapse.Flat) -> Table:
        """A request the Flat did not do goes through the table: it stops being a user of
        the Flat first (it may wait for a device below, which may wait for the Flat)."""
        with self._lock:
            flat.users -= 1
            if flat.retired and not flat.users:
                self._cond.notify_all()
        return flat.table

    def flush(self) -> None:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                table = self._through_table(table)
            table.flush()
        finally:
            self._leave(table)

    def discard(self, offset: int, length: int) -> None:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                table = self._through_table(table)
            table.discard(offset, length)
        finally:
            self._leave(table)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                table = self._through_table(table)
            table.write_zeroes(offset, length, may_unmap)
        finally:
            self._leave(table)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        table = self._enter()
        try:
            if table.__class__ is collapse.Flat:
                table = self._through_table(table)
            return table.block_status(offset, length)
        finally:
            self._leave(table)

    # ---- failures and death of underlying devices (userdm.block.failure) -------------

    def failure_below(self, lower: BlockDevice, offset: int, length: int) -> list[tuple[int, int]]:
        """The byte ranges of this device that its live table maps onto the failed range of
        `lower`, through each target's `failure` hook."""
        table = self.live
        if table is None:
            return []
        return merge_ranges((target.begin * SECTOR + off, n) for target in table.targets
                            for off, n in target.failure(lower, offset, length))

    def dies_with(self, lower: BlockDevice) -> bool:
        """A mapped device dies with any device its live table uses, unless the target that
        uses it carries on without it (`Target.device_lost`: a mirror with handle_errors)."""
        table = self.live
        return table is not None and any(dev.device is lower and not target.device_lost(lower)
                                         for target in table.targets for dev in target.devices())

    # ---- reporting ---------------------------------------------------------------------

    def holders_description(self) -> str:
        return describe_holder(self.holder) if self.holder is not None else "-"


def _flat_below(device: BlockDevice) -> collapse.Flat | None:
    """`collapse.build`'s view of a device below: only plain mapped devices are followed."""
    return device.flat_for_above() if type(device) is MappedDevice else None


def _stacked_above(md: MappedDevice) -> list[MappedDevice]:
    """Every mapped device whose table reaches `md`, directly or through others."""
    seen: dict[int, MappedDevice] = {}
    todo = [md]
    while todo:
        dev = todo.pop()
        for user in list(dev.holder_links):
            if isinstance(user, MappedDevice) and id(user) not in seen and user is not md:
                seen[id(user)] = user
                todo.append(user)
    return list(seen.values())
