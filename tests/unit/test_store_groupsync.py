"""Group commit of durability (files.GroupSync / DirSync) and files.ensure_dir."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from dicomnode.store import files
from dicomnode.store.files import DirSync, GroupSync, atomic_write, ensure_dir


def _wait_until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def test_waiter_arriving_during_a_flush_needs_the_next_flush() -> None:
    """B writes while A's flush runs: that flush began before B's write, so B
    must wait for a second flush, which must begin after B's write."""
    release_first = threading.Event()
    first_started = threading.Event()
    written = 0  # "writes" so far; a flush covers those made before it began
    covered: list[int] = []  # per flush, the writes made before it began
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            covered.append(written)
        if len(covered) == 1:
            first_started.set()
            assert release_first.wait(10)

    g = GroupSync(flush)
    returned: dict[str, int] = {}

    def writer(name: str) -> None:
        nonlocal written
        with lock:
            written += 1
            mine = written
        g.sync()
        with lock:
            returned[name] = mine
            # Some finished flush began after this write.
            assert max(covered) >= mine

    a = threading.Thread(target=writer, args=("a",))
    a.start()
    assert first_started.wait(10)
    b = threading.Thread(target=writer, args=("b",))
    b.start()
    _wait_until(lambda: g.waits == 2)  # B is inside sync(), behind the running flush
    time.sleep(0.05)
    assert "b" not in returned  # not answered by the flush that began before its write
    release_first.set()
    a.join(10)
    b.join(10)
    assert returned == {"a": 1, "b": 2}
    assert covered == [1, 2]
    assert g.flushes == 2


def test_waiters_behind_a_running_flush_share_one_flush() -> None:
    release = threading.Event()
    started = threading.Event()
    calls = 0

    def flush() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            assert release.wait(10)

    g = GroupSync(flush)
    leader = threading.Thread(target=g.sync)
    leader.start()
    assert started.wait(10)
    followers = [threading.Thread(target=g.sync) for _ in range(6)]
    for t in followers:
        t.start()
    _wait_until(lambda: g.waits == 7)
    release.set()
    for t in [leader, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert calls == 2  # the leader's flush, then one for all six followers


def test_a_failed_flush_fails_its_waiters_only() -> None:
    fail = True

    def flush() -> None:
        if fail:
            raise OSError(5, "Input/output error")

    g = GroupSync(flush)
    with pytest.raises(OSError, match="Input/output"):
        g.sync()
    fail = False
    g.sync()  # the next flush succeeds: no stale error
    assert g.flushes == 2


def test_non_os_error_in_flush_reaches_the_waiter_as_oserror() -> None:
    def flush() -> None:
        raise RuntimeError("boom")

    with pytest.raises(OSError, match="boom"):
        GroupSync(flush).sync()


def test_dir_sync_fsyncs_every_noted_folder_and_retries_failed_ones(tmp_path: Path) -> None:
    synced: list[Path] = []
    broken = {tmp_path / "b"}

    def fsync_dir(p: Path) -> None:
        if p in broken:
            raise OSError(5, f"cannot fsync {p}")
        synced.append(p)

    ds = DirSync(fsync_dir)
    ds.sync(tmp_path / "a")
    assert synced == [tmp_path / "a"]
    with pytest.raises(OSError):
        ds.sync(tmp_path / "b")
    broken.clear()
    ds.sync(tmp_path / "c")  # the folder whose fsync failed is flushed again
    assert synced[-2:] == [tmp_path / "b", tmp_path / "c"]


def test_concurrent_atomic_writes_with_shared_dir_sync(tmp_path: Path) -> None:
    ds = DirSync()

    def work(i: int) -> None:
        for k in range(20):
            p = tmp_path / f"s{i}" / f"{k}.dcm"
            tmp, _ = files.write_temp(p, [b"x" * 1000, str(k).encode()])
            files.commit_temp(tmp, p, dir_sync=ds)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for i in range(3):
        names = sorted(q.name for q in (tmp_path / f"s{i}").iterdir())
        assert names == sorted(f"{k}.dcm" for k in range(20))  # no temporary left
        assert (tmp_path / f"s{i}" / "7.dcm").read_bytes() == b"x" * 1000 + b"7"
    assert ds.group.waits == 60
    assert ds.group.flushes <= 60


def test_ensure_dir_refuses_a_file_in_the_way_and_does_not_remember_it(tmp_path: Path) -> None:
    blocker = tmp_path / "study"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match="study"):
        ensure_dir(blocker)
    with pytest.raises(NotADirectoryError):  # still refused: not remembered as made
        ensure_dir(blocker)
    with pytest.raises(NotADirectoryError):  # a file in the middle of the path, too
        ensure_dir(blocker / "series")
    blocker.unlink()
    ensure_dir(blocker / "series")
    assert (blocker / "series").is_dir()


def test_ensure_dir_makes_a_remembered_folder_again_after_it_was_deleted(tmp_path: Path) -> None:
    d = tmp_path / "study" / "series"
    ensure_dir(d)
    shutil.rmtree(tmp_path / "study")
    ensure_dir(d)
    assert d.is_dir()
    shutil.rmtree(tmp_path / "study")
    assert atomic_write(d / "x.dcm", b"abc") == 3
    assert (d / "x.dcm").read_bytes() == b"abc"
    # Deleted and replaced by a file: a clear error, not a later write failure.
    shutil.rmtree(tmp_path / "study")
    (tmp_path / "study").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        ensure_dir(d)
