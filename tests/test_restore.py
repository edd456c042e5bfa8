"""Restore keeps everything (issue 11): a saved table is never dropped by the daemon. A table
that cannot be built at start stays saved and visible with its reason, survives further
restarts, and `resume NAME` brings it back; a table over the daemon's own nbd.sock restores
(the NBD server listens before restore); a devices.json of earlier versions migrates into the
state store with every device, table and flag; a SIGKILL during concurrent creates leaves no
temporary file, no half device and no duplicate."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import Daemon, wait_until
from userdm.dm.mapper import Mapper
from userdm.errors import DMError
from userdm.nbd.client import RemoteDevice

MiB = 1 << 20
SECTORS = 4 * MiB // 512


def read_export(d: Daemon, name: str, offset: int, length: int) -> bytes:
    dev = RemoteDevice(f"nbd+unix:///{name}?socket={d.runtime / 'nbd.sock'}")
    try:
        with dev.open() as h:
            return h.read(offset, length)
    finally:
        dev.close_backing()


def test_a_missing_backing_file_keeps_its_table_until_resume_brings_it_back(tmp_path, images):
    (img,) = images(1, 4 * MiB)
    with open(img, "r+b") as f:
        f.write(b"still here")
    d = Daemon(tmp_path)
    d.start()
    try:
        d.run("create", "low", "--table", f"0 {SECTORS} linear {img} 0")
        d.run("create", "top", "--table", f"0 {SECTORS} linear /dev/mapper/low 0")
        d.run("create", "other", "--table", "0 8 zero")
        table_before = d.run("table", "low").stdout
        d.stop()
        away = img + ".away"
        os.rename(img, away)
        for _ in range(2):  # not dropped across another restart meanwhile
            d.start()
            with d.connect() as client:
                low, top = client.info("low"), client.info("top")
                assert not low["live"] and low["restore_error"].startswith("ENOENT: ") and img in low["restore_error"]
                assert not top["live"] and top["restore_error"].startswith("EINVAL: ")  # low has no size yet
                assert client.info("other")["live"] and client.info("other")["restore_error"] is None
            assert "Not restored:      ENOENT: " in d.run("info", "low").stdout
            assert d.run("table", "low").stdout == table_before  # the saved table, as saved
            res = d.run("resume", "low", check=False)
            assert res.returncode != 0 and "ENOENT" in res.stderr
            d.stop()
        os.rename(away, img)
        d.start()  # restored at start now that the file is back
        assert read_export(d, "top", 0, 10) == b"still here"
        d.stop()
        os.rename(img, away)
        d.start()
        os.rename(away, img)
        d.run("resume", "low")
        d.run("resume", "top")
        with d.connect() as client:
            assert all(client.info(n)["live"] and client.info(n)["restore_error"] is None for n in ("low", "top"))
        assert d.run("table", "low").stdout == table_before
        assert read_export(d, "top", 0, 10) == b"still here"
        d.stop()
        d.start()
        assert read_export(d, "top", 0, 10) == b"still here"
    finally:
        d.stop()


def test_a_table_over_the_daemons_own_nbd_socket_restores(tmp_path, images):
    (img,) = images(1, 4 * MiB)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"through my own export")
    d = Daemon(tmp_path)
    d.start()
    try:
        d.run("create", "base", "--table", f"0 {SECTORS} linear {img} 0")
        url = f"nbd+unix:///base?socket={d.runtime / 'nbd.sock'}"
        d.run("create", "looped", "--table", f"0 {SECTORS} linear {url} 0")
        d.stop()
        d.start()
        with d.connect() as client:
            info = client.info("looped")
            assert info["live"] and info["restore_error"] is None, info
            assert client.info("base")["open_count"] == 1  # the NBD connection of looped's table
        assert read_export(d, "looped", MiB, 21) == b"through my own export"
    finally:
        d.stop()


def legacy_state(img: str) -> dict:
    """A devices.json as the code before the state store wrote it (`Mapper._state`, version 1)."""
    def dev(name: str, minor: int, **kw) -> dict:
        entry = {"name": name, "uuid": "", "minor": minor, "shared": False, "autoclear": False,
                 "max_opens": None, "no_open": False, "interpose": False, "live": None, "inactive": None,
                 "suspended": False, "deferred_remove": False, "event_nr": 0}
        entry.update(kw)
        return entry
    return {"version": 1, "devices": [
        dev("top", 0, live={"text": f"0 {SECTORS} linear /dev/mapper/low 0", "read_only": False}, event_nr=3),
        dev("low", 4, uuid="U-LOW", live={"text": f"0 {SECTORS} linear {img} 0", "read_only": False},
            deferred_remove=True),
        dev("ro", 1, live={"text": "0 16 zero", "read_only": True}, max_opens=2, shared=True),
        dev("bare", 2, inactive={"text": "0 16 zero", "read_only": False}),
        dev("sus", 3, live={"text": "0 8 zero", "read_only": False},
            inactive={"text": "0 32 zero", "read_only": True}, suspended=True),
        dev("front", 5, live={"text": "0 16 linear [interpose]/dev/mapper/ro 0", "read_only": True},
            interpose=True),
        dev("empty", 6),
    ]}


def test_migration_from_devices_json_keeps_every_device_table_and_flag(tmp_path, images):
    (img,) = images(1, 4 * MiB)
    state = tmp_path / "state"
    state.mkdir()
    (state / "devices.json").write_text(json.dumps(legacy_state(img), indent=1))
    (state / "devices.json.tmp.4242").write_text("{half")  # what a SIGKILL left behind
    for round_ in range(2):  # the first start migrates, the second reads the store
        m = Mapper(state)
        try:
            infos = {i["name"]: i for i in m.list()}
            assert set(infos) == {"top", "low", "ro", "bare", "sus", "front", "empty"}
            assert {n: i["minor"] for n, i in infos.items()} == {
                "top": 0, "ro": 1, "bare": 2, "sus": 3, "low": 4, "front": 5, "empty": 6}
            assert all(i["restore_error"] is None for i in infos.values()), infos
            assert infos["low"]["uuid"] == "U-LOW" and infos["low"]["deferred_remove"]
            assert infos["low"]["open_count"] == 1  # by top: so the deferred removal waits
            assert infos["top"]["event_nr"] == 3 and infos["top"]["live"]
            assert m.table("top") == [[0, SECTORS, "linear", "253:4 0"]]
            assert infos["ro"]["readonly"] and infos["ro"]["shared"] and infos["ro"]["max_opens"] == 2
            assert infos["ro"]["interposed_by"] == ["front"] and infos["front"]["interposing"] == "ro"
            assert infos["bare"]["inactive"] and not infos["bare"]["live"]
            assert infos["sus"]["suspended"] and infos["sus"]["live"] and infos["sus"]["inactive"]
            assert infos["sus"]["inactive_readonly"] and m.table("sus", inactive=True) == [[0, 32, "zero", ""]]
            assert not infos["empty"]["live"] and not infos["empty"]["inactive"]
            assert sorted(os.listdir(state)) == ["state.db", "state.db-wal"]
        finally:
            m.close()
    m = Mapper(state)
    try:
        m.resume("sus")  # the migrated inactive table is the one that comes in
        assert m.info("sus")["size"] == 32 * 512 and m.info("sus")["readonly"]
        m.remove("top")  # low's last close: its deferred removal fires
        assert "low" not in m.export_names()
    finally:
        m.close()


@pytest.mark.slow
def test_sigkill_during_concurrent_creates_leaves_no_half_device_and_no_duplicate(tmp_path, images):
    img, = images(1, 4 * MiB)
    d = Daemon(tmp_path)
    d.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def client(t: int) -> None:
        try:
            with d.connect() as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    name = f"c{t}-{i}"
                    c.create(name, f"0 {SECTORS} linear {img} 0", uuid=f"U-{name}")
                    with lock:
                        acknowledged.append(name)
                        if len(acknowledged) >= 200:
                            enough.set()
        except (DMError, OSError, ConnectionError, EOFError):
            return  # the daemon died under us

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(240)
        d.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(60)
        files = sorted(os.listdir(d.state))
        assert not [f for f in files if "tmp" in f], files
        assert set(files) <= {"state.db", "state.db-wal"}, files
        d.start()
        with d.connect() as c:
            infos = c.list()
        names = [i["name"] for i in infos]
        assert len(names) == len(set(names))
        assert len({i["minor"] for i in infos}) == len(infos)
        assert len({i["uuid"] for i in infos}) == len(infos)
        assert set(acknowledged) <= set(names)  # every answered create is durable
        for info in infos:  # and every device there is whole
            assert info["live"] and info["size"] == 4 * MiB and info["restore_error"] is None, info
            assert info["uuid"] == f"U-{info['name']}"
    finally:
        stop.set()
        d.stop()


def test_a_table_loaded_over_an_unrestored_one_replaces_it(tmp_path, images):
    (img,) = images(1, 4 * MiB)
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("dev", f"0 {SECTORS} linear {img} 0")
    m.close()
    os.rename(img, img + ".away")
    m = Mapper(state)
    try:
        assert m.info("dev")["restore_error"].startswith("ENOENT")
        assert m.table("dev") == [[0, SECTORS, "linear", f"{img} 0"]]  # as saved
        m.load("dev", "0 8 zero")  # the user's choice: the new table replaces the saved one
        m.resume("dev")
        assert m.info("dev")["live"] and m.info("dev")["restore_error"] is None
    finally:
        m.close()
    m = Mapper(state)
    try:
        assert m.table("dev") == [[0, 8, "zero", ""]] and m.info("dev")["restore_error"] is None
    finally:
        m.close()


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")
def test_a_table_waiting_on_an_nbd_server_is_retried_until_it_is_up(tmp_path):
    sock = tmp_path / "nbdkit.sock"

    def nbdkit() -> subprocess.Popen:
        proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), "--exit-with-parent",
                                 "memory", "16M"], stderr=subprocess.DEVNULL)
        assert wait_until(sock.exists)
        return proc

    def stop(proc: subprocess.Popen) -> None:
        proc.terminate()
        proc.wait(30)
        sock.unlink(missing_ok=True)  # nbdkit leaves its socket behind

    server = nbdkit()
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("remote", f"0 {16 * MiB // 512} linear nbd+unix:///?socket={sock} 0")
    m.close()
    stop(server)
    m = Mapper(state)
    try:
        info = m.info("remote")
        assert not info["live"] and info["restore_error"].startswith("ENXIO") and str(sock) in info["restore_error"]
        server = nbdkit()
        assert wait_until(lambda: m.info("remote")["live"], timeout=120)  # retried with back-off
        assert m.info("remote")["restore_error"] is None and m.info("remote")["size"] == 16 * MiB
    finally:
        m.close()
        stop(server)


def test_a_keyed_live_table_and_a_loaded_table_both_survive_restarts(tmp_path, images):
    """A crypt live table comes back waiting for its key; the table loaded beside it stays
    saved: neither the resume that brings the key back nor a second restart loses either."""
    (img,) = images(1, 4 * MiB)
    key = os.urandom(32).hex()
    crypt = f"0 {SECTORS} crypt aes-xts-plain64 {key} 0 {img} 0"
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("dev", crypt)
    m.load("dev", f"0 {SECTORS} zero")
    m.close()
    for _ in range(2):
        m = Mapper(state)
        try:
            info = m.info("dev")
            assert info["restore_error"].startswith("ENOKEY") and not info["live"]
            with pytest.raises(DMError) as refused:  # no key yet: refused, and nothing changes
                m.resume("dev")
            assert refused.value.errno == errno.EAGAIN
            m.suspend("dev")
            m.message("dev", 0, f"key set {key}")
            m.resume("dev")
            assert m.table("dev")[0][2] == "crypt"
            assert m.table("dev", inactive=True) == [[0, SECTORS, "zero", ""]]
        finally:
            m.close()
