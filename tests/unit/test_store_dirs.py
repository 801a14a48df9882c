"""files.ensure_dir: a folder is remembered only while it is one; a file in the way is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomnode.store.files import atomic_write, ensure_dir


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
