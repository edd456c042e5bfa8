"""Ceph RBD images as `BlockDevice`s, through librbd's Python binding (Debian's python3-rbd).

A reference is spelled as qemu spells it (`qemu-img info rbd:...`, `-drive file=rbd:...`):

    rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:OPTION=VALUE]...

`conf=PATH` is the Ceph configuration file (without it, librados's default search:
$CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf, and none found is no error);
`id=USER` the client name without `client.`; every other option is a Ceph configuration option
set on this image's cluster handle (`mon_host=...`, `keyring=...`, `rados_osd_op_timeout=5`),
after the file, so it wins. As in qemu, `\\` escapes the next character, so that a value can
hold a colon (`mon_host=127.0.0.1\\:3300`). An image opened at a snapshot (`@SNAP`) is read-only:
opening it for writing is EROFS.

Nothing hangs: unless the file or the reference says otherwise, the handle waits at most
`client_mount_timeout` (10 s) to reach the monitors and `rados_osd_op_timeout` (30 s) for an
OSD, instead of librados's default of forever. A cluster that cannot be reached when the image
is opened refuses the open (ENXIO, with librados's reason); a missing pool, namespace, image or
snapshot is ENOENT. During I/O, an answer that means the cluster is gone (an operation timed
out, the client was blocklisted or shut down) marks the device dead (`BlockDevice.mark_dead`,
as the NBD client does when its server is gone): the devices stacked on it and their holders
are told, a `dead` event is raised, and its I/O fails with EIO from then on. Other errors (EIO
of one object, EROFS, ENOSPC) fail the request with librbd's errno.

Data path: one request up to `CHUNK` bytes is one synchronous librbd call (the binding drops the
GIL inside); a larger one is cut into `CHUNK`-sized pieces issued together with librbd's aio
calls and waited for. `block_status` asks librbd's `diff_iterate` for the allocated extents
(fast with the object-map feature); the gaps read as zeroes (holes).
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import DMError, clipped, quoted
from .device import STATUS_HOLE, STATUS_ZERO, BlockDevice, BlockOpen

SCHEME = "rbd"
#: the longest reference taken (Ceph's pool, image and snapshot names are short)
MAX_REF = 4096
#: the largest piece of one librbd call; larger requests run as this many bytes per aio call
CHUNK = 4 << 20
#: aio pieces in flight per request at most
MAX_INFLIGHT = 16
#: block_status looks at most this far ahead per call
STATUS_WINDOW = 1 << 30

#: bounded waits, unless the configuration file or the reference sets them
DEFAULT_TIMEOUTS = {"client_mount_timeout": "10", "rados_mon_op_timeout": "10",
                    "rados_osd_op_timeout": "30"}
#: errnos from librados/librbd during I/O that mean the cluster is gone, not one bad range
#: (librados answers a blocklisted client with ESHUTDOWN)
GONE_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNREFUSED})
#: librbd's zero_flags bit: allocate the range instead of punching it
WRITE_ZEROES_THICK = 1


@dataclass(frozen=True)
class RBDSpec:
    """A parsed `rbd:` reference."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    options: tuple[tuple[str, str], ...] = field(default=())


def _tokens(text: str) -> list[tuple[str, str | None]]:
    """`text` cut at its unescaped separators, in one pass: each piece (with `\\` escapes
    removed) and the separator that ended it (None for the last). Before the first `@` or
    `:`, `/`, `@` and `:` separate; after `@`, only `:`."""
    out: list[tuple[str, str | None]] = []
    piece: list[str] = []
    seps = "/@:"
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            piece.append(text[i + 1])
            i += 2
            continue
        if c in seps:
            out.append(("".join(piece), c))
            piece = []
            if c != "/":
                seps = ":"
        else:
            piece.append(c)
        i += 1
    out.append(("".join(piece), None))
    return out


def parse_ref(ref: str) -> RBDSpec:
    """Parse `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE]...`; EINVAL, naming the fault."""
    def bad(why: str) -> DMError:
        return DMError(errno.EINVAL, f"{clipped(ref)}: {why} (an RBD reference is "
                       "rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=USER][:OPTION=VALUE]...)")
    if not ref.startswith(SCHEME + ":"):
        raise bad("not an rbd: reference")
    if len(ref) > MAX_REF:
        raise bad(f"longer than {MAX_REF} characters")
    rest = ref[len(SCHEME) + 1:]
    if "\x00" in rest:
        raise bad("a NUL character")
    if rest.startswith("//"):
        raise bad("rbd: references have no '//' (qemu's spelling)")
    tokens = _tokens(rest)
    at = 0
    while tokens[at][1] == "/" and at + 1 < len(tokens):
        at += 1
    names = [part for part, _sep in tokens[:at + 1]]
    sep = tokens[at][1]
    at += 1
    snapshot = None
    if sep == "@":
        snapshot, sep = tokens[at]
        at += 1
        if not snapshot:
            raise bad("an empty snapshot name after '@'")
    if len(names) < 2:
        raise bad("no pool: the image must be named as POOL/IMAGE")
    if len(names) > 3:
        raise bad(f"{len(names)} names separated by '/' (POOL/IMAGE or POOL/NAMESPACE/IMAGE)")
    if not all(names):
        raise bad("an empty pool, namespace or image name")
    pairs: list[list[str]] = []
    for segment, _sep in tokens[at:]:
        key, eq, value = segment.partition("=")
        if eq and key:
            pairs.append([key, value])
        elif not eq and pairs:
            pairs[-1][1] += ":" + segment   # a colon inside a value: mon_host=127.0.0.1:3300
        else:
            raise bad(f"option {quoted(segment)} is not KEY=VALUE")
    conf = user = None
    options: list[tuple[str, str]] = []
    for key, value in pairs:
        if key == "conf":
            conf = value
        elif key == "id":
            user = value or None
        else:
            options.append((key, value))
    pool, image = names[0], names[-1]
    namespace = names[1] if len(names) == 3 else ""
    return RBDSpec(pool, image, namespace, snapshot, conf, user, tuple(options))


def _errno_of(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return abs(err) if isinstance(err, int) and err else errno.EIO


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text[text.index("]") + 2:] if text.startswith("[errno") and "]" in text else text


class RBDDevice(BlockDevice):
    """An RBD image (or a snapshot of one, read-only) used as an underlying device of tables."""

    def __init__(self, ref: str) -> None:
        self.spec = spec = parse_ref(ref)
        try:
            import rados  # type: ignore[import-not-found]
            import rbd  # type: ignore[import-not-found]
        except ImportError as exc:
            raise DMError(errno.ENOPKG, f"{clipped(ref)}: Ceph's Python bindings are missing "
                          f"(install python3-rbd and python3-rados): {exc}") from None
        self._rbd = rbd
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._open_cluster(ref, rados)
            self._image = self._open_image(ref, rados, rbd)
            size = self._image.size()
        except BaseException:
            self._shutdown()
            raise
        super().__init__(ref, size - size % 512, read_only=spec.snapshot is not None)

    # ---- opening ----------------------------------------------------------------------

    def _open_cluster(self, ref: str, rados: Any) -> None:
        spec = self.spec
        self._cluster = cluster = rados.Rados(rados_id=spec.user)
        for key, value in DEFAULT_TIMEOUTS.items():
            cluster.conf_set(key, value)
        try:
            if spec.conf:
                cluster.conf_read_file(spec.conf)
            else:
                try:
                    cluster.conf_read_file()
                except rados.Error:
                    pass          # as qemu: no configuration file is fine without conf=
        except rados.Error as exc:
            err = _errno_of(exc)
            why = "no such file" if err == errno.ENOENT else _reason(exc)
            raise DMError(err, f"{clipped(ref)}: cannot read the Ceph configuration "
                          f"{quoted(spec.conf)}: {why}") from None
        for key, value in spec.options:
            try:
                cluster.conf_set(key, value)
            except rados.Error as exc:
                why = "is not a Ceph option" if _errno_of(exc) == errno.ENOENT else \
                    f"cannot be {quoted(value)}: {_reason(exc)}"
                raise DMError(errno.EINVAL, f"{clipped(ref)}: {quoted(key)} {why}") from None
        try:
            cluster.connect()
        except rados.Error as exc:
            raise DMError(errno.ENXIO, f"{clipped(ref)}: cannot reach the Ceph cluster (monitors "
                          f"{cluster.conf_get('mon_host') or 'unknown'}): {_reason(exc)}") from None

    def _open_image(self, ref: str, rados: Any, rbd: Any) -> Any:
        spec = self.spec
        try:
            self._ioctx = self._cluster.open_ioctx(spec.pool)
        except rados.Error as exc:
            err = _errno_of(exc)
            what = "does not exist" if err == errno.ENOENT else f"cannot be opened: {_reason(exc)}"
            raise DMError(err, f"{clipped(ref)}: pool {quoted(spec.pool)} {what}") from None
        if spec.namespace:
            self._ioctx.set_namespace(spec.namespace)
        try:
            return rbd.Image(self._ioctx, spec.image, snapshot=spec.snapshot,
                             read_only=spec.snapshot is not None)
        except rbd.Error as exc:
            err = _errno_of(exc)
            where = f"pool {quoted(spec.pool)}" + (f" namespace {quoted(spec.namespace)}" if spec.namespace else "")
            if err == errno.ENOENT:
                what = f"image {quoted(spec.image)}"
                if spec.snapshot is not None and self._image_exists(rbd, spec.image):
                    what = f"snapshot {quoted(spec.snapshot)} of image {quoted(spec.image)}"
                raise DMError(err, f"{clipped(ref)}: {what} does not exist in {where}") from None
            raise DMError(err, f"{clipped(ref)}: image {quoted(spec.image)} in {where} cannot be "
                          f"opened: {_reason(exc)}") from None

    def _image_exists(self, rbd: Any, name: str) -> bool:
        try:
            rbd.Image(self._ioctx, name, read_only=True).close()
        except rbd.Error:
            return False
        return True

    def open(self, *, write: bool = False, holder: object | None = None,
             holder_ops: Any = None) -> BlockOpen:
        if write and self.spec.snapshot is not None:
            raise DMError(errno.EROFS, f"{self.ref}: snapshot {quoted(self.spec.snapshot)} of an RBD "
                          "image is read-only and cannot be opened for writing")
        return super().open(write=write, holder=holder, holder_ops=holder_ops)

    def refresh_size(self) -> None:
        """librbd follows the image's header: a `rbd resize` elsewhere shows here."""
        try:
            size = self._call("size", 0, 0, self._image.size)
        except (DMError, AttributeError):
            return                  # unreachable or closed: its I/O says so
        self.size = size - size % 512

    # ---- errors -----------------------------------------------------------------------

    def _failed(self, what: str, offset: int, length: int, err: int, reason: str) -> DMError:
        """The error of a failed request; a gone cluster kills the device (DESIGN §6)."""
        if err in GONE_ERRNOS:
            if not self._closed and not self.dead:
                self.mark_dead(True)
            return DMError(errno.EIO, f"{self.ref}: {what} at byte {offset} length {length} failed, "
                           f"the Ceph cluster is unreachable: {reason}")
        return DMError(err, f"{self.ref}: {what} at byte {offset} length {length} failed: {reason}")

    def _call(self, what: str, offset: int, length: int, fn: Any, *args: Any) -> Any:
        if self.dead:
            raise DMError(errno.EIO, f"{self.ref} is dead (its Ceph cluster was lost)")
        try:
            return fn(*args)
        except self._rbd.Error as exc:
            raise self._failed(what, offset, length, _errno_of(exc), _reason(exc)) from None

    # ---- BlockDevice I/O ----------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview) -> None:
        view = memoryview(buf)
        if len(view) <= CHUNK:
            data = self._call("read", offset, len(view), self._image.read, offset, len(view))
            if len(data) != len(view):
                raise DMError(errno.EIO, f"{self.ref}: read at byte {offset} returned {len(data)} "
                              f"of {len(view)} bytes")
            view[:] = data
            return

        def issue(off: int, at: int, n: int, done: Any) -> Any:
            def landed(completion: Any, data: bytes | None) -> None:
                if completion.get_return_value() >= 0 and data is not None and len(data) == n:
                    view[at:at + n] = data
                    done(None)
                else:
                    rv = completion.get_return_value()
                    done(-rv if rv < 0 else errno.EIO)
            return self._image.aio_read(off, n, landed)
        self._aio("read", offset, len(view), issue)

    def write(self, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        if self.read_only:
            raise DMError(errno.EROFS, f"{self.ref}: a snapshot of an RBD image is read-only")
        view = memoryview(data)
        if len(view) <= CHUNK:
            self._call("write", offset, len(view), self._image.write, bytes(view), offset)
        else:
            def issue(off: int, at: int, n: int, done: Any) -> Any:
                def landed(completion: Any) -> None:
                    rv = completion.get_return_value()
                    done(-rv if rv < 0 else None)
                return self._image.aio_write(bytes(view[at:at + n]), off, landed)
            self._aio("write", offset, len(view), issue)
        if fua:
            self.flush()

    def _aio(self, what: str, offset: int, length: int, issue: Any) -> None:
        """Run `issue(offset, position, length, done)` for each CHUNK of the range, at most
        MAX_INFLIGHT at once; `done(errno or None)` is called by each piece's completion."""
        if self.dead:
            raise DMError(errno.EIO, f"{self.ref} is dead (its Ceph cluster was lost)")
        errors: list[tuple[int, int]] = []
        cond = threading.Condition()
        state = {"pending": 0}
        completions: list[Any] = []

        for pos in range(0, length, CHUNK):
            n = min(CHUNK, length - pos)
            with cond:
                while state["pending"] >= MAX_INFLIGHT:
                    cond.wait()
                if errors:
                    break
                state["pending"] += 1

            def done(err: int | None, off: int = offset + pos) -> None:
                with cond:
                    if err is not None:
                        errors.append((off, err))
                    state["pending"] -= 1
                    cond.notify_all()
            try:
                completions.append(issue(offset + pos, pos, n, done))
            except self._rbd.Error as exc:
                with cond:
                    state["pending"] -= 1
                    errors.append((offset + pos, _errno_of(exc)))
                break
        with cond:
            while state["pending"]:
                cond.wait()
        if errors:
            off, err = min(errors)
            raise self._failed(what, off, min(CHUNK, offset + length - off), err, errno.errorcode.get(err, str(err)))

    def flush(self) -> None:
        if not self.read_only:
            self._call("flush", 0, 0, self._image.flush)

    def discard(self, offset: int, length: int) -> None:
        if length > 0 and not self.read_only:
            self._call("discard", offset, length, self._image.discard, offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        if self.read_only:
            raise DMError(errno.EROFS, f"{self.ref}: a snapshot of an RBD image is read-only")
        if length > 0:
            flags = 0 if may_unmap else WRITE_ZEROES_THICK
            self._call("write zeroes", offset, length, self._image.write_zeroes, offset, length, flags)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        length = min(length, STATUS_WINDOW)
        present: list[tuple[int, int]] = []
        self._call("block status", offset, length, self._image.diff_iterate, offset, length, None,
                   lambda off, n, exists: present.append((off, n)) if exists else None)
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        for off, n in sorted(present):
            off, stop = max(off, pos), min(off + n, end)
            if stop <= off:
                continue
            if off > pos:
                out.append((off - pos, STATUS_HOLE | STATUS_ZERO))
            out.append((stop - off, 0))
            pos = stop
        if pos < end:
            out.append((end - pos, STATUS_HOLE | STATUS_ZERO))
        return out

    # ---- closing ------------------------------------------------------------------------

    def close_backing(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        for obj, method in ((self._image, "close"), (self._ioctx, "close"), (self._cluster, "shutdown")):
            if obj is not None:
                try:
                    getattr(obj, method)()
                except Exception:
                    pass   # a lost cluster: nothing more to release than librados's own handle
        self._image = self._ioctx = self._cluster = None


def open_ref(ref: str) -> RBDDevice:
    """The backing-store factory for `rbd:` references."""
    return RBDDevice(ref)


def register(backing_stores: Any) -> None:
    """Make `rbd:POOL/IMAGE...` usable as a device reference in tables."""
    backing_stores.register_scheme(SCHEME, open_ref, opaque=True)
