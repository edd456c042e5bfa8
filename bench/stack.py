"""A four-deep stack against a single linear device, over NBD, with the same fio jobs.

    single: fio --ioengine=nbd -> NBDServer -> "single" (linear) -> file
    stack:  fio --ioengine=nbd -> NBDServer -> "stack" (linear) -> "l2" (linear) -> "l1"
            (linear) -> "striped" (striped over 2 files, 64 KiB chunks) -> files

Both devices are served by one server process (its own, as bench/nbd.py's `--serve`), with
collapsing of remap-only chains on (`userdm.dm.collapse`); `--compare` adds a second server
with collapsing off, so that one run shows what collapsing saves. Rounds are interleaved,
medians printed, ratios against "single" of the same server (goal: stack >= 0.8x single on
4 KiB randread qd16 and 1 MiB reads). Files live in /dev/shm (see bench/nbd.py). Usage:

    .venv/bin/python bench/stack.py [--mib 512] [--runtime 3] [--rounds 3] [--compare]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import fill, fio, start  # noqa: E402  (bench/nbd.py)

JOBS = [("1M seq read qd8", "read", "1M", 8, "MB/s"),
        ("4K randread qd16", "randread", "4k", 16, "IOPS"),
        ("4K randread qd1", "randread", "4k", 1, "IOPS"),
        ("4K randwrite qd16", "randwrite", "4k", 16, "IOPS")]


def serve(sock: str, work: str, collapse_on: str) -> None:
    """Helper mode: the two devices over the files in `work`, served on `sock`."""
    from userdm import Mapper
    from userdm.dm import collapse
    from userdm.export.nbd.server import NBDServer

    collapse.ENABLED = collapse_on == "1"
    half = os.path.getsize(os.path.join(work, "a.img")) // 512
    m = Mapper()
    m.create("single", f"0 {2 * half} linear {work}/c.img 0")
    m.create("striped", f"0 {2 * half} striped 2 128 {work}/a.img 0 {work}/b.img 0")
    m.create("l1", f"0 {2 * half} linear /dev/mapper/striped 0")
    m.create("l2", f"0 {2 * half} linear /dev/mapper/l1 0")
    m.create("stack", f"0 {2 * half} linear /dev/mapper/l2 0")
    srv = NBDServer(m, unix_path=sock)
    srv.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    srv.stop()
    m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="device size in MiB")
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also a server with collapsing off")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    size = args.mib << 20
    with ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(dir="/dev/shm", prefix="userdm-stack-bench-"))
        for name, n in (("a.img", size // 2), ("b.img", size // 2), ("c.img", size)):
            fill(os.path.join(work, name), n)
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
        servers = {"on": "1", **({"off": "0"} if args.compare else {})}
        targets = {}
        for label, flag in servers.items():
            sock = os.path.join(work, f"{label}.sock")
            start(stack, [sys.executable, os.path.abspath(__file__), "--serve", sock, work, flag], sock,
                  f"server (collapse {label})", env)
            for dev in ("single", "stack"):
                targets[(label, dev)] = f"nbd+unix:///{dev}?socket={sock}"
        out = os.path.join(work, "fio.json")
        results: dict = {}
        for rnd in range(args.rounds):
            for label, rw, bs, qd, unit in JOBS:
                for key, uri in targets.items():
                    r = fio(uri, "", rw, bs, qd, args.runtime, size, out)
                    value = r["bw_bytes"] / 1e6 if unit == "MB/s" else r["iops"]
                    results.setdefault((label, key), []).append(value)
                    print(f"round {rnd + 1} {label:18} collapse {key[0]:3} {key[1]:6} {value:10.0f} {unit}",
                          flush=True)
        print()
        cols = [f"{dev}({c})" for c in servers for dev in ("single", "stack")]
        print(f"{'job':18} " + " ".join(f"{c:>12}" for c in cols)
              + "".join(f"  {'stack/single(' + c + ')':>20}" for c in servers))
        for label, _rw, _bs, _qd, unit in JOBS:
            med = {k: statistics.median(v) for (lab, k), v in results.items() if lab == label}
            cells = " ".join(f"{med[(c, dev)]:12.0f}" for c in servers for dev in ("single", "stack"))
            ratios = "".join(f"  {med[(c, 'stack')] / med[(c, 'single')]:20.2f}" for c in servers)
            print(f"{label:18} {cells}{ratios}   ({unit}, median of {args.rounds})")


if __name__ == "__main__":
    main()
