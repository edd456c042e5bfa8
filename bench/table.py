"""Benchmark: a table of 1,000,000 linear segments — load time and per-I/O mapping cost.

Prints the time to parse, check and construct the table in process and through the daemon's
control socket, and the cost of one 4 KiB read through the huge table against the same read
through a one-segment table and directly from the file (ratios in the same run).
Run: `.venv/bin/python bench/table.py [--segments N]`.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from userdm import Mapper


def per_read(fn, offsets) -> float:
    start = time.perf_counter()
    for off in offsets:
        fn(off)
    return (time.perf_counter() - start) / len(offsets) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.segments
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "disk.img"
        with open(img, "wb") as f:
            f.truncate(n * 8 * 512)
        # every segment is 8 sectors, mapped in reverse order so no two neighbours are adjacent
        table = "".join(f"{i * 8} 8 linear {img} {(n - 1 - i) * 8}\n" for i in range(n))
        m = Mapper()
        t0 = time.perf_counter()
        m.create("huge", table)
        load = time.perf_counter() - t0
        m.create("one", f"0 {n * 8} linear {img} 0")
        huge = m.open_device("huge", write=False)
        one = m.open_device("one", write=False)
        buf = bytearray(4096)
        mv = memoryview(buf)
        rng = random.Random(0)
        offsets = [rng.randrange(n) * 4096 for _ in range(200_000)]
        fd = os.open(img, os.O_RDONLY)
        # each measured twice, the first pass warming the page cache for the pages it touches
        # (the huge table maps the offsets to other pages of the file than the others do)
        raw = [per_read(lambda off: os.preadv(fd, [mv], off), offsets) for _ in range(2)][1]
        t_one = [per_read(lambda off: one.readinto(off, mv), offsets) for _ in range(2)][1]
        t_huge = [per_read(lambda off: huge.readinto(off, mv), offsets) for _ in range(2)][1]
        os.close(fd)
        huge.close()
        one.close()
        m.close()
        print(f"segments: {n}")
        print(f"load in process (parse + check + construct): {load:.2f} s")
        print(f"4 KiB read: raw file {raw:.2f} us, 1-segment table {t_one:.2f} us, "
              f"{n}-segment table {t_huge:.2f} us")
        print(f"ratios: {n}-segment / 1-segment = {t_huge / t_one:.2f}x, "
              f"mapping overhead over the raw read = {t_huge - raw:.2f} us")
        # through the daemon's control socket, as `userdm create` does it
        env = {**os.environ, "USERDM_RUNTIME_DIR": f"{tmp}/run", "USERDM_STATE_DIR": f"{tmp}/state"}
        d = subprocess.Popen([sys.executable, "-m", "userdm", "daemon", "--no-fuse", "--no-nbd"],
                             env=env, stdout=subprocess.PIPE, text=True)
        try:
            d.stdout.readline()
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "userdm", "create", "huge"], input=table, text=True,
                           env=env, check=True)
            print(f"userdm create through the daemon (incl. saving state): {time.perf_counter() - t0:.2f} s")
        finally:
            d.terminate()
            d.wait()


if __name__ == "__main__":
    main()
