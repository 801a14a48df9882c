"""UID-only paths, atomic writes, the strict dataset walker."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom.filereader import read_file_meta_info

from dicomnode.codec.part10 import part10_header
from dicomnode.codec.walker import TruncatedError, walk
from dicomnode.errors import InvalidInstanceError
from dicomnode.store import MissingAttributeError, UndecodableError, read_meta
from dicomnode.store.files import atomic_write, instance_relpath, is_valid_uid
from dicomnode.store.parse import read_meta_fast
from tests.support.receive_node import dataset_bytes, make_instance


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "2.25.1" + "0" * 50])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.", ".1.2", "1..2", "1.2.3a", "../../etc",
                                 "1.2/3", "1.2.3 ", "1" * 65, "1.2\x00"])
def test_invalid_uids_never_reach_a_path(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidInstanceError):
        instance_relpath("1.2", uid, "1.3")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "x.dcm"
    assert atomic_write(p, [b"abc", b"def"]) == 6
    assert atomic_write(p, b"xyz") == 3
    assert p.read_bytes() == b"xyz"
    assert [q.name for q in p.parent.iterdir()] == ["x.dcm"]  # no temporary left


def _local_test_files() -> list[Path]:
    """pydicom's bundled files and pydicom-data's, without any download attempt."""
    dirs = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # pydicom-data: an optional (dev) dependency, imported if present

        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:  # pragma: no cover - pydicom-data is a dev dependency
        pass
    return sorted(p for d in dirs for p in d.glob("*.dcm"))


def _le_files() -> list[Path]:
    out = []
    for f in _local_test_files():
        try:
            ts = str(read_file_meta_info(f).TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - files without meta are not C-STORE payloads
            continue
        if ts not in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
            out.append(Path(f))
    return out


# Truncated on purpose in pydicom's test data: pydicom reads them leniently, the
# node must not acknowledge them.
KNOWN_CORRUPT = ["rtplan_truncated.dcm", "MR_truncated.dcm",
                 "emri_small_jpeg_2k_lossless_too_short.dcm"]


def test_fast_walker_agrees_with_pydicom_on_test_files() -> None:
    checked = 0
    corrupt: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in _le_files():
            data = f.read_bytes()
            if data[128:132] != b"DICM":
                continue
            ts = str(read_file_meta_info(f).TransferSyntaxUID)
            body = dataset_bytes(f)
            head = data[:len(data) - len(body)]
            try:
                slow = read_meta(data)
            except InvalidInstanceError as exc:
                with pytest.raises(type(exc)):
                    read_meta_fast(head, body, ts)
                continue
            try:
                fast = read_meta_fast(head, body, ts)
            except UndecodableError:
                corrupt.append(f.name)  # pydicom reads truncated files leniently
                continue
            assert fast == slow, f.name
            checked += 1
    assert checked > 40
    assert sorted(corrupt) == sorted(KNOWN_CORRUPT), corrupt


def test_truncated_dataset_is_undecodable(tmp_path: Path) -> None:
    p = make_instance(tmp_path / "x.dcm", rows=8)
    body = dataset_bytes(p)
    head = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    read_meta_fast(head, body, "1.2.840.10008.1.2.1")
    with pytest.raises(TruncatedError):
        walk(body[:-3], explicit=True, want=frozenset())
    with pytest.raises(UndecodableError):
        read_meta_fast(head, body[:-3], "1.2.840.10008.1.2.1")
    with pytest.raises(UndecodableError):
        read_meta_fast(head, b"\x08\x00\x16\x00UI\xff\xff" + b"1" * 10, "1.2.840.10008.1.2.1")
    nostudy = make_instance(tmp_path / "y.dcm", drop=["StudyInstanceUID"])
    with pytest.raises(MissingAttributeError, match="StudyInstanceUID"):
        read_meta_fast(head, dataset_bytes(nostudy), "1.2.840.10008.1.2.1")
