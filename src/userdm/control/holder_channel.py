"""Holder ops of a Python program outside the daemon, over a control connection of its own.

A client sends `open` with `"ops": [names]` (the operations its callbacks serve, from
`hooks.OPS`), an exclusive open (`exclusive` or `holder`). The daemon registers `HolderOps`
that send each operation back over that connection and answers as `open` does (the open's
NBD socket beside the answer). From then on the connection carries operations the other way:

    daemon -> client   {"op": "freeze", "args": [], "id": 7}
    client -> daemon   {"id": 7, "ok": true}   or   {"id": 7, "ok": false, "errno": "EIO", "message": "..."}

`notify_failure` has `args` `[offset, length, flags]` in the held device's bytes, `mark_dead`
`[surprise]`. One operation at a time; the daemon waits for its answer at most `hook_timeout`
seconds (`hooks.DEFAULT_TIMEOUT` unless given), as it waits for a hook script. A refusal
(the callback's errno, else EIO) or no answer in time (ETIMEDOUT) fails the operation with a
sentence naming the holder and the device; after a freeze that timed out the daemon sends a `thaw` without waiting for it, so a
callback that finishes late leaves nothing frozen. When the connection closes (the client
closes it, or its process dies) the registration ends (`Mapper.drop_holder_ops`); the open
itself lasts while its NBD socket does.

`serve_holder` is the daemon's side (the connection's thread reads answers until it closes);
`HolderChannel` is the client's (`userdm.connect().open(..., ops=callbacks)`): a thread of its
own calls the callbacks, one at a time, and answers.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..block.device import HolderOps
from ..dm import hooks
from ..errors import DMError
from . import protocol
from .dial import dial, refusal

log = logging.getLogger("userdm.control")

#: the largest answer a client may send (a short error sentence fits many times over)
MAX_ANSWER = 64 << 10


class RemoteHolder:
    """The daemon's side of one holder's connection: `holder_ops()` sends operations on it."""

    def __init__(self, conn: socket.socket, name: str, holder: str, ops: list[str], timeout: float) -> None:
        self.conn = conn
        self.name = name
        self.holder = holder
        self.ops = ops
        self.timeout = timeout
        self._call_lock = threading.Lock()  # one operation at a time
        self._cond = threading.Condition()
        self._ready = False  # the open's answer is sent: operations may follow it
        self._gone = False
        self._seq = 0
        self._answers: dict[int, dict[str, Any]] = {}

    def _what(self, op: str) -> str:
        return f"{op} of device {self.name} by holder {self.holder} (a client's callback)"

    def call(self, op: str, *args: Any) -> None:
        """Send `op` and wait for its answer; DMError naming the holder if it fails."""
        deadline = time.monotonic() + self.timeout
        if not self._call_lock.acquire(timeout=self.timeout):
            raise DMError(errno.ETIMEDOUT, f"{self._what(op)} did not start within {self.timeout:g} seconds: "
                          "the holder is still busy with an earlier operation")
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._ready or self._gone, max(0.0, deadline - time.monotonic()))
                if self._gone:  # unregistered a moment from now: as a holder without ops
                    if op == "notify_failure":
                        raise DMError(errno.EOPNOTSUPP, f"{self._what(op)}: the holder's connection is closed")
                    return
                self._seq += 1
                ident = self._seq
            self._send({"op": op, "args": list(args), "id": ident})
            with self._cond:
                self._cond.wait_for(lambda: ident in self._answers or self._gone,
                                    max(0.0, deadline - time.monotonic()))
                answer = self._answers.pop(ident, None)
                self._answers.clear()  # late answers of earlier operations
            if answer is None:
                if self._gone:
                    raise DMError(errno.EPIPE, f"{self._what(op)}: the holder's connection closed before it answered")
                if op == "freeze":
                    self._send_quietly("thaw")  # if the freeze ends late, nothing stays frozen
                raise DMError(errno.ETIMEDOUT, f"{self._what(op)} did not answer within {self.timeout:g} seconds "
                              "(open --hook-timeout)")
            if not answer.get("ok"):
                cause = DMError.from_name(str(answer.get("errno", "EIO")), str(answer.get("message", "")))
                raise hooks.failed(cause, self._what(op))
        finally:
            self._call_lock.release()

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.conn.sendall(protocol.encode(message))
        except OSError as exc:  # a client that does not read: the connection is dropped
            self._close()
            raise DMError(errno.EPIPE, f"{self._what(message['op'])}: cannot reach the holder: "
                          f"{exc.strerror or type(exc).__name__}") from None

    def _send_quietly(self, op: str) -> None:
        with self._cond:
            self._seq += 1
            ident = self._seq
        try:
            self._send({"op": op, "args": [], "id": ident})
        except DMError as exc:
            log.warning("%s", exc.message)

    def holder_ops(self) -> HolderOps:
        """The operations the client serves; the others are not registered (as a holder
        without them: no freeze, a failure it does not take)."""
        return hooks.holder_ops(self.call, self.ops)

    def ready(self) -> None:
        with self._cond:
            self._ready = True
            self._cond.notify_all()

    def serve(self) -> None:
        """Read the client's answers until the connection closes."""
        decoder = protocol.Decoder(MAX_ANSWER)
        try:
            while True:
                try:
                    data = self.conn.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                for item in decoder.feed_requests(data):
                    ident = item.get("id") if isinstance(item, dict) else None
                    if not isinstance(item, dict) or not isinstance(ident, int) or isinstance(ident, bool):
                        log.warning("holder %s of %s sent something that is not an answer; closing its "
                                    "connection", self.holder, self.name)
                        return
                    with self._cond:
                        if ident == self._seq:
                            self._answers[ident] = item
                            self._cond.notify_all()
        except OSError:
            return
        finally:
            self._close()

    def _close(self) -> None:
        with self._cond:
            self._gone = True
            self._cond.notify_all()
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve_holder(conn: socket.socket, mapper: Any, args: dict[str, Any],
                 reply: Callable[[dict[str, Any]], None]) -> None:
    """Open for a holder whose ops are served on `conn` (see the module docstring), answer
    with `reply`, then read its answers until the connection closes; the registration ends then."""
    timeout = hooks.DEFAULT_TIMEOUT if args.get("hook_timeout") is None else float(args["hook_timeout"])
    holder = args.get("holder") or "(exclusive open)"
    remote = RemoteHolder(conn, args["name"], holder, list(args["ops"]), timeout)
    ops = remote.holder_ops()
    response = protocol.dispatch(mapper, {"cmd": "open", "args": {**args, "ops": None}}, ops=ops)
    if not response.get("ok"):
        reply(response)
        return
    remote.holder = str(response["result"].get("holder") or holder)
    try:
        reply(response)
        conn.settimeout(timeout)  # each operation must go through within the timeout
        remote.ready()
        remote.serve()
    finally:
        remote._close()
        mapper.drop_holder_ops(ops)


class HolderChannel:
    """The client's side: an open whose holder ops are `callbacks`, served by a thread of
    this channel on a control connection of its own. `close()` ends the registration."""

    def __init__(self, path: str, callbacks: object, args: dict[str, Any]) -> None:
        self._callbacks = hooks.callables_of(callbacks)
        self._sock = dial(path)
        self._decoder = protocol.Decoder()
        self._ready: deque[dict[str, Any]] = deque()
        try:
            self.info = self._open(args)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="userdm-holder-ops", daemon=True)
        self._thread.start()

    def _open(self, args: dict[str, Any]) -> dict[str, Any]:
        request = protocol.request("open", **args, ops=sorted(self._callbacks))
        try:
            self._sock.sendall(protocol.encode(request))
        except OSError as exc:
            raise refusal(self._sock, exc) from None
        fds: list[int] = []
        try:
            while not self._ready:
                data, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 4, socket.MSG_CMSG_CLOEXEC)
                fds += got
                if not data:
                    raise DMError(errno.ECONNRESET, "the userdm daemon closed the connection")
                self._ready.extend(self._decoder.feed(data))
            answer = self._ready.popleft()
            info = protocol.result_of(answer)
            if len(fds) != 1 or not isinstance(info, dict):
                raise DMError(errno.EPROTO, f"expected one file descriptor from the daemon, got {len(fds)}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        info["fd"] = fds[0]
        info["ops"] = self
        return info

    def _next(self) -> dict[str, Any] | None:
        while not self._ready:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                return None
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def _run(self) -> None:
        while True:
            try:
                message = self._next()
            except protocol.ProtocolError:
                return
            if message is None:
                return
            answer: dict[str, Any] = {"id": message.get("id"), "ok": True}
            fn = self._callbacks.get(str(message.get("op")))
            try:
                if fn is not None:
                    fn(*message.get("args") or [])
            except Exception as exc:
                err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                said = exc.message if isinstance(exc, DMError) else f"{type(exc).__name__}: {exc}"
                answer = {"id": message.get("id"), "ok": False, "errno": errno.errorcode.get(err, "EIO"),
                          "message": said[:1000]}
            try:
                self._sock.sendall(protocol.encode(answer))
            except OSError:
                return

    def close(self) -> None:
        """End the registration (the daemon sends no more operations); waits for a callback
        that is running, unless called from one. The open lasts while its `fd` does."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._sock.close()

    def __enter__(self) -> HolderChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
