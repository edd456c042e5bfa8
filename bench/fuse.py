"""Throughput of a loop device on a userdm FUSE file, as a ratio to a loop device on the plain file.

Both paths use the same backing file (in the page cache after the first round):

    plain:  dd -> /dev/loopA -> file
    userdm: dd -> /dev/loopB -> FUSE file -> pyfuse3 -> Mapper (linear) -> file

with `dd bs=1M oflag=direct` (write) and `iflag=direct` (read) on the loop devices. The FUSE
loop device is measured both with loop's buffered mode and with `--direct-io=on`. Rounds are
interleaved and the median of each is printed, because this machine's speed drifts. Run as
root: `PYTHONPATH=src python3 bench/fuse.py [--mib 512] [--rounds 3] [--dir /var/tmp]`.
Everything it creates (loop devices, the mount, the files) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from userdm.dm.mapper import Mapper
from userdm.fuse import FuseExport

SECTOR = 512


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB per dd run (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the backing file goes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/fuse.py needs root (loop devices, FUSE)", file=sys.stderr)
        return 2

    results: dict[str, list[tuple[float, float]]] = {"plain": [], "fuse": [], "fuse-dio": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="userdm-bench-") as tmp:
        backing = os.path.join(tmp, "disk.img")
        with open(backing, "wb") as f:
            f.truncate(args.mib << 20)
        subprocess.run(["dd", "if=/dev/zero", f"of={backing}", "bs=1M", f"count={args.mib}",
                        "conv=notrunc", "status=none"], check=True)
        mapper = Mapper()
        mapper.create("bench", f"0 {(args.mib << 20) // SECTOR} linear {backing} 0")
        export = FuseExport(mapper, os.path.join(tmp, "mapper"))
        export.start()
        try:
            fuse_file = os.path.join(export.mountpoint, "bench")
            for _ in range(args.rounds):
                with loop(backing) as dev:
                    results["plain"].append(measure(dev, args.mib))
                with loop(fuse_file) as dev:
                    results["fuse"].append(measure(dev, args.mib))
                with loop(fuse_file, direct=True) as dev:
                    results["fuse-dio"].append(measure(dev, args.mib))
        finally:
            export.stop()
            mapper.close()

    med = {k: (statistics.median(r for r, _ in v), statistics.median(w for _, w in v)) for k, v in results.items()}
    base_read, base_write = med["plain"]
    print(f"dd bs=1M, {args.mib} MiB, median of {args.rounds} interleaved rounds (MB/s)")
    print(f"{'path':<34}{'read':>8}{'write':>8}{'read x':>9}{'write x':>9}")
    labels = {"plain": "loop -> file", "fuse": "loop -> FUSE -> userdm linear",
              "fuse-dio": "loop(dio) -> FUSE -> userdm linear"}
    for key, (r, w) in med.items():
        print(f"{labels[key]:<34}{r:8.0f}{w:8.0f}{r / base_read:9.2f}{w / base_write:9.2f}")
    best_read = max(med["fuse"][0], med["fuse-dio"][0]) / base_read
    best_write = max(med["fuse"][1], med["fuse-dio"][1]) / base_write
    print(f"ratio (best FUSE mode / plain loop): read {best_read:.2f}x, write {best_write:.2f}x (goal >= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
