"""The interposer (DESIGN.md §5, issue 6 §3): take over a device that is in use, live.

Users of DEV keep their opens; after attach their I/O goes through the interposer's table and
the interposer's own I/O reaches DEV's original mapping; detach undoes it. Writers run during
attach and detach and must see no error and lose nothing.
"""

from __future__ import annotations

import errno
import threading

import pytest

from conftest import wait_until
from userdm.block.device import HolderOps
from userdm import Mapper
from userdm.errors import DMError

MiB = 1 << 20
SECTORS = 16384  # 8 MiB


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def collapsed_sinks(mapper, name: str) -> list:
    """The sinks of the device's collapsed path (`userdm.dm.collapse`) after one request."""
    md = mapper.device(name)
    md.readinto(0, memoryview(bytearray(512)))
    return [seg[2] for seg in md._flat.segments] if md._flat is not None else [None]


@pytest.fixture
def dev(mapper, images):
    (img,) = images()
    mapper.create("dev", f"0 {SECTORS} linear {img} 0")
    return img


def test_interposed_io_goes_through_the_interposer(mapper, dev, images):
    meta, = images(1, 4 * MiB)
    user = mapper.open_device("dev", write=True, holder="mounted-fs")
    user.write(0, b"a" * 4096)
    mapper.create("track", f"0 {SECTORS} era {meta} [interpose]/dev/mapper/dev 8", interpose=True)
    assert mapper.info("track")["interposing"] == "dev"
    assert mapper.info("dev")["interposed_by"] == ["track"]
    assert mapper.info("dev")["open_count"] == 1 and mapper.info("dev")["holder"] == "mounted-fs"
    assert mapper.table("track")[0][3].split()[1] == "[interpose]253:0"
    mapper.message("track", 0, "checkpoint")
    user.write(3 * MiB, b"b" * 8192)     # through the user's open of dev, not of track
    assert read_file(dev, 3 * MiB, 8192) == b"b" * 8192
    assert user.read(0, 4096) == b"a" * 4096
    changed = mapper.era_changed("track", 1)
    assert changed and all(r["begin"] <= 3 * MiB // 512 < r["begin"] + r["length"] for r in changed)
    mapper.remove("track")
    assert mapper.info("dev")["interposed_by"] == []
    user.write(5 * MiB, b"c" * 512)      # straight to dev's table again
    assert read_file(dev, 5 * MiB, 512) == b"c" * 512
    assert mapper.info("dev")["open_count"] == 1
    user.close()


@pytest.mark.parametrize("via", ["dev", "top"])
def test_writers_see_nothing_while_the_interposer_attaches_and_detaches(mapper, dev, images, via):
    """Writers on dev itself, or on a linear device over it ("top": collapsed onto the file
    while dev is plain, through dev, and so through the interposer, while it is attached)."""
    if via == "top":
        mapper.create("top", f"0 {SECTORS} linear /dev/mapper/dev 0")
    users = [mapper.open_device(via, write=True) for _ in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}
    lock = threading.Lock()

    def writer(i: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                block = (i * 256 + n % 256) * 4096
                data = bytes([i + 1, n % 251]) * 2048
                users[i].write(block, data)
                assert users[i].read(block, 4096) == data
                with lock:
                    written[block] = data
                n += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for round_ in range(10):
            mapper.create(f"front{round_}", f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0",
                          interpose=True)
            if via == "top":
                assert collapsed_sinks(mapper, "top") == [None]   # through dev and the front
            mapper.remove(f"front{round_}")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    for block, data in written.items():
        assert read_file(dev, block, 4096) == data
    assert mapper.info(via)["open_count"] == 4
    if via == "top":
        assert collapsed_sinks(mapper, "top")[0] is not None     # onto the file again
    for u in users:
        u.close()


def test_holder_is_frozen_and_thawed_around_attach_and_detach(mapper, dev):
    calls: list[str] = []
    ops = HolderOps(freeze=lambda: calls.append("freeze"), thaw=lambda: calls.append("thaw"))
    user = mapper.device("dev").open(write=True, holder="fs", holder_ops=ops)
    mapper.create("front", f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0", interpose=True)
    assert calls == ["freeze", "thaw"]
    mapper.remove("front")
    assert calls == ["freeze", "thaw", "freeze", "thaw"]
    user.close()


def test_refusals(mapper, dev, images):
    (other,) = images()
    cases = [
        (dict(table=f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0"), errno.EINVAL, "--interpose"),
        (dict(table=f"0 {SECTORS} linear /dev/mapper/dev 0", interpose=True), errno.EINVAL, "exactly one"),
        (dict(table=f"0 {SECTORS} linear [interpose]{other} 0", interpose=True), errno.EINVAL, "mapped device"),
        (dict(table=f"0 {SECTORS // 2} linear [interpose]/dev/mapper/dev 0", interpose=True),
         errno.EINVAL, "same size"),
        (dict(table=f"0 {SECTORS} linear [interpose]/dev/mapper/nope 0", interpose=True), errno.ENXIO, "nope"),
        (dict(table=f"0 {SECTORS // 2} linear [interpose]/dev/mapper/dev 0\n"
                    f"{SECTORS // 2} {SECTORS // 2} linear [interpose]/dev/mapper/dev2 0", interpose=True),
         errno.EINVAL, "names 2 devices"),
    ]
    mapper.create("dev2", f"0 {SECTORS} linear {other} 0")
    for kwargs, err, text in cases:
        with pytest.raises(DMError) as exc:
            mapper.create("front", **kwargs)
        assert exc.value.errno == err and text in str(exc.value), exc.value
        assert "front" not in {d["name"] for d in mapper.list()}
        assert mapper.info("dev")["interposed_by"] == []


def test_removal_order_and_stacking(mapper, dev):
    user = mapper.open_device("dev", write=True)
    mapper.create("one", f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0", interpose=True)
    mapper.create("two", f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0", interpose=True)
    assert mapper.info("dev")["interposed_by"] == ["one", "two"]
    user.write(0, b"x" * 512)
    for name, what in (("dev", "interposed by one, two"), ("one", "behind two")):
        with pytest.raises(DMError) as exc:
            mapper.remove(name)
        assert exc.value.errno == errno.EBUSY and what in str(exc.value)
    mapper.remove("two")
    mapper.remove("one")
    mapper.remove("dev", deferred=True)
    assert user.read(0, 512) == b"x" * 512
    user.close()
    assert wait_until(lambda: mapper.list() == [])


def test_an_interposer_survives_a_restart(tmp_path, images):
    (img,) = images()
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("dev", f"0 {SECTORS} linear {img} 0")
    m.create("front", f"0 {SECTORS} linear [interpose]/dev/mapper/dev 0", interpose=True)
    m.close()
    m = Mapper(state)
    try:
        assert m.info("dev")["interposed_by"] == ["front"]
        with m.open_device("dev", write=True) as h:
            h.write(MiB, b"r" * 512)
        assert read_file(img, MiB, 512) == b"r" * 512
    finally:
        m.close()
