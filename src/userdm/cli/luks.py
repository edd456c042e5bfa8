"""`userdm luks`: open cryptsetup's LUKS1/LUKS2 volumes with the `crypt` target.

    userdm luks open DEVICE NAME [--key-file F] [--header FILE] [--key-slot N] [--readonly]
                                 [--allow-discards]     passphrase on stdin unless --key-file
    userdm luks close NAME [--deferred [--no-open]]
    userdm luks dump DEVICE [--header FILE]             the header, like luksDump, no keys

DEVICE (and the header FILE) is anything a table accepts: a file, a block device, a mapped
device, an NBD export. The header is read through the daemon the way a table opens the
device: a temporary read-only, unclaimed `linear` device over it (as cryptsetup once made
`temporary-cryptsetup-PID` devices), created with an open that this process holds, so that it
goes away when the process does (`--autoclear`), read over the daemon's NBD socket. The
unlocked device gets cryptsetup's uuid `CRYPT-LUKS2-<uuid>-NAME`; a device of that name and
uuid that exists without a live table (a daemon restart keeps no keys) gets its table again.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import DMError
from ..targets import _luks

USAGE = ("usage: luks open DEVICE NAME [--key-file F] [--header FILE] [--key-slot N] [--readonly] "
         "[--allow-discards] | luks close NAME | luks dump DEVICE [--header FILE]")
#: the probe device maps this much first, to learn the size of the device from `deps`
PROBE_SECTORS = 8
READ_ALIGN = 4096


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of `luks`, added to the main parser (options may come anywhere)."""
    parser.add_argument("--key-file", help="luks open: read the passphrase from this file (- for stdin)")
    parser.add_argument("--header", help="luks open/dump: the LUKS header is in this file or device")
    parser.add_argument("--key-slot", type=int, metavar="N", help="luks open: try only this keyslot")
    parser.add_argument("--allow-discards", action="store_true", help="luks open: pass discards down")


def main(dm: Any, opts: argparse.Namespace, args: list[str], runtime_dir: str | None) -> None:
    sub, rest = (args[0], args[1:]) if args else ("", [])
    if sub == "open" and len(rest) == 2:
        open_volume(dm, runtime_dir, rest[0], rest[1], opts)
    elif sub == "close" and len(rest) == 1:
        close_volume(dm, rest[0], deferred=opts.deferred, no_open=opts.no_open)
    elif sub == "dump" and len(rest) == 1:
        with header_of(dm, runtime_dir, opts.header or rest[0]) as (header, _read, _size):
            sys.stdout.write(_luks.dump(header, rest[0]))
    else:
        raise DMError(errno.EINVAL, USAGE)


def open_volume(dm: Any, runtime_dir: str | None, device: str, name: str, opts: argparse.Namespace) -> None:
    passphrase = read_passphrase(opts.key_file)
    with header_of(dm, runtime_dir, opts.header or device) as (header, read, size):
        key = _luks.unlock(header, read, bytes(passphrase), opts.key_slot)
    passphrase[:] = bytes(len(passphrase))
    try:
        if opts.header:
            size = device_size(dm, device)
        table = _luks.crypt_table(header, key, device, size, allow_discards=opts.allow_discards)
    finally:
        key[:] = bytes(len(key))
    uuid = header.dm_uuid(name)
    existing = next((d for d in dm.list() if d["name"] == name), None)
    if existing is not None and existing.get("uuid") == uuid and not existing.get("live"):
        dm.load(name, table, readonly=opts.readonly)   # back after a restart, without its key
        dm.resume(name)
        return
    dm.create(name, table, uuid=uuid, readonly=opts.readonly)


def close_volume(dm: Any, name: str, *, deferred: bool, no_open: bool) -> None:
    lines = dm.table(name)
    if lines and not any(line[2] == "crypt" for line in lines):
        raise DMError(errno.EINVAL, f"device {name} is not a crypt device (it maps {lines[0][2]})")
    dm.remove(name, deferred=deferred, no_open=no_open)


def read_passphrase(key_file: str | None) -> bytearray:
    """cryptsetup's rules: a key file whole; on stdin, one line without its newline."""
    try:
        if key_file == "-":
            return bytearray(sys.stdin.buffer.read())
        if key_file:
            with open(key_file, "rb") as f:
                return bytearray(f.read())
    except OSError as exc:
        raise DMError.from_os(exc, f"cannot read key file {key_file}") from None
    line = bytearray(sys.stdin.buffer.readline())
    if line.endswith(b"\n"):
        del line[-1:]
    if not line:
        raise DMError(errno.EINVAL, "no passphrase on stdin (or give --key-file)")
    return line


_probes = iter(range(1 << 30))


@contextmanager
def probe(dm: Any, ref: str) -> Iterator[tuple[str, int, int]]:
    """A temporary read-only unclaimed linear device over `ref`, held open by this process:
    yields (its name, the open's fd, the size of `ref` in bytes)."""
    name = f"temporary-userdm-luks-{os.getpid()}-{next(_probes)}"
    try:
        info = dm.create(name, f"0 {PROBE_SECTORS} linear {ref} 0", readonly=True, shared=True,
                         autoclear=True, open_fd=True)
    except DMError as exc:
        if "too small" in str(exc):
            raise DMError(errno.EINVAL, f"{ref} is too small for a LUKS header") from None
        raise DMError(exc.errno, f"cannot open {ref}: {exc.message}") from None
    fd = info["fd"]
    try:
        deps = dm.deps(name)
        yield name, fd, deps[0]["size"] * 512
    finally:
        os.close(fd)   # the last open of an autoclear device: the daemon removes it


def device_size(dm: Any, ref: str) -> int:
    with probe(dm, ref) as (_name, _fd, size):
        return size


@contextmanager
def header_of(dm: Any, runtime_dir: str | None, ref: str) -> Iterator[tuple[_luks.Header, Any, int]]:
    """The parsed header of `ref`, a reader over it and its size, read through the daemon."""
    from ..control import paths
    from ..nbd.client import open_url
    with probe(dm, ref) as (name, _fd, size):
        dm.load(name, f"0 {size // 512} linear {ref} 0", readonly=True)
        dm.resume(name)
        sock = paths.nbd_socket(paths.runtime_dir(runtime_dir))
        remote = open_url(f"nbd+unix:///{name}?socket={sock}")
        try:
            def read(offset: int, length: int) -> bytes:
                if offset < 0 or length < 0 or offset + length > size:
                    raise DMError(errno.EINVAL, f"{ref}: the LUKS header points at bytes {offset}+{length}, "
                                  f"past the end of the device ({size} bytes)")
                start = offset // READ_ALIGN * READ_ALIGN
                end = min(size, -(-(offset + length) // READ_ALIGN) * READ_ALIGN)
                buf = bytearray(end - start)
                remote.readinto(start, memoryview(buf))
                return bytes(buf[offset - start:offset - start + length])
            yield _luks.read_header(read, size), read, size
        finally:
            remote.close_backing()
