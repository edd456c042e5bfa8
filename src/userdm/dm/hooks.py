"""Holder ops of a holder outside the daemon: a hook script, in the manner of
qemu-guest-agent's fsfreeze hook (`userdm open NAME --exclusive --hook SCRIPT -- CMD`).

The daemon runs `SCRIPT freeze`, `SCRIPT thaw`, `SCRIPT sync`, `SCRIPT notify-failure OFFSET
LENGTH FLAGS` (bytes of the held device) or `SCRIPT mark-dead`, with `USERDM_DEVICE` and
`USERDM_HOLDER` in its environment, and waits at most `timeout` seconds for it. A hook that
exits non-zero fails the operation (EIO; a freeze so fails the suspend, which then holds and
freezes nothing) with a sentence naming the hook, the operation and the exit status and the
last line the hook wrote to stderr; a hook still running at the timeout is killed (its whole
process group) and fails it with ETIMEDOUT. A thaw or mark-dead that fails is logged: nothing
is left to undo. The registration ends with the open (the holder's exit closes it).

A holder in a Python program gives its ops as callbacks instead (`callbacks_ops`): an object or
a mapping with any of `freeze()`, `thaw()`, `sync()`, `notify_failure(offset, length, flags)`
and `mark_dead(surprise)`; an exception they raise fails the operation with a sentence naming
the holder (the daemon delivers them over the holder's control connection,
`userdm.control.holder_channel`, with the same timeout as a hook's).

`SPAWN_LOCK` is held while a hook process is started. A process that serves FUSE files must
not fork while it holds one of them open (`userdm.export.fuse.export`); code that opens one
(the block device export's LOOP_CONFIGURE) holds the lock meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..block.device import HolderOps
from ..errors import DMError

log = logging.getLogger("userdm.hooks")

SPAWN_LOCK = threading.Lock()
#: seconds a hook may run (`open --hook-timeout`), and a client's callback (`open(ops=...)`)
DEFAULT_TIMEOUT = 30.0
#: the holder operations, as a callbacks object or mapping names them
OPS = ("freeze", "thaw", "sync", "notify_failure", "mark_dead")


def check_script(script: str) -> str:
    """An absolute path to an executable file, or DMError naming what is wrong with it."""
    if not os.path.isabs(script):
        raise DMError(errno.EINVAL, f"--hook {script!r}: the hook must be an absolute path")
    if not os.path.isfile(script):
        raise DMError(errno.ENOENT, f"--hook {script}: no such file")
    if not os.access(script, os.X_OK):
        raise DMError(errno.EACCES, f"--hook {script}: not executable")
    return script


class Hook:
    """The hook script of one holder of device `name`."""

    def __init__(self, script: str, name: str, holder: str, timeout: float | None = None) -> None:
        self.script = check_script(script)
        self.name = name
        self.holder = holder
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout

    def run(self, op: str, *args: str) -> None:
        env = {**os.environ, "USERDM_DEVICE": self.name, "USERDM_HOLDER": self.holder}
        with SPAWN_LOCK:
            proc = subprocess.Popen([self.script, op, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env, close_fds=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise DMError(errno.ETIMEDOUT, f"hook {self.script} {op} of device {self.name} (holder {self.holder}) "
                          f"did not exit within {self.timeout:g} seconds and was killed") from None
        if proc.returncode != 0:
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
            status = f"status {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
            raise DMError(errno.EIO, f"hook {self.script} {op} of device {self.name} (holder {self.holder}) "
                          f"exited with {status}" + (f": {last[0]}" if last else ""))

    def _op(self, op: str, *args: Any) -> None:
        if op == "mark_dead":
            args = ()  # the hook is told no more than that the device is gone
        self.run(op.replace("_", "-"), *map(str, args))

    def holder_ops(self) -> HolderOps:
        return holder_ops(self._op)


def callables_of(ops: object) -> dict[str, Callable[..., Any]]:
    """The callbacks of `ops` (an object with methods, or a mapping) by operation name;
    EINVAL if one is not callable or `ops` has none of `OPS`."""
    found: dict[str, Callable[..., Any]] = {}
    for op in OPS:
        fn = ops.get(op) if isinstance(ops, Mapping) else getattr(ops, op, None)
        if fn is None:
            continue
        if not callable(fn):
            raise DMError(errno.EINVAL, f"holder ops: {op} is {type(fn).__name__}, not a callable")
        found[op] = fn
    if not found:
        raise DMError(errno.EINVAL, f"holder ops: {type(ops).__name__} has none of {', '.join(OPS)}")
    return found


def failed(exc: BaseException, what: str) -> DMError:
    """`exc` raised by a holder's callback as a DMError whose sentence begins with `what`
    (its errno if it has one, else EIO)."""
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    said = exc.message if isinstance(exc, DMError) else (str(exc) or type(exc).__name__)
    return DMError(err, f"{what} failed: {said[:300]}")


def holder_ops(call: Callable[..., None], ops: Collection[str] = OPS) -> HolderOps:
    """`HolderOps` whose operations named in `ops` are each `call(op, *args)` (the others are
    not registered); a failed thaw or mark_dead is logged, as there is nothing left to undo."""
    def logged(op: str, *args: Any) -> None:
        try:
            call(op, *args)
        except DMError as exc:
            log.error("%s", exc.message)

    def bound(op: str, fn: Callable[..., None]) -> Any:
        return (lambda *args: fn(op, *args)) if op in ops else None

    return HolderOps(mark_dead=bound("mark_dead", logged), sync=bound("sync", call), freeze=bound("freeze", call),
                     thaw=bound("thaw", logged), notify_failure=bound("notify_failure", call))


def callbacks_ops(ops: object, name: str, holder: str) -> HolderOps:
    """`HolderOps` that call the callbacks of `ops` in this process: an exception fails the
    operation naming the holder."""
    found = callables_of(ops)

    def call(op: str, *args: Any) -> None:
        try:
            found[op](*args)
        except Exception as exc:
            raise failed(exc, f"{op} of device {name} by holder {holder}") from None

    return holder_ops(call, found)
