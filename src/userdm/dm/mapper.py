"""The device-mapper: the registry of mapped devices and every control operation on them.

`Mapper` is the in-process equivalent of the kernel's DM ioctl interface, named after the
dmsetup verbs (`create`, `load`, `resume`, `suspend`, `remove`, `rename`, `info`, `table`,
`status`, `deps`, `message`, `wait` ...). Its results are plain dicts and lists, so the
daemon can send them over the control socket unchanged and `userdm.connect()` returns the
same shapes. It keeps the kernel's rules: unique names and uuids, minors, EBUSY while open,
deferred removal that fires after the last close and cascades down stacks, cancellation by
`@cancel_deferred_remove`. With a `state_dir` every change is saved and restored on start.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from ..block.backing import BackingStores
from ..block.device import SECTOR, BlockDevice, BlockOpen, HolderOps
from ..errors import DMError
from ..version import __version__
from . import state as state_file
from .cycles import DependencyGraph
from .events import EventLog
from .interposer import InterposedView, attach, detach, interposed_device
from .mapped import DM_MAJOR, MappedDevice
from .names import MINOR_LIMIT, check_name, check_uuid
from .partitioned import BLKEXT_MAJOR, MappedPartition, MappedPartitions
from .table import Table, split_args
from .target import registered

log = logging.getLogger("userdm.dm")

DRIVER_VERSION = (4, 50, 0)
REMOVE_RETRIES = 25          # dmsetup's DM_IOCTL_RETRIES
REMOVE_RETRY_DELAY = 0.2     # dmsetup's DM_RETRY_USLEEP_DELAY


class Mapper:
    """All mapped devices of one daemon (or of one test, in process)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 fuse_dir: str | os.PathLike[str] | None = None, direct_io: bool = False) -> None:
        self._lock = threading.RLock()
        self._devices: dict[str, MappedDevice] = {}
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
        #: refuses tables that would make a device depend on itself (`userdm.dm.cycles`)
        self.graph = DependencyGraph(mapped_ref=self._mapped_ref, by_name=self._export_device,
                                     devices=lambda: list(self._devices.values()),
                                     nbd_addresses=lambda: self.nbd_addresses)
        self._exclusive_opens = itertools.count(1)
        #: partitions of mapped devices (NAME1, NAME2 ...), a side table: see dm/partitioned.py
        self.partitions = MappedPartitions(self._lock, self._devices.get, self._emit, self._emit)
        self._register_schemes()
        if self.state_dir:
            self._restore(state_file.load(self.state_dir))

    def _register_schemes(self) -> None:
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
            raise DMError(errno.ENXIO, f"device {name!r} does not exist")
        return md

    def _by_minor(self, minor: int) -> MappedDevice | None:
        for md in self._devices.values():
            if md.minor == minor:
                return md
        return None

    def find_name(self, *, uuid: str | None = None, major: int | None = None,
                  minor: int | None = None) -> str:
        """The name of the device with this uuid or device number (dmsetup's `-u`, `-j/-m`)."""
        with self._lock:
            for md in self._devices.values():
                if uuid is not None and md.uuid == uuid:
                    return md.name
                if minor is not None and md.minor == minor and major in (None, DM_MAJOR):
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
                if md is None:
                    raise DMError(errno.ENXIO, f"no mapped device {ref}")
                return md
            if major.isdigit() and minor.isdigit() and int(major) == BLKEXT_MAJOR:
                part = self.partitions.by_minor(int(minor))
                if part is None:
                    raise DMError(errno.ENXIO, f"no partition {ref}")
                return part
            return None
        if name is None:
            return None
        md = self._devices.get(name) or self.partitions.get(name)
        if md is None:
            raise DMError(errno.ENXIO, f"{ref}: no mapped device named {name!r}")
        return md

    def _resolve(self, ref: str, write: bool, holder: object | None) -> tuple[BlockOpen, str]:
        """Open a table's device reference (the resolver given to every MappedDevice)."""
        md = self._mapped_ref(ref)
        if md is not None:
            return md.open(write=write, holder=holder), "{}:{}".format(*md.devno)
        if ":" in ref and "/" not in ref:
            major, _, minor = ref.partition(":")
            if not (major.isdigit() and minor.isdigit()):
                raise DMError(errno.EINVAL, f"{ref!r} is not MAJOR:MINOR, an absolute path or a URL")
            path = block_node(int(major), int(minor))
            opened = self.backing.open(path, write=write, holder=holder)
            return opened, ref
        opened = self.backing.open(ref, write=write, holder=holder)
        devno = opened.device.devno
        return opened, f"{devno[0]}:{devno[1]}" if devno else ref

    # ---- create / load / resume / suspend --------------------------------------------

    def create(self, name: str | None, table: str | None = None, *, uuid: str | None = None,
               readonly: bool = False, minor: int | None = None, shared: bool = False,
               autoclear: bool = False, max_opens: int | None = None, open_fd: bool = False,
               holder: object | None = None, interpose: bool = False) -> dict[str, Any]:
        """dmsetup create: make the device, and with `table` also load and resume it.

        If the load or resume fails the device is removed again, as libdm does. userdm's
        additions: `shared` (claim no underlying device), `autoclear` (removed at its last
        close), `max_opens` (refuse opens beyond N with EBUSY), `name=None` (pick a free
        name), `interpose`: its table may take over a device in use, `[interpose]DEV`
        (`userdm.dm.interposer`), and `open_fd`: open the new device in the same step, under the registry lock,
        and return the open as `info["fd"]`, an NBD client socket that the caller owns (seed
        001: there is no moment at which the device exists without that open)."""
        with self._lock:
            if name is None:
                name = self._free_name()
            name = check_name(name)
            uuid = check_uuid(uuid)
            if name in self._devices or self.partitions.get(name) is not None:
                raise DMError(errno.EBUSY, f"a device named {name!r} already exists")
            if uuid and any(md.uuid == uuid for md in self._devices.values()):
                raise DMError(errno.EBUSY, f"a device with uuid {uuid!r} already exists")
            if max_opens is not None and (not isinstance(max_opens, int) or max_opens < 1):
                raise DMError(errno.EINVAL, f"--max-opens {max_opens!r}: the limit must be at least 1")
            if open_fd and table is None:
                raise DMError(errno.EINVAL, f"cannot open device {name} at creation without a table")
            minor = self._allocate_minor(minor)
            md = MappedDevice(name, uuid, minor, self._resolve, shared=shared, autoclear=autoclear,
                              max_opens=max_opens, interpose=interpose)
            md.lookup_mapped = self._mapped_ref
            md.graph = self.graph
            md._event_hook = self._table_event
            md.event_observer = self._emit
            md.on_last_close(self._last_close)
            self._devices[name] = md
            fd = None
            try:
                if table is not None:
                    self._load(md, table, readonly)
                    md.resume()
                    self._attach(md)
                if open_fd:
                    fd = self._open_fd(md, write=not md.read_only, holder=holder)
            except BaseException:
                if self._devices.get(name) is md:
                    self._destroy(md)
                raise
            self._changed("create", md, size=md.size)
            info = self._info(md)
            if fd is not None:
                info["fd"] = fd
        if table is not None:
            self.partitions.scan_after_resume(md)
        return info

    def _free_name(self) -> str:
        """A name for `create(None, ...)`: dm-N for the lowest N not taken (the kernel's disk name)."""
        minor = 0
        while f"dm-{minor}" in self._devices:
            minor += 1
        return f"dm-{minor}"

    def open(self, name: str, *, readonly: bool = False, exclusive: bool = False,
             holder: object | None = None) -> dict[str, Any]:
        """Open a device and return the open as `info["fd"]`, an NBD client socket the caller
        owns (`userdm open NAME -- CMD`). `exclusive` claims the device for a holder of its own,
        as an O_EXCL open does; `holder` claims it for that holder (the same holder may nest)."""
        md = self._find(name)
        if exclusive and holder is None:
            holder = f"exclusive open #{next(self._exclusive_opens)}"
        fd = self._open_fd(md, write=not (readonly or md.read_only), holder=holder)
        return {**self._info(md), "fd": fd}

    def _open_fd(self, md: MappedDevice, *, write: bool, holder: object | None) -> int:
        if md.live is None:
            raise DMError(errno.ENXIO, f"device {md.name} has no live table to open")
        if self.open_sockets is None:
            raise DMError(errno.EOPNOTSUPP, f"cannot hand out an open of {md.name} as a file descriptor: "
                          "this Mapper has no NBD export (use userdm.Mapper, or a daemon)")
        handle = md.open(write=write, holder=holder)
        return self.open_sockets.socket_for_open(handle, md.name).detach()  # closes it on failure

    def _allocate_minor(self, minor: int | None) -> int:
        used = {md.minor for md in self._devices.values()}
        if minor is not None:
            if not 0 <= minor < MINOR_LIMIT:
                raise DMError(errno.ENXIO, f"minor {minor} is out of range (0 to {MINOR_LIMIT - 1})")
            if minor in used:
                raise DMError(errno.ENXIO, f"minor {minor} is already in use")
            return minor
        minor = 0
        while minor in used:
            minor += 1
        return minor

    def load(self, name: str, table: str, *, readonly: bool = False) -> dict[str, Any]:
        """dmsetup load/reload: build `table` into the inactive slot."""
        with self._lock:
            md = self._find(name)
            self._load(md, table, readonly)
            self._changed("load", md)
            return self._info(md)

    def _load(self, md: MappedDevice, table: str, readonly: bool) -> None:
        """Load into the inactive slot; an interposer's table names exactly one `[interpose]`
        device, and always the same one."""
        md.load(table, readonly)
        if not md.interpose:
            return
        views = [d.open.device for d in md.inactive.devices() if isinstance(d.open.device, InterposedView)]
        current = interposed_device(md)
        problem = None
        if len(views) != 1:
            problem = f"names {len(views)} devices as [interpose]DEV; an interposer names exactly one"
        elif current is not None and views[0].dev is not current:
            problem = f"interposes {views[0].dev.name}, but the device already interposes {current.name}"
        if problem:
            md.clear()
            raise DMError(errno.EINVAL, f"table of {md.name} {problem}")

    def _attach(self, md: MappedDevice) -> None:
        """After an interposer's resume: put it in front of the device it names (once)."""
        dev = interposed_device(md)
        if dev is not None and md not in dev.interposers:
            attach(dev, md)
            self._changed("interpose", dev, interposer=md.name)

    def clear(self, name: str) -> dict[str, Any]:
        with self._lock:
            md = self._find(name)
            md.clear()
            self._changed("clear", md)
            return self._info(md)

    def suspend(self, name: str, *, noflush: bool = False, nolockfs: bool = False) -> dict[str, Any]:
        """Hold new I/O and drain in-flight I/O. The drain happens outside the registry lock,
        so that a device whose I/O waits on another suspended device never blocks its resume."""
        with self._lock:
            md = self._find(name)
            started = md.begin_suspend(nolockfs=nolockfs)
        if started:
            md.drain()
        with self._lock:
            md.end_suspend(noflush=noflush)
            self._changed("suspend", md, noflush=noflush, nolockfs=nolockfs)
            return self._info(md)

    def resume(self, name: str) -> dict[str, Any]:
        """Swap in the inactive table (suspending first if needed) and let I/O flow; a new
        table's partition table is read after the registry lock is released."""
        md = self._find(name)
        before = md.live
        info = self._resume(name)
        if md.live is not before and md.live is not None:
            self.partitions.scan_after_resume(md)
        return info

    def partprobe(self, name: str) -> list[dict[str, Any]]:
        """`userdm partprobe NAME` (BLKRRPART): read the device's partition table again and
        return its partitions. EBUSY while one of them is open."""
        return self.partitions.partprobe(self._find(name))

    def _resume(self, name: str) -> dict[str, Any]:
        with self._lock:
            md = self._find(name)
            md.check_resume()  # before suspending: a refused resume leaves the device as it was
            must_suspend = md.inactive is not None and not md.suspended
        if must_suspend:
            self.suspend(name, noflush=True, nolockfs=True)
        with self._lock:
            md = self._find(name)
            old_size = md.size
            resized = md.resume()
            md.restore_error = None  # a table with its key is live again
            self._attach(md)
            if resized and old_size:
                md.table_event()  # a size change is an event (and a RESIZE uevent in the kernel)
            self._changed("resume", md, resized=resized, size=md.size)
            if resized and old_size:
                self._emit({"event": "resize", "name": md.name, "old_size": old_size, "size": md.size})
            return self._info(md)

    def wipe_table(self, name: str) -> dict[str, Any]:
        """Replace the table by one `error` target of the same size and resume (noflush, nolockfs)."""
        with self._lock:
            md = self._find(name)
            if md.live is not None:
                md.load(f"0 {md.live.sectors} error", md.live.read_only)
                md.suspend(noflush=True, nolockfs=True)
                md.resume()
                self._changed("load", md)
            return self._info(md)

    # ---- remove ------------------------------------------------------------------------

    def remove(self, name: str, *, force: bool = False, deferred: bool = False,
               retry: bool = False, no_open: bool = False) -> dict[str, Any]:
        """dmsetup remove. Busy devices give EBUSY, or with `deferred` are marked for removal;
        `no_open` (seed 002) also refuses every new open until then (ENXIO)."""
        if no_open and not deferred:
            raise DMError(errno.EINVAL, f"remove {name}: --no-open needs --deferred")
        attempts = REMOVE_RETRIES if retry else 1
        for attempt in range(attempts):
            with self._lock:
                md = self._find(name)
                self._check_interposer_removal(md)
                if force and attempt == 0:
                    self.wipe_table(name)
                info = self._info(md)
                if md.lock_for_deletion(mark_deferred=deferred, no_open=no_open):
                    self._remove(md)
                    info["deferred_remove"] = False
                    return info
                if deferred:
                    self._changed("deferred_remove", md)
                    return self._info(md)
                busy = DMError(errno.EBUSY, f"device {name} is open (open count {md.open_count}); "
                               "close it first or use --deferred")
            if attempt + 1 < attempts:
                time.sleep(REMOVE_RETRY_DELAY)
        raise busy

    def remove_all(self, *, force: bool = False, deferred: bool = False) -> dict[str, Any]:
        """Remove every unopened device, repeating while stacks come apart; mark or report the rest."""
        with self._lock:
            self._remove_unopened(only_deferred=False)
            if force:
                for md in list(self._devices.values()):
                    self.wipe_table(md.name)
            left = list(self._devices.values())
            if deferred:
                for md in left:
                    md.deferred_remove = True
                    self._changed("deferred_remove", md)
            return {"left_open": [md.name for md in left]}

    def _check_interposer_removal(self, md: MappedDevice) -> None:
        if md.interposers:
            raise DMError(errno.EBUSY, f"device {md.name} is interposed by "
                          f"{', '.join(f.name for f in md.interposers)}; remove that first")
        dev = interposed_device(md)
        if dev is not None and md in dev.interposers and dev.interposers[-1] is not md:
            raise DMError(errno.EBUSY, f"device {md.name} interposes {dev.name} behind "
                          f"{dev.interposers[-1].name}; remove that one first")

    def _remove(self, md: MappedDevice) -> None:
        """Unhash and destroy a device that `lock_for_deletion` has marked (an interposer is
        detached first: the device it interposed carries on with its own table)."""
        dev = interposed_device(md)
        if dev is not None and md in dev.interposers:
            detach(dev, md)
            self._changed("uninterpose", dev, interposer=md.name)
        if md.live is not None:
            md.table_event()
        self._destroy(md)
        self._changed("remove", md)

    def _destroy(self, md: MappedDevice) -> None:
        self._devices.pop(md.name, None)
        self.partitions.drop(md)
        md.deleting = True
        md.destroy()

    def _last_close(self, device: BlockDevice) -> None:
        """The kernel's dm_blk_close: after the last close of a device marked for deferred
        removal, remove every unopened device so marked (which cascades down stacks). An
        autoclear device is removed at its last close (loop's `lo_release`)."""
        if not isinstance(device, MappedDevice):
            return
        if device.autoclear:
            with self._lock:
                if self._devices.get(device.name) is device and device.lock_for_deletion():
                    self._remove(device)
        if device.deferred_remove:
            self._remove_unopened(only_deferred=True)

    def _remove_unopened(self, *, only_deferred: bool) -> None:
        """The kernel's dm_hash_remove_all: remove every unopened device (only those marked
        for deferred removal, if asked), rescanning after each one so that stacks come apart."""
        with self._lock:
            progress = True
            while progress:
                progress = False
                for md in list(self._devices.values()):
                    if self._devices.get(md.name) is md and (md.deferred_remove or not only_deferred) \
                            and not md.interposers and md.lock_for_deletion():
                        self._remove(md)
                        progress = True

    # ---- rename ------------------------------------------------------------------------

    def rename(self, name: str, new_name: str | None = None, *, uuid: str | None = None) -> dict[str, Any]:
        """dmsetup rename NAME NEW, or `--setuuid UUID` (only while the device has none)."""
        with self._lock:
            if (new_name is None) == (uuid is None):
                raise DMError(errno.EINVAL, "rename needs exactly one of a new name or a uuid")
            md = self._find(name)
            if uuid is not None:
                if not uuid:
                    raise DMError(errno.EINVAL, "the new uuid is empty")
                uuid = check_uuid(uuid)
                if md.uuid:
                    raise DMError(errno.EINVAL, f"device {name} already has uuid {md.uuid!r}; "
                                  "a uuid cannot be changed")
                if any(other.uuid == uuid for other in self._devices.values()):
                    raise DMError(errno.EBUSY, f"a device with uuid {uuid!r} already exists")
                md.uuid = uuid
            else:
                new_name = check_name(new_name)
                if new_name in self._devices or self.partitions.get(new_name) is not None:
                    raise DMError(errno.EBUSY, f"a device named {new_name!r} already exists")
                self.partitions.check_rename(md, new_name)
                del self._devices[name]
                md.name = new_name
                md.ref = f"/dev/mapper/{new_name}"
                self._devices[new_name] = md
                self.partitions.renamed(md)
            if md.live is not None:
                md.table_event()
            self._changed("rename", md, old_name=name)
            return self._info(md)

    # ---- queries -----------------------------------------------------------------------

    def info(self, name: str) -> dict[str, Any]:
        """The device's state. Lock-free (a snapshot), like `open_device`: see there why."""
        part = self.partitions.get(name) if name not in self._devices else None
        if part is not None:
            return self.partitions.info(part)
        return self._info(self._find(name))

    def _info(self, md: MappedDevice) -> dict[str, Any]:
        return {
            "name": md.name,
            "uuid": md.uuid,
            "major": DM_MAJOR,
            "minor": md.minor,
            "live": md.live is not None,
            "inactive": md.inactive is not None,
            "suspended": md.suspended,
            "readonly": md.live.read_only if md.live is not None else False,
            "inactive_readonly": md.inactive.read_only if md.inactive is not None else False,
            "open_count": md.open_count,
            "event_nr": md.event_nr,
            "target_count": len(md.live.targets) if md.live is not None else 0,
            "inactive_target_count": len(md.inactive.targets) if md.inactive is not None else 0,
            "size": md.size,
            "deferred_remove": md.deferred_remove,
            "shared": md.shared,
            "autoclear": md.autoclear,
            "no_open": md.no_open,
            "max_opens": md.max_opens,
            "interposing": getattr(interposed_device(md), "name", None),
            "interposed_by": [front.name for front in md.interposers],
            "dead": md.dead,
            "holder": md.holders_description(),
            "holders": sorted(getattr(user, "name", str(user)) for user in md.holder_links
                              if not isinstance(user, MappedPartition)),  # sysfs lists no partitions there
            **({"restore_error": md.restore_error} if getattr(md, "restore_error", None) else {}),
        }

    def list(self) -> list[dict[str, Any]]:
        """Every device (partitions included), sorted by name, with its info."""
        with self._lock:
            infos = [self._info(md) for md in self._devices.values()] + self.partitions.infos()
            return sorted(infos, key=lambda info: info["name"])

    def _table_of(self, md: MappedDevice, inactive: bool) -> Table | None:
        return md.inactive if inactive else md.live

    def _find_table(self, name: str, inactive: bool) -> Table | None:
        """The live or inactive table of device `name`; a partition has none."""
        if name not in self._devices and self.partitions.get(name) is not None:
            return None
        return self._table_of(self._find(name), inactive)

    def table(self, name: str, *, inactive: bool = False, showkeys: bool = False) -> list[list[Any]]:
        """Table lines `[start, length, type, params]` in the kernel's table format."""
        with self._lock:
            table = self._find_table(name, inactive)
            if table is None:
                return []
            out = []
            for t in table.targets:
                params = t.table(showkeys) if _takes_showkeys(t) else t.table()
                out.append([t.begin, t.length, t.name, params])
            return out

    def status(self, name: str, *, inactive: bool = False) -> list[list[Any]]:
        """Status lines `[start, length, type, status]` in the kernel's formats."""
        with self._lock:
            table = self._find_table(name, inactive)
            if table is None:
                return []
            return [[t.begin, t.length, t.name, t.status()] for t in table.targets]

    def deps(self, name: str, *, inactive: bool = False) -> list[dict[str, Any]]:
        """The devices a table uses: name (as `table` prints it), device number if any, shared."""
        with self._lock:
            table = self._find_table(name, inactive)
            if table is None:
                return []
            return [_dep(dev) for dev in table.devices()]

    def tree(self) -> list[dict[str, Any]]:
        """Devices with their dependencies, for `ls --tree` (each dep carries 'device' if mapped)."""
        with self._lock:
            out = []
            for _, md in sorted(self._devices.items()):
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
        """dmsetup message: `@cancel_deferred_remove` for the core, anything else to a target."""
        with self._lock:
            md = self._find(name)
            if md.deleting:
                raise DMError(errno.ENXIO, f"device {name} is being removed")
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
            self._changed("message", md)
            return result

    def _core_message(self, md: MappedDevice, args: list[str]) -> str | None:
        if args[0].lower() == "@cancel_deferred_remove":
            if len(args) != 1:
                raise DMError(errno.EINVAL, "@cancel_deferred_remove takes no arguments")
            if md.deleting:
                raise DMError(errno.EBUSY, f"device {md.name} is already being removed")
            md.deferred_remove = md.no_open = False
            self._changed("cancel_deferred_remove", md)
            return None
        raise DMError(errno.EINVAL, f"unknown core message {args[0]!r}")

    def era_changed(self, name: str, since: int, *, metadata_snapshot: bool = False) -> list[dict[str, Any]]:
        """Runs of blocks of the device's era targets written since era `since`, each with
        `begin`/`length` in sectors of the device and `block_begin`/`block_end` (exclusive)
        in era blocks of its target (too bulky for a target message)."""
        if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 1 << 32:
            raise DMError(errno.EINVAL, f"era {since!r} is not an era number (0 to 2^32 - 1)")
        with self._lock:
            md = self._find(name)
            table = md.live
            trackers = [t for t in table.targets if t.tracks_changes] if table is not None else []
            if not trackers:
                raise DMError(errno.EINVAL, f"device {md.name} has no live era target")
            return [run for t in trackers for run in t.changed(since, metadata_snapshot=metadata_snapshot)]

    def wait(self, name: str, event_nr: int = 0, *, timeout: float | None = None) -> dict[str, Any]:
        """dmsetup wait: block until the device's event number differs from `event_nr`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            md = self._find(name)
        with self._events:
            while md.event_nr == event_nr and not md.deleting:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DMError(errno.ETIMEDOUT, f"no event on {name} after event {event_nr} "
                                  f"within {timeout} seconds")
                self._events.wait(remaining)
        with self._lock:
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
        with self._lock:
            md = self._devices.get(ref) or self.partitions.get(ref) or self._mapped_ref(ref)
            if md is not None:
                return md
            same = _file_identity(ref)
            for md in self._devices.values():
                for table in (md.live, md.inactive):
                    for tdev in table.devices() if table is not None else ():
                        device = tdev.open.device
                        if ref in (tdev.ref, tdev.name, device.ref) or \
                                (same is not None and same == _file_identity(device.ref)):
                            return device
        raise DMError(errno.ENXIO, f"{ref!r} is neither a mapped device nor a device that a table uses")

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

    def _changed(self, event: str, md: MappedDevice, **extra: Any) -> None:
        if self.state_dir:
            state_file.save(self.state_dir, self._state())
        self._emit({"event": event, "name": md.name, **extra})

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
            raise DMError(errno.ENXIO, f"device {name!r} does not exist")
        return md.open(write=write, holder=holder, holder_ops=holder_ops)

    def export_names(self) -> list[str]:
        """Devices that have a live table and are not being removed, and their partitions."""
        return sorted([name for name, md in list(self._devices.items()) if md.live is not None and not md.deleting]
                      + self.partitions.export_names())

    def _export_device(self, name: str) -> MappedDevice | MappedPartition | None:
        """The device that the NBD export `name` serves, or None."""
        return self._devices.get(name) or self.partitions.get(name)

    def device(self, name: str) -> MappedDevice | MappedPartition:
        part = self.partitions.get(name) if name not in self._devices else None
        return part if part is not None else self._find(name)  # lock-free, as `open_device`

    # ---- persistence --------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        devices = []
        for md in sorted(self._devices.values(), key=lambda m: m.minor):
            devices.append({
                "name": md.name, "uuid": md.uuid, "minor": md.minor, "shared": md.shared,
                "autoclear": md.autoclear, "max_opens": md.max_opens, "no_open": md.no_open,
                "interpose": md.interpose,
                "live": _table_state(md.live), "inactive": _table_state(md.inactive),
                "suspended": md.suspended, "deferred_remove": md.deferred_remove,
                "event_nr": md.event_nr,
            })
        return {"version": 1, "devices": devices}

    def _restore(self, saved: dict[str, Any]) -> None:
        """Recreate saved devices; tables load in rounds so stacked devices find their parts."""
        entries = saved.get("devices", [])
        state_dir, self.state_dir = self.state_dir, None  # do not rewrite the file while restoring
        try:
            pending = []
            for entry in entries:
                try:
                    self.create(entry["name"], uuid=entry.get("uuid") or None, minor=entry.get("minor"),
                                shared=entry.get("shared", False), autoclear=entry.get("autoclear", False),
                                max_opens=entry.get("max_opens"), interpose=entry.get("interpose", False))
                    md = self._devices[entry["name"]]
                    md.event_nr = entry.get("event_nr", 0)
                    md.deferred_remove = entry.get("deferred_remove", False)
                    md.no_open = entry.get("no_open", False)
                    pending.append(entry)
                except DMError as exc:
                    log.error("cannot restore device %s: %s", entry.get("name"), exc)
            for slot in ("live", "inactive"):
                todo = [e for e in pending if e.get(slot)]
                while todo:
                    failed, errors = [], {}
                    for entry in todo:
                        table = entry[slot]
                        try:
                            self.load(entry["name"], table["text"], readonly=table["read_only"])
                            if table.get("needs_key"):
                                self._await_key(entry["name"])
                            elif slot == "live":
                                self.resume(entry["name"])
                        except DMError as exc:
                            failed.append(entry)
                            errors[entry["name"]] = exc
                    if len(failed) == len(todo):
                        for name, exc in errors.items():
                            log.error("cannot restore the %s table of %s: %s", slot, name, exc)
                        break
                    todo = failed
            for entry in pending:
                if entry.get("suspended") and entry["name"] in self._devices:
                    self.suspend(entry["name"], noflush=True, nolockfs=True)
            self._remove_unopened(only_deferred=True)
            # A restart closed every open, and for an autoclear device that is its last close.
            for md in [md for md in self._devices.values() if md.autoclear]:
                if self._devices.get(md.name) is md and md.lock_for_deletion():
                    self._remove(md)
        finally:
            self.state_dir = state_dir
        if self.state_dir:
            state_file.save(self.state_dir, self._state())

    def _await_key(self, name: str) -> None:
        """A table saved without its key (crypt) is loaded into the inactive slot with its key
        wiped; `info` says so, and `message NAME 0 key set KEY` + `resume` (or `luks open`)
        brings it back, as after cryptsetup's luksSuspend."""
        md = self._devices[name]
        for target in md.inactive.targets if md.inactive is not None else ():
            if getattr(target, "has_keys", False):
                target.forget_key()
        kinds = sorted({t.name for t in md.inactive.targets if getattr(t, "has_keys", False)})
        md.restore_error = f"ENOKEY: {'/'.join(kinds)} table needs its key again (keys are never saved)"
        log.info("%s: %s", name, md.restore_error)

    def close(self) -> None:
        """Release every device's tables without forgetting the saved state (daemon exit)."""
        with self._lock:
            state_dir, self.state_dir = self.state_dir, None
            try:
                self.partitions.close()
                for md in sorted(self._devices.values(), key=lambda m: -m.minor):
                    md.destroy()
                self._devices.clear()
            finally:
                self.state_dir = state_dir


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


def _table_state(table: Table | None) -> dict[str, Any] | None:
    if table is None:
        return None
    saved = {"text": table.text, "read_only": table.read_only}
    return {**saved, "needs_key": True} if table.needs_key else saved  # text without the key


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


def _takes_showkeys(target: Any) -> bool:
    return getattr(target, "has_keys", False)
