"""Failure notification and device death, travelling up a stack of devices (DESIGN §6, seed 004).

A *failure* is a byte range of a device that can no longer be trusted (a media error reported
from outside, a read that returned EIO). `notify(device, offset, length, flags)` gives it to
the device's exclusive holder, if that holder registered `HolderOps.notify_failure`, and then to
every device stacked on it: each user in `device.holder_links` (mapped devices; partitions)
translates the range into its own byte ranges with `failure_below(lower, offset, length)` and
notifies each of them in turn, up to the top. Shared (unclaimed) edges are links too, so they
propagate like claimed ones. The answer is one `Delivery` per device reached, each with the path
of device names the failure travelled; if no holder anywhere took it, `notify` raises EOPNOTSUPP
(the kernel's `dax_holder_notify_failure` without holder ops), and on a dead device ENXIO.

*Death* (`mark_dead(device, surprise)`) travels the same way: the device refuses new opens with
ENXIO and fails I/O with EIO from then on, its holder's `HolderOps.mark_dead` is called, and every
device stacked on it that `dies_with(lower)` dies as well.

A device with an `event_observer` (the device-mapper sets one on every mapped device) is told
about each failure and death that reaches it, as a `failure`/`dead` event record.

Holder callbacks run in the thread that found the failure (often an I/O thread), with no lock
of userdm held: they may open and read devices, but should return promptly.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import DMError


class Stacked(Protocol):
    """What failures and deaths need of a device (every `BlockDevice` is one): its name and
    size, its holder's ops, the devices stacked on it and how each maps a range of it."""

    ref: str
    size: int
    dead: bool
    holder_ops: Any
    holder_links: Any
    event_observer: Any

    def failure_below(self, lower: Stacked, offset: int, length: int) -> list[tuple[int, int]]: ...

    def dies_with(self, lower: Stacked) -> bool: ...

log = logging.getLogger("userdm.block.failure")

#: mf_flags bit: the failure was hit by an access (a read failed), not reported from outside
#: (the kernel's MF_ACTION_REQUIRED)
MF_ACTION_REQUIRED = 1 << 1

#: a translated failure is cut into at most this many ranges per device; beyond that (a huge
#: range over small stripe chunks) the device gets the one range that covers them all
MAX_RANGES = 4096

#: errnos of a read that mean the device itself is gone, not a range of it
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ESTALE})


@dataclass(frozen=True)
class Delivery:
    """One device reached by a failure, in that device's own byte offsets."""

    device: str
    offset: int
    length: int
    flags: int
    path: tuple[str, ...]
    #: the device's holder took it (its `notify_failure` returned)
    handled: bool
    #: the errno name the holder's `notify_failure` refused with, if it did
    holder_error: str | None = None

    def record(self) -> dict[str, Any]:
        """The `failure` event record of this delivery."""
        out: dict[str, Any] = {"event": "failure", "name": self.device, "offset": self.offset,
                               "length": self.length, "flags": self.flags, "path": list(self.path),
                               "handled": self.handled}
        if self.holder_error:
            out["holder_error"] = self.holder_error
        return out


def device_name(device: Stacked) -> str:
    """How a path names a device: a mapped device by its name, anything else by its reference."""
    return getattr(device, "name", None) or device.ref


def notify(device: Stacked, offset: int, length: int, flags: int = 0,
           path: Sequence[str] = ()) -> list[Delivery]:
    """Report the failed byte range [offset, offset+length) of `device` up the stack."""
    if device.dead:
        raise DMError(errno.ENXIO, f"{device.ref} is dead; its failures are no longer reported")
    if offset < 0 or length <= 0 or offset + length > device.size:
        raise DMError(errno.EINVAL, f"{device.ref}: failure at byte {offset} length {length} is not "
                      f"a non-empty range inside the device ({device.size} bytes)")
    deliveries: list[Delivery] = []
    _deliver(device, offset, length, flags, tuple(path), deliveries)
    if not any(d.handled for d in deliveries):
        raise NotHandled(device, offset, length, deliveries)
    return deliveries


class NotHandled(DMError):
    """EOPNOTSUPP: the failure reached no holder that registered `notify_failure`."""

    def __init__(self, device: Stacked, offset: int, length: int, deliveries: list[Delivery]) -> None:
        counts: dict[str, int] = {}
        for d in deliveries:
            counts[d.device] = counts.get(d.device, 0) + 1
        reached = ", ".join(f"{name} ({n} ranges)" if n > 1 else name for name, n in counts.items())
        refused = sorted({f"{d.device}: {d.holder_error}" for d in deliveries if d.holder_error})
        super().__init__(errno.EOPNOTSUPP, f"the failure at byte {offset} length {length} of {device.ref} "
                         f"reached {reached}, but no holder there took it"
                         + (f" (refused by the holder of {', '.join(refused)})" if refused
                            else " (none registered notify_failure)"))
        self.deliveries = deliveries


def _deliver(device: Stacked, offset: int, length: int, flags: int, path: tuple[str, ...],
             out: list[Delivery]) -> None:
    here = device_name(device)
    if here in path:  # a cycle of mapped devices: the failure has been here already
        return
    path = (*path, here)
    handled, refused = False, None
    ops = device.holder_ops
    if ops is not None and ops.notify_failure is not None:
        try:
            ops.notify_failure(offset, length, flags)
            handled = True
        except DMError as exc:
            refused = exc.errno_name
        except Exception:  # a holder's bug must not stop the failure on its way up
            log.exception("notify_failure of the holder of %s failed", here)
            refused = "EIO"
    delivery = Delivery(here, offset, length, flags, path, handled, refused)
    out.append(delivery)
    _observe(device, delivery.record())
    for upper in list(device.holder_links):
        if getattr(upper, "dead", True):
            continue
        for off, n in upper.failure_below(device, offset, length):
            _deliver(upper, off, n, flags, path, out)


def mark_dead(device: Stacked, surprise: bool = True, path: Sequence[str] = ()) -> list[str]:
    """Mark `device` dead and everything stacked on it that dies with it; the names that died."""
    died: list[str] = []
    _kill(device, surprise, tuple(path), died)
    return died


def _kill(device: Stacked, surprise: bool, path: tuple[str, ...], died: list[str]) -> None:
    with device._opens_lock:
        if device.dead:
            return
        device.dead = True
    here = device_name(device)
    path = (*path, here)
    died.append(here)
    ops = device.holder_ops
    if ops is not None and ops.mark_dead is not None:
        try:
            ops.mark_dead(surprise)
        except Exception:
            log.exception("mark_dead of the holder of %s failed", here)
    _observe(device, {"event": "dead", "name": here, "surprise": surprise, "path": list(path)})
    for upper in list(device.holder_links):
        if not getattr(upper, "dead", True) and upper.dies_with(device):
            _kill(upper, surprise, path, died)


def read_failed(device: Stacked, offset: int, length: int, exc: DMError) -> None:
    """A read of [offset, offset+length) from `device` by a table raised `exc`: an EIO becomes a
    failure of that range (flag MF_ACTION_REQUIRED), or of the ranges a target named with
    `Target.read_error`; a vanished device (ENODEV, ESTALE) is marked dead. Each error is
    reported once, by the lowest open that saw it, and never for a device already dead (its EIO
    is the death, reported already)."""
    if getattr(exc, "failure_reported", False) or device.dead:
        return
    exc.failure_reported = True  # type: ignore[attr-defined]
    if exc.errno in GONE_ERRNOS:
        mark_dead(device, True)
        return
    if exc.errno != errno.EIO:
        return
    pieces = [(offset, length)]
    narrowed = getattr(exc, "failed_ranges", None)  # a target's own read error: `Target.read_error`
    if narrowed:
        pieces = merge_ranges((max(off, offset), min(off + n, offset + length) - max(off, offset))
                              for off, n in narrowed) or pieces
    for off, n in pieces:
        try:
            notify(device, off, n, MF_ACTION_REQUIRED)
        except DMError:
            pass  # nobody holds it with notify_failure: the EIO itself still reaches the reader


def _observe(device: Stacked, record: dict[str, Any]) -> None:
    observer = device.event_observer
    if observer is not None:
        try:
            observer(record)
        except Exception:
            log.exception("event observer of %s failed", record.get("name"))


# ---- range arithmetic for translations ----------------------------------------------------

def clip(offset: int, length: int, base: int, size: int) -> list[tuple[int, int]]:
    """The part of [offset, offset+length) inside [base, base+size), relative to `base`."""
    lo, hi = max(offset, base), min(offset + length, base + size)
    return [(lo - base, hi - lo)] if lo < hi else []


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort `(offset, length)` ranges and join those that overlap or touch; past MAX_RANGES
    pieces, the one range that covers them all."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + n) - start)
        else:
            out.append((off, n))
    if len(out) > MAX_RANGES:
        return [(out[0][0], out[-1][0] + out[-1][1] - out[0][0])]
    return out
