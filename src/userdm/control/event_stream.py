"""The `events` stream of the control socket: the daemon's event records, live, one per message.

A client sends `{"cmd": "events", "args": {"name": NAME or null, "recent": bool}}`. The daemon
answers `{"ok": true, "result": {"stream": "events"}}`, then (with `recent`) the recent records,
then every new record as it happens, each as `{"event": RECORD}` (records: `userdm.dm.events`),
only those concerning NAME if given, until the client closes the connection. A client that
reads too slowly loses the oldest undelivered records and gets `{"event": {"event": "lost",
"count": N}}` in their place; the daemon never waits for it.

`serve_events` is the daemon's side (one control connection's thread); `EventStream` is the
client's (`userdm.connect().events(...)`): iterate it, or give it a callback that a thread of
its own calls; `close()` ends it.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..dm.events import matches
from ..errors import DMError
from . import protocol
from .dial import dial, refusal

#: records kept for a slow reader before the oldest are dropped
MAX_PENDING = 10000


def serve_events(conn: socket.socket, mapper: Any, args: Any) -> None:
    """Stream event records on `conn` until the peer closes it (or the server shuts it down)."""
    if not isinstance(args, dict) or not isinstance(args.get("name"), (str, type(None))):
        conn.sendall(protocol.encode(protocol.error(
            DMError(errno.EINVAL, "events: the argument 'name' must be a device name or null"))))
        return
    name = args.get("name")
    pending: deque[dict[str, Any]] = deque()
    lost = 0
    lock = threading.Lock()
    try:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # e.g. EMFILE: say so, the connection carries on
        conn.sendall(protocol.encode(protocol.error(DMError.from_os(exc, "events: cannot start a stream"))))
        return

    def listener(record: dict[str, Any]) -> None:
        nonlocal lost
        if not matches(record, name):
            return
        with lock:
            if len(pending) >= MAX_PENDING:
                pending.popleft()
                lost += 1
            pending.append(record)
        try:
            os.write(wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the sender is awake anyway

    backlog = mapper.subscribe(listener)
    selector = selectors.DefaultSelector()
    try:
        first = [protocol.ok({"stream": "events"})]
        if args.get("recent"):
            first += [{"event": record} for record in backlog if matches(record, name)]
        conn.sendall(b"".join(protocol.encode(m) for m in first))
        selector.register(conn, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is conn:
                    if not conn.recv(4096):
                        return  # the client closed the stream
                else:
                    while True:
                        try:
                            if not os.read(wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
            with lock:
                batch = list(pending)
                pending.clear()
                dropped, lost = lost, 0
            if dropped:
                batch.insert(0, {"event": "lost", "count": dropped})
            if batch:
                conn.sendall(b"".join(protocol.encode({"event": record}) for record in batch))
    finally:
        mapper.unsubscribe(listener)
        selector.close()
        os.close(wake_r)
        os.close(wake_w)


class EventStream:
    """A live stream of the daemon's event records on a control connection of its own."""

    def __init__(self, path: str, *, name: str | None = None, recent: bool = False) -> None:
        self._sock = dial(path)  # a connection of its own, made as every client makes one
        self._decoder = protocol.Decoder()
        self._ready: deque[dict[str, Any]] = deque()
        self._thread: threading.Thread | None = None
        try:
            try:
                self._sock.sendall(protocol.encode(protocol.request("events", name=name, recent=recent)))
            except OSError as exc:
                raise refusal(self._sock, exc) from None
            protocol.result_of(self._next_message())
        except BaseException:
            self._sock.close()
            raise

    def _next_message(self) -> dict[str, Any]:
        while not self._ready:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                raise EOFError
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The records, as they happen; ends when the stream is closed or the daemon goes."""
        while True:
            try:
                message = self._next_message()
            except EOFError:
                return
            record = message.get("event")
            if isinstance(record, dict):
                yield record

    def start(self, callback: Callable[[dict[str, Any]], None]) -> EventStream:
        """Call `callback(record)` for each record, from a thread of this stream."""
        def run() -> None:
            for record in self:
                callback(record)
        self._thread = threading.Thread(target=run, name="userdm-events", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """End the stream (the daemon stops sending); waits for the callback thread."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
