"""The control plane at scale, through a real daemon: the figures of issue 12, side by side.

One run against one `userdm daemon` (its own runtime and state directories in a temporary
directory, FUSE on when /dev/fuse exists), every device a small linear device over one
sparse file:

- create and remove latency (median of a create + remove of one more device) at 10, 1,000
  and 10,000 devices, and the ratio of the last to the first (goal: at most 1.2). On a shared
  machine the load drifts between those measurements, so each size is also measured side by
  side with a second daemon that keeps 10 devices (the rounds alternate between the two), and
  the ratios are given both ways;
- create/remove throughput of 1 client and of 8 concurrent clients (goal: 8 get 1.5x);
- `nbdinfo --list` with every device exported, the median of LIST_RUNS runs (goal: under 1 s
  at 10,000);
- restart time with every device (SIGTERM, start, until the daemon says it is ready);
- during a `remove_all` of 5,000 devices and during the load of a 1,000,000-segment table:
  the slowest of a stream of small creates (goal: under a tenth of the slow operation) and
  the p99 latency of 4 KiB NBD reads from another device (goal: under 20 ms).

    sudo .venv/bin/python bench/scale.py [--devices 10000] [--remove-all 5000]
        [--segments 1000000] [--no-fuse]

Smaller numbers give a quick run (e.g. `--devices 2000 --remove-all 1000 --segments 100000`).
Every process, mount and file it makes is gone at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
# bench/nbd.py would shadow libnbd's `nbd` module: drop this directory from the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(SRC))

from userdm.control.client import Client  # noqa: E402
from userdm.errors import DMError  # noqa: E402

SECTORS = 8  # each device maps 4 KiB
LIST_RUNS = 5  # nbdinfo --list runs (their median is the figure)


class Daemon:
    def __init__(self, base: Path, fuse: bool) -> None:
        base.mkdir(exist_ok=True)
        self.runtime, self.state = base / "run", base / "state"
        self.fuse = fuse
        self.proc: subprocess.Popen | None = None
        self.log = base / "daemon.log"

    def start(self) -> float:
        """Start it; the seconds until it said it was ready (its control socket is last)."""
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        args = [sys.executable, "-m", "userdm", "daemon", "--runtime-dir", str(self.runtime),
                "--state-dir", str(self.state)] + ([] if self.fuse else ["--no-fuse"])
        began = time.perf_counter()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"daemon did not start: {self.log.read_text()[-2000:]}")
        return time.perf_counter() - began

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> Client:
        return Client(str(self.runtime / "control"))

    @property
    def nbd_socket(self) -> str:
        return str(self.runtime / "nbd.sock")


def timed(fn, *args, **kwargs) -> float:
    began = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - began


def grow(dm: Client, img: str, have: int, want: int) -> int:
    for i in range(have, want):
        dm.create(f"d{i}", f"0 {SECTORS} linear {img} {(i % 100_000) * SECTORS}")
    return want


def create_remove_latency(dm: Client, img: str, rounds: int = 50, peer: Client | None = None,
                          peer_img: str = "") -> tuple[float, float, float, float]:
    """Median seconds of one create and of one remove at the current number of devices, and
    (with `peer`, another daemon, measured in alternate rounds) the same of the peer; NaN
    for a peer not asked."""
    creates, removes, peer_creates, peer_removes = [], [], [], []
    for i in range(rounds):
        creates.append(timed(dm.create, "probe", f"0 {SECTORS} linear {img} {i * SECTORS}"))
        removes.append(timed(dm.remove, "probe"))
        if peer is not None:
            peer_creates.append(timed(peer.create, "probe", f"0 {SECTORS} linear {peer_img} {i * SECTORS}"))
            peer_removes.append(timed(peer.remove, "probe"))
    nan = float("nan")
    return (statistics.median(creates), statistics.median(removes),
            statistics.median(peer_creates) if peer_creates else nan,
            statistics.median(peer_removes) if peer_removes else nan)


def throughput(daemon: Daemon, img: str, clients: int, seconds: float) -> float:
    """Create + remove operations per second of `clients` clients, each on its own devices."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        with daemon.client() as dm:
            i = 0
            while time.perf_counter() < stop:
                name = f"tp{k}-{i}"
                dm.create(name, f"0 {SECTORS} linear {img} {(k * 1000 + i % 1000) * SECTORS}")
                dm.remove(name)
                done[k] += 2
                i += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


class Reader:
    """4 KiB NBD reads from one device in a loop, in a thread, recording each latency."""

    def __init__(self, socket_path: str, name: str) -> None:
        import nbd  # Debian's python3-libnbd
        self.h = nbd.NBD()
        self.h.set_export_name(name)
        self.h.connect_unix(socket_path)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            self.h.pread(4096, 0)
            self.latencies.append(time.perf_counter() - began)
            time.sleep(0.001)

    @contextmanager
    def reading(self):
        self.latencies = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def p99(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")

    def close(self) -> None:
        self.h.shutdown()


def during(daemon: Daemon, img: str, reader: Reader, slow) -> tuple[float, float, float, int]:
    """Run `slow(client)` in a thread; meanwhile small creates (and removes) on another
    connection and reads on `reader`. Returns (slow seconds, slowest small create, read p99,
    number of small creates)."""
    result: dict[str, float] = {}

    def run() -> None:
        with daemon.client() as dm:
            result["seconds"] = timed(slow, dm)

    small: list[float] = []
    with reader.reading(), daemon.client() as dm:
        t = threading.Thread(target=run)
        t.start()
        i = 0
        while t.is_alive():
            small.append(timed(dm.create, f"small{i}", f"0 {SECTORS} linear {img} 0"))
            try:
                dm.remove(f"small{i}")
            except DMError:
                pass  # a concurrent remove_all took it already
            i += 1
            time.sleep(0.01)
        t.join()
    return result["seconds"], max(small, default=float("nan")), reader.p99(), len(small)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--remove-all", type=int, default=5_000)
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--seconds", type=float, default=5.0, help="for each throughput measurement")
    args = ap.parse_args()
    fuse = not args.no_fuse and os.path.exists("/dev/fuse") and os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="userdm-scale-"))
    img = str(base / "disk.img")
    with open(img, "wb") as f:
        f.truncate(max(100_000, args.segments) * SECTORS * 512 + (1 << 20))
    daemon = Daemon(base, fuse)
    reference = Daemon(base / "reference", fuse)   # keeps 10 devices: the side-by-side peer
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, goal: str = "") -> None:
        rows.append((what, value, goal))
        print(f"  {what:<58} {value:>14}  {goal}", flush=True)

    try:
        daemon.start()
        reference.start()
        print(f"userdm bench/scale.py: daemon with FUSE {'on' if fuse else 'off'}, state in {daemon.state}")
        with daemon.client() as dm, reference.client() as ref:
            grow(ref, img, 0, 10)
            have = 0
            lat = {}
            for n in sorted({10, 1_000, args.devices}):
                if n > args.devices:
                    continue
                took = timed(grow, dm, img, have, n)
                if n > have and have:
                    row(f"grow {have} -> {n} devices (one client)", f"{(n - have) / took:.0f}/s")
                have = n
                lat[n] = create_remove_latency(dm, img, peer=ref, peer_img=img)
                row(f"create / remove at {n} devices", f"{lat[n][0] * 1e3:.2f} / {lat[n][1] * 1e3:.2f} ms",
                    f"(side by side at 10: {lat[n][2] * 1e3:.2f} / {lat[n][3] * 1e3:.2f} ms)")
                if n == 10:
                    one = throughput(daemon, img, 1, args.seconds)
                    eight = throughput(daemon, img, 8, args.seconds)
                    row("throughput, 1 client", f"{one:.0f} ops/s")
                    row("throughput, 8 clients", f"{eight:.0f} ops/s", f"ratio {eight / one:.2f} (goal >= 1.5)")
            lo, hi = min(lat), max(lat)
            for k, what in ((0, "create"), (1, "remove")):
                row(f"{what} at {hi} / {what} at {lo}", f"{lat[hi][k] / lat[lo][k]:.2f}",
                    f"side by side {lat[hi][k] / lat[hi][k + 2]:.2f} (goal <= 1.2)")
        reference.stop()
        listings, listed = [], 0
        for _ in range(LIST_RUNS):
            began = time.perf_counter()
            listing = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={daemon.nbd_socket}"],
                                     capture_output=True, text=True, timeout=600)
            listings.append(time.perf_counter() - began)
            listed = listing.stdout.count('"export-name"')
        row(f"nbdinfo --list at {have} devices ({listed} listed)", f"{statistics.median(listings):.2f} s",
            f"median of {LIST_RUNS} (min {min(listings):.2f}, max {max(listings):.2f}) (goal < 1 s at 10,000)")
        daemon.stop()
        row(f"restart with {have} devices (until ready)", f"{daemon.start():.2f} s")

        with daemon.client() as dm:
            for i in range(args.remove_all, have):
                dm.remove(f"d{i}")
            dm.create("io", f"0 {SECTORS * 1024} linear {img} 0")
        reader = Reader(daemon.nbd_socket, "io")  # its open keeps "io" through remove_all
        try:
            secs, worst, p99, n = during(daemon, img, reader, lambda dm: dm.remove_all())
            row(f"remove_all of {args.remove_all} devices", f"{secs:.2f} s")
            row(f"  slowest of {n} small creates meanwhile", f"{worst * 1e3:.1f} ms",
                f"ratio {worst / secs:.3f} (goal < 0.1)")
            row("  4 KiB NBD read p99 meanwhile", f"{p99 * 1e3:.2f} ms", "(goal < 20 ms)")
            table = "".join(f"{i * 8} 8 linear {img} {(args.segments - 1 - i) * 8}\n"
                            for i in range(args.segments))
            secs, worst, p99, n = during(daemon, img, reader, lambda dm: dm.create("huge", table))
            row(f"create of a {args.segments}-segment table", f"{secs:.2f} s")
            row(f"  slowest of {n} small creates meanwhile", f"{worst * 1e3:.1f} ms",
                f"ratio {worst / secs:.3f} (goal < 0.1)")
            row("  4 KiB NBD read p99 meanwhile", f"{p99 * 1e3:.2f} ms", "(goal < 20 ms)")
            with daemon.client() as dm:
                lat_after = create_remove_latency(dm, img, rounds=20)
            row("create / remove with the huge table present", f"{lat_after[0] * 1e3:.2f} / {lat_after[1] * 1e3:.2f} ms")
        finally:
            reader.close()
    finally:
        daemon.stop()
        reference.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
