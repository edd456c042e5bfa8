"""The device-mapper: the registry of mapped devices and every control operation on them.

`Mapper` is the in-process equivalent of the kernel's DM ioctl interface, named after the
dmsetup verbs (`create`, `load`, `resume`, `suspend`, `remove`, `rename`, `info`, `table`,
`status`, `deps`, `message`, `wait` ...). Its results are plain dicts and lists, so the
daemon can send them over the control socket unchanged and `userdm.connect()` returns the
same shapes. It keeps the kernel's rules: unique names and uuids, minors, EBUSY while open,
deferred removal that fires after the last close and cascades down stacks, cancellation by
`@cancel_deferred_remove`. With a `state_dir` every change is committed to the state store
(`userdm.dm.state`) before it takes effect, and the devices come back on start
(`userdm.dm.restore`).

Locking: the registry lock `_lock` covers only the bookkeeping of names, uuids and minors (and
partitions' names); it is never held across I/O, table building or a state commit. Every other
operation on a device holds that device's `op_lock` (`MappedDevice`), so a slow create (a huge
table, a slow NBD server) or a stuck suspend delays only operations on that device. Queries
(`info`, `list`, `table`, `status`) take no device lock. `remove_all` removes devices one at a
time. A removal that a last close triggers (deferred, autoclear) while another thread holds
the device's lock is done by that thread when it releases the lock (`_reap`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..block.backing import BackingStores
from ..block.device import SECTOR, BlockDevice, BlockOpen, HolderOps
from ..errors import DMError, clipped, quoted
from ..version import __version__
from . import state as state_file
from .cycles import DependencyGraph
from .events import EventLog
from .hooks import Hook, callbacks_ops
from .interposer import InterposedView, attach, detach, interposed_device
from .mapped import DM_MAJOR, MappedDevice
from .names import MINOR_LIMIT, check_name, check_uuid
from .partitioned import BLKEXT_MAJOR, MappedPartition, MappedPartitions
from .restore import Restorer, saved_lines
from .table import Table, split_args
from .target import registered

log = logging.getLogger("userdm.dm")

DRIVER_VERSION = (4, 50, 0)
REMOVE_RETRIES = 25          # dmsetup's DM_IOCTL_RETRIES
REMOVE_RETRY_DELAY = 0.2     # dmsetup's DM_RETRY_USLEEP_DELAY
REMOVE_ALL_WAIT = 1.0        # how long remove_all waits for a device that another operation holds


class Mapper:
    """All mapped devices of one daemon (or of one test, in process).

    With `restore=False` the saved devices are not restored by the constructor: the daemon
    calls `restore()` once its NBD server listens (a table may name the daemon's own export)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 fuse_dir: str | os.PathLike[str] | None = None, direct_io: bool = False,
                 restore: bool = True) -> None:
        #: the registry lock: names, uuids and minors only (see "Locking" in the module docstring)
        self._lock = threading.RLock()
        self._devices: dict[str, MappedDevice] = {}
        self._by_uuid: dict[str, MappedDevice] = {}
        self._minors: dict[int, MappedDevice] = {}
        #: names promised to a rename whose state commit is under way
        self._reserved: set[str] = set()
        #: every `dm-N` below this is taken (a hint that makes `_free_name` O(1) amortized)
        self._name_hint = 0
        #: every minor below this is taken
        self._minor_hint = 0
        #: devices marked for deferred removal
        self._deferred: set[MappedDevice] = set()
        self._events = threading.Condition()
        self.backing = BackingStores(direct=direct_io)
        self.fuse_dir = os.fspath(fuse_dir) if fuse_dir else None
        self.state_dir = os.fspath(state_dir) if state_dir else None
        self._log = EventLog()
        #: hands out an open as an NBD client socket for `create(open_fd=True)` and `open`:
        #: an object with `socket_for_open(handle, name) -> socket`, provided by the export
        #: layer above the core (the daemon's NBD server; `userdm.Mapper` brings its own)
        self.open_sockets: Any = None
        #: this daemon's own NBD listeners, Unix socket paths (str) and TCP (host, port): a
        #: table over one of them is an edge to the device it exports (set by the daemon)
        self.nbd_addresses: list[Any] = []
        #: lockfs, provided by the export layer above (the daemon's block devices,
        #: `userdm.export.blockdev`): `freeze(device)` freezes the filesystems mounted on the
        #: device and returns their thaw callable; None: nothing outside is frozen
        self.lockfs: Any = None
        #: holders outside the core that a removal must let go first (the block devices):
        #: `release(device, deferred)` detaches them, or raises EBUSY (in use, not deferred)
        self.outside_holders: Any = None
        #: why this daemon serves no kernel block devices (no FUSE, no /dev/loop-control):
        #: `create --blockdev` is refused with it; None: the flag is taken (in process, it is
        #: saved for a daemon that serves this state directory)
        self.no_block_devices: DMError | None = None
        #: refuses tables that would make a device depend on itself (`userdm.dm.cycles`)
        self.graph = DependencyGraph(mapped_ref=self._mapped_ref, by_name=self._export_device,
                                     devices=lambda: list(self._devices.values()),
                                     nbd_addresses=lambda: self.nbd_addresses)
        self._exclusive_opens = itertools.count(1)
        self._closing = threading.Event()
        #: partitions of mapped devices (NAME1, NAME2 ...), a side table: see dm/partitioned.py
        self.partitions = MappedPartitions(self._lock, self._devices.get, self._emit, self._emit)
        self._register_schemes()
        self._store = state_file.StateStore(self.state_dir) if self.state_dir else None
        #: disk sequence numbers: each device gets the next one; the store keeps the last one
        self._diskseq = itertools.count((self._store.last_diskseq() if self._store is not None else 0) + 1)
        self._restorer = Restorer(self)
        if restore:
            self.restore()

    def _register_schemes(self) -> None:
        from ..block import rbd_image
        rbd_image.register(self.backing)   # librbd itself is imported by the first rbd: open
        try:
            from ..nbd import client as nbd_client
        except ImportError:
            return
        register = getattr(nbd_client, "register", None)
        if register is not None:
            register(self.backing)

    # ---- lookup --------------------------------------------------------------------------

    def _find(self, name: str) -> MappedDevice:
        md = self._devices.get(name)
        if md is None:
            part = self.partitions.get(name)
            if part is not None:
                raise DMError(errno.ENXIO, f"{name} is partition {part.number} of {part.whole.name}, "
                              "not a mapped device")
            raise DMError(errno.ENXIO, f"device {quoted(name)} does not exist")
        return md

    def _by_minor(self, minor: int) -> MappedDevice | None:
        return self._minors.get(minor)

    def find_name(self, *, uuid: str | None = None, major: int | None = None,
                  minor: int | None = None) -> str:
        """The name of the device with this uuid or device number (dmsetup's `-u`, `-j/-m`)."""
        with self._lock:
            md = None
            if uuid is not None:
                md = self._by_uuid.get(uuid)
            elif minor is not None and major in (None, DM_MAJOR):
                md = self._minors.get(minor)
            if md is not None and self._devices.get(md.name) is md:
                return md.name
            part = self.partitions.by_minor(minor) if major == BLKEXT_MAJOR and minor is not None else None
            if part is not None:
                return part.name
        what = f"uuid {uuid!r}" if uuid is not None else f"device number {major}:{minor}"
        raise DMError(errno.ENXIO, f"no device with {what}")

    def _mapped_ref(self, ref: str) -> BlockDevice | None:
        """The mapped device (or partition of one) a table reference names, or None if it
        names something else."""
        name = None
        if ref.startswith("/dev/mapper/"):
            name = ref[len("/dev/mapper/"):]
        elif self.fuse_dir and os.path.dirname(ref.rstrip("/")) == self.fuse_dir.rstrip("/"):
            name = os.path.basename(ref)
        elif ":" in ref and "/" not in ref:
            major, _, minor = ref.partition(":")
            if major.isdigit() and minor.isdigit() and int(major) == DM_MAJOR:
                md = self._by_minor(int(minor))
                if md is None or md.deleting:
                    raise DMError(errno.ENXIO, f"no mapped device {clipped(ref)}")
                return md
            if major.isdigit() and minor.isdigit() and int(major) == BLKEXT_MAJOR:
                part = self.partitions.by_minor(int(minor))
                if part is None:
                    raise DMError(errno.ENXIO, f"no partition {clipped(ref)}")
                return part
            return None
        if name is None:
            return None
        md = self._devices.get(name) or self.partitions.get(name)
        if md is None:
            raise DMError(errno.ENXIO, f"{clipped(ref)}: no mapped device named {quoted(name)}")
        return md

    def _resolve(self, ref: str, write: bool, holder: object | None) -> tuple[BlockOpen, str]:
        """Open a table's device reference (the resolver given to every MappedDevice)."""
        md = self._mapped_ref(ref)
        if md is not None:
            return md.open(write=write, holder=holder), "{}:{}".format(*md.devno)
        if ":" in ref and "/" not in ref and not self.backing.is_scheme(ref):
            major, _, minor = ref.partition(":")
            if not (major.isdigit() and minor.isdigit()):
                raise DMError(errno.EINVAL, f"{quoted(ref)} is not MAJOR:MINOR, an absolute path or a URL")
            path = block_node(int(major), int(minor))
            opened = self.backing.open(path, write=write, holder=holder)
            return opened, ref
        opened = self.backing.open(ref, write=write, holder=holder)
        devno = opened.device.devno
        return opened, f"{devno[0]}:{devno[1]}" if devno else ref

    # ---- the registry: names, uuids, minors (under `_lock`, never across slow work) ----------

    def _name_taken(self, name: str) -> bool:
        return name in self._devices or name in self._reserved or self.partitions.get(name) is not None

    def _free_name(self) -> str:
        """A name for `create(None, ...)`: dm-N for the lowest N not taken (the kernel's disk name)."""
        n = self._name_hint
        while self._name_taken(f"dm-{n}"):
            n += 1
        self._name_hint = n
        return f"dm-{n}"

    def _name_freed(self, name: str) -> None:
        if name.startswith("dm-") and name[3:].isdigit() and name[3:] == str(int(name[3:])):
            self._name_hint = min(self._name_hint, int(name[3:]))

    def _allocate_minor(self, minor: int | None) -> int:
        if minor is not None:
            if not isinstance(minor, int) or isinstance(minor, bool) or not 0 <= minor < MINOR_LIMIT:
                raise DMError(errno.ENXIO, f"minor {minor!r} is out of range (0 to {MINOR_LIMIT - 1})")
            if minor in self._minors:
                # the kernel's specific_minor: idr_alloc's ENOSPC becomes EBUSY
                raise DMError(errno.EBUSY, f"minor {minor} is already in use")
            return minor
        minor = self._minor_hint
        while minor in self._minors:
            minor += 1
        if minor >= MINOR_LIMIT:
            raise DMError(errno.ENXIO, f"no free minor: all {MINOR_LIMIT} are in use")
        self._minor_hint = minor
        return minor

    def _register(self, md: MappedDevice) -> None:
        self._devices[md.name] = md
        self._minors[md.minor] = md
        if md.uuid:
            self._by_uuid[md.uuid] = md

    def _unhash(self, md: MappedDevice) -> None:
        """Forget the device's name and uuid (the kernel's dm_hash_remove); its minor stays
        taken until it is destroyed."""
        with self._lock:
            if self._devices.get(md.name) is md:
                del self._devices[md.name]
                self._name_freed(md.name)
            if md.uuid and self._by_uuid.get(md.uuid) is md:
                del self._by_uuid[md.uuid]
            self._deferred.discard(md)
            self.partitions.drop(md)

    def _release_minor(self, md: MappedDevice) -> None:
        with self._lock:
            if self._minors.get(md.minor) is md:
                del self._minors[md.minor]
                self._minor_hint = min(self._minor_hint, md.minor)

    # ---- per-device operations ------------------------------------------------------------

    @contextmanager
    def _op(self, name: str) -> Iterator[MappedDevice]:
        """Find device `name` and hold its `op_lock` for one control operation; ENXIO if it
        was removed (or renamed) while we waited for the lock."""
        md = self._find(name)
        self._lock_device(md)
        try:
            if self._devices.get(name) is not md or md.deleting:
                raise DMError(errno.ENXIO, f"device {quoted(name)} does not exist (it was removed or renamed)")
            yield md
        finally:
            self._unlock_device(md)

    def _lock_device(self, md: MappedDevice, *, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        if md.op_owner == me:
            raise RuntimeError(f"device {md.name}: nested control operation in one thread")
        if not md.op_lock.acquire(blocking, timeout if blocking else -1):
            return False
        md.op_owner = me
        return True

    def _unlock_device(self, md: MappedDevice, *, reap: bool = True) -> None:
        md.op_owner = None
        md.op_lock.release()
        if md.deleting:
            return
        if md.reap_pending or (reap and md.deferred_remove and not md.opens):
            self._reap(md)

    def _reap(self, md: MappedDevice) -> None:
        """Remove `md` if it is unopened and due to go (deferred removal, autoclear after its
        last close). If another operation holds its lock, that one does it when it ends."""
        md.reap_pending = True
        if md.op_owner == threading.get_ident() or not self._lock_device(md, blocking=False):
            return
        md.reap_pending = False
        try:
            if self._devices.get(md.name) is md and not md.deleting and (md.deferred_remove or md.autoclear) \
                    and not md.interposers and md.lock_for_deletion():
                try:
                    self._commit("remove", state_file.drop_device(md.minor))
                except DMError as exc:
                    md.undo_deletion()
                    log.error("%s stays: %s", md.name, exc)
                    return
                self._remove_locked(md)
        finally:
            self._unlock_device(md, reap=False)

    def _commit(self, what: str, *changes: list) -> None:
        """Make a change durable before it takes effect (DMError with the errno if not)."""
        if self._store is not None:
            self._store.commit(what, *changes)

    def _saved(self, md: MappedDevice, live: Table | None = None) -> state_file.SavedDevice:
        return state_file.SavedDevice(
            md.name, md.minor, md.uuid, md.shared, md.autoclear, md.max_opens, md.no_open, md.interpose,
            md.suspended, md.deferred_remove, md.event_nr,
            state_file.SavedTable(live.text, live.read_only) if live is not None else None,
            blockdev=md.blockdev, diskseq=md.diskseq)

    # ---- create / load / resume / suspend --------------------------------------------

    def create(self, name: str | None, table: str | None = None, *, uuid: str | None = None,
               readonly: bool = False, minor: int | None = None, shared: bool = False,
               autoclear: bool = False, max_opens: int | None = None, open_fd: bool = False,
               holder: object | None = None, interpose: bool = False,
               blockdev: bool = False) -> dict[str, Any]:
        """dmsetup create: make the device, and with `table` also load and resume it.

        The name, uuid and minor are taken at once (a second create of the name gets EBUSY);
        the table is built under the device's own lock, then the device and its table are
        committed to the state store, then it is resumed. If anything fails the device is
        removed again, as libdm does. userdm's
        additions: `shared` (claim no underlying device), `autoclear` (removed at its last
        close), `max_opens` (refuse opens beyond N with EBUSY), `name=None` (pick a free
        name), `interpose`: its table may take over a device in use, `[interpose]DEV`
        (`userdm.dm.interposer`), `blockdev`: a kernel block device over it (when the daemon
        serves them, `userdm.export.blockdev`), and `open_fd`: open the new device in the same step, under its lock,
        and return the open as `info["fd"]`, an NBD client socket that the caller owns (seed
        001: there is no moment at which the device exists without that open)."""
        if max_opens is not None and (not isinstance(max_opens, int) or isinstance(max_opens, bool)
                                      or max_opens < 1):
            raise DMError(errno.EINVAL, f"--max-opens {max_opens!r}: the limit must be at least 1")
        if open_fd and table is None:
            raise DMError(errno.EINVAL, f"cannot open device {name} at creation without a table")
        if blockdev and self.no_block_devices is not None:
            raise DMError(self.no_block_devices.errno, f"create {quoted(str(name))} --blockdev: "
                          f"{self.no_block_devices.message}")
        uuid = check_uuid(uuid)
        if name is not None:
            name = check_name(name)
        with self._lock:
            if name is None:
                name = self._free_name()
            if self._name_taken(name):
                raise DMError(errno.EBUSY, f"a device named {quoted(name)} already exists")
            if uuid and uuid in self._by_uuid:
                raise DMError(errno.EBUSY, f"a device with uuid {uuid!r} already exists")
            minor = self._allocate_minor(minor)
            md = self._new_device(name, uuid, minor, shared=shared, autoclear=autoclear,
                                  max_opens=max_opens, interpose=interpose, blockdev=blockdev)
            md.diskseq = next(self._diskseq)
            self._lock_device(md)  # a new lock: never waits
            self._register(md)
        try:
            info = self._create_locked(md, table, readonly, open_fd, holder)
        finally:
            self._unlock_device(md)
        if table is not None:
            self.partitions.scan_after_resume(md)
        return info

    def _new_device(self, name: str, uuid: str, minor: int, **flags: Any) -> MappedDevice:
        md = MappedDevice(name, uuid, minor, self._resolve, **flags)
        md.lookup_mapped = self._mapped_ref
        md.graph = self.graph
        md._event_hook = self._table_event
        md.event_observer = self._emit
        md.on_last_close(self._last_close)
        md.freeze_hook = self._freeze_outside
        return md

    def _freeze_outside(self, md: MappedDevice) -> Callable[[], None] | None:
        lockfs = self.lockfs
        return lockfs.freeze(md) if lockfs is not None else None

    def _restore_shell(self, saved: state_file.SavedDevice) -> MappedDevice:
        """A saved device without its tables yet (`userdm.dm.restore`); nothing is committed."""
        with self._lock:
            if self._name_taken(saved.name) or saved.minor in self._minors or \
                    (saved.uuid and saved.uuid in self._by_uuid):
                raise DMError(errno.EEXIST, f"the name, uuid or minor of {saved.name!r} is taken twice")
            md = self._new_device(saved.name, saved.uuid, saved.minor, shared=saved.shared,
                                  autoclear=saved.autoclear, max_opens=saved.max_opens, interpose=saved.interpose,
                                  blockdev=saved.blockdev)
            md.event_nr = saved.event_nr
            md.diskseq = saved.diskseq or self._give_diskseq(saved)
            md.deferred_remove = saved.deferred_remove
            md.no_open = saved.no_open
            md.saved_suspended = saved.suspended
            for slot in ("live", "inactive"):
                table = getattr(saved, slot)
                if table is not None:
                    setattr(md, f"saved_{slot}", (table.text, table.read_only))
            self._register(md)
            if md.deferred_remove:
                self._deferred.add(md)
            return md

    def _give_diskseq(self, saved: state_file.SavedDevice) -> int:
        """A device saved by a version without diskseq gets one at its restore."""
        value = next(self._diskseq)
        try:
            self._commit("diskseq", state_file.diskseq(saved.minor, value))
        except DMError as exc:
            log.error("cannot save the disk sequence number of %s: %s", saved.name, exc)
        return value

    def _create_locked(self, md: MappedDevice, text: str | None, readonly: bool, open_fd: bool,
                       holder: object | None) -> dict[str, Any]:
        committed = False
        fd = None
        try:
            new = None
            if text is not None:
                new = md.build(text, readonly)
                try:
                    self._check_interpose(md, new)
                except BaseException:
                    new.destroy()
                    raise
                md.set_inactive(new)
            self._commit("create", state_file.device(self._saved(md, new)))
            committed = True
            if new is not None:
                md.resume()
                self._attach(md)
            if open_fd:
                fd = self._open_fd(md, write=not md.read_only, holder=holder)
        except BaseException:
            self._undo_create(md, committed)
            raise
        self._emit({"event": "create", "name": md.name, "size": md.size, "diskseq": md.diskseq})
        info = self._info(md)
        if fd is not None:
            info["fd"] = fd
        return info

    def _undo_create(self, md: MappedDevice, committed: bool) -> None:
        md.deleting = True
        if committed:
            try:
                self._commit("create", state_file.drop_device(md.minor))
            except DMError as exc:  # it comes back at the next start, with its restore error
                log.error("cannot forget the failed create of %s: %s", md.name, exc)
        self._unhash(md)
        md.destroy()
        self._release_minor(md)

    def open(self, name: str, *, readonly: bool = False, exclusive: bool = False,
             holder: object | None = None, diskseq: int | None = None, hook: str | None = None,
             hook_timeout: float | None = None, ops: object | None = None) -> dict[str, Any]:
        """Open a device and return the open as `info["fd"]`, an NBD client socket the caller
        owns (`userdm open NAME -- CMD`). `exclusive` claims the device for a holder of its own,
        as an O_EXCL open does; `holder` claims it for that holder (the same holder may nest).
        With `diskseq`, only the device with that disk sequence number is opened (ENXIO if
        NAME is another device now: the one meant was removed, and NAME created again).
        With `hook` (an executable's absolute path; needs `exclusive` or `holder`) the holder
        registers holder ops that run that hook (`userdm.dm.hooks`), for at most
        `hook_timeout` seconds each; EBUSY if the device has holder ops already. `ops` registers
        callbacks instead (`hooks.callbacks_ops`; the control server passes the `HolderOps` of a
        holder outside the daemon, `userdm.control.holder_channel`)."""
        if (hook is not None or ops is not None) and not exclusive and holder is None:
            raise DMError(errno.EINVAL, f"open {name} {'--hook' if ops is None else 'with ops'}: holder ops need "
                          "an exclusive open (--exclusive or --holder ID)")
        if hook is not None and ops is not None:
            raise DMError(errno.EINVAL, f"open {name}: a holder registers either a hook or ops, not both")
        md = self._find(name)
        if diskseq is not None and md.diskseq != diskseq:
            raise DMError(errno.ENXIO, f"device {name} has disk sequence number {md.diskseq}, not {diskseq}: "
                          f"the device with diskseq {diskseq} no longer exists")
        if exclusive and holder is None:
            holder = f"exclusive open #{next(self._exclusive_opens)}"
        elif isinstance(holder, str):
            holder = sys.intern(holder)  # an id that arrives twice is one holder: it nests
        holder_ops = None
        if hook is not None or ops is not None:
            if md.holder_ops is not None:
                raise DMError(errno.EBUSY, f"device {name} already has holder operations registered "
                              f"(by {md.holders_description()})")
            holder_ops = Hook(hook, md.name, str(holder), hook_timeout).holder_ops() if hook is not None \
                else ops if isinstance(ops, HolderOps) else callbacks_ops(ops, md.name, str(holder))
        fd = self._open_fd(md, write=not (readonly or md.read_only), holder=holder, holder_ops=holder_ops)
        return {**self._info(md), "fd": fd}

    def drop_holder_ops(self, ops: HolderOps) -> None:
        """The holder that registered `ops` is gone (a holder outside the daemon whose control
        connection closed): its registration ends, its open may stay."""
        for md in list(self._devices.values()):
            md.drop_holder_ops(ops)

    def _open_fd(self, md: MappedDevice, *, write: bool, holder: object | None,
                 holder_ops: HolderOps | None = None) -> int:
        if md.live is None:
            raise DMError(errno.ENXIO, f"device {md.name} has no live table to open")
        if self.open_sockets is None:
            raise DMError(errno.EOPNOTSUPP, f"cannot hand out an open of {md.name} as a file descriptor: "
                          "this Mapper has no NBD export (use userdm.Mapper, or a daemon)")
        handle = md.open(write=write, holder=holder, holder_ops=holder_ops)
        return self.open_sockets.socket_for_open(handle, md.name).detach()  # closes it on failure

    def load(self, name: str, table: str, *, readonly: bool = False) -> dict[str, Any]:
        """dmsetup load/reload: build `table` into the inactive slot. The live table is not
        touched; the new table is committed before it is installed."""
        with self._op(name) as md:
            new = md.build(table, readonly)
            try:
                self._check_interpose(md, new)
                md.check_table(new)  # ELOOP before anything is committed
                self._commit("load", state_file.put_table(md.minor, "inactive", new.text, new.read_only))
            except BaseException:
                new.destroy()
                raise
            try:
                md.set_inactive(new)  # checks again, atomically with the install
            except DMError:
                # a concurrent load closed a cycle in between: the store gets the old slot back
                old = md.inactive
                undo = state_file.put_table(md.minor, "inactive", old.text, old.read_only) if old is not None \
                    else state_file.drop_table(md.minor, "inactive")
                try:
                    self._commit("load", undo)
                except DMError as exc:
                    log.error("cannot undo the refused load of %s in the state store: %s", md.name, exc)
                raise
            md.saved_inactive = None
            md.loaded_since_restore = True
            _settle_restore(md)
            self._emit({"event": "load", "name": md.name})
            return self._info(md)

    def _check_interpose(self, md: MappedDevice, table: Table) -> None:
        """An interposer's table names exactly one `[interpose]` device, and always the same one."""
        if not md.interpose:
            return
        views = [d.open.device for d in table.devices() if isinstance(d.open.device, InterposedView)]
        current = interposed_device(md)
        problem = None
        if len(views) != 1:
            problem = f"names {len(views)} devices as [interpose]DEV; an interposer names exactly one"
        elif current is not None and views[0].dev is not current:
            problem = f"interposes {views[0].dev.name}, but the device already interposes {current.name}"
        if problem:
            raise DMError(errno.EINVAL, f"table of {md.name} {problem}")

    def _attach(self, md: MappedDevice) -> None:
        """After an interposer's resume: put it in front of the device it names (once)."""
        dev = interposed_device(md)
        if dev is not None and md not in dev.interposers:
            attach(dev, md)
            self._emit({"event": "interpose", "name": dev.name, "interposer": md.name})

    def clear(self, name: str) -> dict[str, Any]:
        with self._op(name) as md:
            if md.inactive is not None or md.saved_inactive is not None:
                self._commit("clear", state_file.drop_table(md.minor, "inactive"))
            md.clear()
            md.saved_inactive = None
            _settle_restore(md)
            self._emit({"event": "clear", "name": md.name})
            return self._info(md)

    def suspend(self, name: str, *, noflush: bool = False, nolockfs: bool = False) -> dict[str, Any]:
        """Hold new I/O and drain in-flight I/O, under the device's own lock only: a device whose
        I/O is stuck delays operations on itself, never on other devices."""
        with self._op(name) as md:
            was_suspended = md.suspended
            if not was_suspended:
                self._commit("suspend", state_file.flags(md.minor, suspended=True, event_nr=md.event_nr))
            try:
                md.suspend(noflush=noflush, nolockfs=nolockfs)
            except BaseException:  # lockfs failed: the device runs on, and the store says so
                if not was_suspended and not md.suspended:
                    try:
                        self._commit("suspend", state_file.flags(md.minor, suspended=False))
                    except DMError as exc:
                        log.error("cannot undo the failed suspend of %s in the state store: %s", md.name, exc)
                raise
            self._emit({"event": "suspend", "name": md.name, "noflush": noflush, "nolockfs": nolockfs})
            return self._info(md)

    def resume(self, name: str) -> dict[str, Any]:
        """Swap in the inactive table (suspending first if needed) and let I/O flow; a new
        table's partition table is read after the device's lock is released. On a device
        whose saved live table could not be restored (`info["restore_error"]`) and that has
        not been loaded since, resume tries that table again instead."""
        with self._op(name) as md:
            before = md.live
            if md.saved_live is not None and not md.loaded_since_restore:
                self._restorer.retry(md, resumed=True)
                info = self._info(md)
            else:
                info = self._resume_locked(md)
        if md.live is not before and md.live is not None:
            self.partitions.scan_after_resume(md)
        return info

    def partprobe(self, name: str) -> list[dict[str, Any]]:
        """`userdm partprobe NAME` (BLKRRPART): read the device's partition table again and
        return its partitions. EBUSY while one of them is open."""
        return self.partitions.partprobe(self._find(name))

    def _resume_locked(self, md: MappedDevice) -> dict[str, Any]:
        md.check_resume()  # before committing or suspending: a refused resume leaves all as it was
        old_live = md.live
        swap = md.inactive is not None
        # the saved live table back with its key: the store has it in the live slot already
        keyed_live = swap and md.inactive is md.keyless_live
        if swap:
            self._commit("resume", [] if keyed_live else state_file.promote(md.minor),
                         state_file.flags(md.minor, suspended=False, event_nr=md.event_nr))
            md.saved_live = None
        elif md.suspended:
            self._commit("resume", state_file.flags(md.minor, suspended=False, event_nr=md.event_nr))
        old_size = md.size
        new = md.inactive
        if swap and not md.suspended:
            md.suspend(noflush=True, nolockfs=True)  # the kernel's resume suspends first
            self._emit({"event": "suspend", "name": md.name, "noflush": True, "nolockfs": True})
        try:
            resized = md.resume()
        except BaseException:
            if swap and md.live is not new:  # not swapped: the store must say so again
                undo: list = []
                if not keyed_live:
                    # (a table refused at the swap, too small for its device, is gone as in the kernel)
                    undo = state_file.put_table(md.minor, "inactive", new.text, new.read_only) \
                        if md.inactive is new else state_file.drop_table(md.minor, "inactive")
                    if old_live is not None:
                        undo += state_file.put_table(md.minor, "live", old_live.text, old_live.read_only)
                    else:
                        undo += state_file.drop_table(md.minor, "live")
                try:
                    self._commit("resume", undo, state_file.flags(md.minor, suspended=md.suspended))
                except DMError as exc:
                    log.error("cannot undo the failed resume of %s in the state store: %s", md.name, exc)
            raise
        self._attach(md)
        md.keyless_live = None
        if keyed_live and md.saved_inactive is not None:
            try:  # the table saved beside it waited for the inactive slot
                self._restorer.build(md)
            except DMError as exc:
                log.error("%s: its saved inactive table stays unbuilt: %s", md.name, exc)
        _settle_restore(md)
        if resized and old_size:
            md.table_event()  # a size change is an event (and a RESIZE uevent in the kernel)
        self._emit({"event": "resume", "name": md.name, "resized": resized, "size": md.size})
        if resized and old_size:
            self._emit({"event": "resize", "name": md.name, "old_size": old_size, "size": md.size})
        return self._info(md)

    def wipe_table(self, name: str) -> dict[str, Any]:
        """Replace the table by one `error` target of the same size and resume (noflush, nolockfs)."""
        with self._op(name) as md:
            self._wipe_locked(md)
            return self._info(md)

    def _wipe_locked(self, md: MappedDevice) -> None:
        if md.live is None:
            return
        new = md.build(f"0 {md.live.sectors} error", md.live.read_only)
        try:
            self._commit("wipe_table", state_file.drop_table(md.minor, "inactive"),
                         state_file.put_table(md.minor, "live", new.text, new.read_only),
                         state_file.flags(md.minor, suspended=False))
        except BaseException:
            new.destroy()
            raise
        md.set_inactive(new)
        md.saved_inactive = None
        md.suspend(noflush=True, nolockfs=True)
        md.resume()
        self._emit({"event": "load", "name": md.name})

    # ---- remove ------------------------------------------------------------------------

    def remove(self, name: str, *, force: bool = False, deferred: bool = False,
               retry: bool = False, no_open: bool = False) -> dict[str, Any]:
        """dmsetup remove. Busy devices give EBUSY, or with `deferred` are marked for removal;
        `no_open` (seed 002) also refuses every new open until then (ENXIO). The removal is
        committed to the state store first; if that fails, nothing is removed."""
        if no_open and not deferred:
            raise DMError(errno.EINVAL, f"remove {name}: --no-open needs --deferred")
        attempts = REMOVE_RETRIES if retry else 1
        for attempt in range(attempts):
            with self._op(name) as md:
                self._check_interposer_removal(md)
                if force and attempt == 0:
                    self._wipe_locked(md)
                if self.outside_holders is not None and md.opens:
                    self.outside_holders.release(md, deferred)  # EBUSY while a filesystem is mounted
                info = self._info(md)
                if self._remove_if_unopened(md, "remove"):
                    info["deferred_remove"] = False
                    return info
                if deferred:
                    self._commit("remove --deferred", state_file.flags(
                        md.minor, deferred_remove=True, no_open=md.no_open or no_open, event_nr=md.event_nr))
                    if md.lock_for_deletion(mark_deferred=True, no_open=no_open):
                        self._remove_committed(md, "remove --deferred")  # closed meanwhile
                        info["deferred_remove"] = False
                        return info
                    with self._lock:
                        self._deferred.add(md)
                    self._emit({"event": "deferred_remove", "name": md.name})
                    return self._info(md)
                busy = DMError(errno.EBUSY, f"device {name} is open (open count {md.open_count}); "
                               "close it first or use --deferred")
            if attempt + 1 < attempts:
                time.sleep(REMOVE_RETRY_DELAY)
        raise busy

    def _remove_if_unopened(self, md: MappedDevice, what: str) -> bool:
        """With the device's lock held: if it is not open, commit its removal and remove it."""
        if not md.lock_for_deletion():
            return False
        self._remove_committed(md, what)
        return True

    def _remove_committed(self, md: MappedDevice, what: str) -> None:
        """`md` is marked by `lock_for_deletion`: commit its removal (or undo the mark and
        raise), then remove it."""
        try:
            self._commit(what, state_file.drop_device(md.minor))
        except BaseException:
            md.undo_deletion()
            raise
        self._remove_locked(md)

    def remove_all(self, *, force: bool = False, deferred: bool = False) -> dict[str, Any]:
        """Remove every unopened device, one at a time (other requests go in between), repeating
        while stacks come apart; mark or report the rest."""
        progress = True
        while progress:
            progress = False
            for md in self._snapshot():
                if self._try_remove(md, "remove_all"):
                    progress = True
        if force:
            for md in self._snapshot():
                try:
                    self.wipe_table(md.name)
                except DMError:
                    pass
        left = self._snapshot()
        if deferred:
            for md in left:
                try:
                    self.remove(md.name, deferred=True)
                except DMError:
                    pass
            left = self._snapshot()
        return {"left_open": [md.name for md in left]}

    def _try_remove(self, md: MappedDevice, what: str) -> bool:
        """Remove `md` if it is unopened; a device whose lock stays busy for REMOVE_ALL_WAIT
        seconds (a suspend stuck on its I/O) is left alone, as an open one is."""
        if not self._lock_device(md, timeout=REMOVE_ALL_WAIT):
            return False
        try:
            if self._devices.get(md.name) is not md or md.deleting or md.interposers:
                return False
            dev = interposed_device(md)
            if dev is not None and md in dev.interposers and dev.interposers[-1] is not md:
                return False
            if self.outside_holders is not None and md.opens:
                try:
                    self.outside_holders.release(md, False)  # an unmounted block device goes
                except DMError:
                    return False  # mounted: left alone, as an open device is
            return self._remove_if_unopened(md, what)
        finally:
            self._unlock_device(md)

    def _snapshot(self) -> list[MappedDevice]:
        with self._lock:
            return list(self._devices.values())

    def _check_interposer_removal(self, md: MappedDevice) -> None:
        if md.interposers:
            raise DMError(errno.EBUSY, f"device {md.name} is interposed by "
                          f"{', '.join(f.name for f in md.interposers)}; remove that first")
        dev = interposed_device(md)
        if dev is not None and md in dev.interposers and dev.interposers[-1] is not md:
            raise DMError(errno.EBUSY, f"device {md.name} interposes {dev.name} behind "
                          f"{dev.interposers[-1].name}; remove that one first")

    def _remove_locked(self, md: MappedDevice) -> None:
        """Unhash and destroy a device that `lock_for_deletion` has marked and whose removal is
        committed (an interposer is detached first: the device it interposed carries on with
        its own table). The device's lock is held; the registry lock only for the bookkeeping."""
        dev = interposed_device(md)
        if dev is not None and md in dev.interposers:
            detach(dev, md)
            self._emit({"event": "uninterpose", "name": dev.name, "interposer": md.name})
        if md.live is not None:
            md.table_event()
        self._unhash(md)
        md.destroy()
        self._release_minor(md)
        self._emit({"event": "remove", "name": md.name, "diskseq": md.diskseq})

    def _last_close(self, device: BlockDevice) -> None:
        """The kernel's dm_blk_close: after the last close of a device marked for deferred
        removal, remove every unopened device so marked (which cascades down stacks: their
        own last closes follow). An autoclear device is removed at its last close (loop's
        `lo_release`)."""
        if not isinstance(device, MappedDevice) or device.deleting:
            return
        if device.autoclear or device.deferred_remove:
            self._reap(device)
        if device.deferred_remove:
            self._remove_unopened(only_deferred=True)

    def _remove_unopened(self, *, only_deferred: bool) -> None:
        """The kernel's dm_hash_remove_all: remove every unopened device (only those marked
        for deferred removal, if asked), rescanning after each one so that stacks come apart."""
        progress = True
        while progress:
            progress = False
            with self._lock:
                candidates = list(self._deferred) if only_deferred else list(self._devices.values())
            for md in candidates:
                if not md.deleting and not md.opens and (md.deferred_remove or not only_deferred):
                    self._reap(md) if only_deferred else self._try_remove(md, "remove")
                    progress = progress or md.deleting

    # ---- rename ------------------------------------------------------------------------

    def rename(self, name: str, new_name: str | None = None, *, uuid: str | None = None) -> dict[str, Any]:
        """dmsetup rename NAME NEW, or `--setuuid UUID` (only while the device has none). The
        new name (or uuid) is reserved, committed, then applied."""
        if (new_name is None) == (uuid is None):
            raise DMError(errno.EINVAL, "rename needs exactly one of a new name or a uuid")
        if uuid is not None:
            if not uuid:
                raise DMError(errno.EINVAL, "the new uuid is empty")
            uuid = check_uuid(uuid)
        else:
            new_name = check_name(new_name)
        with self._op(name) as md:
            if uuid is not None:
                self._set_uuid(md, uuid)
            else:
                self._rename(md, new_name)
            if md.live is not None:
                md.table_event()
            self._emit({"event": "rename", "name": md.name, "old_name": name})
            return self._info(md)

    def _set_uuid(self, md: MappedDevice, uuid: str) -> None:
        with self._lock:
            if md.uuid:
                raise DMError(errno.EINVAL, f"device {md.name} already has uuid {md.uuid!r}; "
                              "a uuid cannot be changed")
            if uuid in self._by_uuid:
                raise DMError(errno.EBUSY, f"a device with uuid {uuid!r} already exists")
            self._by_uuid[uuid] = md  # reserved
        try:
            self._commit("rename --setuuid", state_file.flags(md.minor, uuid=uuid, event_nr=md.event_nr))
        except BaseException:
            with self._lock:
                del self._by_uuid[uuid]
            raise
        md.uuid = uuid

    def _rename(self, md: MappedDevice, new_name: str) -> None:
        old = md.name
        with self._lock:
            if self._name_taken(new_name):
                raise DMError(errno.EBUSY, f"a device named {new_name!r} already exists")
            self.partitions.check_rename(md, new_name)
            self._reserved.add(new_name)
        try:
            self._commit("rename", state_file.flags(md.minor, name=new_name, event_nr=md.event_nr))
        except BaseException:
            with self._lock:
                self._reserved.discard(new_name)
            raise
        with self._lock:
            self._reserved.discard(new_name)
            del self._devices[old]
            self._name_freed(old)
            md.name = new_name
            md.ref = f"/dev/mapper/{new_name}"
            self._devices[new_name] = md
            self.partitions.renamed(md)

    # ---- queries -----------------------------------------------------------------------

    def info(self, name: str) -> dict[str, Any]:
        """The device's state. Lock-free (a snapshot), like `open_device`: see there why."""
        part = self.partitions.get(name) if name not in self._devices else None
        if part is not None:
            return self.partitions.info(part)
        return self._info(self._find(name))

    def _info(self, md: MappedDevice) -> dict[str, Any]:
        live, inactive = md.live, md.inactive
        return {
            "name": md.name,
            "uuid": md.uuid,
            "major": DM_MAJOR,
            "minor": md.minor,
            "live": live is not None,
            "inactive": inactive is not None,
            "suspended": md.suspended,
            "readonly": live.read_only if live is not None else False,
            "inactive_readonly": inactive.read_only if inactive is not None else False,
            "open_count": md.open_count,
            "event_nr": md.event_nr,
            "target_count": len(live.targets) if live is not None else 0,
            "inactive_target_count": len(inactive.targets) if inactive is not None else 0,
            "size": md.size,
            "deferred_remove": md.deferred_remove,
            "shared": md.shared,
            "autoclear": md.autoclear,
            "no_open": md.no_open,
            "max_opens": md.max_opens,
            "interposing": getattr(interposed_device(md), "name", None),
            "interposed_by": [front.name for front in list(md.interposers)],
            "dead": md.dead,
            "holder": md.holders_description(),
            "holders": sorted([getattr(user, "name", str(user)) for user in list(md.holder_links)
                               if not isinstance(user, MappedPartition)]  # sysfs lists no partitions there
                              + ([os.path.basename(md.block_device)] if md.block_device else [])),
            "blockdev": md.blockdev,
            "diskseq": md.diskseq,
            #: the kernel block device over it (`userdm.export.blockdev`), or None
            "block_device": md.block_device,
            #: why a saved table is not live (or not loaded) after a restart; None when all is restored
            "restore_error": md.restore_error,
        }

    def list(self) -> list[dict[str, Any]]:
        """Every device (partitions included), sorted by name, with its info."""
        infos = [self._info(md) for md in self._snapshot()] + self.partitions.infos()
        return sorted(infos, key=lambda info: info["name"])

    def _table_of(self, md: MappedDevice, inactive: bool) -> Table | None:
        return md.inactive if inactive else md.live

    def _find_table(self, name: str, inactive: bool) -> Table | None:
        """The live or inactive table of device `name`; a partition has none."""
        if name not in self._devices and self.partitions.get(name) is not None:
            return None
        return self._table_of(self._find(name), inactive)

    def table(self, name: str, *, inactive: bool = False, showkeys: bool = False) -> list[list[Any]]:
        """Table lines `[start, length, type, params]` in the kernel's table format. A saved
        table that restore could not build is shown as it was saved."""
        table = self._find_table(name, inactive)
        if table is None:
            md = self._devices.get(name)
            saved = None if md is None else md.saved_inactive if inactive else md.saved_live
            return saved_lines(saved[0]) if saved is not None else []
        return [[t.begin, t.length, t.name, t.table(showkeys) if t.has_keys else t.table()]
                for t in table.targets]

    def table_text(self, name: str, *, inactive: bool = False, showkeys: bool = False) -> str:
        """The table as `dmsetup table NAME` prints it: `start length type params` and a
        newline per target, in one string (a million-line table is built and sent without
        a list per line: `userdm table` uses it)."""
        table = self._find_table(name, inactive)
        if table is None:
            return "".join(f"{s} {n} {t} {p}\n" for s, n, t, p in self.table(name, inactive=inactive))
        return "".join([f"{t.begin} {t.length} {t.name} {t.table(showkeys) if t.has_keys else t.table()}\n"
                        for t in table.targets])

    def status(self, name: str, *, inactive: bool = False) -> list[list[Any]]:
        """Status lines `[start, length, type, status]` in the kernel's formats."""
        table = self._find_table(name, inactive)
        if table is None:
            return []
        return [[t.begin, t.length, t.name, t.status()] for t in table.targets]

    def deps(self, name: str, *, inactive: bool = False) -> list[dict[str, Any]]:
        """The devices a table uses: name (as `table` prints it), device number if any, shared."""
        table = self._find_table(name, inactive)
        if table is None:
            return []
        return [_dep(dev) for dev in table.devices()]

    def tree(self) -> list[dict[str, Any]]:
        """Devices with their dependencies, for `ls --tree` (each dep carries 'device' if mapped)."""
        out = []
        for md in sorted(self._snapshot(), key=lambda m: m.name):
            tables = [t for t in (md.live, md.inactive) if t is not None]
            seen: dict[int, dict[str, Any]] = {}
            for table in tables:
                for dev in table.devices():
                    seen.setdefault(id(dev.open.device), _dep(dev))
            out.append({**self._info(md), "deps": list(seen.values())})
        return out

    def targets(self) -> list[dict[str, Any]]:
        return [{"name": name, "version": list(cls.version)} for name, cls in registered().items()]

    def version(self) -> dict[str, Any]:
        return {"library": __version__, "driver": list(DRIVER_VERSION)}

    # ---- messages and events -------------------------------------------------------------

    def message(self, name: str, sector: int, message: str) -> str | None:
        """dmsetup message: `@cancel_deferred_remove` for the core, anything else to a target
        (under the device's lock: a message never waits for another device's operation)."""
        with self._op(name) as md:
            args = split_args(message)
            if not args:
                raise DMError(errno.EINVAL, "empty message")
            if args[0].startswith("@"):
                return self._core_message(md, args)
            table = md.live
            if table is None and md.inactive is not None and md.inactive.needs_key:
                table = md.inactive  # restored without its key: `key set` goes to the waiting table
            if table is None:
                return None  # the kernel does nothing (and reports success) without a live table
            target = table.target_at(int(sector))
            if target is None:
                raise DMError(errno.EINVAL, f"message sector {sector} is beyond the end of {name} "
                              f"({table.sectors} sectors)")
            result = target.message(args)
            self._emit({"event": "message", "name": md.name})
            return result

    def _core_message(self, md: MappedDevice, args: list[str]) -> str | None:
        if args[0].lower() == "@cancel_deferred_remove":
            if len(args) != 1:
                raise DMError(errno.EINVAL, "@cancel_deferred_remove takes no arguments")
            if md.deleting:
                raise DMError(errno.EBUSY, f"device {md.name} is already being removed")
            self._commit("@cancel_deferred_remove", state_file.flags(
                md.minor, deferred_remove=False, no_open=False, event_nr=md.event_nr))
            md.deferred_remove = md.no_open = False
            with self._lock:
                self._deferred.discard(md)
            self._emit({"event": "cancel_deferred_remove", "name": md.name})
            return None
        raise DMError(errno.EINVAL, f"unknown core message {quoted(args[0])}")

    def era_changed(self, name: str, since: int, *, metadata_snapshot: bool = False) -> list[dict[str, Any]]:
        """Runs of blocks of the device's era targets written since era `since`, each with
        `begin`/`length` in sectors of the device and `block_begin`/`block_end` (exclusive)
        in era blocks of its target (too bulky for a target message)."""
        if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 1 << 32:
            raise DMError(errno.EINVAL, f"era {since!r} is not an era number (0 to 2^32 - 1)")
        with self._op(name) as md:
            table = md.live
            trackers = [t for t in table.targets if t.tracks_changes] if table is not None else []
            if not trackers:
                raise DMError(errno.EINVAL, f"device {md.name} has no live era target")
            return [run for t in trackers for run in t.changed(since, metadata_snapshot=metadata_snapshot)]

    def wait(self, name: str, event_nr: int = 0, *, timeout: float | None = None) -> dict[str, Any]:
        """dmsetup wait: block until the device's event number differs from `event_nr`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        md = self._find(name)
        with self._events:
            while md.event_nr == event_nr and not md.deleting:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DMError(errno.ETIMEDOUT, f"no event on {name} after event {event_nr} "
                                  f"within {timeout} seconds")
                self._events.wait(remaining)
        if md.deleting:
            raise DMError(errno.ENXIO, f"device {name} was removed while waiting")
        return self._info(md)

    def notify_failure(self, dev: str, offset: int, length: int, flags: int = 0) -> list[dict[str, Any]]:
        """`userdm notify-failure`: a byte range of a device failed (a media error reported from
        outside). `dev` names a mapped device (name, /dev/mapper path, MAJOR:MINOR) or a device
        that a table uses (its path, URL or MAJOR:MINOR). The failure travels up to the holders
        (DESIGN §6) and becomes a `failure` event at every mapped device it reaches; returns
        those records. EOPNOTSUPP if no holder registered notify_failure, ENXIO if the device is
        unknown or dead, EINVAL if the range is not inside it."""
        for what, value in (("offset", offset), ("length", length), ("flags", flags)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DMError(errno.EINVAL, f"notify_failure: {what} {value!r} is not a byte count")
        device = self._failure_device(dev)
        return [d.record() for d in device.notify_failure(offset, length, flags)]

    def _failure_device(self, ref: str) -> BlockDevice:
        md = self._devices.get(ref) or self.partitions.get(ref) or self._mapped_ref(ref)
        if md is not None:
            return md
        same = _file_identity(ref)
        for md in self._snapshot():
            for table in (md.live, md.inactive):
                for tdev in table.devices() if table is not None else ():
                    device = tdev.open.device
                    if ref in (tdev.ref, tdev.name, device.ref) or \
                            (same is not None and same == _file_identity(device.ref)):
                        return device
        raise DMError(errno.ENXIO, f"{quoted(ref)} is neither a mapped device nor a device that a table uses")

    def _table_event(self, md: MappedDevice) -> None:
        with self._events:
            self._events.notify_all()
        self._emit({"event": "table_event", "name": md.name, "event_nr": md.event_nr})

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Call `listener(record)` for every event from now on (records: `userdm.dm.events`);
        returns the recent records, none of which the listener gets again."""
        return self._log.subscribe(listener)

    def unsubscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._log.unsubscribe(listener)

    def recent_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The last events (a bounded ring), only those concerning device `name` if given."""
        return self._log.recent(name)

    def _emit(self, record: dict[str, Any]) -> None:
        self._log.emit(record)

    # ---- exports -------------------------------------------------------------------------

    # Opens and the export list do not take the registry lock: a table being loaded may be
    # connecting to this daemon's own NBD export, whose handshake calls these. An open races
    # safely with removal because `lock_for_deletion` and `open` share the device's lock.

    def open_device(self, name: str, *, write: bool, holder: object | None = None,
                    holder_ops: HolderOps | None = None) -> BlockOpen:
        """Open a mapped device for an export or a user: it counts in the device's open count.
        An exclusive open (`holder`) may register `holder_ops` (DESIGN §6)."""
        md = self._devices.get(name) or self.partitions.get(name)
        if md is None:
            raise DMError(errno.ENXIO, f"device {quoted(name)} does not exist")
        return md.open(write=write, holder=holder, holder_ops=holder_ops)

    def export_names(self) -> list[str]:
        """Devices that have a live table and are not being removed, and their partitions."""
        return sorted([name for name, md in list(self._devices.items()) if md.live is not None and not md.deleting]
                      + self.partitions.export_names())

    def _export_device(self, name: str) -> MappedDevice | MappedPartition | None:
        """The device that the NBD export `name` serves, or None."""
        return self._devices.get(name) or self.partitions.get(name)

    def exported(self, name: str) -> MappedDevice | MappedPartition | None:
        """The device `name` if `export_names()` would list it, else None: one dict lookup,
        lock-free like `open_device` (the NBD server asks this on every INFO and GO)."""
        md = self._devices.get(name)
        if md is not None:
            return md if md.live is not None and not md.deleting else None
        part = self.partitions.get(name)
        return part if part is not None and part.live is not None else None

    def device(self, name: str) -> MappedDevice | MappedPartition:
        part = self.partitions.get(name) if name not in self._devices else None
        return part if part is not None else self._find(name)  # lock-free, as `open_device`

    # ---- persistence --------------------------------------------------------------------

    def restore(self) -> None:
        """Bring back the saved devices (`userdm.dm.restore`): every one of them, with its
        tables, in dependency order; a table that cannot be built stays saved and visible."""
        if self._store is not None:
            self._restorer.restore(self._store.load())

    def close(self) -> None:
        """Release every device's tables without forgetting the saved state (daemon exit).
        Takes no device's lock, so a device stuck in a suspend does not hold it up: its
        waiting I/O fails with EIO. Idempotent."""
        self._closing.set()
        self._restorer.stop()
        self.partitions.close()
        with self._lock:
            devices = sorted(self._devices.values(), key=lambda m: -m.minor)
            self._devices.clear()
            self._by_uuid.clear()
            self._minors.clear()
            self._deferred.clear()
        for md in devices:
            md.deleting = True
            try:
                md.destroy()
            except Exception:
                log.exception("closing %s failed", md.name)
        if self._store is not None:
            self._store.close()


def block_node(major: int, minor: int) -> str:
    """The /dev node of a block device number (udev's /dev/block links may not exist)."""
    rdev = os.makedev(major, minor)
    candidates = [f"/dev/block/{major}:{minor}"]
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent", encoding="utf-8") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    candidates.append("/dev/" + line.strip().split("=", 1)[1])
    except OSError:
        pass
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            return path
    raise DMError(errno.ENXIO, f"no block device {major}:{minor} on this machine")


def _file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an absolute path, so that two names of one file match."""
    if not path.startswith("/"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _dep(dev: Any) -> dict[str, Any]:
    device = dev.open.device
    devno = device.devno
    return {
        "name": dev.name,
        "devno": list(devno) if devno else None,
        "device": device.name if isinstance(device, (MappedDevice, MappedPartition)) else None,
        "shared": dev.shared,
        "size": device.size // SECTOR,
    }


def _settle_restore(md: MappedDevice) -> None:
    """A user's load, clear or resume replaced the saved tables that restore could not build:
    there is no restore error left to report once none is pending."""
    if md.saved_live is None and md.saved_inactive is None:
        md.restore_error = None

