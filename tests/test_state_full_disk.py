"""A full state filesystem: every change is refused with ENOSPC and none of them is applied, in
memory or on disk; the daemon restarts on that full disk and serves its devices; once there is
room again, changes go through. The state directory lives on a small tmpfs mounted for the test
(and unmounted even when it fails)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Daemon
from userdm.dm.mapper import Mapper
from userdm.errors import DMError
from userdm.nbd.client import RemoteDevice

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "statefs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "userdm-test-state", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    """Fill the filesystem until not one more byte fits."""
    path = fs / "fill"
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"\xff" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return path


def read_export(d: Daemon, name: str, offset: int, length: int) -> bytes:
    dev = RemoteDevice(f"nbd+unix:///{name}?socket={d.runtime / 'nbd.sock'}")
    try:
        with dev.open() as h:
            return h.read(offset, length)
    finally:
        dev.close_backing()


def refused(d: Daemon, *args: str) -> str:
    res = d.run(*args, check=False)
    assert res.returncode != 0, f"userdm {' '.join(args)} was accepted on a full disk"
    assert "ENOSPC" in res.stderr, res.stderr
    return res.stderr


def test_a_full_state_filesystem_refuses_every_change_and_the_daemon_restarts_on_it(tmp_path, small_fs, images):
    img, other = images(2, 4 * MiB)
    with open(img, "r+b") as f:
        f.write(b"kept data")
    d = Daemon(tmp_path)
    d.state = small_fs / "state"
    d.env["USERDM_STATE_DIR"] = str(d.state)
    d.start()
    try:
        d.run("create", "keep", "--table", f"0 8192 linear {img} 0")
        d.run("create", "gone", "--table", "0 8 zero")
        d.run("create", "ren", "--table", "0 8 zero")
        before = d.run("ls").stdout
        filler = fill(small_fs)

        assert "nothing was changed" in refused(d, "create", "new", "--table", f"0 8192 linear {other} 0")
        refused(d, "load", "keep", "--table", "0 16 zero")
        refused(d, "remove", "gone")
        refused(d, "rename", "ren", "ren2")
        with d.connect() as client:
            with pytest.raises(DMError) as exc:
                client.create("viaclient", "0 8 zero")
            assert exc.value.errno == errno.ENOSPC
            info = client.info("keep")
            assert info["live"] and not info["inactive"] and info["size"] == 8192 * 512
        assert d.run("ls").stdout == before  # nothing was applied
        assert d.run("table", "keep").stdout.split()[2] == "linear"
        assert read_export(d, "keep", 0, 9) == b"kept data"

        d.stop()
        d.start()  # on the full disk
        assert d.run("ls").stdout == before
        assert read_export(d, "keep", 0, 9) == b"kept data"
        refused(d, "create", "new", "--table", "0 8 zero")
        refused(d, "remove", "gone")

        filler.unlink()  # room again: changes go through
        d.run("create", "new", "--table", "0 8 zero")
        d.run("remove", "gone")
        d.run("rename", "ren", "ren2")
        d.stop()
        d.start()
        assert sorted(line.split()[0] for line in d.run("ls").stdout.splitlines()) == ["keep", "new", "ren2"]
    finally:
        d.stop()


def test_a_refused_commit_changes_nothing_in_process(small_fs, images):
    (img,) = images(1, 4 * MiB)
    m = Mapper(small_fs / "state")
    try:
        m.create("a", f"0 8192 linear {img} 0", uuid="UA")
        m.create("b", "0 8 zero")
        m.suspend("b")
        filler = fill(small_fs)
        before = m.list()
        for call, args, kwargs in [
            (m.create, ("c", "0 8 zero"), {}), (m.create, ("d",), {}),
            (m.load, ("a", "0 16 zero"), {}), (m.remove, ("a",), {}), (m.rename, ("a", "z"), {}),
            (m.rename, ("b",), {"uuid": "UB"}), (m.resume, ("b",), {}),
            (m.remove, ("a",), {"deferred": True}), (m.wipe_table, ("a",), {}),
            # a big table goes to a file of its own first: that write fails, and leaves nothing
            (m.load, ("a", "\n".join(f"{i * 8} 8 zero" for i in range(100_000))), {}),
        ]:
            with pytest.raises(DMError) as exc:
                call(*args, **kwargs)
                pytest.fail(f"{call.__name__}{args} was accepted on a full disk")
            assert exc.value.errno == errno.ENOSPC, (call.__name__, exc.value)
        assert m.list() == before
        assert m.find_name(uuid="UA") == "a"
        assert "c" not in m.export_names() and m.info("b")["suspended"]
        assert not any((small_fs / "state" / "tables").glob("*"))
        filler.unlink()
        m.create("c", "0 8 zero")  # the minor, name and uuid refused before are free
        m.rename("b", uuid="UB")
    finally:
        m.close()
    m = Mapper(small_fs / "state")
    try:
        assert [i["name"] for i in m.list()] == ["a", "b", "c"]
        assert m.info("b")["uuid"] == "UB" and m.info("b")["suspended"]
    finally:
        m.close()
