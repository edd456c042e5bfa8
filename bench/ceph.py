"""userdm over a Ceph RBD image against qemu-nbd over the same image, with the same fio jobs.
(Named ceph.py: a bench/rbd.py would shadow librbd's `rbd` module in the server it starts.)

One run: a throwaway single-node Ceph (tests/ceph_cluster.py: one monitor, one memstore OSD on
localhost), one image filled with random data, and two NBD servers on Unix sockets in front of
it, measured in interleaved rounds (this machine is shared and its speed drifts), medians and
the ratio userdm/qemu-nbd printed:

    userdm:   fio --ioengine=nbd -> NBDServer (own process) -> Mapper (linear) -> librbd (python3-rbd)
    qemu-nbd: fio --ioengine=nbd -> qemu-nbd rbd:... (qemu-block-extra's librbd driver)

Both use librbd with its defaults (its cache included) and the same configuration file. The jobs
are bench/nbd.py's. Usage:

    .venv/bin/python bench/ceph.py [--mib 256] [--runtime 3] [--rounds 3] [--jobs read,qd16]

(python3-rbd is Debian's: it imports under /usr/bin/python3 and in the venv made from it with
--system-site-packages, as scripts/setup.sh makes it.) Every process and file it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

import nbd as nbd_bench  # noqa: E402  (bench/nbd.py: the fio jobs and helpers)
from ceph_cluster import Cluster  # noqa: E402

SERVERS = ["userdm", "qemu-nbd"]


def serve(sock: str, ref: str, mib: str) -> None:
    """Helper mode: a Mapper with one linear device over the RBD reference, served on `sock`."""
    from userdm import Mapper
    from userdm.export.nbd.server import NBDServer

    mapper = Mapper()
    mapper.create("bench", f"0 {int(mib) * 2048} linear {ref} 0\n")
    srv = NBDServer(mapper, unix_path=sock)
    srv.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    srv.stop()
    mapper.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="image size in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", help="comma-separated substrings of the job labels to run (default: all)")
    ap.add_argument("--serve", nargs=3, metavar=("SOCKET", "REF", "MIB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    jobs = nbd_bench.JOBS
    if args.jobs:
        wanted = [w.strip() for w in args.jobs.split(",") if w.strip()]
        jobs = [j for j in jobs if any(w in j[0] for w in wanted)] or sys.exit(f"no job matches {args.jobs!r}")
    size = args.mib << 20
    with ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="userdm-rbd-bench-"))
        cluster = stack.enter_context(Cluster(os.path.join(work, "ceph")))
        data = os.path.join(work, "fill.raw")
        nbd_bench.fill(data, size)
        cluster.rbd("import", "--no-progress", data, "bench")
        os.unlink(data)
        ref = cluster.ref("bench")
        socks = {s: os.path.join(work, f"{s}.sock") for s in SERVERS}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.abspath(os.path.join(HERE, "..", "src")), os.environ.get("PYTHONPATH", "")])}
        nbd_bench.start(stack, [sys.executable, os.path.abspath(__file__), "--serve", socks["userdm"], ref,
                                str(args.mib)], socks["userdm"], "userdm server", env)
        nbd_bench.start(stack, ["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-e", "16", "-k",
                                socks["qemu-nbd"], ref], socks["qemu-nbd"], "qemu-nbd")
        targets = {"userdm": f"nbd+unix:///bench?socket={socks['userdm']}",
                   "qemu-nbd": f"nbd+unix:///?socket={socks['qemu-nbd']}"}
        results: dict[tuple[str, str], list[float]] = {}
        out = os.path.join(work, "fio.json")
        for rnd in range(args.rounds):
            for label, rw, bs, qd, unit in jobs:
                for server in SERVERS:
                    r = nbd_bench.fio(targets[server], "", rw, bs, qd, args.runtime, size, out)
                    value = r["bw_bytes"] / 1e6 if unit == "MB/s" else r["iops"]
                    results.setdefault((label, server), []).append(value)
                    print(f"round {rnd + 1} {label:18} {server:8} {value:10.0f} {unit}", flush=True)
        print()
        print(f"{'job':18} " + " ".join(f"{s:>10}" for s in SERVERS) + f"  {'userdm/qemu-nbd':>16}")
        for label, _rw, _bs, _qd, unit in jobs:
            med = {s: statistics.median(results[(label, s)]) for s in SERVERS}
            print(f"{label:18} " + " ".join(f"{med[s]:10.0f}" for s in SERVERS)
                  + f"  {med['userdm'] / med['qemu-nbd']:16.2f}   ({unit}, median of {args.rounds})")


if __name__ == "__main__":
    main()
