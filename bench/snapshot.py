"""Benchmark: what a snapshot costs a writer, and how long the interposer holds I/O.

1. First-write (copy-on-write) cost: 4 KiB writes, each to a chunk not yet copied, through a
   `snapshot-origin` with one persistent snapshot, against the same writes through a plain
   `linear` device over the same kind of file (ratio in the same run), for 4 KiB and 64 KiB
   chunks; and the cost of a second write to a chunk already copied.
2. Interposer attach/detach pause: 4 writer threads write 4 KiB blocks to DEV without a break
   while an interposer (snapshot-origin) is attached and detached 20 times; prints how long each
   switch took and the worst write latency seen during switches against the writers' p99.
Run: `.venv/bin/python bench/snapshot.py [--dir /dev/shm] [--writes 4096]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from userdm import Mapper

MiB = 1 << 20


def sparse(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def per_write(handle, offsets: list[int], data: bytes) -> float:
    """Microseconds per write."""
    t0 = time.perf_counter()
    for off in offsets:
        handle.write(off, data)
    return (time.perf_counter() - t0) / len(offsets) * 1e6


def cow_cost(work: Path, writes: int, chunk_sectors: int) -> tuple[float, float, float]:
    chunk = chunk_sectors * 512
    size = writes * chunk
    sectors = size // 512
    m = Mapper()
    try:
        plain = sparse(work / "plain.img", size)
        origin = sparse(work / "origin.img", size)
        cow = sparse(work / "cow.img", size + 64 * MiB)
        m.create("plain", f"0 {sectors} linear {plain} 0")
        m.create("base", f"0 {sectors} linear {origin} 0")
        m.create("origin", f"0 {sectors} snapshot-origin /dev/mapper/base")
        m.create("snap", f"0 {sectors} snapshot /dev/mapper/base {cow} P {chunk_sectors}")
        data = os.urandom(4096)
        offsets = [i * chunk for i in range(writes)]
        with m.open_device("plain", write=True) as p, m.open_device("origin", write=True) as o:
            per_write(p, offsets[: writes // 8], data)      # warm up code paths, not chunks
            t_plain = per_write(p, offsets, data)
            t_first = per_write(o, offsets, data)
            t_again = per_write(o, offsets, data)
        return t_plain, t_first, t_again
    finally:
        m.close()
        for name in ("plain.img", "origin.img", "cow.img"):
            (work / name).unlink(missing_ok=True)


def interposer_pause(work: Path, rounds: int = 20) -> tuple[list[float], float, float]:
    size = 64 * MiB
    sectors = size // 512
    m = Mapper()
    stop = threading.Event()
    switching = threading.Event()
    lat_normal: list[float] = []
    lat_switch: list[float] = []
    try:
        m.create("dev", f"0 {sectors} linear {sparse(work / 'dev.img', size)} 0")
        handles = [m.open_device("dev", write=True) for _ in range(4)]
        data = os.urandom(4096)

        def writer(i: int) -> None:
            n = 0
            while not stop.is_set():
                off = ((i * 4096 + n) % (size // 4096)) * 4096
                t0 = time.perf_counter()
                handles[i].write(off, data)
                dt = time.perf_counter() - t0
                (lat_switch if switching.is_set() else lat_normal).append(dt)
                n += 1

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        switches = []
        for r in range(rounds):
            switching.set()
            t0 = time.perf_counter()
            m.create("front", f"0 {sectors} snapshot-origin [interpose]/dev/mapper/dev", interpose=True)
            switches.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m.remove("front")
            switches.append(time.perf_counter() - t0)
            switching.clear()
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
        for h in handles:
            h.close()
        p99 = statistics.quantiles(lat_normal, n=100)[98]
        return switches, p99, max(lat_switch) if lat_switch else 0.0
    finally:
        stop.set()
        m.close()
        (work / "dev.img").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the files go (default /dev/shm: the page cache, not the disk)")
    ap.add_argument("--writes", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        print("copy-on-write cost of a 4 KiB write (us per write, ratio to a plain linear write)")
        for chunk_sectors in (8, 128):
            plain, first, again = cow_cost(work, args.writes, chunk_sectors)
            print(f"  chunk {chunk_sectors * 512 // 1024:3d} KiB: plain {plain:6.1f}  first write "
                  f"{first:7.1f} ({first / plain:5.1f}x)  chunk already copied {again:6.1f} "
                  f"({again / plain:4.1f}x)")
        switches, p99, worst = interposer_pause(work)
        print("interposer attach/detach with 4 writers (ms)")
        print(f"  switch: median {statistics.median(switches) * 1e3:.2f}  max {max(switches) * 1e3:.2f}")
        print(f"  write latency: p99 outside switches {p99 * 1e3:.3f}, worst during switches "
              f"{worst * 1e3:.2f}")


if __name__ == "__main__":
    main()
