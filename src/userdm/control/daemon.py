"""`userdm daemon`: one process that owns every mapped device and serves it.

It restores the saved devices, listens on the control socket, exports every device over NBD
(`nbd.sock`, TCP only with `--nbd-listen`) and as a file in the FUSE directory `mapper/`,
and runs in the foreground until SIGTERM or SIGINT. On exit it unmounts and removes only
what it created; the devices come back on the next start from the state directory.
"""

from __future__ import annotations

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
                 control_limits: ControlLimits | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.nbd_listen = parse_listen(nbd_listen) if nbd_listen else None
        self.want_fuse = fuse
        self.want_nbd = nbd
        self.example = example
        self.control_limits = control_limits or ControlLimits()
        self.stopping = threading.Event()
        self._services: list[Any] = []
        self.mapper: Mapper | None = None

    def start(self) -> None:
        paths.prepare_daemon_dirs(self.runtime_dir, self.state_dir)  # 0700, ours, no planted links
        fuse_dir = paths.fuse_dir(self.runtime_dir)
        control = ControlServer(None, paths.control_socket(self.runtime_dir), limits=self.control_limits)
        claim_socket_path(control.path)  # refuse before restoring devices if another daemon runs here
        self.mapper = Mapper(self.state_dir, fuse_dir=fuse_dir if self.want_fuse else None)
        if self.example:
            ensure_example(self.mapper, self.state_dir)
        control.target = self.mapper
        if self.want_nbd:
            control.nbd = self._start_nbd()
        control.start()
        self._services.append(control)
        if self.want_fuse:
            self._start_fuse(fuse_dir)

    def _start_nbd(self) -> Any:
        try:
            from ..export.nbd.server import NBDServer
        except ImportError as exc:
            log.warning("NBD export unavailable: %s", exc)
            return None
        server = NBDServer(self.mapper, unix_path=paths.nbd_socket(self.runtime_dir), tcp=self.nbd_listen)
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
            return
        if not os.path.exists("/dev/fuse"):
            log.warning("FUSE export unavailable: /dev/fuse does not exist")
            return
        cleanup_stale(fuse_dir)
        fuse_dir.mkdir(exist_ok=True)
        export = FuseExport(self.mapper, fuse_dir)
        try:
            export.start()
        except Exception as exc:  # e.g. no permission to mount: run without the FUSE export
            log.warning("FUSE export unavailable: %s", exc)
            return
        self._services.append(export)

    def stop(self) -> None:
        for service in reversed(self._services):
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        self._services.clear()
        if self.mapper is not None:
            self.mapper.close()
        for path in (paths.nbd_socket(self.runtime_dir),):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def run(self) -> None:
        """Start, announce readiness on stdout, serve until a signal, stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.start()
        try:
            assert self.mapper is not None
            names = ", ".join(self.mapper.export_names()) or "none"
            print(f"userdm daemon ready: runtime {self.runtime_dir}, state {self.state_dir}, "
                  f"devices: {names}", flush=True)
            while not self.stopping.wait(3600):
                pass
        finally:
            self.stop()
