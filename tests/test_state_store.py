"""The state store's group commit: changes that arrive together share one transaction and one
sync, yet each is applied or refused on its own, and each is durable when `commit` returns."""

from __future__ import annotations

import errno
import threading

import pytest

from userdm.dm import state
from userdm.errors import DMError


def test_concurrent_changes_each_apply_or_fail_alone(tmp_path):
    store = state.StateStore(str(tmp_path))
    threads, per_thread = 8, 40
    refused: list[DMError] = []
    start = threading.Barrier(threads)

    def writer(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            minor = k * per_thread + i
            store.commit("create", state.device(state.SavedDevice(f"dev{minor}", minor)))
            # every other change takes a name that exists: it must fail alone, not its batch
            if i % 2:
                try:
                    store.commit("create", state.device(state.SavedDevice(f"dev{minor}", 100_000 + minor)))
                except DMError as exc:
                    refused.append(exc)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(refused) == threads * per_thread // 2
    assert all("dev" in str(exc) or "UNIQUE" in str(exc) for exc in refused)
    store.close()

    # a fresh store (a restarted daemon) sees exactly the changes that were acknowledged
    again = state.StateStore(str(tmp_path))
    names = sorted(d.name for d in again.load())
    assert names == sorted(f"dev{m}" for m in range(threads * per_thread))
    assert {d.minor for d in again.load()} == set(range(threads * per_thread))
    again.close()


def test_a_change_the_database_refuses_carries_an_errno_and_changes_nothing(tmp_path):
    store = state.StateStore(str(tmp_path))
    store.commit("create", state.device(state.SavedDevice("a", 0)))
    store._db.execute("PRAGMA query_only = ON")  # every write now fails inside the transaction
    with pytest.raises(DMError) as info:
        store.commit("create", state.device(state.SavedDevice("b", 1)))
    assert info.value.errno == errno.EROFS
    assert "cannot save the create" in str(info.value)
    assert [d.name for d in store.load()] == ["a"]
    store.close()


def test_a_big_table_lives_in_its_own_file_and_no_file_outlives_its_row(tmp_path):
    big = "\n".join(f"{i * 8} 8 linear /var/lib/userdm/disk.img {i * 8}" for i in range(40_000))
    assert len(big) >= state.BIG_TABLE
    tables = tmp_path / state.TABLE_DIR
    store = state.StateStore(str(tmp_path))
    store.commit("create", state.device(state.SavedDevice("big", 0, live=state.SavedTable(big, False))))
    store.commit("load", state.put_table(0, "inactive", big + "\n", True))
    assert len(list(tables.iterdir())) == 2
    store.close()

    (tables / "0123.table").write_text("a transaction that a crash cut short")
    store = state.StateStore(str(tmp_path))
    (dev,) = store.load()
    assert dev.live == state.SavedTable(big, False) and dev.inactive == state.SavedTable(big + "\n", True)
    assert len(list(tables.iterdir())) == 2       # the orphan is gone at start
    store.commit("resume", state.promote(0))      # the inactive file replaces the live one
    assert len(list(tables.iterdir())) == 1
    (dev,) = store.load()
    assert dev.live == state.SavedTable(big + "\n", True) and dev.inactive is None
    store.commit("remove", state.drop_device(0))
    assert list(tables.iterdir()) == []
    store.close()
