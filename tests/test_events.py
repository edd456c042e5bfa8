"""Events (DESIGN §4, §6): the event log of the Mapper, `userdm events [--follow] [NAME]`,
`userdm notify-failure`, and the event stream of the control socket (`Client.events`).

Records: create, suspend, resume, resize, rename, remove, failure (offsets and the path it
travelled), dead; a bounded ring of recent ones; every record delivered exactly once to a
subscriber; streams that end when either side goes away.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from userdm.block import HolderOps
from userdm.cli.main import Commands, build_parser
from userdm.control.client import Client
from userdm.control.server import ControlServer
from userdm.dm.events import EventLog
from userdm.errors import DMError

from conftest import USERDM, wait_until

MiB = 1 << 20


def kinds(records: list[dict], name: str | None = None) -> list[str]:
    return [r["event"] for r in records if name is None or r.get("name") == name]


# ---- the event log ---------------------------------------------------------------------------

def test_the_ring_keeps_the_last_records_and_a_subscriber_gets_each_once():
    log = EventLog(size=5)
    for i in range(8):
        log.emit({"event": "create", "name": f"d{i}"})
    assert [r["seq"] for r in log.recent()] == [4, 5, 6, 7, 8]
    assert [r["name"] for r in log.recent("d6")] == ["d6"]
    got: list[dict] = []
    backlog = log.subscribe(got.append)
    assert [r["seq"] for r in backlog] == [4, 5, 6, 7, 8]
    log.emit({"event": "remove", "name": "d7"})
    assert [r["seq"] for r in got] == [9]                  # not again what the backlog had
    log.unsubscribe(got.append)
    log.emit({"event": "remove", "name": "d6"})
    assert len(got) == 1

    def broken(record):
        raise RuntimeError("a listener's bug")
    log.subscribe(broken)
    assert log.emit({"event": "create", "name": "x"})["seq"] == 11   # the log carries on


def test_the_mapper_records_changes_failures_and_deaths(mapper, images):
    a, b = images(2, 4 * MiB)
    got: list[dict] = []
    mapper.subscribe(got.append)
    mapper.create("low", f"0 {4 * MiB // 512} linear {a} 0")
    mapper.create("v", f"0 {2 * MiB // 512} linear /dev/mapper/low 0")
    mapper.suspend("v", nolockfs=True)
    mapper.resume("v")
    mapper.load("v", f"0 {4 * MiB // 512} linear /dev/mapper/low 0")
    mapper.resume("v")
    mapper.rename("v", "w")
    h = mapper.open_device("w", write=False, holder="fs", holder_ops=HolderOps(notify_failure=lambda *a: None))
    mapper.notify_failure(a, 1 * MiB, 4096)
    mapper.device("low").mark_dead(False)
    h.close()
    mapper.remove("w")
    by = {r["event"]: r for r in got}
    assert [(r["name"], r["size"]) for r in got if r["event"] == "create"] == [("low", 4 * MiB), ("v", 2 * MiB)]
    # the second suspend is the one resume does before swapping in the loaded table
    assert [(r["noflush"], r["nolockfs"]) for r in got if r["event"] == "suspend"] == [(False, True), (True, True)]
    assert [(r["old_size"], r["size"]) for r in got if r["event"] == "resize"] == [(2 * MiB, 4 * MiB)]
    assert by["rename"]["old_name"] == "v"
    assert [(r["name"], r["offset"], r["length"], r["path"], r["handled"], r["flags"])
            for r in got if r["event"] == "failure"] == [
        ("low", 1 * MiB, 4096, [a, "low"], False, 0), ("w", 1 * MiB, 4096, [a, "low", "w"], True, 0)]
    assert [(r["name"], r["path"], r["surprise"]) for r in got if r["event"] == "dead"] == [
        ("low", ["low"], False), ("w", ["low", "w"], False)]
    assert got[-1]["event"] == "remove" and got[-1]["name"] == "w"
    assert [r["seq"] for r in got] == sorted(r["seq"] for r in got)
    assert all(isinstance(r["time"], float) for r in got)
    # NAME selects the device's own records, those of its former name, and those whose path crosses it
    for_v = mapper.recent_events("v")
    assert {r["event"] for r in for_v} >= {"create", "suspend", "resume", "resize", "rename"}
    assert {r["name"] for r in mapper.recent_events(a)} == {"low", "w"}
    assert json.loads(json.dumps(got)) == got                # JSON-ready


# ---- the command line -------------------------------------------------------------------------

def test_cli_notify_failure_and_events(daemon, images):
    (img,) = images(1, 8 * MiB)
    daemon.run("create", "st", "--table", f"0 {8 * MiB // 512} striped 1 16 {img} 0")
    daemon.run("create", "top", "--table", f"0 {4 * MiB // 512} linear /dev/mapper/st 2048")
    daemon.run("suspend", "top", "--nolockfs")
    daemon.run("resume", "top")
    res = daemon.run("notify-failure", img, "2M", "4K", check=False)
    # no holder registered notify_failure (no in-process holder in a daemon): EOPNOTSUPP
    assert res.returncode == 1
    assert res.stderr.startswith("notify-failure: EOPNOTSUPP: the failure at byte 2097152 length 4096")
    assert "reached" in res.stderr and "top" in res.stderr
    res = daemon.run("notify-failure", img, "1x", "4K", check=False)
    assert res.returncode == 1 and "EINVAL" in res.stderr and "'1x' is not a byte count" in res.stderr
    res = daemon.run("notify-failure", "nothing-like-this", "0", "512", check=False)
    assert res.returncode == 1 and "ENXIO" in res.stderr

    records = [json.loads(line) for line in daemon.run("events").stdout.splitlines()]
    failures = [(r["name"], r["offset"], r["length"], r["path"]) for r in records if r["event"] == "failure"]
    assert failures == [("st", 2 * MiB, 4096, [img, "st"]), ("top", 1 * MiB, 4096, [img, "st", "top"])]
    assert [(r["event"], r.get("nolockfs")) for r in records if r["name"] == "top"][:3] == [
        ("create", None), ("suspend", True), ("resume", None)]
    only_top = [json.loads(line) for line in daemon.run("events", "top").stdout.splitlines()]
    assert {r["name"] for r in only_top} == {"top"}
    assert len(only_top) == len([r for r in records if r["name"] == "top"])
    assert daemon.run("events", "a", "b", check=False).returncode == 1


def test_cli_notify_failure_prints_where_the_failure_went(mapper, images, capsys):
    """The verb's own output, run against an in-process Mapper that has a holder with ops."""
    (img,) = images(1, 4 * MiB)
    mapper.create("v", f"0 {2 * MiB // 512} linear {img} 2048")
    taken = []
    h = mapper.open_device("v", write=True, holder="fs",
                           holder_ops=HolderOps(notify_failure=lambda *args: taken.append(args)))
    opts = build_parser().parse_intermixed_args(["notify-failure", img, "1M", "1KiB"])
    Commands(mapper, opts, []).notify_failure()
    assert taken == [(0, 1024, 0)]
    assert capsys.readouterr().out.splitlines() == [
        f"{img}: bytes 1048576+1024 (path {img}): no holder ops",
        f"v: bytes 0+1024 (path {img} -> v): taken by its holder"]
    h.close()


def test_cli_events_follow(daemon, images):
    (img,) = images(1, 4 * MiB)
    daemon.run("create", "v", "--table", f"0 {4 * MiB // 512} linear {img} 0")
    daemon.run("create", "other", "--table", f"0 8 zero")
    follower = subprocess.Popen(USERDM + ["events", "--follow", "v"], env=daemon.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []

    def read() -> None:
        for line in follower.stdout:
            lines.append(json.loads(line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: kinds(lines) == ["create"])  # the recent record of v
        daemon.run("suspend", "v")
        daemon.run("resume", "v")
        daemon.run("remove", "other")
        daemon.run("load", "v", "--table", f"0 {2 * MiB // 512} linear {img} 0")
        daemon.run("resume", "v")
        daemon.run("notify-failure", "v", "4K", "512", check=False)
        daemon.run("remove", "v")
        assert wait_until(lambda: kinds(lines)[-1:] == ["remove"])
        # resuming a loaded table suspends first; a size change and a removal are table events too
        assert kinds(lines) == ["create", "suspend", "resume", "load", "suspend", "table_event", "resume",
                                "resize", "failure", "table_event", "remove"]
        assert all(r["name"] == "v" for r in lines)
        failure = lines[kinds(lines).index("failure")]
        assert (failure["offset"], failure["length"], failure["path"]) == (4096, 512, ["v"])
    finally:
        follower.terminate()
        follower.wait(20)
        reader.join(20)
    # the daemon lives on and still answers
    assert daemon.run("events").returncode == 0


# ---- the Python client ------------------------------------------------------------------------

def test_client_events_callback_and_iterator(daemon, images):
    a, b = images(2, 4 * MiB)
    got: list[dict] = []
    with daemon.connect() as client:
        stream = client.events(got.append, name="v")
        try:
            client.create("v", f"0 {4 * MiB // 512} linear {b} 0")
            client.create("unrelated", "0 8 zero")
            client.suspend("v")
            client.resume("v")
            e = None
            try:
                client.notify_failure(b, 0, 512)
            except DMError as exc:
                e = exc
            assert e is not None and e.errno == errno.EOPNOTSUPP
            os.unlink(b)                                  # the backing file goes: v dies
            assert wait_until(lambda: "dead" in kinds(got))
        finally:
            stream.close()
        assert kinds(got) == ["create", "suspend", "resume", "failure", "dead"]
        dead = got[-1]
        assert (dead["name"], dead["path"], dead["surprise"]) == ("v", [b, "v"], True)
        assert client.info("v")["dead"]
        # the iterator form, with the recent records first
        with client.events(name="v", recent=True) as stream:
            it = iter(stream)
            assert [next(it)["event"] for _ in range(5)] == kinds(got)
            client.remove("v")
            assert [next(it)["event"] for _ in range(2)] == ["table_event", "remove"]
        e2 = None
        try:
            client.events(name=7)
        except DMError as exc:
            e2 = exc
        assert e2 is not None and e2.errno == errno.EINVAL


def test_a_stream_unsubscribes_when_its_client_goes_and_ends_when_the_server_stops(mapper, tmp_path: Path):
    server = ControlServer(mapper, tmp_path / "control")
    server.start()
    try:
        client = Client(str(tmp_path / "control"))
        got: list[dict] = []
        stream = client.events(got.append)
        assert len(mapper._log._listeners) == 1
        mapper.create("x", "0 8 zero")
        assert wait_until(lambda: kinds(got) == ["create"])
        stream.close()
        assert wait_until(lambda: not mapper._log._listeners)
        iterated = client.events()
        ended = threading.Event()

        def drain() -> None:
            for _ in iterated:
                pass
            ended.set()
        threading.Thread(target=drain, daemon=True).start()
        assert wait_until(lambda: len(mapper._log._listeners) == 1)
    finally:
        server.stop()
    assert ended.wait(20), "a stream did not end when the server stopped"
    assert wait_until(lambda: not mapper._log._listeners)
    iterated.close()
    client.close()


def test_the_stream_command_refuses_bad_arguments(mapper, tmp_path: Path):
    import socket

    from userdm.control import protocol
    server = ControlServer(mapper, tmp_path / "control")
    server.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "control"))
        sock.sendall(protocol.encode({"cmd": "events", "args": {"name": ["not", "a", "name"]}}))
        decoder = protocol.Decoder()
        messages: list[dict] = []
        while not messages:
            data = sock.recv(4096)
            assert data
            messages += decoder.feed(data)
        with pytest.raises(DMError) as exc:
            protocol.result_of(messages[0])
        assert exc.value.errno == errno.EINVAL
        sock.close()
    finally:
        server.stop()
