"""Throughput of a loop device on a userdm FUSE file, as a ratio to a loop device on the plain file.

All paths use the same backing file:

    plain:    dd -> /dev/loopA -> file
    userdm:   dd -> /dev/loopB -> FUSE file -> libfuse3 (mfusepy) -> Mapper (linear) -> file
    baseline: the same with the FuseExport of another source tree (`--baseline-src`), e.g. the
              pyfuse3 export of an older commit, for before/after figures of one run

with `dd bs=1M oflag=direct` (write) and `iflag=direct` (read) on the loop devices. Each FUSE
export runs in its own process (`--serve`), as in the daemon; its loop device is measured in
loop's buffered mode and with `--direct-io=on`. Rounds are interleaved and the median of each
is printed, because this machine's speed drifts. Run as root:

    PYTHONPATH=src python3 bench/fuse.py [--mib 512] [--rounds 3] [--dir /var/tmp]
        [--baseline-src DIR]      # e.g. git archive OLD src | tar -x -C /tmp/old; DIR=/tmp/old/src

The file lives in /var/tmp by default, where the plain loop device reads fastest (~8.8 GB/s
here, against ~5.4 GB/s for a file in /dev/shm), so it is the harder ratio for reads; this
machine's DAMON reclaim may evict some of its page cache between rounds (`--dir /dev/shm`
avoids that). Everything it creates (loop devices, mounts, processes, files) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

SECTOR = 512


def serve(mountpoint: str, path: str) -> None:
    """Helper mode: a Mapper with one linear device `bench` over `path`, exported at `mountpoint`."""
    from userdm import Mapper
    from userdm.export.fuse import FuseExport

    mapper = Mapper()
    mapper.create("bench", f"0 {os.path.getsize(path) // SECTOR} linear {path} 0")
    export = FuseExport(mapper, mountpoint)
    export.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    export.stop()
    mapper.close()


def dd(args: list[str]) -> float:
    """Run dd and return its throughput in MB/s (10^6 bytes per second, as dd prints)."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m.group(1)) / float(m.group(2)) / 1e6


@contextmanager
def loop(path: str, direct: bool = False) -> Iterator[str]:
    cmd = ["losetup", "--show", "-f", f"--direct-io={'on' if direct else 'off'}", path]
    dev = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def measure(dev: str, mib: int) -> tuple[float, float]:
    write = dd(["if=/dev/zero", f"of={dev}", "bs=1M", f"count={mib}", "oflag=direct"])
    read = dd([f"if={dev}", "of=/dev/null", "bs=1M", f"count={mib}", "iflag=direct"])
    return read, write


def start_export(stack: ExitStack, src: str, mountpoint: str, backing: str) -> None:
    """A `--serve` helper with `src` first on PYTHONPATH; returns when its mount answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", mountpoint, backing],
                            env=env, stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, capture_output=True)
    stack.callback(stop)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the FUSE export from {src} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB per dd run (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the backing file goes")
    parser.add_argument("--baseline-src", metavar="DIR", help="also measure the FuseExport of this source tree")
    parser.add_argument("--serve", nargs=2, metavar=("MOUNTPOINT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if os.geteuid() != 0:
        print("bench/fuse.py needs root (loop devices, FUSE)", file=sys.stderr)
        return 2

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    exports = {"userdm": here, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    paths = ["plain"] + [f"{name}{mode}" for name in exports for mode in ("", "-dio")]
    results: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="userdm-fuse-bench-"))
        backing = os.path.join(tmp, "disk.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={backing}", "bs=1M", f"count={args.mib}", "status=none"],
                       check=True)
        for name, src in exports.items():
            start_export(stack, src, os.path.join(tmp, name), backing)
        for _ in range(args.rounds):
            for path in paths:
                name, _, mode = path.partition("-")
                target = backing if name == "plain" else os.path.join(tmp, name, "bench")
                with loop(target, direct=mode == "dio") as dev:
                    results[path].append(measure(dev, args.mib))
                time.sleep(0.2)   # let the loop device's detach settle

    med = {k: (statistics.median(r for r, _ in v), statistics.median(w for _, w in v)) for k, v in results.items()}
    base_read, base_write = med["plain"]
    print(f"dd bs=1M, {args.mib} MiB in {args.dir}, median of {args.rounds} interleaved rounds (MB/s)")
    print(f"{'path':<38}{'read':>8}{'write':>8}{'read x':>9}{'write x':>9}")
    for key, (r, w) in med.items():
        name, _, mode = key.partition("-")
        label = "loop -> file" if name == "plain" else \
            f"loop{'(dio)' if mode else ''} -> FUSE -> {name} linear"
        print(f"{label:<38}{r:8.0f}{w:8.0f}{r / base_read:9.2f}{w / base_write:9.2f}")
    for name in exports:
        best_read = max(med[name][0], med[f"{name}-dio"][0]) / base_read
        best_write = max(med[name][1], med[f"{name}-dio"][1]) / base_write
        print(f"ratio {name} (best FUSE mode / plain loop): read {best_read:.2f}x, write {best_write:.2f}x"
              + (" (goal >= 0.5x)" if name == "userdm" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
