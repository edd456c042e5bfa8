"""The Python client as an API: explicit, typed methods that match the control schema (and so
the Mapper), a mistyped keyword is a TypeError, DMError is an OSError with errno, open_device
over the daemon, and a short script that `mypy --strict` accepts and that runs."""

import errno
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import userdm
from userdm.control import schema
from userdm.control.client import Client
from userdm.errors import DMError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "striped.py"


def test_every_command_is_an_explicit_method_with_the_schemas_parameters():
    for cmd, fields in schema.SCHEMA.items():
        method = Client.__dict__.get(cmd)
        assert method is not None, f"Client has no method {cmd}()"
        assert method.__doc__, cmd
        if cmd in ("connect_nbd", "events"):
            continue
        params = list(inspect.signature(method).parameters)[1:]
        assert params == list(fields), (cmd, params, list(fields))
        hints = inspect.get_annotations(method)
        assert "return" in hints and all(p in hints for p in params), cmd
    assert Client.open_device.__doc__


def test_mistyped_keyword_and_errors(daemon, images):
    (a,) = images(1, 1 << 20)
    with daemon.connect() as dm:
        with pytest.raises(TypeError, match="readonlyy"):
            dm.create("x", "0 8 zero", readonlyy=True)   # type: ignore[call-arg]
        with pytest.raises(TypeError):
            dm.info()                                     # type: ignore[call-arg]
        assert dm.list() == []                            # nothing was sent
        with pytest.raises(OSError) as caught:
            dm.info("nosuch")
        assert isinstance(caught.value, DMError) and caught.value.errno == errno.ENXIO
        assert caught.value.strerror == "device 'nosuch' does not exist"
        assert str(caught.value) == "ENXIO: device 'nosuch' does not exist"
        dm.create("v", f"0 8 linear {a} 0")
        with pytest.raises(OSError) as caught:
            dm.create("v", "0 8 zero")
        assert caught.value.errno == errno.EBUSY   # the kernel answers a taken name with EBUSY


def test_open_device_reads_and_writes_through_the_daemon(daemon, images):
    a, b = images(2, 1 << 20)
    with daemon.connect() as dm:
        dm.create("s", f"0 2048 striped 2 8 {a} 0 {b} 0")
        with dm.open_device("s") as dev:
            assert dev.size == 2048 * 512
            dev.write(4096, b"x" * 4096)    # chunk 1 of the stripe: the start of b
            dev.flush()
            assert dm.info("s")["open_count"] == 1
            assert dev.read(4096, 4096) == b"x" * 4096
            with pytest.raises(DMError, match="outside the device"):
                dev.read(2048 * 512 - 1, 2)
        with open(b, "rb") as f:
            assert f.read(4096) == b"x" * 4096
        with dm.open_device("s", write=False) as ro:
            with pytest.raises(DMError) as caught:
                ro.write(0, b"y")
            assert caught.value.errno == errno.EBADF
        dm.remove("s")


def test_example_script_runs_and_passes_mypy_strict(daemon):
    res = subprocess.run([sys.executable, str(EXAMPLE), str(daemon.runtime)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with daemon.connect() as dm:
        assert dm.list() == []
    assert len(EXAMPLE.read_text().splitlines()) <= 15
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          "--cache-dir", os.devnull, str(EXAMPLE)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (ROOT / "src" / "userdm" / "py.typed").exists()
