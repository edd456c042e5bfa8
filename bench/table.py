"""Benchmark: a table of 1,000,000 linear segments — load time, memory, per-I/O cost, and
what the rest of the process sees meanwhile.

In process (a child process per source tree, so that `--baseline-src` measures an older tree
in the same run):
- the time to parse, check and construct the table (`create`), wall and CPU;
- memory per segment (the process's resident memory before and after, over the segments;
  the table's text is kept too, as `table` and the state store need it);
- 4 KiB reads of another device while the table loads: how many, and their worst and p99
  latency (the load pauses the cyclic collector and yields the interpreter between chunks);
- the cost of one 4 KiB read through the huge table against the same read through a
  one-segment table and directly from the file (ratio in the same run);
- `table` of the huge device (the list of lines, as the control socket sends it).
Through the daemon (`userdm daemon --no-fuse --no-nbd`, own runtime and state directories):
`userdm create` of the table (state committed included) and `userdm table` printing it.

The machine is shared: compare the ratios and the baseline columns of one run, not
absolute figures. Run: `.venv/bin/python bench/table.py [--segments N] [--baseline-src DIR]`
(e.g. `git archive main src | tar -x -C /tmp/base` and `--baseline-src /tmp/base/src`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_read(fn, offsets) -> float:
    """CPU microseconds per call (the process's CPU time: less noisy on a shared machine)."""
    start = time.process_time()
    for off in offsets:
        fn(off)
    return (time.process_time() - start) / len(offsets) * 1e6


def in_process(img: str, n: int) -> dict:
    """The in-process figures (run in a child process with the source tree to measure)."""
    from userdm import Mapper

    table = "".join(f"{i * 8} 8 linear {img} {(n - 1 - i) * 8}\n" for i in range(n))
    m = Mapper()
    m.create("one", f"0 {n * 8} linear {img} 0")
    one = m.open_device("one", write=False)
    buf = bytearray(4096)
    mv = memoryview(buf)
    latencies: list[float] = []
    loading = threading.Event()
    done = threading.Event()

    def reader() -> None:
        rng = random.Random(1)
        loading.wait()
        while not done.is_set():
            t = time.perf_counter()
            one.readinto(rng.randrange(n) * 4096, mv)
            latencies.append(time.perf_counter() - t)
            time.sleep(0.0005)

    thread = threading.Thread(target=reader)
    thread.start()
    before = rss()
    loading.set()
    t0, c0 = time.perf_counter(), time.process_time()
    m.create("huge", table)
    load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    thread.join()
    memory = rss() - before - len(table)   # the caller's copy of the text is not the table's
    huge = m.open_device("huge", write=False)
    rng = random.Random(0)
    offsets = [rng.randrange(n) * 4096 for _ in range(200_000)]
    fd = os.open(img, os.O_RDONLY)
    # each measured twice, the first pass warming the page cache for the pages it touches
    # (the huge table maps the offsets to other pages of the file than the others do)
    raw = [per_read(lambda off: os.preadv(fd, [mv], off), offsets) for _ in range(2)][1]
    t_one = [per_read(lambda off: one.readinto(off, mv), offsets) for _ in range(2)][1]
    t_huge = [per_read(lambda off: huge.readinto(off, mv), offsets) for _ in range(2)][1]
    os.close(fd)
    t0 = time.perf_counter()
    lines = m.table("huge")
    listing = time.perf_counter() - t0
    assert len(lines) == n
    huge.close()
    one.close()
    m.close()
    latencies.sort()
    return {"load": load, "load_cpu": load_cpu, "bytes_per_segment": memory / n, "raw": raw,
            "one": t_one, "huge": t_huge, "table": listing, "reads_during_load": len(latencies),
            "read_max_ms": latencies[-1] * 1e3 if latencies else float("nan"),
            "read_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else float("nan")}


def through_daemon(src: str, tmp: str, img: str, n: int) -> dict:
    table = "".join(f"{i * 8} 8 linear {img} {(n - 1 - i) * 8}\n" for i in range(n))
    env = {**os.environ, "PYTHONPATH": src, "USERDM_RUNTIME_DIR": f"{tmp}/run", "USERDM_STATE_DIR": f"{tmp}/state"}
    d = subprocess.Popen([sys.executable, "-m", "userdm", "daemon", "--no-fuse", "--no-nbd"],
                         env=env, stdout=subprocess.PIPE, text=True)
    try:
        d.stdout.readline()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "userdm", "create", "huge"], input=table, text=True,
                       env=env, check=True)
        create = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "userdm", "table", "huge"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return {"daemon_create": create, "daemon_table": time.perf_counter() - t0}
    finally:
        d.terminate()
        d.wait()


def measure(src: str, n: int) -> dict:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None   # page cache eviction: see bench/nbd.py
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        img = str(Path(tmp) / "disk.img")
        with open(img, "wb") as f:
            f.truncate(n * 8 * 512)
        env = {**os.environ, "PYTHONPATH": src}
        out = subprocess.run([sys.executable, __file__, "--child", img, str(n)], env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        figures.update(through_daemon(src, tmp, img, n))
        return figures


ROWS = [  # (key, label, format)
    ("load", "load in process (parse + check + construct), s", "{:.2f}"),
    ("load_cpu", "  of which CPU time, s", "{:.2f}"),
    ("bytes_per_segment", "memory per segment (resident), bytes", "{:.0f}"),
    ("reads_during_load", "4 KiB reads of another device during the load", "{:.0f}"),
    ("read_p99_ms", "  their p99, ms", "{:.2f}"),
    ("read_max_ms", "  their worst, ms", "{:.1f}"),
    ("raw", "4 KiB read from the file, CPU us", "{:.2f}"),
    ("one", "4 KiB read through a 1-segment table, CPU us", "{:.2f}"),
    ("huge", "4 KiB read through the huge table, CPU us", "{:.2f}"),
    ("ratio", "  huge / 1-segment (goal <= 1.5)", "{:.2f}"),
    ("table", "table() of the huge device in process, s", "{:.2f}"),
    ("daemon_create", "userdm create through the daemon (state included), s", "{:.2f}"),
    ("daemon_table", "userdm table printing it, s", "{:.2f}"),
]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(in_process(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--baseline-src", metavar="DIR", help="also measure the source tree DIR, side by side")
    args = ap.parse_args()
    trees = {"this tree": str(HERE.parent / "src")}
    if args.baseline_src:
        trees["baseline"] = os.path.abspath(args.baseline_src)
    results = {name: measure(src, args.segments) for name, src in trees.items()}
    for r in results.values():
        r["ratio"] = r["huge"] / r["one"]
    print(f"segments: {args.segments}")
    print(f"{'':58}" + "".join(f"{name:>12}" for name in results)
          + ("   this/baseline" if len(results) > 1 else ""))
    for key, label, fmt in ROWS:
        cells = "".join(f"{fmt.format(r[key]):>12}" for r in results.values())
        rel = ""
        if len(results) > 1 and results["baseline"][key]:
            rel = f"   {results['this tree'][key] / results['baseline'][key]:.2f}"
        print(f"{label:58}{cells}{rel}")


if __name__ == "__main__":
    main()
