"""Ownership and lifetime (issue 5 §2, §3; seeds 001 and 002): race-free create-and-open with
autoclear, `open -- CMD`, `remove --deferred --no-open`, `--max-opens`, through the Python API,
the CLI, NBD and FUSE, and a stress test of all of them at once.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import USERDM, wait_until
from userdm import Mapper
from userdm.errors import DMError

SECTORS = 8192  # 4 MiB devices

#: a libnbd client on an inherited descriptor (Debian's binding needs /usr/bin/python3)
LIBNBD_ON_FD = textwrap.dedent("""
    import os, sys, nbd
    h = nbd.NBD()
    h.connect_socket(int(os.environ.get("USERDM_FD") or sys.argv[1]))
    size = h.get_size()
    h.pwrite(b"%s" * 4096, 0)
    assert h.pread(4096, 0) == b"%s" * 4096
    print(size)
""")


def need_libnbd() -> None:
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("needs python3-libnbd for /usr/bin/python3")


def table(path: str) -> str:
    return f"0 {SECTORS} linear {path} 0"


def removed(m, name: str) -> bool:
    return name not in {d["name"] for d in m.list()}


# ---- create-and-open with autoclear (seed 001) -------------------------------------------

def test_create_open_fd_autoclear_in_process(mapper, images):
    (img,) = images()
    info = mapper.create(None, table(img), open_fd=True, autoclear=True)
    assert info["name"] == "dm-0" and info["open_count"] == 1 and info["autoclear"]
    sock = socket.socket(fileno=info["fd"])
    assert sock.family == socket.AF_UNIX
    second = mapper.create(None, table(img), autoclear=True)  # a free name again
    assert second["name"] == "dm-1"
    sock.close()
    assert wait_until(lambda: removed(mapper, "dm-0"))
    assert not removed(mapper, "dm-1")  # never opened: autoclear waits for a last close


def test_autoclear_device_goes_at_its_first_last_close(mapper, images):
    (img,) = images()
    mapper.create("ac", table(img), autoclear=True)
    first = mapper.open_device("ac", write=True)
    second = mapper.open_device("ac", write=False)
    first.close()
    assert not removed(mapper, "ac")
    second.close()
    assert removed(mapper, "ac")
    with pytest.raises(DMError) as exc:
        mapper.open_device("ac", write=False)
    assert exc.value.errno == errno.ENXIO


def test_open_fd_needs_a_table_and_a_failed_create_leaves_nothing(mapper, images):
    (img,) = images()
    with pytest.raises(DMError) as exc:
        mapper.create("x", None, open_fd=True)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(DMError):
        mapper.create("x", f"0 {SECTORS * 100} linear {img} 0", open_fd=True, autoclear=True)
    assert mapper.list() == []


def test_fd_travels_to_another_process_and_the_device_lives_until_every_copy_closes(mapper, images):
    need_libnbd()
    (img,) = images()
    info = mapper.create("vm-disk", table(img), open_fd=True, autoclear=True)
    fd = info["fd"]
    out = subprocess.run(["/usr/bin/python3", "-c", LIBNBD_ON_FD % ("A", "A"), str(fd)],
                         pass_fds=[fd], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == SECTORS * 512
    # The child disconnected (NBD_CMD_DISC) and exited, but this process still holds a copy.
    assert not wait_until(lambda: removed(mapper, "vm-disk"), timeout=0.3)
    assert mapper.info("vm-disk")["open_count"] == 1
    os.close(fd)
    assert wait_until(lambda: removed(mapper, "vm-disk"))
    with open(img, "rb") as f:
        assert f.read(4096) == b"A" * 4096

    info = mapper.create("held", table(img), open_fd=True, autoclear=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[info["fd"]])
    try:
        os.close(info["fd"])  # the child's inherited copy keeps the open
        assert not wait_until(lambda: removed(mapper, "held"), timeout=0.3)
        assert mapper.info("held")["open_count"] == 1
        child.kill()
        child.wait()
        assert wait_until(lambda: removed(mapper, "held"), timeout=1.0)
    finally:
        child.kill()
        child.wait()


def test_qemu_io_uses_the_fd_and_its_exit_clears_the_device(mapper, images):
    if shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-io")
    (img,) = images()
    info = mapper.create(None, table(img), open_fd=True, autoclear=True)
    fd = info["fd"]
    try:
        out = subprocess.run(["qemu-io", "--image-opts", f"driver=nbd,server.type=fd,server.str={fd}",
                              "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"],
                             pass_fds=[fd], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "read 65536/65536" in out.stdout, out.stderr
    finally:
        os.close(fd)
    assert wait_until(lambda: removed(mapper, info["name"]))


def test_autoclear_devices_do_not_survive_a_restart(tmp_path, images):
    (img,) = images()
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("keep", table(img))
    m.create("ac", table(img), autoclear=True, max_opens=3)
    held = m.open_device("ac", write=False)
    m.close()
    held.close()
    m = Mapper(state)
    try:
        assert [d["name"] for d in m.list()] == ["keep"]
    finally:
        m.close()


# ---- no-open deferred remove and open limits (seed 002) -------------------------------------

def test_encrypted_swap_flow(mapper, images):
    """Create, open once, `remove --deferred --no-open`: every other open fails, and the
    device goes with the last close (the swap use case of seed 002)."""
    (img,) = images()
    mapper.create("swap", table(img))
    swap = mapper.open_device("swap", write=True)
    info = mapper.remove("swap", deferred=True, no_open=True)
    assert info["deferred_remove"] and info["no_open"]
    for attempt in (lambda: mapper.open_device("swap", write=False),
                    lambda: mapper.open_device("swap", write=True, holder="someone"),
                    lambda: mapper.create("over", "0 8 linear /dev/mapper/swap 0")):
        with pytest.raises(DMError) as exc:
            attempt()
        assert exc.value.errno == errno.ENXIO, exc.value
    assert "over" not in {d["name"] for d in mapper.list()}
    swap.write(0, b"s" * 512)  # the existing open carries on
    swap.close()
    assert removed(mapper, "swap")


def test_no_open_rules(mapper, images):
    (img,) = images()
    mapper.create("d", table(img))
    with pytest.raises(DMError) as exc:
        mapper.remove("d", no_open=True)
    assert exc.value.errno == errno.EINVAL and "--deferred" in str(exc.value)
    mapper.remove("d", deferred=True, no_open=True)  # not open: removed at once
    assert removed(mapper, "d")

    mapper.create("d", table(img))
    h = mapper.open_device("d", write=False)
    mapper.remove("d", deferred=True, no_open=True)
    mapper.message("d", 0, "@cancel_deferred_remove")
    info = mapper.info("d")
    assert not info["deferred_remove"] and not info["no_open"]
    mapper.open_device("d", write=False).close()
    h.close()
    assert not removed(mapper, "d")


def test_max_opens(mapper, images):
    (img,) = images()
    for bad in (0, -1):
        with pytest.raises(DMError) as exc:
            mapper.create("m", table(img), max_opens=bad)
        assert exc.value.errno == errno.EINVAL
    mapper.create("m", table(img), max_opens=2)
    a = mapper.open_device("m", write=True)
    b = mapper.open_device("m", write=False)
    with pytest.raises(DMError) as exc:
        mapper.open_device("m", write=False)
    assert exc.value.errno == errno.EBUSY and "max-opens 2" in str(exc.value)
    with pytest.raises(DMError) as exc:
        mapper.create("top", "0 8 linear /dev/mapper/m 0")
    assert exc.value.errno == errno.EBUSY
    b.close()
    mapper.create("top", "0 8 linear /dev/mapper/m 0")  # the table's open is the second
    assert mapper.info("m")["open_count"] == 2 and mapper.info("m")["max_opens"] == 2
    a.close()


def test_exclusive_open_holders(mapper, images):
    (img,) = images()
    mapper.create("e", table(img))
    one = mapper.open("e", exclusive=True)
    try:
        with pytest.raises(DMError) as exc:
            mapper.open("e", exclusive=True)  # every --exclusive open is a holder of its own
        assert exc.value.errno == errno.EBUSY
        assert mapper.info("e")["holder"].startswith("exclusive open #")
    finally:
        os.close(one["fd"])
    assert wait_until(lambda: mapper.info("e")["open_count"] == 0)
    a = mapper.open("e", holder="backup")
    b = mapper.open("e", holder="backup")  # one holder may nest
    try:
        with pytest.raises(DMError) as exc:
            mapper.open("e", holder="other")
        assert exc.value.errno == errno.EBUSY and "backup" in str(exc.value)
        ro = mapper.open("e", readonly=True)  # non-exclusive opens are never blocked
        os.close(ro["fd"])
    finally:
        os.close(a["fd"])
        os.close(b["fd"])


# ---- through the daemon: CLI, NBD --------------------------------------------------------------

def test_cli_create_autoclear_exec(daemon, images):
    need_libnbd()
    (img,) = images()
    script = LIBNBD_ON_FD % ("Z", "Z") + "import os; print(os.environ['USERDM_DEVICE'])\n"
    res = daemon.run("create", "job", "--table", table(img), "--autoclear", "--exec", "--",
                     "/usr/bin/python3", "-c", script)
    assert res.stdout.split() == [str(SECTORS * 512), "job"]
    assert wait_until(lambda: "job" not in daemon.run("ls").stdout)
    with open(img, "rb") as f:
        assert f.read(4096) == b"Z" * 4096
    bad = daemon.run("create", "job", "--table", table(img), "--exec", check=False)
    assert bad.returncode == 1 and "needs a command" in bad.stderr


def test_cli_sigkill_of_the_only_holder_removes_within_a_second(daemon, images):
    (img,) = images()
    proc = subprocess.Popen(USERDM + ["create", "vm", "--table", table(img), "--autoclear", "--exec",
                                      "--", "sleep", "60"], env=daemon.env)
    try:
        client = daemon.connect()
        assert wait_until(lambda: "vm" in {d["name"] for d in client.list()}
                          and client.info("vm")["open_count"] == 1)
        info = daemon.run("info", "vm").stdout
        assert "autoclear" in info
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: removed(client, "vm"), timeout=1.0)
        client.close()
    finally:
        proc.kill()
        proc.wait()


def test_cli_open_exclusive_holder(daemon, images):
    (img,) = images()
    daemon.run("create", "shared-disk", "--table", table(img))
    proc = subprocess.Popen(USERDM + ["open", "shared-disk", "--exclusive", "--holder", "vm1", "--",
                                      "sleep", "60"], env=daemon.env)
    try:
        client = daemon.connect()
        assert wait_until(lambda: client.info("shared-disk")["holder"] == "vm1")
        res = daemon.run("open", "shared-disk", "--exclusive", "--", "true", check=False)
        assert res.returncode == 1 and "EBUSY" in res.stderr and "vm1" in res.stderr
        res = daemon.run("open", "shared-disk", "--readonly", "--", "true")
        assert res.returncode == 0
        proc.kill()
        proc.wait()
        assert wait_until(lambda: client.info("shared-disk")["open_count"] == 0)
        assert client.info("shared-disk")["holder"] == "-"
        client.close()
    finally:
        proc.kill()
        proc.wait()
    res = daemon.run("open", "nothing", "--", "true", check=False)
    assert res.returncode == 1 and "ENXIO" in res.stderr


def test_python_client_create_open_fd(daemon, images):
    need_libnbd()
    (img,) = images()
    with daemon.connect() as client:
        info = client.create(None, table(img), open_fd=True, autoclear=True)
        fd = info["fd"]
        assert isinstance(fd, int) and info["open_count"] == 1
        out = subprocess.run(["/usr/bin/python3", "-c", LIBNBD_ON_FD % ("Q", "Q"), str(fd)],
                             pass_fds=[fd], capture_output=True, text=True, timeout=60)
        os.close(fd)
        assert out.returncode == 0, out.stderr
        assert wait_until(lambda: removed(client, info["name"]))


def test_cli_no_open_and_max_opens_over_nbd(daemon, images):
    if shutil.which("nbdinfo") is None:
        pytest.skip("needs nbdinfo")
    (img,) = images()
    sock = daemon.runtime / "nbd.sock"
    uri = f"nbd+unix:///lim?socket={sock}"
    daemon.run("create", "lim", "--table", table(img), "--max-opens", "1")
    assert "max-opens 1" in daemon.run("info", "lim").stdout
    holder = subprocess.Popen(USERDM + ["open", "lim", "--", "sleep", "60"], env=daemon.env)
    try:
        client = daemon.connect()
        assert wait_until(lambda: client.info("lim")["open_count"] == 1)
        res = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0  # the second open is refused
        assert daemon.run("remove", "lim", "--no-open", check=False).returncode == 1
        daemon.run("remove", "lim", "--deferred", "--no-open")
        assert "no-open" in daemon.run("info", "lim").stdout
        res = daemon.run("open", "lim", "--", "true", check=False)
        assert res.returncode == 1 and "ENXIO" in res.stderr
        holder.kill()
        holder.wait()
        assert wait_until(lambda: removed(client, "lim"))
        client.close()
    finally:
        holder.kill()
        holder.wait()


# ---- FUSE --------------------------------------------------------------------------------------

def test_fuse_opens_obey_no_open_and_max_opens(tmp_path, images):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    from userdm.export.fuse import FuseExport
    (img,) = images()
    mnt = tmp_path / "mapper"
    mnt.mkdir()
    m = Mapper(fuse_dir=mnt)
    export = FuseExport(m, str(mnt))
    export.start()
    try:
        m.create("f", table(img), max_opens=1)
        path = mnt / "f"
        first = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as exc:
                os.open(path, os.O_RDONLY)
            assert exc.value.errno == errno.EBUSY
            m.remove("f", deferred=True, no_open=True)
            with pytest.raises(OSError) as exc:
                os.open(path, os.O_RDONLY)
            assert exc.value.errno in (errno.ENXIO, errno.ENOENT)
            os.pwrite(first, b"f" * 4096, 0)
        finally:
            os.close(first)
        assert wait_until(lambda: removed(m, "f"))
    finally:
        export.stop()
        m.close()


# ---- stress --------------------------------------------------------------------------------------

def test_stress_opens_removes_cancels_and_autoclear(mapper, images):
    """Threads open, close, remove (deferred, no-open), cancel and create autoclear devices at
    once, for a bounded number of rounds. Afterwards: nothing leaked, no open succeeded after
    --no-open took effect, every device was removed exactly once, the mapper still answers."""
    (img,) = images()
    removals: dict[str, int] = {}
    lock = threading.Lock()

    def count(record):
        if record["event"] == "remove":
            with lock:
                removals[record["name"]] = removals.get(record["name"], 0) + 1
    mapper.subscribe(count)
    violations: list[str] = []
    errors: list[BaseException] = []
    created: set[str] = set()
    ROUNDS = 60

    def worker(wid: int) -> None:
        try:
            for i in range(ROUNDS):
                name = f"w{wid}-{i}"
                if i % 3 == 0:
                    info = mapper.create(f"a{name}", table(img), open_fd=True, autoclear=True)
                    with lock:
                        created.add(info["name"])
                    extra = []
                    for _ in range(3):
                        try:
                            extra.append(mapper.open_device(info["name"], write=False))
                        except DMError as exc:
                            assert exc.errno == errno.ENXIO
                    os.close(info["fd"])
                    for h in extra:
                        h.close()
                    continue
                mapper.create(name, table(img), max_opens=4)
                with lock:
                    created.add(name)
                opens = [mapper.open_device(name, write=True)]
                mapper.remove(name, deferred=True, no_open=(i % 2 == 0))
                if i % 5 == 0:
                    try:
                        mapper.message(name, 0, "@cancel_deferred_remove")
                    except DMError as exc:
                        assert exc.errno in (errno.ENXIO, errno.EBUSY)
                try:
                    no_open_now = mapper.info(name)["no_open"]
                    h = mapper.open_device(name, write=False)
                    if no_open_now:
                        violations.append(f"{name}: opened after --no-open took effect")
                    opens.append(h)
                except DMError as exc:
                    assert exc.errno in (errno.ENXIO, errno.EBUSY), exc
                for h in opens:
                    h.close()
                if name in {d["name"] for d in mapper.list()}:
                    mapper.remove(name, retry=False)
        except BaseException as exc:  # report from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert not violations, violations[:3]
    assert wait_until(lambda: mapper.list() == []), mapper.list()
    mapper.unsubscribe(count)
    assert set(removals) == created and set(removals.values()) == {1}
    mapper.create("after", table(img))
    assert mapper.info("after")["open_count"] == 0


def _process_worker(runtime: str, img: str, wid: int, rounds: int, queue) -> None:
    """One process of the daemon stress test: its own control connection, its own devices."""
    from userdm.control.client import connect
    report = {"created": [], "violations": [], "error": None}
    try:
        with connect(runtime) as c:
            for i in range(rounds):
                name = f"p{wid}-{i}"
                if i % 2:
                    info = c.create(name, table(img), open_fd=True, autoclear=True)
                    report["created"].append(name)
                    try:
                        extra = c.open(name, readonly=True)
                        os.close(extra["fd"])
                    except DMError as exc:
                        assert exc.errno == errno.ENXIO
                    os.close(info["fd"])
                    continue
                c.create(name, table(img), max_opens=2)
                report["created"].append(name)
                held = c.open(name)
                c.remove(name, deferred=True, no_open=True)
                try:
                    late = c.open(name, readonly=True)
                    os.close(late["fd"])
                    report["violations"].append(f"{name}: opened after --no-open")
                except DMError as exc:
                    assert exc.errno == errno.ENXIO, exc
                if i % 4 == 0:
                    c.message(name, 0, "@cancel_deferred_remove")
                    os.close(held["fd"])
                    assert wait_until(lambda: c.info(name)["open_count"] == 0)
                    c.remove(name)
                else:
                    os.close(held["fd"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        report["error"] = repr(exc)
    queue.put(report)


def test_stress_processes_through_the_daemon(daemon, images):
    """Four processes create, open, remove with --no-open, cancel and autoclear at once through
    the daemon; afterwards every device is gone exactly once and the daemon still answers."""
    import multiprocessing
    (img,) = images()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(str(daemon.runtime), img, w, 24, queue))
             for w in range(4)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(r["error"] is None for r in reports), [r["error"] for r in reports]
    assert not [v for r in reports for v in r["violations"]]
    with daemon.connect() as c:
        assert wait_until(lambda: c.list() == []), c.list()
        removes = [e for e in c.recent_events() if e["event"] == "remove"]
        created = sorted(n for r in reports for n in r["created"])
        assert sorted(e["name"] for e in removes if e["name"] in set(created)) == created
        assert c.version()["driver"]
