"""The device-mapper state machine, as the kernel runs it (create/load/resume/suspend/remove,
deferred remove, rename, uuids, events, claims, persistence)."""

import errno
import threading

import pytest

from userdm import Mapper
from userdm.errors import DMError

from conftest import wait_until


def err(fn, *args, **kwargs) -> DMError:
    with pytest.raises(DMError) as exc:
        fn(*args, **kwargs)
    return exc.value


def test_create_without_table_then_load_and_resume(mapper, images):
    (img,) = images()
    info = mapper.create("v", uuid="U-1")
    assert (info["live"], info["inactive"], info["suspended"], info["open_count"], info["event_nr"]) == \
        (False, False, False, 0, 0)
    assert err(mapper.open_device("v", write=False).read, 0, 1).errno == errno.EINVAL  # size 0
    mapper.load("v", f"0 100 linear {img} 0")
    info = mapper.info("v")
    assert info["inactive"] and not info["live"]
    mapper.resume("v")
    info = mapper.info("v")
    assert info["live"] and not info["inactive"] and info["size"] == 100 * 512
    mapper.load("v", f"0 200 linear {img} 0")
    mapper.clear("v")
    assert not mapper.info("v")["inactive"]


def test_load_already_claims_the_underlying_device(mapper, images):
    (img,) = images()
    mapper.create("v")
    mapper.load("v", f"0 100 linear {img} 0")
    disk = mapper.device("v").inactive.devices()[0].device
    assert err(disk.open, write=True, holder="a-filesystem").errno == errno.EBUSY
    mapper.clear("v")  # releases it
    # a second mapped device may map the same disk (one shared device-mapper holder)
    mapper.create("a", f"0 100 linear {img} 0")
    mapper.create("b", f"0 100 linear {img} 0")


def test_outside_exclusive_holder_blocks_the_load(mapper, images):
    (img,) = images()
    owner = mapper.backing.open(img, write=True, holder="mounted-fs")
    e = err(mapper.create, "v", f"0 100 linear {img} 0")
    assert e.errno == errno.EBUSY and "table line 1" in e.message and "mounted-fs" in e.message
    owner.close()
    mapper.create("v", f"0 100 linear {img} 0")


def test_resume_grows_the_device_and_counts_an_event(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    dev = mapper.open_device("v", write=True)
    dev.write(0, b"keep")
    mapper.load("v", f"0 300 linear {img} 0")
    assert dev.size == 100 * 512                 # the live table is still the old one
    mapper.resume("v")
    assert dev.size == 300 * 512 and dev.read(0, 4) == b"keep"
    assert mapper.info("v")["event_nr"] == 1
    dev.close()


def test_suspend_holds_io_until_resume(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    dev = mapper.open_device("v", write=True)
    mapper.suspend("v")
    assert mapper.info("v")["suspended"]
    done = threading.Event()
    result = {}

    def writer():
        dev.write(512, b"late")
        result["data"] = dev.read(512, 4)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not done.wait(0.3)      # held, not failed
    mapper.resume("v")
    t.join(10)
    assert done.is_set() and result["data"] == b"late"
    dev.close()


def test_resume_without_any_table_is_einval(mapper):
    mapper.create("v")
    mapper.suspend("v")
    assert err(mapper.resume, "v").errno == errno.EINVAL
    assert mapper.info("v")["suspended"]


def test_io_without_live_table_fails_with_eio(mapper, images):
    (img,) = images()
    mapper.create("v")
    mapper.load("v", f"0 100 linear {img} 0")
    md = mapper.device("v")
    assert err(md.readinto, 0, memoryview(bytearray(1))).errno == errno.EIO


def test_names_and_uuids(mapper):
    for bad in ["", "a/b", "control", ".", "..", "x" * 128, "tab\there", "nul\0"]:
        assert err(mapper.create, bad).errno == errno.EINVAL, bad
    mapper.create("x" * 127)
    mapper.create("v", uuid="u" * 128)
    assert err(mapper.create, "w", uuid="u" * 129).errno == errno.EINVAL
    assert err(mapper.create, "v").errno == errno.EBUSY
    assert err(mapper.create, "w", uuid="u" * 128).errno == errno.EBUSY
    assert mapper.create("w", minor=7)["minor"] == 7
    assert err(mapper.create, "z", minor=7).errno == errno.EBUSY      # taken, as the kernel says
    assert err(mapper.create, "z", minor=1 << 20).errno == errno.ENXIO
    assert mapper.create("z")["minor"] == 2


def test_rename_and_setuuid_once(mapper):
    mapper.create("a")
    mapper.create("b")
    assert err(mapper.rename, "a", "b").errno == errno.EBUSY
    assert err(mapper.rename, "nope", "c").errno == errno.ENXIO
    assert err(mapper.rename, "a", "bad/name").errno == errno.EINVAL
    mapper.rename("a", "c")
    assert mapper.info("c")["minor"] == 0
    mapper.rename("c", uuid="U1")
    assert err(mapper.rename, "c", uuid="U2").errno == errno.EINVAL
    assert err(mapper.rename, "b", uuid="U1").errno == errno.EBUSY
    assert mapper.find_name(uuid="U1") == "c"


def test_remove_busy_force_and_retry(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    dev = mapper.open_device("v", write=True)
    e = err(mapper.remove, "v")
    assert e.errno == errno.EBUSY and "open count 1" in e.message
    e = err(mapper.remove, "v", force=True)     # still open: EBUSY, but the table is now error
    assert e.errno == errno.EBUSY
    assert mapper.table("v") == [[0, 100, "error", ""]]
    assert err(dev.read, 0, 512).errno == errno.EIO
    assert mapper.deps("v") == []               # the file was released
    threading.Timer(0.3, dev.close).start()
    mapper.remove("v", retry=True)              # succeeds once the opener goes away
    assert err(mapper.info, "v").errno == errno.ENXIO


def test_deferred_remove_fires_after_last_close_and_cascades(mapper, images):
    (img,) = images()
    mapper.create("low", f"0 100 linear {img} 0")
    mapper.create("top", "0 100 linear /dev/mapper/low 0")
    assert mapper.info("low")["open_count"] == 1
    assert mapper.info("low")["holders"] == ["top"]      # the sysfs holders/ graph
    assert err(mapper.remove, "low").errno == errno.EBUSY
    info = mapper.remove("low", deferred=True)
    assert info["deferred_remove"] and mapper.info("low")["deferred_remove"]
    user = mapper.open_device("top", write=True)
    mapper.remove("top", deferred=True)
    extra = mapper.open_device("top", write=False)   # new opens are still allowed (kernel)
    extra.close()
    assert {d["name"] for d in mapper.list()} == {"low", "top"}
    user.close()                                      # last close: top goes, then low
    assert mapper.list() == []
    assert mapper.backing.devices() == []


def test_cancel_deferred_remove(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    dev = mapper.open_device("v", write=True)
    mapper.remove("v", deferred=True)
    assert mapper.message("v", 0, "@cancel_deferred_remove") is None
    assert not mapper.info("v")["deferred_remove"]
    dev.close()
    assert mapper.info("v")["name"] == "v"            # not removed
    assert err(mapper.message, "v", 0, "@cancel_deferred_remove now").errno == errno.EINVAL
    assert err(mapper.message, "v", 0, "@bogus").errno == errno.EINVAL
    assert err(mapper.message, "v", 100, "hello").errno == errno.EINVAL   # beyond the end
    assert err(mapper.message, "v", 0, "hello").errno == errno.EINVAL     # linear takes none
    md = mapper.device("v")
    md.deleting = True
    assert err(mapper.message, "v", 0, "@cancel_deferred_remove").errno == errno.ENXIO


def test_open_of_a_device_being_removed_is_enxio(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    md = mapper.device("v")
    mapper.remove("v")
    assert err(md.open, write=False).errno == errno.ENXIO
    assert err(mapper.open_device, "v", write=False).errno == errno.ENXIO


def test_remove_all_takes_stacks_apart(mapper, images):
    (img,) = images()
    mapper.create("a", f"0 100 linear {img} 0")
    mapper.create("b", "0 100 linear /dev/mapper/a 0")
    mapper.create("c", "0 100 linear 253:1 0")
    mapper.create("busy", f"0 100 linear {img} 0")
    dev = mapper.open_device("busy", write=False)
    assert mapper.remove_all(deferred=True) == {"left_open": ["busy"]}
    assert [d["name"] for d in mapper.list()] == ["busy"]
    dev.close()
    assert mapper.list() == []


def test_readonly_table(mapper, images):
    (img,) = images()
    mapper.create("ro", f"0 100 linear {img} 0", readonly=True)
    assert mapper.info("ro")["readonly"]
    assert err(mapper.open_device, "ro", write=True).errno == errno.EACCES
    mapper.open_device("ro", write=False).close()


def test_map_onto_itself_is_refused(mapper):
    mapper.create("self", "0 8 zero")
    e = err(mapper.load, "self", "0 8 linear /dev/mapper/self 0")
    assert e.errno == errno.ELOOP and e.message.startswith("self -> self: ") and "itself" in e.message


def test_wait_returns_on_event(mapper, images):
    (img,) = images()
    mapper.create("v", f"0 100 linear {img} 0")
    assert err(mapper.wait, "v", 0, timeout=0.05).errno == errno.ETIMEDOUT
    threading.Timer(0.1, lambda: mapper.rename("v", "w")).start()
    info = mapper.wait("v", 0, timeout=10)
    assert info["event_nr"] == 1 and info["name"] == "w"


def test_state_survives_a_restart(tmp_path, images):
    (img,) = images()
    state = tmp_path / "state"
    m = Mapper(state)
    m.create("low", f"0 100 linear {img} 0", uuid="L")
    m.create("top", "0 50 linear /dev/mapper/low 50")   # created after, minor 1
    m.create("ro", "0 8 zero", readonly=True)
    m.create("bare")
    m.load("bare", "0 16 zero")
    m.create("sus", "0 8 zero")
    m.suspend("sus")
    dev = m.open_device("top", write=True)
    dev.write(0, b"persist")
    dev.close()
    m.close()
    m2 = Mapper(state)
    infos = {d["name"]: d for d in m2.list()}
    assert set(infos) == {"low", "top", "ro", "bare", "sus"}
    assert infos["low"]["uuid"] == "L" and infos["top"]["minor"] == 1
    assert infos["ro"]["readonly"] and infos["bare"]["inactive"] and not infos["bare"]["live"]
    assert infos["sus"]["suspended"]
    assert m2.open_device("low", write=False).read(50 * 512, 7) == b"persist"
    assert m2.table("top") == [[0, 50, "linear", "253:0 50"]]
    m2.close()
