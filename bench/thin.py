"""Benchmark: a thin device against a linear device and against qemu-nbd over a qcow2 image.

One run, fio over NBD on Unix sockets, everything in one directory (/dev/shm by default):

    thin:     fio -> userdm daemon -> thin -> thin-pool (64 KiB blocks) -> data file
    linear:   fio -> userdm daemon -> linear -> file (the same daemon)
    qcow2:    fio -> qemu-nbd --cache=writeback -> qcow2 (64 KiB clusters)

Jobs, each on fresh space where it says so:
- first writes, 4 KiB: one 4 KiB write per unprovisioned block (fio `write:60k`, 64 KiB
  stride): every write provisions a block (zeroing the rest) / allocates a cluster;
- first writes, 1 MiB: sequential 1 MiB writes over unprovisioned space;
- provisioned 4 KiB random writes and reads at qd16, and 1 MiB sequential reads at qd8, on
  space written before (thin and linear);
- breaking sharing: one 4 KiB write per block of space that a snapshot shares (thin:
  `create_snap`; qcow2: an internal snapshot, `qemu-img snapshot -c`).

Goals from issue 14: provisioned I/O at least 0.8x linear; first writes and broken sharing at
least 1.0x qcow2. Usage: `.venv/bin/python bench/thin.py [--mib 256] [--rounds 3] [--dir DIR]`. Every process
and file it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

MiB = 1 << 20
BS = 128  # sectors: 64 KiB thin blocks and qcow2 clusters


class Userdm:
    """A userdm daemon in its own runtime directory, driven by the CLI."""

    def __init__(self, work: Path, stack: ExitStack) -> None:
        self.env = {**os.environ, "USERDM_RUNTIME_DIR": str(work / "run"),
                    "USERDM_STATE_DIR": str(work / "state")}
        self.sock = work / "run" / "nbd.sock"
        self.proc = subprocess.Popen([sys.executable, "-m", "userdm", "daemon", "--no-fuse"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stack.callback(self.stop)
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError("userdm daemon did not start")

    def __call__(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "userdm", *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Qcow2:
    """qemu-nbd over a qcow2 image, restarted around offline `qemu-img` steps."""

    def __init__(self, work: Path, size: int, stack: ExitStack) -> None:
        self.image = str(work / "disk.qcow2")
        self.sock = str(work / "qemu.sock")
        self.size = size
        self.proc: subprocess.Popen | None = None
        stack.callback(self.stop)

    def fresh(self) -> None:
        self.stop()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", self.image,
                        str(self.size)], check=True)
        self.start()

    def snapshot(self) -> None:
        self.stop()
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", self.image], check=True)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--cache=writeback", "-t", "-k", self.sock,
                                      self.image], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            if os.path.exists(self.sock):
                return
            time.sleep(0.02)
        raise RuntimeError("qemu-nbd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


def fio(uri: str, work: Path, rw: str, bs: str, qd: int, size: int, runtime: float | None = None) -> float:
    """MB/s (1 MiB jobs) or IOPS (4 KiB jobs) of one fio job."""
    out = work / "fio.json"
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}", f"--output={out}", "--output-format=json"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=0.5"]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=work)
    job = json.loads(out.read_text())["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["bw_bytes"] / 1e6 if bs == "1M" else side["iops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="size of each measured region in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per provisioned-I/O job")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are printed")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp")
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/thin.py needs {tool}")
    size = args.mib * MiB
    blocks = size // (BS * 512)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, ExitStack() as stack:
        work = Path(tmp)
        for name, bytes_ in (("meta.img", 64 * MiB), ("data.img", 5 * args.rounds * size), ("linear.img", size)):
            with open(work / name, "wb") as f:
                f.truncate(bytes_)
        dm = Userdm(work, stack)
        dm("create", "pool", "--table", f"0 {5 * args.rounds * blocks * BS} thin-pool {work / 'meta.img'} "
           f"{work / 'data.img'} {BS} 0")
        dm("create", "linear", "--table", f"0 {size // 512} linear {work / 'linear.img'} 0")
        next_id = iter(range(1 << 20))

        def thin() -> str:
            dev = next(next_id)
            dm("message", "pool", "0", "create_thin", str(dev))
            dm("create", f"t{dev}", "--table", f"0 {size // 512} thin /dev/mapper/pool {dev}")
            return f"t{dev}"

        q = Qcow2(work, size, stack)
        stride = "write:60k"

        def record(label: str, who: str, value: float) -> None:
            results.setdefault(label, {}).setdefault(who, []).append(value)

        for rnd in range(args.rounds):  # rounds interleave the two sides: this machine's speed drifts
            record("first 4K writes (IOPS)", "thin", fio(dm.uri(thin()), work, stride, "4k", 16, size))
            q.fresh()
            record("first 4K writes (IOPS)", "qcow2", fio(q.uri, work, stride, "4k", 16, size))
            record("first 1M writes (MB/s)", "thin", fio(dm.uri(thin()), work, "write", "1M", 8, size))
            q.fresh()
            record("first 1M writes (MB/s)", "qcow2", fio(q.uri, work, "write", "1M", 8, size))
            full = thin()  # provisioned I/O: a fully written thin device against linear
            fio(dm.uri(full), work, "write", "1M", 8, size)
            if not rnd:
                fio(dm.uri("linear"), work, "write", "1M", 8, size)
            for label, rw, bs, qd in (("provisioned 4K randwrite qd16 (IOPS)", "randwrite", "4k", 16),
                                      ("provisioned 4K randread qd16 (IOPS)", "randread", "4k", 16),
                                      ("provisioned 1M read qd8 (MB/s)", "read", "1M", 8)):
                for who, name in (("thin", full), ("linear", "linear")):
                    record(label, who, fio(dm.uri(name), work, rw, bs, qd, size, args.runtime))
            # breaking sharing: 4 KiB into each block that a snapshot shares
            dm("message", "pool", "0", "create_snap", str(next(next_id)), full.lstrip("t"))
            record("break sharing 4K (IOPS)", "thin", fio(dm.uri(full), work, stride, "4k", 16, size))
            q.fresh()
            fio(q.uri, work, "write", "1M", 8, size)
            q.snapshot()
            record("break sharing 4K (IOPS)", "qcow2", fio(q.uri, work, stride, "4k", 16, size))
        status = dm("status", "pool").split()
    print(f"thin pool after the run: {status[4]} metadata, {status[5]} data blocks used\n")
    width = max(len(k) for k in results)
    for label, row in results.items():
        other = "linear" if "linear" in row else "qcow2"
        thin_, them = statistics.median(row["thin"]), statistics.median(row[other])
        print(f"{label:<{width}}  thin {thin_:9.1f}  {other:<6} {them:9.1f}  ratio {thin_ / them:4.2f}x")


if __name__ == "__main__":
    main()
