"""userdm's crypt target over NBD against nbdkit's luks filter and qemu-nbd's luks driver.

One run, everything on Unix sockets, files in /dev/shm, rounds interleaved across servers,
medians printed with the ratios the issue asks for (issue 13 §4):

    userdm-512:    fio -> NBDServer -> Mapper: crypt aes-xts-plain64, LUKS1 volume (512-byte sectors)
    userdm-4k:     fio -> NBDServer -> Mapper: crypt aes-xts-plain64 sector_size:4096, LUKS2 volume
    userdm-linear: fio -> NBDServer -> Mapper: linear over the LUKS1 file (no encryption)
    nbdkit:        fio -> nbdkit file + luks filter, the LUKS1 volume
    qemu-nbd:      fio -> qemu-nbd with qemu's luks driver, the LUKS1 volume

Jobs: 1 MiB sequential read and write at qd8, 4 KiB random read at qd16, one connection each.
The volumes are unlocked by userdm's own LUKS code (targets/_luks.py), as `luks open` does.

    PYTHONPATH=src python3 bench/crypt.py [--mib 256] [--runtime 3] [--rounds 3] [--dir DIR]
        [--jobs read,randread] [--servers userdm-512,nbdkit] [--profile DIR]

`--profile DIR` writes a cProfile of each userdm server to DIR/SERVER.prof (and prints the top
of it), to show where Python spends the time. `--serve ...` is the helper mode that runs a
userdm server in its own process. Every process and file it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd import fio, wait_for  # noqa: E402  (bench/nbd.py: the same fio runner)

JOBS = [  # (label, fio rw, block size, queue depth, unit)
    ("1M seq read qd8", "read", "1M", 8, "MB/s"),
    ("1M seq write qd8", "write", "1M", 8, "MB/s"),
    ("4K randread qd16", "randread", "4k", 16, "IOPS"),
]
SERVERS = ["userdm-512", "userdm-4k", "userdm-linear", "nbdkit", "qemu-nbd"]
PASSPHRASE = b"bench passphrase"


def serve(sock: str, path: str, keyfile: str, mode: str, profile: str | None) -> None:
    """Helper mode: a Mapper with one device (the unlocked volume, or linear over the file)."""
    from userdm import Mapper
    from userdm.export.nbd.server import NBDServer
    from userdm.targets import _luks

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, in every thread
    size = os.path.getsize(path)
    mapper = Mapper()
    with open(path, "rb") as f:
        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        header = _luks.read_header(read, size)
        with open(keyfile, "rb") as k:
            key = _luks.unlock(header, read, k.read())
    table = _luks.crypt_table(header, key, path, size)
    if mode == "linear":   # the same data area, unencrypted (and the header left alone)
        sectors, start = table.split()[1], header.segment.offset // 512
        table = f"0 {sectors} linear {path} {start}"
    mapper.create("bench", table)
    srv = NBDServer(mapper, unix_path=sock)
    profiles: list = []
    if profile:   # one cProfile per server thread, started by the thread's first profiled event
        import cProfile
        import threading

        def per_thread(*_args: object) -> None:
            prof = cProfile.Profile()
            profiles.append(prof)
            prof.enable()      # replaces this hook in this thread
        threading.setprofile(per_thread)
    srv.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    srv.stop()
    if profiles:
        import pstats
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            stats.add(prof)
        stats.dump_stats(profile)
    mapper.close()


def start(stack: ExitStack, cmd: list[str], sock: str, what: str, log: str, env: dict | None = None) -> None:
    """Start a server; its stderr goes to a file (a pipe nobody reads would stall it)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    stack.callback(stop)
    wait_for(sock, proc, what)


def make_volumes(work: str, size: int) -> dict[str, str]:
    keyfile = os.path.join(work, "pw")
    with open(keyfile, "wb") as f:
        f.write(PASSPHRASE)
    paths = {}
    for kind, extra in (("luks1", ["--type", "luks1"]), ("luks2", ["--type", "luks2", "--sector-size", "4096"])):
        path = os.path.join(work, f"{kind}.img")
        block = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(block)
        subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--key-file", keyfile, "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", "--cipher", "aes-xts-plain64", "--key-size", "512",
                        *extra, path], check=True)
        paths[kind] = path
    paths["key"] = keyfile
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="volume size in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp")
    ap.add_argument("--jobs", help="comma-separated substrings of the job labels to run (default: all)")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--profile", metavar="DIR", help="cProfile each userdm server into DIR")
    ap.add_argument("--serve", nargs=4, metavar=("SOCKET", "FILE", "KEYFILE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve, args.profile_out)
        return
    for tool in ("fio", "nbdkit", "qemu-nbd", "cryptsetup"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/crypt.py needs {tool}")
    jobs = [j for j in JOBS if not args.jobs or any(w.strip() in j[0] for w in args.jobs.split(","))]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if set(servers) - set(SERVERS) or not jobs:
        sys.exit(f"servers: {', '.join(SERVERS)}; jobs: {', '.join(j[0] for j in JOBS)}")
    size = args.mib << 20
    with ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="userdm-crypt-bench-"))
        vols = make_volumes(work, size)
        socks = {s: os.path.join(work, f"{s}.sock") for s in servers}
        log = os.path.join(work, "servers.log")
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
        userdm = {"userdm-512": (vols["luks1"], "crypt"), "userdm-4k": (vols["luks2"], "crypt"),
                  "userdm-linear": (vols["luks1"], "linear")}
        for name, (path, mode) in userdm.items():
            if name in servers:
                cmd = [sys.executable, os.path.abspath(__file__), "--serve", socks[name], path, vols["key"], mode]
                if args.profile:
                    os.makedirs(args.profile, exist_ok=True)
                    cmd += ["--profile-out", os.path.join(os.path.abspath(args.profile), f"{name}.prof")]
                start(stack, cmd, socks[name], f"{name} server", log, env)
        if "nbdkit" in servers:
            start(stack, ["nbdkit", "-f", "-U", socks["nbdkit"], "--filter=luks", "file", vols["luks1"],
                          f"passphrase=+{vols['key']}"], socks["nbdkit"], "nbdkit", log)
        if "qemu-nbd" in servers:
            start(stack, ["qemu-nbd", "--object", f"secret,id=s0,file={vols['key']},format=raw", "--image-opts",
                          f"driver=luks,key-secret=s0,file.filename={vols['luks1']}", "--cache=writeback", "-t",
                          "-e", "16", "-k", socks["qemu-nbd"]], socks["qemu-nbd"], "qemu-nbd", log)
        targets = {s: f"nbd+unix:///{'bench' if s.startswith('userdm') else ''}?socket={socks[s]}" for s in servers}
        results: dict[tuple[str, str], list[float]] = {}
        out = os.path.join(work, "fio.json")
        fio_size = size - (16 << 20)   # inside every export (the LUKS2 payload starts at 16 MiB)
        for rnd in range(args.rounds):
            for label, rw, bs, qd, unit in jobs:
                for server in servers:
                    try:
                        r = fio(targets[server], "", rw, bs, qd, args.runtime, fio_size, out)
                    except subprocess.CalledProcessError:
                        with open(log, "rb") as f:
                            sys.exit(f"fio failed on {server}; the servers' log ends with:\n"
                                     f"{f.read()[-2000:].decode(errors='replace')}")
                    value = r["bw_bytes"] / 1e6 if unit == "MB/s" else r["iops"]
                    results.setdefault((label, server), []).append(value)
                    print(f"round {rnd + 1} {label:18} {server:14} {value:10.0f} {unit}", flush=True)
        report(jobs, servers, results, args.rounds)
    if args.profile:
        import pstats
        for name in userdm:
            prof = os.path.join(args.profile, f"{name}.prof")
            if os.path.exists(prof):
                print(f"\n--- profile of {name} (cumulative) ---")
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def report(jobs: list, servers: list[str], results: dict, rounds: int) -> None:
    print()
    print(f"{'job':18} " + " ".join(f"{s:>13}" for s in servers))
    for label, _rw, _bs, _qd, unit in jobs:
        med = {s: statistics.median(results[(label, s)]) for s in servers if (label, s) in results}
        print(f"{label:18} " + " ".join(f"{med[s]:13.0f}" for s in servers) + f"   ({unit}, median of {rounds})")
        peers = [med[s] for s in ("nbdkit", "qemu-nbd") if s in med]
        for ours in ("userdm-512", "userdm-4k"):
            if ours not in med:
                continue
            parts = []
            if peers:
                parts.append(f"{med[ours] / max(peers):.2f}x the faster peer")
            if "userdm-linear" in med:
                parts.append(f"{med[ours] / med['userdm-linear']:.2f}x userdm linear")
            print(f"    {ours}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
