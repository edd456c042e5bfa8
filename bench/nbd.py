"""The userdm NBD server against nbdkit, qemu-nbd and the raw file, with the same fio jobs.

One run, everything on Unix sockets over the same file (in the page cache after the first
job), rounds interleaved across servers (this machine's speed drifts), medians printed:

    daemon:   fio --ioengine=nbd -> `userdm daemon` (control socket, state store, FUSE on,
              its own runtime and state directories) -> device "bench" (linear) -> file
    userdm:   fio --ioengine=nbd -> NBDServer (own process) -> Mapper (linear) -> file
    nbdkit:   fio --ioengine=nbd -> nbdkit file
    qemu-nbd: fio --ioengine=nbd -> qemu-nbd --cache=writeback
    raw:      fio --ioengine=psync on the file (queue depth 1)

Jobs: 1 MiB sequential read and write at qd8, 4 KiB random read at qd1 and qd16, 4 KiB
random write at qd16; each with one connection and with four (fio `numjobs=4`, each job its
own NBD connection, figures summed). Ratios are printed for the daemon and for the bench
server against the peers. Usage:

    PYTHONPATH=src python3 bench/nbd.py [--mib 1024] [--runtime 3] [--rounds 3] [--dir DIR]
        [--jobs write,qd16] [--servers daemon,userdm,nbdkit] [--conns 1,4]
        [--baseline-src DIR [--baseline-as daemon]] [--tls] [--no-fuse] [--nbd-workers N]

`--tls`: every NBD connection does STARTTLS (X.509 certificates made for the run by
scripts/tls-certs.sh): userdm with `--tls-certificates`, `nbdkit --tls=require`, qemu-nbd
with `tls-creds-x509`; fio connects with `nbds+unix://` (libnbd reads the client
certificates from $HOME/.pki/libnbd: fio's nbd engine refuses `tls-certificates=` in a URI,
so fio runs with HOME set to the run's directory). The raw file is measured as without TLS.

`--baseline-src` adds a second userdm server run from another source tree, for before/after
figures taken in one run, e.g. with the last commit's code:
`git archive HEAD src | tar -x -C /tmp/base && ... --baseline-src /tmp/base/src`;
`--baseline-as daemon` runs that tree as a `userdm daemon` (compare it with "daemon").

After the rates, the CPU time each server process used per request is printed (user +
system, read from /proc): on a shared machine it moves much less than the rates, which
depend on how the scheduler places the client and the server on the CPUs.

The file lives in /dev/shm by default: this machine runs DAMON proactive reclaim (kdamond),
which evicts a file's page cache within seconds, so a file in /var/tmp is measured at the
speed of the virtual disk (raw 4K reads drop to ~20k IOPS) instead of the servers' speed.
Give `--dir /var/tmp` to measure that case.

`--serve SOCKET FILE` is the helper mode that runs the userdm server in its own process.
Every process and file it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

JOBS = [  # (label, fio rw, block size, queue depth, unit)
    ("1M seq read qd8", "read", "1M", 8, "MB/s"),
    ("1M seq write qd8", "write", "1M", 8, "MB/s"),
    ("4K randread qd1", "randread", "4k", 1, "IOPS"),
    ("4K randread qd16", "randread", "4k", 16, "IOPS"),
    ("4K randwrite qd16", "randwrite", "4k", 16, "IOPS"),
]
SERVERS = ["daemon", "userdm", "nbdkit", "qemu-nbd", "raw"]
OURS = ("daemon", "userdm")


def serve(sock: str, path: str, certs: str | None = None) -> None:
    """Helper mode: a Mapper with one linear device over `path`, served on `sock` (with TLS
    from the certificate directory `certs`, if given)."""
    from userdm import Mapper
    try:
        from userdm.export.nbd.server import NBDServer
    except ImportError:  # a --baseline-src tree from before the exports moved above the core
        from userdm.nbd.server import NBDServer

    size = os.path.getsize(path) // 512
    mapper = Mapper()
    mapper.create("bench", f"0 {size} linear {path} 0\n")
    if certs:
        from userdm.export.nbd.tls import ServerTLS
        from userdm.nbd.tls import server_context
        srv = NBDServer(mapper, unix_path=sock, tls=ServerTLS("require", server_context(certs), certs))
    else:
        srv = NBDServer(mapper, unix_path=sock)
    srv.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    srv.stop()
    mapper.close()


def start_daemon(stack: ExitStack, work: str, path: str, src: str, certs: str | None,
                 fuse: bool, extra: list[str] = ()) -> tuple[str, int]:
    """The real `userdm daemon` with its own runtime and state directories under `work` (FUSE
    on unless `fuse` is False), one linear device "bench" over `path` created through its
    control socket; returns its NBD socket and its PID."""
    run, state = os.path.join(work, "daemon-run"), os.path.join(work, "daemon-state")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "userdm", "daemon", "--runtime-dir", run, "--state-dir", state]
    if not fuse:
        cmd.append("--no-fuse")
    if certs:
        cmd += ["--tls", "require", "--tls-certificates", certs]
    cmd += extra
    log = open(os.path.join(work, "daemon.log"), "w")
    stack.callback(log.close)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    stack.callback(stop, proc, 60)
    if "ready" not in (proc.stdout.readline() or ""):
        raise RuntimeError(f"userdm daemon did not start: {open(log.name).read()[-2000:]}")
    size = os.path.getsize(path) // 512
    subprocess.run([sys.executable, "-m", "userdm", "create", "bench"], input=f"0 {size} linear {path} 0\n",
                   text=True, check=True, env={**env, "USERDM_RUNTIME_DIR": run})
    return os.path.join(run, "nbd.sock"), proc.pid


def wait_for(path: str, proc: subprocess.Popen, what: str) -> None:
    for _ in range(500):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not create {path}")


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (a process this bench started)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(stack: ExitStack, cmd: list[str], sock: str, what: str, env: dict | None = None) -> int:
    """Start a server process that listens on `sock`; its PID."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stack.callback(stop, proc, 10)
    wait_for(sock, proc, what)
    return proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads, ended ones included) and of
    its live child processes (the daemon's NBD workers; the children it waited for count too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(cpu_seconds(int(child)) for child in f.read().split())
        except OSError:
            pass
    return total


def fio(target: str, path: str, rw: str, bs: str, qd: int, runtime: float, size: int, out: str,
        env: dict | None = None, conns: int = 1) -> dict:
    cmd = ["fio", "--name=bench", f"--rw={rw}", f"--bs={bs}", f"--size={size}", "--time_based",
           f"--runtime={runtime}", "--ramp_time=0.5", f"--output={out}", "--output-format=json",
           f"--numjobs={conns}", "--group_reporting"]
    if target.startswith("nbd"):
        cmd += ["--ioengine=nbd", f"--uri={target}", f"--iodepth={qd}"]
    else:
        cmd += ["--ioengine=psync", f"--filename={path}"]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    job = json.load(open(out))["jobs"][0]
    return job["read"] if job["read"]["io_bytes"] else job["write"]


def fill(path: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def tls_setup(work: str, here: str) -> tuple[str, dict]:
    """Certificates for the run (scripts/tls-certs.sh) and fio's environment: libnbd reads
    the client's from $HOME/.pki/libnbd."""
    certs = os.path.join(work, "certs")
    subprocess.run(["bash", os.path.join(here, "..", "scripts", "tls-certs.sh"), certs],
                   stdout=subprocess.DEVNULL, check=True)
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(home, ".pki"))
    shutil.copytree(os.path.join(certs, "client"), os.path.join(home, ".pki", "libnbd"))
    return certs, {**os.environ, "HOME": home}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp")
    ap.add_argument("--jobs", help="comma-separated substrings of the job labels to run (default: all)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma-separated servers to measure (default: {','.join(SERVERS)})")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="also measure a userdm server run from the source tree DIR (e.g. an older commit's "
                         "src from `git archive`), as 'baseline', for before/after figures of one run")
    ap.add_argument("--baseline-as", choices=("server", "daemon"), default="server",
                    help="run the --baseline-src tree as the bench server (default) or as a `userdm daemon`")
    ap.add_argument("--tls", action="store_true",
                    help="NBD over TLS for every server (userdm, nbdkit --tls=require, qemu-nbd)")
    ap.add_argument("--conns", default="1,4", help="comma-separated connection counts (default: 1,4)")
    ap.add_argument("--no-fuse", action="store_true", help="run the daemon without its FUSE export")
    ap.add_argument("--nbd-workers", type=int, metavar="N",
                    help="the daemon's --nbd-workers (default: the daemon's own; not given to --baseline-src)")
    ap.add_argument("--serve", nargs="+", metavar="SOCKET FILE [CERTS]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/nbd.py needs {tool}")
    jobs = JOBS
    if args.jobs:
        wanted = [w.strip() for w in args.jobs.split(",") if w.strip()]
        jobs = [j for j in JOBS if any(w in j[0] for w in wanted)]
        if not jobs:
            sys.exit(f"no job matches {args.jobs!r}; jobs: {', '.join(j[0] for j in JOBS)}")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown or not set(OURS) & set(servers):
        sys.exit(f"--servers takes daemon or userdm and any of {', '.join(SERVERS[2:])}")
    ours = [s for s in OURS if s in servers]
    conn_counts = [int(c) for c in args.conns.split(",") if c.strip()]
    if args.baseline_src:
        servers.insert(1, "baseline")
    size = args.mib << 20
    with ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="userdm-nbd-bench-"))
        path = os.path.join(work, "disk.img")
        fill(path, size)
        socks = {s: os.path.join(work, f"{s}.sock") for s in servers if s != "raw"}
        here = os.path.dirname(os.path.abspath(__file__))
        certs, fio_env = tls_setup(work, here) if args.tls else (None, None)
        sources = {"userdm": os.path.join(here, "..", "src"), "daemon": os.path.join(here, "..", "src"),
                   "baseline": args.baseline_src}
        pids: dict[str, int] = {}   # server -> its process, for its CPU time per request
        for name in ("daemon", "baseline"):
            if name in servers and (name == "daemon" or args.baseline_as == "daemon"):
                os.makedirs(os.path.join(work, name), exist_ok=True)
                extra = ["--nbd-workers", str(args.nbd_workers)] if name == "daemon" and args.nbd_workers is not None else []
                socks[name], pids[name] = start_daemon(stack, os.path.join(work, name), path, sources[name],
                                                       certs + "/server" if certs else None, not args.no_fuse, extra)
        for name in ("userdm", "baseline"):
            if name in servers and name not in pids:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [os.path.abspath(sources[name]), os.environ.get("PYTHONPATH", "")])}
                pids[name] = start(stack, [sys.executable, os.path.abspath(__file__), "--serve", socks[name], path,
                                           *([certs + "/server"] if certs else [])],
                                   socks[name], f"{name} server", env)
        if "nbdkit" in servers:
            tls = ["--tls=require", f"--tls-certificates={certs}/server"] if certs else []
            pids["nbdkit"] = start(stack, ["nbdkit", "-f", "-U", socks["nbdkit"], *tls, "file", path],
                                   socks["nbdkit"], "nbdkit")
        if "qemu-nbd" in servers:
            tls = (["--object", f"tls-creds-x509,id=tls0,dir={certs}/server,endpoint=server,verify-peer=off",
                    "--tls-creds", "tls0"] if certs else [])
            pids["qemu-nbd"] = start(stack, ["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-e", "16", "-k",
                                             socks["qemu-nbd"], *tls, path], socks["qemu-nbd"], "qemu-nbd")
        scheme = "nbds+unix" if certs else "nbd+unix"
        targets = {"daemon": f"{scheme}:///bench?socket={socks.get('daemon')}",
                   "userdm": f"{scheme}:///bench?socket={socks.get('userdm')}",
                   "baseline": f"{scheme}:///bench?socket={socks.get('baseline')}",
                   "nbdkit": f"{scheme}:///?socket={socks.get('nbdkit')}",
                   "qemu-nbd": f"{scheme}:///?socket={socks.get('qemu-nbd')}",
                   "raw": path}
        results: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}   # server CPU microseconds per request
        out = os.path.join(work, "fio.json")
        runs = [(f"{label} x{c}" if c > 1 else label, rw, bs, qd, unit, c)
                for c in conn_counts for label, rw, bs, qd, unit in jobs]
        for rnd in range(args.rounds):
            for label, rw, bs, qd, unit, c in runs:
                for server in servers:
                    if server == "raw" and (c > 1 or qd > 1 and rw.startswith("rand")):
                        continue          # psync has no queue depth
                    before = cpu_seconds(pids[server]) if server in pids else 0.0
                    r = fio(targets[server], path, rw, bs, qd, args.runtime, size, out, fio_env, c)
                    value = r["bw_bytes"] / 1e6 if unit == "MB/s" else r["iops"]
                    results.setdefault((label, server), []).append(value)
                    if server in pids and r["total_ios"]:   # the ramp's CPU time counts too: an upper bound
                        cpu.setdefault((label, server), []).append(
                            1e6 * (cpu_seconds(pids[server]) - before) / r["total_ios"])
                    print(f"round {rnd + 1} {label:21} {server:8} {value:10.0f} {unit}", flush=True)
        print()
        others = [s for s in ("nbdkit", "qemu-nbd", "baseline") if s in servers]
        pairs = [(a, b) for a in ours for b in others]
        print(f"{'job (xN: connections)':21} " + " ".join(f"{s:>9}" for s in servers)
              + "".join(f"  {a + '/' + b:>15}" for a, b in pairs))
        for label, _rw, _bs, _qd, unit, _c in runs:
            med = {s: statistics.median(results[(label, s)]) for s in servers if (label, s) in results}
            cells = " ".join(f"{med[s]:9.0f}" if s in med else f"{'-':>9}" for s in servers)
            ratios = "".join(f"  {med[a] / med[b]:15.2f}" for a, b in pairs)
            print(f"{label:21} {cells}{ratios}   ({unit}, median of {args.rounds})")
        measured = [s for s in servers if s in pids]
        print(f"\nserver CPU time per request, microseconds (user + system of the server process over the "
              f"run, ramp included, / requests; less noisy than the rates on a shared machine)")
        print(f"{'job (xN: connections)':21} " + " ".join(f"{s:>9}" for s in measured))
        for label, *_ in runs:
            print(f"{label:21} " + " ".join(f"{statistics.median(cpu[(label, s)]):9.1f}" if (label, s) in cpu
                                            else f"{'-':>9}" for s in measured))

if __name__ == "__main__":
    main()
