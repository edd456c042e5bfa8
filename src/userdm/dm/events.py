"""The device-mapper's event log: numbered records, a ring of the recent ones, and listeners.

Every change and every notice becomes one record, a JSON-ready dict with `seq` (increasing),
`time` (seconds since the epoch), `event` and `name` (the device), plus what the event carries:

    create   size                         remove
    load / clear                          rename     old_name
    suspend  noflush, nolockfs            resume     resized, size
    resize   old_size, size               table_event event_nr
    failure  offset, length, flags, path, handled[, holder_error]   (bytes of device `name`)
    dead     surprise, path               deferred_remove / cancel_deferred_remove / message

`failure` and `dead` are emitted by every mapped device they reach on their way up a stack
(block/failure.py), `path` naming the devices they travelled, from where they started.
`userdm events [--follow] [NAME]` prints these records as JSON lines; `Mapper.subscribe` and
`Client.events` deliver them to Python. Listeners run in the thread that emitted, outside every
lock, and must return promptly; records from concurrent threads may reach a listener out of
`seq` order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("userdm.dm.events")

#: how many recent records `recent` keeps
RING_SIZE = 1000

Listener = Callable[[dict[str, Any]], None]


def matches(record: dict[str, Any], name: str | None) -> bool:
    """Whether a record concerns device `name`: it is the device, its former name, or a device
    on the path a failure or death travelled (so an underlying file can be followed too)."""
    return name is None or record.get("name") == name or record.get("old_name") == name \
        or name in record.get("path", ())


class EventLog:
    """Numbers records, keeps the last RING_SIZE, and hands each to every listener."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._lock = threading.Lock()
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0
        self._listeners: list[Listener] = []

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            record = {"seq": self._seq, "time": time.time(), **record}
            self._ring.append(record)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # a listener must never break the device-mapper
                log.exception("event listener failed")
        return record

    def subscribe(self, listener: Listener) -> list[dict[str, Any]]:
        """Add a listener; returns the recent records, each of which the listener will not get
        again (every record is either in that list or delivered to the listener, never both)."""
        with self._lock:
            self._listeners.append(listener)
            return list(self._ring)

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def recent(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [record for record in self._ring if matches(record, name)]
