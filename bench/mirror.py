"""Benchmark: a two-leg mirror against a single linear device, in one run.

fio over NBD on Unix sockets, everything in one directory (/dev/shm by default):

    linear:       fio -> userdm daemon -> linear -> file
    mirror core:  fio -> userdm daemon -> mirror (core log, nosync) -> two files
    mirror disk:  fio -> userdm daemon -> mirror (disk log on a third file) -> two files

Jobs (each time-based, on space written before): 4 KiB random writes and reads at qd16,
1 MiB sequential writes and reads at qd8. Region size 1024 sectors (512 KiB). Rounds
interleave the devices, each round in another order (this machine's speed drifts; it is
shared, so only the ratios measured side by side mean anything); the medians of the figures
are printed, and the median over the rounds of each round's ratio mirror/linear. A second
table gives the CPU time per request of the daemon and its NBD worker processes (from /proc:
a linear device's connection is served by a worker), which other load on a shared
machine disturbs far less than the throughput.

Goals from issue 15: at least 0.5x for writes and 1.0x for reads. Usage:
`.venv/bin/python bench/mirror.py [--mib 256] [--runtime 3] [--rounds 3] [--jobs randread,...]
[--dir DIR]`. Every process and file it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from nbd import cpu_seconds    # bench/nbd.py: the daemon's and its NBD workers' CPU time
from thin import Userdm, fio   # bench/thin.py: a daemon driven by the CLI, one fio job

RAMP = 0.5                     # thin.fio's ramp_time: fio runs it too, and counts nothing

MiB = 1 << 20
JOBS = (("4K randwrite qd16 (IOPS)", "randwrite", "4k", 16),
        ("4K randread qd16 (IOPS)", "randread", "4k", 16),
        ("1M write qd8 (MB/s)", "write", "1M", 8),
        ("1M read qd8 (MB/s)", "read", "1M", 8))


def timed_fio(dm: Userdm, name: str, work: Path, rw: str, bs: str, qd: int, size: int,
              runtime: float) -> tuple[float, float]:
    """One fio job's figure, and the daemon's CPU time per request in microseconds: what a
    request costs the daemon, far less disturbed by other load on the machine than the
    throughput (requests counted from the figure over the job's time, its ramp included)."""
    before = cpu_seconds(dm.proc.pid)
    value = fio(dm.uri(name), work, rw, bs, qd, size, runtime)
    used = cpu_seconds(dm.proc.pid) - before
    per_second = value if bs == "4k" else value * 1e6 / MiB
    return value, used / (per_second * (runtime + RAMP)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of each device in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per job")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are printed")
    ap.add_argument("--jobs", default="", help="comma-separated fio rw modes to run (default: all), "
                    "e.g. randread,randwrite")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp")
    args = ap.parse_args()
    if shutil.which("fio") is None:
        sys.exit("bench/mirror.py needs fio")
    jobs = [j for j in JOBS if not args.jobs or j[1] in args.jobs.split(",")]
    size = args.mib * MiB
    sectors = size // 512
    results: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, ExitStack() as stack:
        work = Path(tmp)
        for name, n in (("linear.img", size), ("a0.img", size), ("a1.img", size), ("b0.img", size),
                        ("b1.img", size), ("log.img", MiB)):
            with open(work / name, "wb") as f:
                f.truncate(n)
        dm = Userdm(work, stack)
        dm("create", "linear", "--table", f"0 {sectors} linear {work / 'linear.img'} 0")
        dm("create", "core", "--table", f"0 {sectors} mirror core 2 1024 nosync 2 {work / 'a0.img'} 0 "
           f"{work / 'a1.img'} 0 1 handle_errors")
        log = work / "log.img"
        dm("create", "disk", "--table", f"0 {sectors} mirror disk 3 {log} 1024 nosync 2 {work / 'b0.img'} 0 "
           f"{work / 'b1.img'} 0 1 handle_errors")
        devices = ("linear", "core", "disk")
        for name in devices:
            fio(dm.uri(name), work, "write", "1M", 8, size)       # reads see written space
        for r in range(args.rounds):
            for label, rw, bs, qd in jobs:
                for name in devices[r % 3:] + devices[:r % 3]:   # no device always runs first
                    value, per_request = timed_fio(dm, name, work, rw, bs, qd, size, args.runtime)
                    results.setdefault(label, {}).setdefault(name, []).append(value)
                    cpu.setdefault(label, {}).setdefault(name, []).append(per_request)
        status = {name: dm("status", name).strip() for name in ("core", "disk")}
    print("two-leg mirror (legs: files in the same directory) against linear, one daemon, fio over NBD;")
    print("the machine is shared: compare the ratios, measured side by side, not the figures\n")
    for name, line in status.items():
        print(f"{name}: {line.split(' mirror ', 1)[1].split(' ', 3)[3]}")
    print()
    width = max(len(k) for k in results)
    for title, table in (("throughput, higher is better: ratio mirror/linear", results),
                         ("daemon CPU per request in us, lower is better: ratio linear/mirror", cpu)):
        print(title)
        for label, row in table.items():
            # the ratio of each round (its runs are neighbours in time), then their median
            ratios = {name: statistics.median((m / lin) if table is results else (lin / m)
                                              for m, lin in zip(row[name], row["linear"]))
                      for name in ("core", "disk")}
            cells = "  ".join(f"mirror {name} {statistics.median(row[name]):9.1f} ({ratios[name]:4.2f}x)"
                              for name in ("core", "disk"))
            print(f"  {label:<{width}}  linear {statistics.median(row['linear']):9.1f}  {cells}")


if __name__ == "__main__":
    main()
