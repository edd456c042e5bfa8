"""I/O through a loop device on a userdm FUSE file, as a ratio to a loop device on the plain file.

Both paths use the same backing file, in one run:

    plain:    fio/dd -> /dev/loopA (direct-io) -> file
    userdm:   fio/dd -> /dev/loopB (direct-io) -> FUSE file -> userdm's FUSE server -> Mapper
              (linear) -> file, requests read from /dev/fuse (the default)
    uring:    the same, requests through FUSE over io_uring (`userdm daemon --fuse-uring`; the
              bench turns the kernel's `enable_uring` on for its run and back after;
              `--no-uring` leaves it out)
    baseline: the same with the FuseExport of another source tree (`--baseline-src`), e.g. the
              libfuse export of an older commit (with mfusepy installed), for before/after figures
    passthrough: (`--passthrough`) userdm's export with FUSE passthrough: the device maps the
              file byte for byte, so the kernel does the loop device's I/O on the file itself
    bindfs:   fio/dd -> /dev/loopC (direct-io) -> bindfs's mirror of the file (a C FUSE daemon on
              libfuse3, one thread, direct_io) -> file: what the kernel's FUSE path costs on this
              machine without Python (when bindfs is installed; `--no-bindfs` leaves it out)

Jobs (the goals of issue 20 in brackets):
    4k-randread-qd16, 4k-randwrite-qd16 (>= 0.5x), 4k-randread-qd1 (>= 0.6x): fio libaio, direct
    1m-seqread, 1m-seqwrite: fio (qd4) and dd bs=1M iflag/oflag=direct (>= 0.8x)
    ext4-4k-mix: ext4 on each loop device, fio 4 KiB random 70/30 read/write qd16 in a file (>= 0.5x)

Each FUSE export runs in its own process (`--serve`), as in the daemon. Rounds are interleaved
and the median of each job is printed, because this machine's speed drifts (and it is shared:
absolute figures are noisy, ratios measured side by side less so). `--profile` samples the
serving process with py-spy during the 4 KiB jobs (py-spy on PATH or in the venv). Run as root:

    PYTHONPATH=src python3 bench/fuse.py [--mib 1024] [--rounds 3] [--runtime 5] [--dir /dev/shm]
        [--jobs 4k-randread-qd16,...] [--baseline-src DIR] [--passthrough] [--profile OUT.txt]

Everything it creates (loop devices, mounts, processes, files) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

SECTOR = 512
MiB = 1 << 20

#: job name -> (fio arguments, metric): metric "iops" or "mbps"
FIO_JOBS: dict[str, tuple[list[str], str]] = {
    "4k-randread-qd16": (["--rw=randread", "--bs=4k", "--iodepth=16"], "iops"),
    "4k-randwrite-qd16": (["--rw=randwrite", "--bs=4k", "--iodepth=16"], "iops"),
    "4k-randread-qd1": (["--rw=randread", "--bs=4k", "--iodepth=1"], "iops"),
    "1m-seqread": (["--rw=read", "--bs=1M", "--iodepth=4"], "mbps"),
    "1m-seqwrite": (["--rw=write", "--bs=1M", "--iodepth=4"], "mbps"),
}
DD_JOBS = ("dd-1m-read", "dd-1m-write")
EXT4_JOB = "ext4-4k-mix"
ALL_JOBS = [*FIO_JOBS, *DD_JOBS, EXT4_JOB]
GOALS = {"4k-randread-qd16": 0.5, "4k-randwrite-qd16": 0.5, "4k-randread-qd1": 0.6, "1m-seqread": 0.8,
         "1m-seqwrite": 0.8, "dd-1m-read": 0.8, "dd-1m-write": 0.8, EXT4_JOB: 0.5}


def serve(mountpoint: str, path: str, passthrough: bool, uring: bool) -> None:
    """Helper mode: a Mapper with one linear device `bench` over `path`, exported at `mountpoint`."""
    from userdm import Mapper
    from userdm.export.fuse import FuseExport

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})   # for sigwait, in every thread
    mapper = Mapper()
    mapper.create("bench", f"0 {os.path.getsize(path) // SECTOR} linear {path} 0")
    export = FuseExport(mapper, mountpoint, **({"passthrough": True} if passthrough else {}),
                        **({"uring": True} if uring else {}))
    export.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    export.stop()
    mapper.close()


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def dd(args: list[str]) -> float:
    """Run dd and return its throughput in MB/s (10^6 bytes per second, as dd prints)."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m.group(1)) / float(m.group(2)) / 1e6


def fio(target: str, args: list[str], metric: str, runtime: int, size: str | None = None) -> float:
    """One fio job on `target`; IOPS (reads + writes) or MB/s."""
    cmd = ["fio", "--name=bench", f"--filename={target}", "--ioengine=libaio", "--direct=1",
           "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--randrepeat=0",
           "--output-format=json", *args]
    if size:
        cmd.append(f"--size={size}")
    job = json.loads(run(*cmd))["jobs"][0]
    if metric == "iops":
        return job["read"]["iops"] + job["write"]["iops"]
    return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6


@contextmanager
def loop(path: str) -> Iterator[str]:
    dev = run("losetup", "--show", "-f", "--direct-io=on", path).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        time.sleep(0.2)   # let the detach settle


@contextmanager
def ext4_on(dev: str, mnt: str) -> Iterator[str]:
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    os.makedirs(mnt, exist_ok=True)
    run("mount", dev, mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)


def start_export(stack: ExitStack, src: str, mountpoint: str, backing: str, flags: list[str]) -> int:
    """A `--serve` helper with `src` first on PYTHONPATH; returns its pid once its mount answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", mountpoint, backing,
                             *flags],
                            env=env, stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    stack.callback(stop)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the FUSE export from {src} did not start")
    return proc.pid


def start_bindfs(stack: ExitStack, source: str, mountpoint: str) -> None:
    """bindfs (C, libfuse3, single-threaded: its multithreaded mode measured 3x slower here)
    mirrors `source` at `mountpoint` with direct_io, as userdm's files are."""
    os.makedirs(mountpoint)
    subprocess.run(["bindfs", "-o", "direct_io", source, mountpoint], check=True)
    stack.callback(lambda: subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True))


def measure(job: str, target: str, tmp: str, runtime: int, mib: int) -> float:
    """One job on the file `target` through a fresh loop device."""
    with loop(target) as dev:
        if job in FIO_JOBS:
            args, metric = FIO_JOBS[job]
            return fio(dev, args, metric, runtime)
        if job == "dd-1m-write":
            return dd(["if=/dev/zero", f"of={dev}", "bs=1M", f"count={mib}", "oflag=direct"])
        if job == "dd-1m-read":
            return dd([f"if={dev}", "of=/dev/null", "bs=1M", f"count={mib}", "iflag=direct"])
        with ext4_on(dev, os.path.join(tmp, "ext4")) as mnt:
            return fio(os.path.join(mnt, "fio.dat"), ["--rw=randrw", "--rwmixread=70", "--bs=4k",
                                                      "--iodepth=16"], "iops", runtime,
                       size=f"{max(64, mib // 4)}M")


def profiled(pid: int, out: str, runtime: int, what: Callable[[], None]) -> None:
    """Run `what` while py-spy samples the serving process `pid` (the thread holding the GIL)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if spy is None:
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        what()
        return
    rec = subprocess.Popen([spy, "record", "-p", str(pid), "-o", out, "-f", "raw", "-d", str(runtime + 2),
                            "-r", "200", "--gil"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        what()
    finally:
        rec.wait(60)


def summarize_profile(raw: str, top: int = 30) -> str:
    """py-spy's collapsed stacks -> the share of GIL-holding samples per function, by itself
    (`self`) and with what it calls (`total`), lines merged."""
    own: dict[str, int] = {}
    cumulative: dict[str, int] = {}
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            n = int(count)
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for fr in set(frames):
                cumulative[fr] = cumulative.get(fr, 0) + n
    rows = sorted(cumulative.items(), key=lambda kv: -kv[1])[:top]
    total = max(total, 1)
    lines = [f"total {100 * c / total:5.1f}%  self {100 * own.get(name, 0) / total:5.1f}%  {name}"
             for name, c in rows]
    return f"{total} samples\n" + "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the backing file in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job (default 5)")
    parser.add_argument("--dir", default="/dev/shm", help="where the backing file goes (default /dev/shm)")
    parser.add_argument("--jobs", default=",".join(ALL_JOBS), help="comma-separated subset of " + ",".join(ALL_JOBS))
    parser.add_argument("--baseline-src", metavar="DIR", help="also measure the FuseExport of this source tree")
    parser.add_argument("--passthrough", action="store_true",
                        help="also measure userdm's export with FUSE passthrough")
    parser.add_argument("--no-bindfs", action="store_true", help="leave out the C FUSE daemon (bindfs)")
    parser.add_argument("--no-uring", action="store_true", help="leave out userdm with FUSE over io_uring")
    parser.add_argument("--uring", action="store_true", help=argparse.SUPPRESS)   # for --serve
    parser.add_argument("--profile", metavar="OUT", help="py-spy the serving process during the 4k jobs")
    parser.add_argument("--serve", nargs=2, metavar=("MOUNTPOINT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve, args.passthrough, args.uring)
        return 0
    if os.geteuid() != 0:
        print("bench/fuse.py needs root (loop devices, FUSE)", file=sys.stderr)
        return 2
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = set(jobs) - set(ALL_JOBS)
    if unknown:
        parser.error(f"unknown jobs: {', '.join(sorted(unknown))}")

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    exports = {"userdm": (here, []), **({} if args.no_uring else {"uring": (here, ["--uring"])}),
               **({"baseline": (args.baseline_src, [])} if args.baseline_src else {}),
               **({"passthrough": (here, ["--passthrough"])} if args.passthrough else {})}
    c_fuse = not args.no_bindfs and shutil.which("bindfs") is not None
    paths = ["plain", *exports, *(["bindfs"] if c_fuse else [])]
    compared = paths[1:]
    results: dict[tuple[str, str], list[float]] = {(p, j): [] for p in paths for j in jobs}
    sys.path.insert(0, here)
    from userdm.export.fuse.uring import fuse_uring_enabled
    with ExitStack() as stack:
        if not args.no_uring and not stack.enter_context(fuse_uring_enabled()):
            print("this kernel has no FUSE over io_uring: the uring column reads /dev/fuse", file=sys.stderr)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="userdm-fuse-bench-"))
        os.mkdir(os.path.join(tmp, "data"))
        backing = os.path.join(tmp, "data", "disk.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={backing}", "bs=1M", f"count={args.mib}", "status=none"],
                       check=True)
        pids = {name: start_export(stack, src, os.path.join(tmp, name), backing, flags)
                for name, (src, flags) in exports.items()}
        if c_fuse:
            start_bindfs(stack, os.path.join(tmp, "data"), os.path.join(tmp, "bindfs"))
        for rnd in range(args.rounds):
            for job in jobs:
                for path in paths:
                    target = (backing if path == "plain" else os.path.join(tmp, "bindfs", "disk.img")
                              if path == "bindfs" else os.path.join(tmp, path, "bench"))

                    def one(path: str = path, job: str = job, target: str = target) -> None:
                        results[(path, job)].append(measure(job, target, tmp, args.runtime, args.mib))
                    if args.profile and rnd == 0 and path == "userdm" and job.startswith("4k"):
                        profiled(pids["userdm"], f"{args.profile}.{job}.raw", args.runtime, one)
                    else:
                        one()

    print(f"loop (direct-io) on a {args.mib} MiB file in {args.dir} against loop on the userdm FUSE file, "
          f"median of {args.rounds} interleaved rounds, {args.runtime}s fio jobs; shared machine: compare ratios")
    print(f"{'job':<20}{'unit':>6}" + "".join(f"{p:>14}" for p in paths)
          + "".join(f"{p + ' x':>14}" for p in compared) + f"{'goal':>7}"
          + (f"{'userdm/bindfs':>15}" if c_fuse else ""))
    for job in jobs:
        unit = "IOPS" if job.startswith(("4k", "ext4")) else "MB/s"
        med = {p: statistics.median(results[(p, job)]) for p in paths}
        print(f"{job:<20}{unit:>6}" + "".join(f"{med[p]:14.0f}" for p in paths)
              + "".join(f"{med[p] / med['plain']:14.2f}" for p in compared) + f"{GOALS[job]:7.1f}"
              + (f"{med['userdm'] / med['bindfs']:15.2f}" if c_fuse else ""))
    if args.profile:
        for job in jobs:
            raw = f"{args.profile}.{job}.raw"
            if os.path.exists(raw):
                print(f"\nprofile of the serving process during {job}: samples of the thread holding the GIL "
                      f"(200/s over {args.runtime + 2}s at most; fewer: the GIL was free)")
                print(summarize_profile(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
