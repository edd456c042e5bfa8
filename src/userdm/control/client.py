"""The Python client of a running daemon: `userdm.connect()` returns a `Client` whose methods
are the Mapper's (`create`, `load`, `resume`, `info`, ...), with the same signatures, and return
the same results. Every refusal is a `DMError` (an `OSError` with the kernel's `errno`); a
mistyped keyword is a `TypeError`, as with any Python function. `docs/api.md` describes it."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..errors import DMError
from . import paths, protocol
from .dial import dial, refusal
from .event_stream import EventStream
from .holder_channel import HolderChannel


class Client:
    """A connection to the daemon's control socket. Thread-safe; one request at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = dial(path)
        self._decoder = protocol.Decoder()
        self._lock = threading.Lock()

    def call(self, cmd: str, **args: Any) -> Any:
        """Run one command; a file descriptor sent beside the answer (`create(open_fd=True)`,
        `open`) becomes the result's `"fd"`, owned by the caller."""
        result, fd = self._call_with_fd(cmd, args)
        if fd is not None:
            if isinstance(result, dict):
                result["fd"] = fd
            else:
                os.close(fd)
        return result

    def _call_with_fd(self, cmd: str, args: dict[str, Any]) -> tuple[Any, int | None]:
        """The result and the file descriptor that came beside it: exactly one if the response
        says it carries one (`"fds"`), else none (stray ones are closed)."""
        message, fds = self._roundtrip(cmd, args)
        try:
            result = protocol.result_of(message)
            if message.get("fds") and len(fds) != 1:
                raise DMError(errno.EPROTO, f"expected one file descriptor from the daemon, got {len(fds)}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if not message.get("fds"):
            for fd in fds:
                os.close(fd)
            return result, None
        return result, fds[0]

    def _roundtrip(self, cmd: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            try:
                self._sock.sendall(protocol.encode(protocol.request(cmd, **args)))
            except OSError as exc:
                # the daemon may have answered and closed (EAGAIN: too many connections)
                raise refusal(self._sock, exc) from None
            fds: list[int] = []
            while True:
                data, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 20, 4, socket.MSG_CMSG_CLOEXEC)
                fds += got
                if not data:
                    for fd in fds:
                        os.close(fd)
                    raise DMError(errno.ECONNRESET, "the userdm daemon closed the connection")
                messages = self._decoder.feed(data)
                if messages:
                    return messages[0], fds

    def connect_nbd(self) -> socket.socket:
        """A new socket connected to the daemon's NBD server, passed over the control socket
        (SCM_RIGHTS). Do the NBD handshake on it, e.g. libnbd's `connect_socket(sock.fileno())`."""
        _, fd = self._call_with_fd("connect_nbd", {})
        if fd is None:
            raise DMError(errno.EPROTO, "the daemon answered connect_nbd without a file descriptor")
        return socket.socket(fileno=fd)

    def events(self, callback: Callable[[dict[str, Any]], None] | None = None, *,
               name: str | None = None, recent: bool = False) -> EventStream:
        """A live stream of event records (failures, deaths, creates, removes, ...), on a
        connection of its own: iterate it, or pass `callback` (called from a thread of the
        stream). Only records concerning device `name` if given; with `recent`, first the
        recent ones. `close()` the stream to end it."""
        stream = EventStream(self.path, name=name, recent=recent)
        return stream.start(callback) if callback is not None else stream

    def __getattr__(self, cmd: str) -> Any:
        # a command of the protocol that has no method below yet (see test_client_api)
        if cmd not in protocol.COMMANDS or cmd.startswith("_"):
            raise AttributeError(cmd)
        return lambda *args, **kwargs: self.call(cmd, **_positional(cmd, args), **kwargs)

    # ---- the Mapper's commands, over the control socket -------------------------------------

    def version(self) -> dict[str, Any]:
        """`{"library": "0.1.0", "driver": [4, 48, 0]}`."""
        return self.call("version")  # type: ignore[no-any-return]

    def targets(self) -> list[dict[str, Any]]:
        """The target types: `[{"name": "linear", "version": [1, 4, 0]}, ...]`."""
        return self.call("targets")  # type: ignore[no-any-return]

    def list(self) -> list[dict[str, Any]]:
        """Every device's info (partitions too), sorted by name."""
        return self.call("list")  # type: ignore[no-any-return]

    def tree(self) -> list[dict[str, Any]]:
        """Every device's info with `"deps"`: the devices its tables use (`ls --tree`)."""
        return self.call("tree")  # type: ignore[no-any-return]

    def info(self, name: str) -> dict[str, Any]:
        """A device's state: name, uuid, major, minor, live, inactive, suspended, readonly,
        open_count, event_nr, target_count, size (bytes) and userdm's flags."""
        return self.call("info", name=name)  # type: ignore[no-any-return]

    def create(self, name: str | None, table: str | None = None, *, uuid: str | None = None,
               readonly: bool = False, minor: int | None = None, shared: bool = False,
               autoclear: bool = False, max_opens: int | None = None, open_fd: bool = False,
               holder: str | None = None, interpose: bool = False, blockdev: bool = False) -> dict[str, Any]:
        """Create a device (name None: the daemon picks one); with a table, load and resume it.
        With `open_fd`, the result's `"fd"` is an NBD client socket holding an open of it;
        with `blockdev`, it gets a kernel block device at RUNTIME/dev/NAME."""
        return self.call("create", name=name, table=table, uuid=uuid, readonly=readonly,  # type: ignore[no-any-return]
                         minor=minor, shared=shared, autoclear=autoclear, max_opens=max_opens,
                         open_fd=open_fd, holder=holder, interpose=interpose, blockdev=blockdev)

    def load(self, name: str, table: str, *, readonly: bool = False) -> dict[str, Any]:
        """Load a table into the inactive slot; `resume` makes it live."""
        return self.call("load", name=name, table=table, readonly=readonly)  # type: ignore[no-any-return]

    def clear(self, name: str) -> dict[str, Any]:
        """Drop the inactive table."""
        return self.call("clear", name=name)  # type: ignore[no-any-return]

    def suspend(self, name: str, *, noflush: bool = False, nolockfs: bool = False) -> dict[str, Any]:
        """Hold new I/O and wait for the I/O in flight."""
        return self.call("suspend", name=name, noflush=noflush, nolockfs=nolockfs)  # type: ignore[no-any-return]

    def resume(self, name: str) -> dict[str, Any]:
        """Make the inactive table live (if any) and release held I/O."""
        return self.call("resume", name=name)  # type: ignore[no-any-return]

    def remove(self, name: str, *, force: bool = False, deferred: bool = False, retry: bool = False,
               no_open: bool = False) -> dict[str, Any]:
        """Remove a device (EBUSY while open, unless `deferred`: then at its last close)."""
        return self.call("remove", name=name, force=force, deferred=deferred, retry=retry,  # type: ignore[no-any-return]
                         no_open=no_open)

    def remove_all(self, *, force: bool = False, deferred: bool = False) -> dict[str, Any]:
        """Remove every device that is not open; `{"left_open": [...]}` names the others."""
        return self.call("remove_all", force=force, deferred=deferred)  # type: ignore[no-any-return]

    def wipe_table(self, name: str) -> dict[str, Any]:
        """Replace the table by an error target of the same size."""
        return self.call("wipe_table", name=name)  # type: ignore[no-any-return]

    def partprobe(self, name: str) -> list[dict[str, Any]]:
        """Read the device's partition table again; the partitions' infos."""
        return self.call("partprobe", name=name)  # type: ignore[no-any-return]

    def table(self, name: str, *, inactive: bool = False, showkeys: bool = False) -> list[list[Any]]:
        """Table lines `[start, length, type, params]` in the kernel's format."""
        return self.call("table", name=name, inactive=inactive, showkeys=showkeys)  # type: ignore[no-any-return]

    def table_text(self, name: str, *, inactive: bool = False, showkeys: bool = False) -> str:
        """The table as one string, a line per target, as `dmsetup table NAME` prints it."""
        return self.call("table_text", name=name, inactive=inactive, showkeys=showkeys)  # type: ignore[no-any-return]

    def status(self, name: str, *, inactive: bool = False) -> list[list[Any]]:
        """Status lines `[start, length, type, status]` in the kernel's formats."""
        return self.call("status", name=name, inactive=inactive)  # type: ignore[no-any-return]

    def deps(self, name: str, *, inactive: bool = False) -> list[dict[str, Any]]:
        """The devices a table uses: `{"name", "devno", "device", "shared"}` each."""
        return self.call("deps", name=name, inactive=inactive)  # type: ignore[no-any-return]

    def rename(self, name: str, new_name: str | None = None, *, uuid: str | None = None) -> dict[str, Any]:
        """Rename a device, or (`uuid`) set the uuid of one that has none."""
        return self.call("rename", name=name, new_name=new_name, uuid=uuid)  # type: ignore[no-any-return]

    def message(self, name: str, sector: int, message: str) -> str | None:
        """Send a message to the target at `sector` (or `@cancel_deferred_remove`); its answer."""
        return self.call("message", name=name, sector=sector, message=message)  # type: ignore[no-any-return]

    def wait(self, name: str, event_nr: int = 0, *, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the device's event number exceeds `event_nr` (ETIMEDOUT after `timeout`)."""
        return self.call("wait", name=name, event_nr=event_nr, timeout=timeout)  # type: ignore[no-any-return]

    def find_name(self, *, uuid: str | None = None, major: int | None = None,
                  minor: int | None = None) -> str:
        """The name of the device with this uuid, or this major and minor."""
        return self.call("find_name", uuid=uuid, major=major, minor=minor)  # type: ignore[no-any-return]

    def open(self, name: str, *, readonly: bool = False, exclusive: bool = False,
             holder: str | None = None, diskseq: int | None = None, hook: str | None = None,
             hook_timeout: float | None = None, ops: object | None = None) -> dict[str, Any]:
        """An open of the device that lasts while the result's `"fd"` (an NBD client socket) or
        a copy of it stays open; only of the device with disk sequence number `diskseq` if
        given (ENXIO otherwise); `hook`: a script the daemon runs as the holder's ops.
        `ops`: the holder's ops as callbacks (an object or mapping with any of `freeze()`,
        `thaw()`, `sync()`, `notify_failure(offset, length, flags)`, `mark_dead(surprise)`),
        called from a thread of the result's `"ops"`, a `HolderChannel` (its own connection),
        each within `hook_timeout` seconds; `"ops"`'s `close()` ends the registration."""
        args = {"name": name, "readonly": readonly, "exclusive": exclusive, "holder": holder, "diskseq": diskseq,
                "hook": hook, "hook_timeout": hook_timeout}
        if ops is not None:
            return HolderChannel(self.path, ops, args).info
        return self.call("open", **args)  # type: ignore[no-any-return]

    def era_changed(self, name: str, since: int, *, metadata_snapshot: bool = False) -> list[dict[str, Any]]:
        """The sector runs of an era device written since era `since`."""
        return self.call("era_changed", name=name, since=since,  # type: ignore[no-any-return]
                         metadata_snapshot=metadata_snapshot)

    def notify_failure(self, dev: str, offset: int, length: int, flags: int = 0) -> list[dict[str, Any]]:
        """Report a media failure on bytes `offset`..`offset+length` of `dev`; where it reached."""
        return self.call("notify_failure", dev=dev, offset=offset, length=length,  # type: ignore[no-any-return]
                         flags=flags)

    def recent_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The recent event records (of device `name`, if given)."""
        return self.call("recent_events", name=name)  # type: ignore[no-any-return]

    def open_device(self, name: str, *, write: bool = True) -> "RemoteOpen":
        """Read and write the device, as an in-process `Mapper.open_device` does: over the
        daemon's NBD socket (the connection counts in its open count until `close()`)."""
        from ..nbd.client import RemoteDevice
        sock = os.path.join(os.path.dirname(self.path), "nbd.sock")
        return RemoteOpen(RemoteDevice(f"nbd+unix:///{name}?socket={sock}"), write=write)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteOpen:
    """An open of a daemon's device (`Client.open_device`): byte offsets, like `BlockOpen`."""

    def __init__(self, device: Any, *, write: bool) -> None:
        self.device = device
        self.writable = write

    @property
    def size(self) -> int:
        """The device's size in bytes."""
        return int(self.device.size)

    def _check(self, offset: int, length: int, write: bool) -> None:
        if write and not self.writable:
            raise DMError(errno.EBADF, f"{self.device.url}: opened read-only (write=False)")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DMError(errno.EINVAL, f"{self.device.url}: bytes {offset}+{length} lie outside "
                          f"the device ({self.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`."""
        self._check(offset, length, False)
        buf = bytearray(length)
        self.device.readinto(offset, memoryview(buf))
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write `data` at `offset` (`fua`: on stable storage when this returns)."""
        self._check(offset, len(data), True)
        self.device.write(offset, memoryview(data), fua)

    def flush(self) -> None:
        """Everything written is on stable storage."""
        self.device.flush()

    def close(self) -> None:
        """Close the open: when this returns, the daemon has released it (a `remove` that
        follows does not find the device open)."""
        self.device.close_backing(wait=True)

    def __enter__(self) -> "RemoteOpen":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Positional parameters of the Mapper methods, so `client.create("v", table)` works as in process.
_POSITIONAL = {
    "create": ("name", "table"), "load": ("name", "table"), "message": ("name", "sector", "message"),
    "rename": ("name", "new_name"), "wait": ("name", "event_nr"),
    "notify_failure": ("dev", "offset", "length", "flags"),
}


def _positional(cmd: str, args: tuple[Any, ...]) -> dict[str, Any]:
    names = _POSITIONAL.get(cmd, ("name",))
    if len(args) > len(names):
        raise TypeError(f"{cmd}() takes at most {len(names)} positional arguments")
    return dict(zip(names, args))


def connect(runtime_dir: str | None = None) -> Client:
    """Connect to the daemon that serves `runtime_dir` (default: see DESIGN §3)."""
    return Client(str(paths.control_socket(paths.runtime_dir(runtime_dir))))
