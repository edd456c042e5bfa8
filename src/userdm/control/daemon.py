"""`userdm daemon`: one process that owns every mapped device and serves it.

Startup order: open the state store (migrating an old `devices.json`), start the NBD server
(`nbd.sock`, TCP only with `--nbd-listen`) so that saved tables over the daemon's own exports
can be restored, mount the FUSE directory `mapper/`, restore the saved devices
(`userdm.dm.restore`), and only then listen on the control socket: when `control` appears,
every restored device is served over NBD and FUSE. It runs in the foreground until SIGTERM or
SIGINT. On exit it unmounts and removes only what it created; the devices come back on the
next start from the state directory. Stopping takes at most `STOP_TIMEOUT` seconds, even with
devices whose I/O is stuck: after `STUCK_GRACE` seconds the devices are released, which fails
the I/O they hold with EIO (a suspended device's held requests, say) so that their
connections end; what is still not released by `STOP_TIMEOUT` is left to the process's exit
(every change is already committed, so nothing saved is lost).
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..dm.mapper import Mapper
from ..errors import DMError
from . import paths
from .server import ControlLimits, ControlServer, claim_socket_path

log = logging.getLogger("userdm.daemon")

#: how often the main thread looks for a signal that another thread received
SIGNAL_POLL = 0.25
#: seconds that stopping may take before the daemon exits anyway (stuck devices)
STOP_TIMEOUT = 10.0
#: seconds that exports may take to finish their requests before held I/O is failed
STUCK_GRACE = 3.0

EXAMPLE_NAME = "example"
EXAMPLE_SIZE = 1 << 30


def ensure_example(mapper: Mapper, state_dir: Path) -> None:
    """A linear device `example` over a sparse 1 GiB file in the state directory."""
    if EXAMPLE_NAME in {d["name"] for d in mapper.list()}:
        return
    image = state_dir / "example.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(EXAMPLE_SIZE)
    sectors = image.stat().st_size // 512
    mapper.create(EXAMPLE_NAME, f"0 {sectors} linear {image} 0")


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not host:
        raise DMError(22, f"--nbd-listen {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Daemon:
    def __init__(self, runtime_dir: Path, state_dir: Path, *, nbd_listen: str | None = None,
                 fuse: bool = True, nbd: bool = True, example: bool = False,
                 control_limits: ControlLimits | None = None, nbd_limits: Any = None,
                 block_devices: bool = False, nbd_tls: Any = None, fuse_passthrough: bool = False,
                 fuse_uring: bool = False) -> None:
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.nbd_listen = parse_listen(nbd_listen) if nbd_listen else None
        self.want_fuse = fuse
        #: FUSE files of devices that map one file byte for byte do their I/O in the kernel
        self.fuse_passthrough = fuse_passthrough
        #: FUSE over io_uring when the kernel offers it (`--fuse-uring`)
        self.fuse_uring = fuse_uring
        self.want_nbd = nbd
        self.example = example
        #: every device with a live table gets a kernel block device (else only `create --blockdev`)
        self.block_devices = block_devices
        self._blockdevs: Any = None
        self.control_limits = control_limits or ControlLimits()
        #: the NBD server's `NBDLimits` (None: its defaults)
        self.nbd_limits = nbd_limits
        #: the NBD server's `ServerTLS` (None: no TLS; `export/nbd/tls.py` has the rules)
        self.nbd_tls = nbd_tls
        self.stopping = threading.Event()
        self._services: list[Any] = []
        self.mapper: Mapper | None = None

    def start(self) -> None:
        paths.prepare_daemon_dirs(self.runtime_dir, self.state_dir)  # 0700, ours, no planted links
        fuse_dir = paths.fuse_dir(self.runtime_dir)
        control = ControlServer(None, paths.control_socket(self.runtime_dir), limits=self.control_limits)
        claim_socket_path(control.path)  # refuse before restoring devices if another daemon runs here
        self.mapper = Mapper(self.state_dir, fuse_dir=fuse_dir if self.want_fuse else None, restore=False)
        control.target = self.mapper
        if self.want_nbd:
            control.nbd = self._start_nbd()
        if self.want_fuse:
            self._start_fuse(fuse_dir)
        else:
            self._no_block_devices(errno.EOPNOTSUPP, "the daemon runs without its FUSE export (--no-fuse), "
                                   "over whose files block devices are made")
        self.mapper.restore()
        if self.example:
            ensure_example(self.mapper, self.state_dir)
        if self._blockdevs is not None:
            self._start_blockdevs()
        control.start()  # last: every restored device is served by now
        self._services.append(control)

    def _start_nbd(self) -> Any:
        try:
            from ..export.nbd.server import NBDServer
        except ImportError as exc:
            log.warning("NBD export unavailable: %s", exc)
            return None
        server = NBDServer(self.mapper, unix_path=paths.nbd_socket(self.runtime_dir), tcp=self.nbd_listen,
                           limits=self.nbd_limits, tls=self.nbd_tls)
        server.start()
        self._services.append(server)
        self.mapper.open_sockets = server
        # tables over these are edges to the exported devices (`userdm.dm.cycles`)
        self.mapper.nbd_addresses = [str(server.unix_path)] + ([server.tcp_address] if server.tcp_address else [])
        return server

    def _start_fuse(self, fuse_dir: Path) -> None:
        try:
            from ..export.fuse import FuseExport, cleanup_stale
        except ImportError as exc:
            log.warning("FUSE export unavailable: %s", exc)
            self._no_block_devices(errno.EOPNOTSUPP, f"the FUSE export is unavailable ({exc})")
            return
        if not os.path.exists("/dev/fuse"):
            log.warning("FUSE export unavailable: /dev/fuse does not exist")
            self._no_block_devices(errno.ENODEV, "/dev/fuse does not exist (no FUSE export, over whose "
                                   "files block devices are made)")
            return
        cleanup_stale(fuse_dir)
        fuse_dir.mkdir(exist_ok=True)
        export = FuseExport(self.mapper, fuse_dir, passthrough=self.fuse_passthrough, uring=self.fuse_uring)
        try:
            export.start()
        except Exception as exc:  # e.g. no permission to mount: run without the FUSE export
            log.warning("FUSE export unavailable: %s", exc)
            self._no_block_devices(getattr(exc, "errno", None) or errno.EOPNOTSUPP,
                                   f"the FUSE export could not be mounted ({exc})")
            return
        self._services.append(export)
        from ..export.blockdev import BlockDevices
        self._blockdevs = BlockDevices(self.mapper, fuse_dir, paths.block_dir(self.runtime_dir),
                                       all_devices=self.block_devices)

    def _start_blockdevs(self) -> None:
        """Block devices over the FUSE files (and lockfs), once the saved devices are back."""
        if not os.path.exists("/dev/loop-control"):
            self._no_block_devices(errno.ENODEV, "/dev/loop-control does not exist (no loop driver: "
                                   "modprobe loop)")
            return
        try:
            self._blockdevs.start()
        except Exception as exc:  # e.g. no permission: run without them
            self._blockdevs.stop()
            self._no_block_devices(getattr(exc, "errno", None) or errno.EOPNOTSUPP,
                                   f"loop devices cannot be attached ({exc})")
            return
        self._services.append(self._blockdevs)

    def _no_block_devices(self, err: int, why: str) -> None:
        """This daemon serves no kernel block devices: `--block-devices` fails the start, and
        `create --blockdev` is refused, with `err` and a sentence saying `why`."""
        assert self.mapper is not None
        self.mapper.no_block_devices = DMError(err, f"this daemon serves no kernel block devices: {why}")
        if self.block_devices:
            raise DMError(err, f"--block-devices: {why}")
        log.warning("block devices unavailable: %s", why)

    def stop(self) -> None:
        """Stop serving and release the devices, within `STOP_TIMEOUT` seconds (see the module
        docstring); returns False if that time ran out."""
        done = threading.Event()

        def work() -> None:
            try:
                self._stop()
            finally:
                done.set()
        threading.Thread(target=work, name="daemon-stop", daemon=True).start()
        if done.wait(STOP_TIMEOUT):
            return True
        log.error("stopping took more than %.0f seconds (a device's I/O is stuck); exiting anyway; "
                  "the threads that are still busy:", STOP_TIMEOUT)
        faulthandler.dump_traceback(all_threads=True)
        return False

    def _stop(self) -> None:
        services, self._services = list(reversed(self._services)), []
        done = threading.Event()

        def stop_services() -> None:
            for service in services:
                try:
                    service.stop()
                except Exception:
                    log.exception("stopping %s failed", type(service).__name__)
            done.set()
        threading.Thread(target=stop_services, name="stop-services", daemon=True).start()
        if not done.wait(STUCK_GRACE) and self.mapper is not None:
            # connections wait for I/O that a suspended (or otherwise stuck) device holds:
            # releasing the devices fails that I/O with EIO, and the connections end
            log.warning("I/O is still held after %.0f seconds; failing it to stop", STUCK_GRACE)
            self.mapper.close()
        done.wait()
        if self.mapper is not None:
            self.mapper.close()
        for path in (paths.nbd_socket(self.runtime_dir),):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def run(self) -> None:
        """Start, announce readiness on stdout, serve until a signal, stop."""
        signalled: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            # no lock in a handler: it runs between two bytecodes of the main thread, which
            # may be holding the Event's own lock
            signal.signal(sig, lambda num, _frame: signalled.append(num))
        try:
            self.start()
        except BaseException:
            self.stop()  # unmount and close what was started
            raise
        try:
            assert self.mapper is not None
            names = ", ".join(self.mapper.export_names()) or "none"
            print(f"userdm daemon ready: runtime {self.runtime_dir}, state {self.state_dir}, "
                  f"devices: {names}", flush=True)
            # Python runs signal handlers in the main thread, but only when it runs: a signal
            # the kernel delivers to another thread does not wake a main thread blocked in a
            # lock, so it looks every SIGNAL_POLL seconds (seen: SIGTERM ignored for minutes)
            while not signalled and not self.stopping.wait(SIGNAL_POLL):
                pass
            self.stopping.set()
        finally:
            if not self.stop():
                logging.shutdown()
                os._exit(1)  # threads stuck in device I/O must not keep the process alive
