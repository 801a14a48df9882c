"""The SCP against real peers: pynetdicom SCU, DCMTK storescu/echoscu, node as a process."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from dicomnode.store import Store
from tests.support.peers import dcmtk
from tests.support.receive_node import (
    MR_IMAGE,
    NodeProcess,
    dataset_bytes,
    echo,
    make_instance,
    start_node,
    store_files,
    try_associate,
)

ALLOWED = ["TESTSCU", "STORESCU", "ECHOSCU"]

# One file per transfer syntax family (pydicom's bundled test files / pydicom-data).
TS_FILES = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",  # implicit VR LE
    "1.2.840.10008.1.2.1": "CT_small.dcm",  # explicit VR LE
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",  # explicit VR BE (retired)
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",  # deflated explicit VR LE
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg.dcm",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_08.dcm",  # JPEG-LS near (UIDs added)
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",  # RLE
}
OTHER_FILES = [
    "test-SR.dcm",  # Comprehensive SR
    "emri_small.dcm",  # enhanced MR, multi-frame
    "liver_expb.dcm",  # Segmentation (big endian)
    "gdcm-US-ALOKA-16.dcm",  # ultrasound
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    n = start_node(tmp_path_factory.mktemp("node"), node={"allowed_calling_aets": ALLOWED})
    yield n
    assert n.stop() == 0, n.log()[-2000:]


def _stored(node: NodeProcess, sop_uid: str) -> Path | None:
    with Store.open(node.settings) as store:
        for study in store.studies():
            for se in study.series:
                for ref in store.series_instances(se.series_uid):
                    if ref.sop_instance_uid == sop_uid:
                        return ref.path
    return None


def _sop_uid(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def test_echo_pynetdicom_and_dcmtk(node: NodeProcess) -> None:
    assert echo(node.port) == 0x0000
    r = dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert r.returncode == 0, r.stderr


def _with_uids(src: Path, dst: Path) -> Path:
    """Copy of a test file lacking Study/Series UIDs, with them added (pixel data untouched)."""
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_every_transfer_syntax_arrives_byte_identical(node: NodeProcess, tmp_path: Path) -> None:
    paths = [Path(get_testdata_file(name)) for name in [*TS_FILES.values(), *OTHER_FILES]]
    paths = [_with_uids(p, tmp_path / p.name) if p.name.startswith("JPEGLSNear") else p
             for p in paths]
    for ts, p in zip(TS_FILES, paths, strict=False):
        assert str(read_file_meta_info(p).TransferSyntaxUID) == ts, p
    # Several of these files share a SOP Instance UID (one instance in several
    # transfer syntaxes), so each is checked right after it arrives.
    for p in paths:
        assert store_files(node.port, [p]) == [(p, 0x0000)], p.name
        stored = _stored(node, _sop_uid(p))
        assert stored is not None and stored.is_file(), p
        assert dataset_bytes(stored) == dataset_bytes(p), f"{p.name} was changed on the way"
        meta = read_file_meta_info(stored)
        assert str(meta.TransferSyntaxUID) == str(read_file_meta_info(p).TransferSyntaxUID)


def test_dcmtk_storescu_series(node: NodeProcess, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    files = [make_instance(tmp_path / f"{i}.dcm", study_uid=study, series_uid=series,
                           instance_number=i + 1) for i in range(5)]
    r = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
              *[str(f) for f in files])
    assert r.returncode == 0, r.stderr + r.stdout
    with Store.open(node.settings) as store:
        refs = store.series_instances(series)
    assert [ref.instance_number for ref in refs] == [1, 2, 3, 4, 5]
    assert {ref.sop_instance_uid for ref in refs} == {_sop_uid(f) for f in files}


def test_dcmtk_storescu_compressed(node: NodeProcess) -> None:
    p = Path(get_testdata_file("JPEG2000.dcm"))
    r = dcmtk("storescu", "-xw", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(p))
    assert r.returncode == 0, r.stderr + r.stdout
    stored = _stored(node, _sop_uid(p))
    assert stored is not None
    # DCMTK re-encodes the header on its way out; the compressed frames must be untouched.
    got, sent = dcmread(stored), dcmread(p)
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert got.PixelData == sent.PixelData


def test_calling_aet_not_allowed_is_rejected(node: NodeProcess) -> None:
    res = try_associate(node.port, "DICOMNODE", "INTRUDER")
    assert res.rejected and not res.established
    # A-ASSOCIATE-RJ: rejected-permanent, service user, calling AE title not recognised.
    assert (res.result, res.source, res.reason) == (1, 1, 3)
    r = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert r.returncode != 0
    assert echo(node.port) == 0x0000  # still serving


def test_wrong_called_aet_is_rejected(node: NodeProcess) -> None:
    res = try_associate(node.port, "NOTTHENODE", "TESTSCU")
    assert res.rejected
    # rejected-permanent, service user, called AE title not recognised.
    assert (res.result, res.source, res.reason) == (1, 1, 7)
    assert echo(node.port) == 0x0000


def test_bad_inputs_get_failure_statuses(node: NodeProcess, tmp_path: Path) -> None:
    ok = make_instance(tmp_path / "ok.dcm")
    cases = {
        "garbage": (make_instance(tmp_path / "garbage.dcm",
                                  raw_dataset=b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 64),
                    0xC210),
        "no_study": (make_instance(tmp_path / "nostudy.dcm", drop=["StudyInstanceUID"]), 0xC220),
        "no_series": (make_instance(tmp_path / "noseries.dcm", drop=["SeriesInstanceUID"]),
                      0xC220),
        "no_sop_uid": (make_instance(tmp_path / "nosop.dcm", drop=["SOPInstanceUID"],
                                     meta_sop_uid=generate_uid()), 0xC220),
        "bad_uid": (make_instance(tmp_path / "baduid.dcm", study_uid="1.2.3/../../etc"), 0xC221),
        "class_mismatch": (make_instance(tmp_path / "mismatch.dcm", sop_class=MR_IMAGE,
                                         meta_sop_class="1.2.840.10008.5.1.4.1.1.2"), 0xA900),
        "instance_mismatch": (make_instance(tmp_path / "instmismatch.dcm",
                                            meta_sop_uid=generate_uid()), 0xA900),
    }
    for name, (path, expected) in cases.items():
        results = store_files(node.port, [path, ok])
        assert results[0][1] == expected, f"{name}: got {results[0][1]}"
        assert results[1][1] == 0x0000, f"{name}: association broken afterwards"
    assert not any((node.settings.storage.path).rglob("*etc*"))
    assert echo(node.port) == 0x0000
    assert node.alive()
    assert "0xC221" in node.log() and "calling_aet=TESTSCU" in node.log()


def test_duplicate_replaces_without_second_row(node: NodeProcess, tmp_path: Path) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    a = make_instance(tmp_path / "a.dcm", study_uid=study, series_uid=series, sop_uid=sop,
                      instance_number=1)
    b = make_instance(tmp_path / "b.dcm", study_uid=study, series_uid=series, sop_uid=sop,
                      instance_number=7)
    assert [s for _, s in store_files(node.port, [a, b])] == [0, 0]
    with Store.open(node.settings) as store:
        refs = store.series_instances(series)
    assert len(refs) == 1 and refs[0].instance_number == 7  # default policy: replace
    assert dataset_bytes(refs[0].path) == dataset_bytes(b)


def test_full_disk_answers_a700(tmp_path: Path) -> None:
    n = start_node(tmp_path / "full", storage={"min_free_mb": 10**9})
    try:
        f = make_instance(tmp_path / "x.dcm")
        assert store_files(n.port, [f]) == [(f, 0xA700)]
        assert not list((tmp_path / "full" / "storage").rglob("*.dcm"))
        assert echo(n.port) == 0x0000
    finally:
        assert n.stop() == 0
    assert "disk space below minimum" in n.log()
