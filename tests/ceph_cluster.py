"""A throwaway single-node Ceph cluster for the RBD tests: one monitor and one memstore OSD on
localhost, auth off, in a temp directory with its own fsid and port.

`Cluster(base).start()` makes the monitor and the OSD (`ceph-mon --mkfs`, `ceph osd new` with an
explicit uuid, `ceph-osd --mkfs`), runs both in the foreground as child processes, creates the
pool `rbd` and waits until a write to it succeeds. `stop()` ends both by PID (SIGTERM, then
SIGKILL) and removes the directory; it is safe to call twice and after a failed start. The
memstore keeps objects in the OSD's memory: killing the OSD (`kill_osd`) loses them, which is
what the failure tests want.

Run `python tests/ceph_cluster.py` to bring one up by hand (Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

POOL = "rbd"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One monitor (`a`) and one memstore OSD (`0`) under `base`."""

    def __init__(self, base: str | os.PathLike | None = None) -> None:
        self.owns_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="userdm-ceph-"))
        self.conf = self.base / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.port = free_port()
        self.mon_host = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.osd_uuid = str(uuid.uuid4())

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> "Cluster":
        try:
            self._write_conf()
            self._mon()
            self._osd()
            self.ceph("osd", "pool", "create", POOL, "8", "8")
            self.ceph("osd", "pool", "application", "enable", POOL, "rbd")
            self._wait_writable()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("osd", "mon"):
            self._end(name)
        shutil.rmtree(self.base, ignore_errors=True)

    def kill_osd(self) -> None:
        """SIGKILL the OSD (its memstore objects are lost with it)."""
        self._end("osd", signal.SIGKILL)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what clients need ------------------------------------------------------------

    def ref(self, image: str, snap: str | None = None, **options: str) -> str:
        """An `rbd:` reference to an image of the pool, with this cluster's conf."""
        spec = f"rbd:{POOL}/{image}" + (f"@{snap}" if snap else "")
        return spec + f":conf={self.conf}" + "".join(f":{k}={v}" for k, v in options.items())

    def ceph(self, *args: str, timeout: float = 30.0) -> str:
        return self._tool("ceph", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        return self._tool("rbd", "-p", POOL, *args, timeout=timeout)

    def _tool(self, tool: str, *args: str, timeout: float) -> str:
        res = subprocess.run([tool, "-c", str(self.conf), *args], capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    # ---- steps ----------------------------------------------------------------------

    def _write_conf(self) -> None:
        for sub in ("mon/ceph-a", "osd/ceph-0", "run", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        b = self.base
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon_host = v2:{self.mon_host}
public_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {b}/run
admin_socket = {b}/run/$name.asok
log_file = {b}/log/$name.log
pid_file = {b}/run/$name.pid
mon_data = {b}/mon/$cluster-$id
osd_data = {b}/osd/$cluster-$id
osd_objectstore = memstore
memstore_device_bytes = 2147483648
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
rados_mon_op_timeout = 10
rados_osd_op_timeout = 10
client_mount_timeout = 10
""")

    def _spawn(self, name: str, *argv: str) -> None:
        log = open(self.base / "log" / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def _run(self, *argv: str) -> None:
        res = subprocess.run([*argv, "-c", str(self.conf)], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")

    def _mon(self) -> None:
        monmap = self.base / "monmap"
        subprocess.run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                        f"[v2:{self.mon_host}]", str(monmap)], check=True, capture_output=True, timeout=30)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._spawn("mon", "ceph-mon", "-i", "a")

    def _osd(self) -> None:
        osd_id = self.ceph("osd", "new", self.osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph osd new gave OSD id {osd_id!r}, expected 0")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid)
        self._spawn("osd", "ceph-osd", "-i", "0", "--osd-uuid", self.osd_uuid)

    def _wait_writable(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            res = subprocess.run(["rados", "-c", str(self.conf), "-p", POOL, "put", "probe", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not become writable: {res.stderr.strip()}")
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    log = (self.base / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"ceph {name} exited ({proc.returncode}): {log}")
            time.sleep(0.2)

    def _end(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    with Cluster() as cluster:
        print(f"cluster up: conf {cluster.conf}; ref example {cluster.ref('IMAGE')}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
