"""Interop: real third-party NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio, nbdsh)
against the userdm NBD server, and a table whose underlying device is an `nbdkit memory`
export. Unix sockets only. Every spawned process is killed in a `finally`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from userdm import Mapper
from userdm.export.nbd.server import NBDServer

pytestmark = pytest.mark.interop
MiB = 1 << 20
SIZE = 32 * MiB


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt: qemu-utils, libnbd-bin, nbdkit, fio)")


def run(*cmd: str, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def export(tmp_path, images):
    """(mapper, uri) for device vol0 (a linear table over a sparse file) served on a Unix socket."""
    m = Mapper()
    m.create("vol0", f"0 {SIZE // 512} linear {images(1, SIZE)[0]} 0\n")
    sock = tmp_path / "nbd.sock"
    srv = NBDServer(m, unix_path=sock)
    srv.start()
    try:
        yield m, f"nbd+unix:///vol0?socket={sock}"
    finally:
        srv.stop()
        m.close()


@pytest.fixture
def pattern_file(tmp_path) -> Path:
    p = tmp_path / "pattern.img"
    with open(p, "wb") as f:
        for i in range(SIZE // MiB):
            f.write((bytes([i % 251 + 1]) * 4096 if i % 3 else bytes(4096)) * (MiB // 4096))
    return p


def test_qemu_img_info(export):
    need("qemu-img")
    _, uri = export
    info = json.loads(run("qemu-img", "info", "--output=json", uri))
    assert info["virtual-size"] == SIZE


def test_qemu_io_write_read_pattern(export):
    need("qemu-io")
    _, uri = export
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 512 512",
              "-c", "read -P 0xab 1M 3M", "-c", "read -P 0xcd 512 512", "-c", "read -P 0 0 512", uri)
    assert "Pattern verification failed" not in out
    bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 1M 4k", uri],
                         capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_qemu_img_convert_and_compare(export, pattern_file):
    need("qemu-img")
    _, uri = export
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(pattern_file), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(pattern_file), uri)


def test_nbdinfo_size_and_map(export):
    need("nbdinfo", "qemu-io")
    _, uri = export
    assert run("nbdinfo", "--size", uri).strip() == str(SIZE)
    run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 1M", uri)
    extents = json.loads(run("nbdinfo", "--map", "--json", uri))
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    assert (4 * MiB, MiB) in data
    assert any(e["type"] == 3 and e["offset"] == 0 for e in extents)
    assert sum(e["length"] for e in extents) == SIZE
    listing = run("nbdinfo", "--list", uri.replace("/vol0?", "/?"))
    assert 'export="vol0"' in listing


def test_nbdcopy_to_and_from_file(export, pattern_file, tmp_path):
    need("nbdcopy")
    _, uri = export
    run("nbdcopy", str(pattern_file), uri)
    back = tmp_path / "back.img"
    run("nbdcopy", uri, str(back))
    assert back.read_bytes() == pattern_file.read_bytes()


def test_fio_verify_eight_connections(export, tmp_path):
    need("fio")
    _, uri = export
    out = tmp_path / "fio.json"
    run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        "--iodepth=8", "--numjobs=8", "--size=2M", "--offset_increment=4M", "--verify=crc32c",
        "--do_verify=1", "--verify_state_save=0", "--group_reporting", f"--output={out}",
        "--output-format=json")
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * 2 * MiB


def test_nbdsh_libnbd_capabilities(export):
    need("nbdsh")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("nbdsh needs /usr/bin/python3 with python3-libnbd")
    _, uri = export
    script = (
        "h.pwrite(b'z' * 4096, 8192)\n"
        "assert h.pread(4096, 8192) == b'z' * 4096\n"
        "assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()\n"
        "h.flush()\n"
        "h.set_strict_mode(0)\n"
        "try:\n"
        "    h.pread(512, h.get_size())\n"
        "    raise SystemExit('read past the end succeeded')\n"
        "except nbd.Error as e:\n"
        "    print('past-end', e.errnum)\n"
    )
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    proc = subprocess.run(["nbdsh", "-u", uri, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "past-end" in proc.stdout


@pytest.fixture
def nbdkit_memory(tmp_path):
    need("nbdkit")
    sock = tmp_path / "kit.sock"
    proc = subprocess.Popen(["nbdkit", "-U", str(sock), "-f", "memory", str(SIZE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ev = threading.Event()
        for _ in range(500):
            if sock.exists() or proc.poll() is not None:
                break
            ev.wait(0.02)
        assert sock.exists(), f"nbdkit did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_table_over_nbdkit_memory(nbdkit_memory, tmp_path):
    need("qemu-io", "nbdcopy")
    m = Mapper()
    sock = tmp_path / "nbd.sock"
    srv = NBDServer(m, unix_path=sock)
    try:
        m.create("remote", f"0 {(SIZE - MiB) // 512} linear nbd+unix:///?socket={nbdkit_memory} {MiB // 512}\n")
        srv.start()
        uri = f"nbd+unix:///remote?socket={sock}"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 2M", "-c", "read -P 0x77 0 2M", uri)
        raw = tmp_path / "kit.img"
        run("nbdcopy", f"nbd+unix:///?socket={nbdkit_memory}", str(raw))
        data = raw.read_bytes()
        assert data[:MiB] == bytes(MiB) and data[MiB:3 * MiB] == b"\x77" * (2 * MiB)
    finally:
        srv.stop()
        m.close()
