"""Shared fixtures: sparse image files, an in-process Mapper, and a real daemon in a temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from userdm import Mapper

USERDM = [sys.executable, "-m", "userdm"]


@pytest.fixture
def lends(monkeypatch) -> list[int]:
    """[how many collapsed tables devices lent (`MappedDevice.lend_flat`)] during the test."""
    count = [0]
    from userdm.dm.mapped import MappedDevice
    lend = MappedDevice.lend_flat

    def counted(self, watcher):  # noqa: ANN001, ANN202
        flat = lend(self, watcher)
        count[0] += flat is not None
        return flat

    monkeypatch.setattr(MappedDevice, "lend_flat", counted)
    return count


@pytest.fixture
def batches(monkeypatch) -> list[int]:
    """[how many batches of FUSE replies left through a ring (`export/fuse/replies.py`)]
    during the test."""
    count = [0]
    from userdm.export.fuse.replies import RING_MIN, Replies
    send = Replies.send

    def counted(self):  # noqa: ANN001, ANN202
        count[0] += self.held >= RING_MIN
        return send(self)

    monkeypatch.setattr(Replies, "send", counted)
    return count


@pytest.fixture
def images(tmp_path: Path):
    """images(n, size) -> list of paths of sparse files."""
    def make(n: int = 1, size: int = 64 << 20) -> list[str]:
        paths = []
        for i in range(n):
            p = tmp_path / f"disk{len(list(tmp_path.glob('disk*')))}.img"
            with open(p, "wb") as f:
                f.truncate(size)
            paths.append(str(p))
        return paths
    return make


@pytest.fixture
def mapper():
    m = Mapper()
    yield m
    m.close()


class Daemon:
    """A `userdm daemon` subprocess with its own runtime and state directories."""

    def __init__(self, base: Path) -> None:
        self.runtime = base / "run"
        self.state = base / "state"
        self.env = {**os.environ, "USERDM_RUNTIME_DIR": str(self.runtime),
                    "USERDM_STATE_DIR": str(self.state)}
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str, fuse: bool = False) -> None:
        """Start it; with `fuse`, it also serves its FUSE directory (runtime/mapper)."""
        self.log = self.runtime.parent / "daemon.log"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(USERDM + ["daemon", *([] if fuse else ["--no-fuse"]), *extra], env=self.env,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.stop(signal.SIGKILL)  # never leave a half-started daemon behind
            raise AssertionError(f"daemon did not start: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(USERDM + list(args), env=self.env, input=input, capture_output=True,
                             text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"userdm {' '.join(args)} failed: {res.stderr}")
        return res

    def connect(self):
        from userdm.control.client import connect
        return connect(str(self.runtime))


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def threads_held_by_suspends() -> int:
    """How many threads of this process wait for a suspended device to resume (inside
    `MappedDevice._enter`): requests that reached the device and are held there."""
    import gc
    import sys
    held = 0
    # No garbage collection inside `_current_frames`: it holds the interpreter's thread list
    # lock, and a finalizer run there that closes a file on a FUSE mount served by this very
    # process waits for a serving thread, which cannot start without that lock (a CI run hung
    # in the held-requests test with the main thread in `_current_frames`).
    gc.disable()
    try:
        frames = sys._current_frames()
    finally:
        gc.enable()
    for frame in frames.values():
        while frame is not None:
            if frame.f_code.co_name == "_enter" and frame.f_code.co_filename.endswith("mapped.py"):
                held += 1
                break
            frame = frame.f_back
    return held


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll a condition (for asynchronous effects; never used to measure time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ---- FUSE over io_uring -----------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def fuse_uring_enabled():
    """Turn the kernel's FUSE over io_uring on for the run (it is off by default), as it was
    after: FUSE exports take it when the kernel offers it, so every FUSE test covers it, and
    those parametrized with `fuse_transport` cover /dev/fuse too. True if the kernel has it."""
    from userdm.export.fuse.uring import fuse_uring_enabled as enabled
    with enabled() as on:
        yield on


@pytest.fixture(params=["uring", "devfuse"])
def fuse_transport(request, fuse_uring_enabled) -> dict[str, bool]:
    """FuseExport options for each way requests come: through io_uring (skipped when the kernel
    has none) and read from /dev/fuse."""
    if request.param == "uring" and not fuse_uring_enabled:
        pytest.skip("this kernel has no FUSE over io_uring")
    return {"uring": request.param == "uring"}


# ---- Ceph (tests/test_rbd.py, tests/test_mirror_rbd.py) ----------------------------------------


@pytest.fixture(scope="session")
def ceph():
    """One throwaway single-node cluster for the whole run (tests/ceph_cluster.py); stopped by
    PID and removed even on failure."""
    from ceph_cluster import Cluster
    cluster = Cluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


_image_names = iter(range(1 << 30))


@pytest.fixture
def image(ceph):
    """image(size) -> the name of a new RBD image in the test pool (removed afterwards)."""
    made: list[str] = []

    def make(size: int = 32 << 20) -> str:
        name = f"img{next(_image_names)}"
        ceph.rbd("create", "--size", f"{size >> 20}M", name)
        made.append(name)
        return name
    yield make
    for name in made:
        try:
            ceph.rbd("snap", "purge", name)
            ceph.rbd("rm", "--no-progress", name)
        except RuntimeError:
            pass
