"""Hostile clients of the control socket (issue 11, classes 4, 5 and 7).

Each test gives the daemon something bad (type-confused fields, garbage, huge inputs, too many
connections, a message that never completes, exhausted file descriptors, untrusted runtime
directories) and proves two things: the bad input gets its errno and a sentence naming it, and
the daemon, its other devices and its other connections carry on (`carries_on`: a second
client's `info` of a healthy device, and an NBD read of that device's data).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import resource
import select
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userdm.control import protocol, schema
from userdm.dm.mapper import Mapper
from userdm.errors import DMError

pytestmark = pytest.mark.hostile

DATA = b"healthy!" * 512  # 4 KiB at offset 0 of the healthy device
SAFETY = 30  # seconds a socket may block before the test fails instead of hanging


# ---- helpers -------------------------------------------------------------------------------------

def raw(daemon: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(SAFETY)
    s.connect(str(daemon.runtime / "control"))
    return s


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def send(s: socket.socket, message: Any) -> None:
    s.sendall(frame(message if isinstance(message, bytes) else json.dumps(message).encode()))


def receive(s: socket.socket) -> dict[str, Any]:
    """One response; fails (never hangs) if the daemon does not answer."""
    decoder = protocol.Decoder()
    while True:
        data = s.recv(1 << 16)
        assert data, "the daemon closed the connection instead of answering"
        got = decoder.feed(data)
        if got:
            assert len(got) == 1
            return got[0]


def ask(s: socket.socket, message: Any) -> dict[str, Any]:
    send(s, message)
    return receive(s)


def hold(daemon: Daemon) -> socket.socket:
    """A connection the daemon serves; retried while a client that just closed still holds its
    slot (the daemon frees it when it sees the close, a moment later)."""
    got = []

    def attempt() -> bool:
        s = raw(daemon)
        try:
            response = ask(s, {"cmd": "version", "args": {}})
        except OSError:  # refused and closed before the request went out
            s.close()
            return False
        if not response["ok"]:
            assert response["errno"] == "EAGAIN", response
            s.close()
            return False
        got.append(s)
        return True
    assert wait_until(attempt)
    return got[0]


def refused(response: dict[str, Any], err: str, *words: str) -> str:
    assert response.get("ok") is False, response
    assert response["errno"] == err, response
    for word in words:
        assert word in response["message"], (word, response)
    return response["message"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.fixture
def healthy(daemon: Daemon, images):
    """The default daemon with a healthy device `good` holding DATA."""
    (img,) = images(1, 8 << 20)
    with open(img, "r+b") as f:
        f.write(DATA)
    with daemon.connect() as client:
        client.create("good", f"0 {(8 << 20) // 512} linear {img} 0")
    return daemon


def carries_on(daemon: Daemon) -> None:
    """A second client's `info` of the healthy device and an NBD read of it still work, and
    the daemon logged no traceback."""
    with daemon.connect() as client:
        info = client.info("good")
        assert info["live"] and info["size"] == 8 << 20
    from userdm.nbd.client import RemoteDevice
    dev = RemoteDevice(f"nbd+unix:///good?socket={daemon.runtime / 'nbd.sock'}")
    try:
        buf = bytearray(len(DATA))
        dev.readinto(0, memoryview(buf))
        assert bytes(buf) == DATA
    finally:
        dev.close_backing()
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log.read_text()


# ---- type-confused requests ------------------------------------------------------------------

#: values of the wrong type for a parameter annotated as the key (the Mapper's own annotations)
WRONG = {
    "bool": ["no", 0, 1, None, 1.0, [], {}],
    "int": [1.5, True, "1", None, [], {}],
    "int | None": [1.5, True, "1", [], {}],
    "str": [5, True, None, 1.5, [], {}],
    "str | None": [5, True, 1.5, [], {"a": 1}],
    "float | None": ["1", True, [], {}, float("nan"), float("inf")],
    "object | None": [5, True, [], {}],  # a holder id: over the socket, a string
}

#: a type-correct value of each required parameter, naming nothing that exists
BASE = {"name": "nosuch", "table": "0 8 zero", "sector": 0, "message": "m", "since": 0,
        "dev": "nosuch", "offset": 0, "length": 0}


def mapper_params(cmd: str) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(getattr(Mapper, cmd)).parameters)
    params.pop("self")
    return params


def type_confused_requests():
    """(cmd, field, request) for every field of every command with every wrong value."""
    for cmd in sorted(protocol.COMMANDS):
        params = mapper_params(cmd)
        required = {k: BASE[k] for k, p in params.items() if p.default is inspect.Parameter.empty}
        for field, param in params.items():
            for value in WRONG[str(param.annotation)]:
                if value is None and param.default is None:
                    continue
                yield cmd, field, {"cmd": cmd, "args": {**required, field: value}}
    for cmd, fields in (("events", {"name": WRONG["str | None"], "recent": WRONG["bool"]}),):
        for field, values in fields.items():
            for value in values:
                yield cmd, field, {"cmd": cmd, "args": {field: value}}


def test_schema_covers_every_command_and_parameter():
    """The schema names exactly the Mapper's parameters, required exactly when they have no
    default: a parameter added to the Mapper without a schema entry fails here."""
    assert set(schema.SCHEMA) == protocol.COMMANDS | protocol.FD_COMMANDS | protocol.STREAM_COMMANDS
    for cmd in protocol.COMMANDS:
        params = mapper_params(cmd)
        assert set(schema.SCHEMA[cmd]) == set(params), cmd
        for field, param in params.items():
            assert schema.SCHEMA[cmd][field].required == (param.default is inspect.Parameter.empty), (cmd, field)


def test_type_confused_fields_of_every_command_get_einval_naming_the_field(healthy):
    s = raw(healthy)
    count = 0
    for cmd, field, request in type_confused_requests():
        response = ask(s, request)  # one connection for all: it is never dropped
        refused(response, "EINVAL", cmd, repr(field))
        count += 1
    for cmd in sorted(schema.SCHEMA):
        refused(ask(s, {"cmd": cmd, "args": {"bogus": 1}}), "EINVAL", cmd, "'bogus'")
        for field, spec in schema.SCHEMA[cmd].items():
            if spec.required:
                args = {k: BASE[k] for k, f in schema.SCHEMA[cmd].items() if f.required and k != field}
                refused(ask(s, {"cmd": cmd, "args": args}), "EINVAL", cmd, repr(field), "missing")
    refused(ask(s, {"cmd": "connect_nbd", "args": {"name": "good"}}), "EINVAL", "connect_nbd", "'name'")
    assert count > 200
    assert ask(s, {"cmd": "info", "args": {"name": "good"}})["ok"]
    s.close()
    carries_on(healthy)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=20) | st.sampled_from(
        ["", "good", "nosuch", "0 8 zero", "-", "\udcff", "@cancel_deferred_remove", "x" * 300]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


#: plausible values of each field, so that one wrong field among right ones reaches deep
VALID = {"name": st.sampled_from(["good", "fresh"]), "new_name": st.just("renamed"),
         "table": st.sampled_from(["0 8 zero", "0 8 error"]), "uuid": st.sampled_from([None, "U-1"]),
         "minor": st.integers(0, 3), "max_opens": st.integers(1, 3), "holder": st.just("h"),
         "sector": st.just(0), "message": st.sampled_from(["@cancel_deferred_remove", "x"]),
         "event_nr": st.just(0), "since": st.just(0), "dev": st.just("good"), "offset": st.just(0),
         "length": st.just(512), "flags": st.just(0), "major": st.just(253), "timeout": st.just(0)}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(protocol.COMMANDS)), st.data())
def test_fuzzed_requests_never_reach_an_internal_error(cmd, data):
    """Random JSON (right and wrong types, surrogates, huge and negative numbers) in every field
    of every command, against a real in-process Mapper: always an answer, never an internal
    error, never a long sentence."""
    spec = schema.SCHEMA[cmd]
    value = {f: st.one_of(VALID.get(f, st.booleans()), JSON) for f in spec}  # mostly one wrong field
    args = data.draw(st.fixed_dictionaries({f: value[f] for f in spec if spec[f].required},
                                           optional={**{f: value[f] for f in spec if not spec[f].required},
                                                     "bogus": JSON}))
    if cmd == "wait":
        args["timeout"] = 0  # a well-typed wait on a device that exists would wait for an event
    message = data.draw(st.sampled_from([{"cmd": cmd, "args": args}, {"cmd": cmd, "args": args, "x": 1},
                                         {"cmd": cmd, "args": list(args)}]))
    mapper = Mapper()
    try:
        mapper.create("good", "0 8 zero")
        response = protocol.dispatch(mapper, message)
    finally:
        mapper.close()
    assert set(response) >= {"ok"}
    if not response["ok"]:
        assert "internal error" not in response["message"], response
        assert len(response["message"]) <= 1000, response
        json.dumps(response)  # it can be sent


def test_readonly_no_and_float_minor_are_refused_not_misread(healthy):
    with healthy.connect() as client:
        for args, field in (({"readonly": "no"}, "readonly"), ({"minor": 3.0}, "minor"),
                            ({"minor": True}, "minor"), ({"max_opens": "2"}, "max_opens"),
                            ({"uuid": 7}, "uuid"), ({"shared": None}, "shared")):
            with pytest.raises(DMError) as exc:
                client.create("confused", "0 8 zero", **args)
            assert exc.value.errno == errno.EINVAL and repr(field) in exc.value.message, exc.value
            assert "confused" not in {d["name"] for d in client.list()}
        with pytest.raises(DMError) as exc:
            client.message("good", "0", "@cancel_deferred_remove")
        assert exc.value.errno == errno.EINVAL and "'sector'" in exc.value.message
        with pytest.raises(DMError) as exc:
            client.load("good", ["0 8 zero"])
        assert exc.value.errno == errno.EINVAL and "'table'" in exc.value.message
        assert client.info("good")["readonly"] is False
    carries_on(healthy)


def test_malformed_envelopes_get_einval_and_the_connection_carries_on(healthy):
    s = raw(healthy)
    cases = [
        ({"cmd": "info", "args": [1]}, "EINVAL", "'args'"),
        ({"cmd": "info", "args": "name=good"}, "EINVAL", "'args'"),
        ({"cmd": "info", "args": None}, "EINVAL", "'args'"),
        ({"cmd": 5, "args": {}}, "EINVAL", "'cmd'"),
        ({"cmd": ["info"], "args": {}}, "EINVAL", "'cmd'"),
        ({"cmd": {"x": 1}}, "EINVAL", "'cmd'"),
        ({"cmd": None}, "EINVAL", "'cmd'"),
        ({"args": {"name": "good"}}, "EINVAL", "'cmd'"),
        ({"cmd": "info", "args": {"name": "good"}, "id": 1}, "EINVAL", "'id'"),
        ({"cmd": "__class__"}, "ENOTTY", "__class__"),
        (b'{"cmd":"info","args":{"name":"\xff\xfe"}}', "EINVAL", "UTF-8"),
        (b"\xff\xfe\xfd", "EINVAL", "JSON"),
        (b'{"cmd": "info"', "EINVAL", "JSON"),
        (b"[1, 2]", "EINVAL", "object"),
        (b"[" * 200000 + b"]" * 200000, "EINVAL", "JSON"),
        (b'{"cmd":"wait","args":{"name":"good","timeout":NaN}}', "EINVAL", "'timeout'"),
        (b'{"cmd":"info","args":{"name":"good"}}\x00', "EINVAL", "JSON"),
        (b"", "EINVAL", "JSON"),
    ]
    for request, err, word in cases:
        refused(ask(s, request), err, word)
    assert ask(s, {"cmd": "info", "args": {"name": "good"}})["result"]["name"] == "good"
    s.close()
    carries_on(healthy)


def test_a_name_that_is_not_utf8_is_refused_and_listing_exports_still_works(healthy):
    s = raw(healthy)
    body = b'{"cmd":"create","args":{"name":"bad\\udcff","table":"0 8 zero"}}'  # a lone surrogate
    refused(ask(s, body), "EINVAL", "not valid UTF-8")
    refused(ask(s, b'{"cmd":"rename","args":{"name":"good","new_name":"\\ud800x"}}'), "EINVAL", "UTF-8")
    refused(ask(s, b'{"cmd":"create","args":{"name":"u","uuid":"\\udcff"}}'), "EINVAL", "uuid", "UTF-8")
    with healthy.connect() as client:
        with pytest.raises(DMError) as exc:
            client.create("bad\udcff", "0 8 zero")
        assert exc.value.errno == errno.EINVAL
        assert [d["name"] for d in client.list()] == ["good"]
    if shutil.which("nbdinfo"):
        res = subprocess.run(["nbdinfo", "--list", f"nbd+unix://?socket={healthy.runtime / 'nbd.sock'}"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "good" in res.stdout, res
    carries_on(healthy)


def test_huge_inputs_get_a_short_reply(tmp_path, images):
    """A 100 MB name, and a 10 MB command name, uuid, table, reference or message reach the
    schema, the table parser and the targets (the message limit is raised for it) and are
    answered in a few hundred bytes."""
    d = Daemon(tmp_path)
    d.start("--max-message-size", "256M")
    try:
        (img,) = images(1, 8 << 20)
        with open(img, "r+b") as f:
            f.write(DATA)
        with d.connect() as client:
            client.create("good", f"0 {(8 << 20) // 512} linear {img} 0")
        huge = "x" * (100 << 20)  # a 100 MB name
        big = "x" * (10 << 20)  # the other inputs: as long as any error sentence could echo
        s = raw(d)
        for request, err, word in (
                ({"cmd": "create", "args": {"name": huge, "table": "0 8 zero"}}, "EINVAL", "device name"),
                ({"cmd": "info", "args": {"name": huge}}, "EINVAL", "'name'"),
                ({"cmd": big}, "ENOTTY", "unknown command"),
                ({"cmd": "create", "args": {"name": "h", "uuid": big}}, "EINVAL", "uuid"),
                ({"cmd": "create", "args": {"name": "h", "table": big}}, "EINVAL", "table line 1"),
                ({"cmd": "create", "args": {"name": "h", "table": "0 8 " + big}}, "EINVAL", "unknown target type"),
                ({"cmd": "create", "args": {"name": "h", "table": f"0 8 linear /{big} 0"}}, "", "table line 1"),
                ({"cmd": "create", "args": {"name": "h", "table": f"0 8 linear nbd://{big} 0"}}, "", "table line 1"),
                ({"cmd": "create", "args": {"name": "h", "table": f"0 8 linear /dev/mapper/{big} 0"}}, "ENXIO",
                 "table line 1"),
                ({"cmd": "notify_failure", "args": {"dev": big, "offset": 0, "length": 1}}, "EINVAL", "'dev'"),
                ({"cmd": "message", "args": {"name": "good", "sector": 0, "message": "@" + big}}, "EINVAL",
                 "unknown core message")):
            send(s, request)
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                chunk = s.recv(1 << 16)
                assert chunk
                data += chunk
            # the core's message and the Mapper's lookups are cut by the backstop (2000 characters)
            limit = protocol.MAX_ERROR_MESSAGE + 200 if word == "unknown core message" else 1000
            assert len(data) < limit, (word, len(data))
            response = protocol.Decoder().feed(data)[0]
            refused(response, err or response.get("errno"), word)
        s.close()
        carries_on(d)
    finally:
        d.stop()


# ---- resource limits -------------------------------------------------------------------------

def test_the_decoder_never_buffers_beyond_its_limit_and_keeps_its_framing():
    dec = protocol.Decoder(4096)
    got = dec.feed_requests(struct.pack(">I", 1 << 30) + b"x" * (1 << 20))
    assert len(got) == 1 and isinstance(got[0], DMError) and got[0].errno == errno.E2BIG
    assert dec.buffered == 0 and dec.pending == (1 << 30) - (1 << 20)
    for _ in range(1023):
        assert dec.feed_requests(b"y" * (1 << 20)) == [] and dec.buffered == 0
    good = protocol.encode(protocol.request("info", name="v"))
    assert dec.feed_requests(good[:3]) == [] and dec.buffered == 3
    assert dec.feed_requests(good[3:]) == [{"cmd": "info", "args": {"name": "v"}}]
    assert dec.buffered == 0 and dec.pending == 0


def test_a_million_line_table_fits_the_default_request_limit():
    table = "".join(f"{i * 2048} 2048 linear /var/lib/userdm/disk{i % 8}.img {i * 2048}\n"
                    for i in range(1_000_000))
    data = protocol.encode(protocol.request("create", name="huge", table=table))
    assert len(data) <= protocol.DEFAULT_MAX_REQUEST
    got = protocol.Decoder(protocol.DEFAULT_MAX_REQUEST).feed_requests(data)
    assert got[0]["args"]["table"] == table



def test_oversize_requests_get_e2big_and_the_connection_carries_on(tmp_path, images):
    d = Daemon(tmp_path)
    d.start("--max-message-size", "1M")
    try:
        (img,) = images(1, 8 << 20)
        with open(img, "r+b") as f:
            f.write(DATA)
        with d.connect() as client:
            client.create("good", f"0 {(8 << 20) // 512} linear {img} 0")
            table = "".join(f"{i * 8} 8 zero\n" for i in range(100000))  # ~1.3 MB of JSON
            with pytest.raises(DMError) as exc:
                client.create("big", table)
            assert exc.value.errno == errno.E2BIG and "--max-message-size" in exc.value.message
            assert client.info("good")["live"]  # the same connection: the body was skipped
            assert "big" not in {dev["name"] for dev in client.list()}
        s = raw(d)  # a declared length of 4 GiB: answered at once, nothing buffered
        s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"\0" * 65536)
        refused(receive(s), "E2BIG", "4294967295")
        s.close()
        carries_on(d)
    finally:
        d.stop()


def test_a_request_that_never_completes_is_cut_off_and_idle_connections_stay(tmp_path, images):
    d = Daemon(tmp_path)
    d.start("--control-message-timeout", "2", "--max-control-connections", "4")
    try:
        (img,) = images(1, 8 << 20)
        with open(img, "r+b") as f:
            f.write(DATA)
        with d.connect() as client:
            client.create("good", f"0 {(8 << 20) // 512} linear {img} 0")
        idle = raw(d)
        drip = raw(d)
        drip.sendall(struct.pack(">I", 100) + b'{"cmd":')  # and never the rest
        carries_on(d)  # meanwhile, others are served
        refused(receive(drip), "ETIMEDOUT", "did not arrive in full", "--control-message-timeout")
        assert drip.recv(100) == b""  # then closed
        drip.close()
        # an idle connection is never cut off
        assert ask(idle, {"cmd": "info", "args": {"name": "good"}})["ok"]
        other = raw(d)
        assert ask(other, {"cmd": "version", "args": {}})["ok"]
        other.close()
        idle.close()
        carries_on(d)
    finally:
        d.stop()


def test_connections_beyond_the_cap_get_eagain_and_a_freed_slot_is_reused(tmp_path, images):
    d = Daemon(tmp_path)
    d.start("--max-control-connections", "4")
    held = []
    try:
        (img,) = images(1, 8 << 20)
        with open(img, "r+b") as f:
            f.write(DATA)
        with d.connect() as client:
            client.create("good", f"0 {(8 << 20) // 512} linear {img} 0")
        for _ in range(4):
            held.append(hold(d))  # accepted and served
        for _ in range(3):
            with pytest.raises(DMError) as exc:
                with d.connect() as client:
                    client.info("good")
            assert exc.value.errno == errno.EAGAIN and "--max-control-connections" in exc.value.message
        with d.connect() as client:  # an event stream is a connection like any other
            with pytest.raises(DMError) as exc:
                client.events()
            assert exc.value.errno == errno.EAGAIN
        res = d.run("info", "good", check=False)
        assert res.returncode == 1 and "EAGAIN" in res.stderr, res
        assert ask(held[0], {"cmd": "info", "args": {"name": "good"}})["ok"]  # those served carry on
        held.pop().close()

        def served() -> bool:
            try:
                with d.connect() as client:
                    return client.info("good")["live"]
            except DMError as exc:
                assert exc.errno == errno.EAGAIN
                return False
        assert wait_until(served)  # the freed slot is taken again
        while held:
            held.pop().close()
        assert wait_until(served)  # (a client's close reaches the daemon a moment later)
        carries_on(d)
    finally:
        for s in held:
            s.close()
        d.stop()


def test_the_accept_loop_survives_emfile(tmp_path, images):
    """With the daemon's descriptors exhausted (a low RLIMIT_NOFILE set on the running daemon,
    as `prlimit --pid` does), connections wait in the backlog; the loop logs once and keeps
    trying, and answers them as soon as descriptors are free again."""
    d = Daemon(tmp_path)
    d.start()
    conns: list[socket.socket] = []
    pid = d.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    warning = "cannot accept control connections"
    try:
        (img,) = images(1, 8 << 20)
        with open(img, "r+b") as f:
            f.write(DATA)
        setup = raw(d)  # held to the end: no connection closes behind the count of descriptors
        conns.append(setup)
        table = f"0 {(8 << 20) // 512} linear {img} 0"
        assert ask(setup, {"cmd": "create", "args": {"name": "good", "table": table}})["ok"]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 3, old[1]))
        held: list[socket.socket] = []  # served until the descriptors run out
        while warning not in d.log.read_text():
            assert len(held) < 64, "the lowered limit never ran out"
            s = raw(d)
            conns.append(s)
            send(s, {"cmd": "version", "args": {}})
            assert wait_until(lambda: select.select([s], [], [], 0)[0] or warning in d.log.read_text(),
                              timeout=SAFETY)
            if select.select([s], [], [], 0)[0]:
                assert receive(s)["ok"]
                held.append(s)
        assert held, "the daemon had no descriptor left even for one connection"
        waiting = []
        for _ in range(12):  # these wait in the backlog while the loop keeps retrying
            s = raw(d)
            conns.append(s)
            send(s, {"cmd": "info", "args": {"name": "good"}})
            waiting.append(s)
        assert d.log.read_text().count(warning) == 1  # once per burst, however often it retried
        for s in held:
            s.close()
        # descriptors free again: the first connection in the backlog is answered
        assert receive(waiting[0])["result"]["name"] == "good"
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        for s in waiting[1:]:
            assert receive(s)["result"]["name"] == "good"
        assert "accepting control connections again" in d.log.read_text()
        for s in conns:
            s.close()
        conns = []
        carries_on(d)
    finally:
        for s in conns:
            s.close()
        if d.proc is not None and d.proc.poll() is None:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        d.stop()


def test_a_closed_connection_frees_its_buffer_at_once(tmp_path, images):
    d = Daemon(tmp_path)
    d.start()
    try:
        pid = d.proc.pid
        before = rss(pid)
        s = raw(d)
        s.sendall(struct.pack(">I", 60 << 20) + b" " * (48 << 20))  # an incomplete request
        assert wait_until(lambda: rss(pid) > before + (40 << 20), timeout=SAFETY)
        s.close()
        assert wait_until(lambda: rss(pid) < before + (16 << 20), timeout=SAFETY), (before, rss(pid))
        with d.connect() as client:
            assert client.list() == []
    finally:
        d.stop()


# ---- the command line ------------------------------------------------------------------------

def test_devices_named_like_options_are_managed_with_double_dash(healthy):
    for name in ("--help", "-x"):
        healthy.run("create", "--table", "0 8 zero", "--", name)
        info = healthy.run("info", "--", name).stdout
        assert f"Name:              {name}" in info or name in info.splitlines()[0], info
        assert healthy.run("table", "--", name).stdout.strip() == "0 8 zero"
        healthy.run("suspend", "--", name)
        healthy.run("resume", "--", name)
        assert healthy.run("open", "--", name, "--", "true").returncode == 0
        healthy.run("remove", "--", name)
        res = healthy.run("info", "--", name, check=False)
        assert res.returncode == 1 and "ENXIO" in res.stderr, res
    # `--` still introduces the command of `open` and `create --exec`
    res = healthy.run("create", "ex", "--table", "0 8 zero", "--autoclear", "--exec", "--", "sh", "-c",
                      'test "$USERDM_DEVICE" = ex')
    assert res.returncode == 0, res
    assert healthy.run("open", "good", "--", "true").returncode == 0
    carries_on(healthy)


# ---- runtime and state directories -----------------------------------------------------------

def _refuses_to_start(d: Daemon, *reason: str) -> None:
    res = d.run("daemon", "--no-fuse", check=False)  # returns at once: it never gets ready
    assert res.returncode == 1, res
    assert "EPERM" in res.stderr, res.stderr
    for word in reason:
        assert word in res.stderr, (word, res.stderr)
    assert not (d.runtime / "control").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_runtime_dir_owned_by_another_uid_is_refused(tmp_path):
    d = Daemon(tmp_path)
    d.runtime.mkdir(mode=0o700)
    os.chown(d.runtime, 65534, 65534)
    _refuses_to_start(d, "runtime directory", "owned by uid 65534")


@pytest.mark.parametrize("which", ["runtime", "state"])
def test_a_directory_writable_by_others_is_refused(tmp_path, which):
    d = Daemon(tmp_path)
    path = getattr(d, which)
    path.mkdir()
    os.chmod(path, 0o777)
    _refuses_to_start(d, f"{which} directory", "mode 0777", "writable by group or others")


def test_a_planted_mapper_symlink_and_a_symlinked_runtime_dir_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    d = Daemon(tmp_path)
    d.runtime.mkdir(mode=0o700)
    (d.runtime / "mapper").symlink_to(elsewhere)
    _refuses_to_start(d, "mapper", "symbolic link", str(elsewhere))
    assert list(elsewhere.iterdir()) == []
    (d.runtime / "mapper").unlink()
    d.runtime.rmdir()
    d.runtime.symlink_to(elsewhere, target_is_directory=True)
    _refuses_to_start(d, "runtime directory", "symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_created_directories_are_private_and_the_daemon_starts(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        for path in (d.runtime, d.state):
            st = os.lstat(path)
            assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
        with d.connect() as client:
            assert client.list() == []
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_client_refuses_a_control_socket_in_someone_elses_directory(daemon):
    os.chown(daemon.runtime, 65534, 65534)
    try:
        with pytest.raises(DMError) as exc:
            daemon.connect()
        assert exc.value.errno == errno.EPERM and "owned by uid 65534" in exc.value.message
        res = daemon.run("ls", check=False)
        assert res.returncode == 1 and "EPERM" in res.stderr
    finally:
        os.chown(daemon.runtime, os.geteuid(), os.getegid())
    with daemon.connect() as client:
        assert client.list() == []
