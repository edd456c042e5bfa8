"""Disk sequence numbers (issue 16 §4, seed 001): every device gets one at create, never
reused, across daemon restarts too; `open --diskseq N` opens only that device. Qubes' race:
a creator is SIGKILLed, its autoclear device goes, another process creates the same name, and
an open by the first diskseq must not reach the new device.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import USERDM, wait_until
from userdm import Mapper
from userdm.errors import DMError

SECTORS = 8192


def table(img: str) -> str:
    return f"0 {SECTORS} linear {img} 0"


def test_each_create_gets_a_new_diskseq_and_open_checks_it(images):
    (img,) = images()
    m = Mapper()
    try:
        a = m.create("a", table(img), shared=True)["diskseq"]
        b = m.create("b", table(img), shared=True)["diskseq"]
        assert 0 < a < b
        m.remove("a")
        again = m.create("a", table(img), shared=True)
        assert again["diskseq"] > b and m.info("a")["diskseq"] == again["diskseq"]
        with pytest.raises(DMError) as exc:
            m.open("a", diskseq=a)
        assert exc.value.errno == errno.ENXIO and f"not {a}" in exc.value.message
        opened = m.open("a", diskseq=again["diskseq"])
        assert opened["diskseq"] == again["diskseq"]
        os.close(opened["fd"])
        created = [r for r in m.recent_events() if r["event"] == "create"]
        assert [r["diskseq"] for r in created] == [a, b, again["diskseq"]]
    finally:
        m.close()


def test_qubes_race_sigkilled_creator_and_a_new_device_of_the_same_name(daemon, images, tmp_path):
    (img,) = images()
    told = tmp_path / "diskseq"
    first = subprocess.Popen(USERDM + ["create", "vm1", "--table", table(img), "--autoclear", "--exec", "--",
                                       "sh", "-c", f'echo "$USERDM_DISKSEQ" > {told}; exec sleep 600'],
                             env=daemon.env)
    try:
        assert wait_until(lambda: told.exists() and told.read_text().strip() != "")
        old = int(told.read_text())
        client = daemon.connect()
        assert client.info("vm1")["diskseq"] == old
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert wait_until(lambda: "vm1" not in {d["name"] for d in client.list()})
    finally:
        first.kill()
        first.wait()
    daemon.run("create", "vm1", "--table", table(img))
    new = client.info("vm1")["diskseq"]
    assert new > old
    res = daemon.run("open", "vm1", "--diskseq", str(old), "--", "true", check=False)
    assert res.returncode != 0 and "ENXIO" in res.stderr and str(old) in res.stderr, res.stderr
    assert daemon.run("open", "vm1", "--diskseq", str(new), "--", "sh", "-c",
                      'test "$USERDM_DISKSEQ" = ' + str(new)).returncode == 0
    with pytest.raises(DMError) as exc:
        client.open("vm1", diskseq=old)
    assert exc.value.errno == errno.ENXIO
    opened = client.open("vm1", diskseq=new)
    assert opened["diskseq"] == new
    os.close(opened["fd"])
    columns = daemon.run("info", "-c", "--noheadings", "-o", "name,diskseq", "vm1").stdout.split()
    assert columns == ["vm1", str(new)]
    # across a restart: devices keep theirs, and new ones continue above every number handed out
    daemon.run("create", "gone", "--table", table(img))
    gone = client.info("gone")["diskseq"]
    daemon.run("remove", "gone")
    client.close()
    daemon.stop()
    daemon.start()
    client = daemon.connect()
    assert client.info("vm1")["diskseq"] == new
    daemon.run("create", "vm2", "--table", table(img))
    assert client.info("vm2")["diskseq"] > gone > new
    client.close()


def test_a_store_of_an_earlier_version_gets_the_new_columns(images, tmp_path):
    """The state store of a daemon before issue 16 has no blockdev and diskseq columns: they
    are added, and its devices get disk sequence numbers that are kept."""
    (img,) = images()
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "state.db")
    db.executescript(f"""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE devices (minor INTEGER PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL UNIQUE,
          uuid TEXT NOT NULL, shared INTEGER NOT NULL, autoclear INTEGER NOT NULL, max_opens INTEGER,
          no_open INTEGER NOT NULL, interpose INTEGER NOT NULL, suspended INTEGER NOT NULL,
          deferred_remove INTEGER NOT NULL, event_nr INTEGER NOT NULL);
        CREATE TABLE tables (minor INTEGER NOT NULL, slot TEXT NOT NULL, text TEXT NOT NULL,
          read_only INTEGER NOT NULL, PRIMARY KEY (minor, slot));
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO devices VALUES (0, 1, 'old', '', 1, 0, NULL, 0, 0, 0, 0, 0);
        INSERT INTO tables VALUES (0, 'live', '{table(img)}', 0);
    """)
    db.close()
    m = Mapper(state)
    try:
        info = m.info("old")
        assert info["live"] and not info["blockdev"] and info["diskseq"] > 0
        seq = info["diskseq"]
        fresh = m.create("fresh", table(img), shared=True, blockdev=True)
        assert fresh["diskseq"] > seq and fresh["blockdev"]
    finally:
        m.close()
    m = Mapper(state)
    try:
        assert m.info("old")["diskseq"] == seq
        assert m.info("fresh")["blockdev"] and m.info("fresh")["diskseq"] == fresh["diskseq"]
    finally:
        m.close()


def test_events_carry_the_diskseq(daemon, images):
    (img,) = images()
    daemon.run("create", "ev", "--table", table(img))
    seq = daemon.connect().info("ev")["diskseq"]
    daemon.run("remove", "ev")
    records = [json.loads(line) for line in daemon.run("events").stdout.splitlines()]
    assert {(r["event"], r.get("diskseq")) for r in records if r.get("name") == "ev"} >= {("create", seq),
                                                                                       ("remove", seq)}
