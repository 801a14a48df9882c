"""C-STORE dispatch against real peers: Orthanc, DCMTK storescp, a scripted pynetdicom SCP."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.compat.pynetdicom import guard_reactor_race
from dicomnode.config import DestinationConfig
from dicomnode.dispatch import AssociationFailed, OutcomeState, store_files
from dicomnode.errors import DispatchError
from tests.support.dispatch_peers import ScriptedSCP, storescp_running
from tests.support.peers import Orthanc, free_port, orthanc_running
from tests.support.series import write_series

SAMPLES = {
    "ct": "CT_small.dcm",  # explicit VR little endian
    "mr_rle": "MR_small_RLE.dcm",
    "emr_j2k": "emri_small_jpeg_2k_lossless.dcm",  # enhanced MR, multi-frame
    "sc_deflated": "image_dfl.dcm",  # deflated explicit VR little endian, odd stream length
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("samples")
    out = {}
    for key, name in SAMPLES.items():
        src = get_testdata_file(name)
        assert src, f"pydicom test file {name} missing"
        out[key] = Path(shutil.copy(src, d / name))
    # An implicit VR little endian CT with its own UIDs.
    ds = pydicom.dcmread(out["ct"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out["ct_implicit"] = d / "ct_implicit.dcm"
    ds.save_as(out["ct_implicit"], implicit_vr=True, little_endian=True)
    return out


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight small CT slices with distinct SOP Instance UIDs."""
    rng = np.random.default_rng(7)
    arr = rng.integers(-1000, 1000, size=(8, 32, 32)).astype(np.float32)
    return write_series(arr, tmp_path_factory.mktemp("ct"), modality="CT")


def dest(port: int, ae: str, **kw: object) -> DestinationConfig:
    return DestinationConfig(name="test", ae_title=ae, host="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc_running(workdir=tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def _same_dataset(a: Path, b: bytes | Path) -> None:
    """Equal data sets (file meta aside) and identical pixel bytes."""
    da = pydicom.dcmread(a)
    db = pydicom.dcmread(b if isinstance(b, Path) else pydicom.filebase.DicomBytesIO(b))
    assert da.file_meta.TransferSyntaxUID == db.file_meta.TransferSyntaxUID
    assert da.SOPInstanceUID == db.SOPInstanceUID
    if "PixelData" in da:
        assert da.PixelData == db.PixelData
    padding = pydicom.tag.Tag(0xFFFC, 0xFFFC)  # trailing padding: DCMTK drops it
    assert {e.tag for e in da} - {padding} == {e.tag for e in db} - {padding}


def test_orthanc_stores_every_file_as_sent(orthanc: Orthanc, samples: dict[str, Path]) -> None:
    paths = list(samples.values())
    result = store_files(dest(orthanc.dicom_port, orthanc.aet), paths, calling_ae_title="DICOMNODE")
    assert result.ok, [o.message for o in result.failed]
    assert result.associations == 1
    assert [o.path for o in result.outcomes] == paths
    for path, out in zip(paths, result.outcomes, strict=True):
        assert out.state is OutcomeState.STORED and out.status == 0
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert out.transfer_syntax == ds.file_meta.TransferSyntaxUID  # sent as stored
        found = orthanc.post("/tools/lookup", ds.SOPInstanceUID.encode())
        assert len(found) == 1 and found[0]["Type"] == "Instance"
        _same_dataset(path, orthanc.get(f"/instances/{found[0]['ID']}/file"))


def test_proposes_exactly_the_needed_contexts(samples: dict[str, Path]) -> None:
    scp = ScriptedSCP()
    with scp.running():
        result = store_files(dest(scp.port, scp.ae_title),
                             [samples["ct"], samples["mr_rle"], samples["emr_j2k"]])
    assert result.ok and scp.associations == 1
    assert scp.requested == [{
        (CTImageStorage, ExplicitVRLittleEndian),
        # fallback proposed only because CT data is uncompressed
        (CTImageStorage, ImplicitVRLittleEndian),
        (MRImageStorage, RLELossless),
        (EnhancedMRImageStorage, JPEG2000Lossless),
    }]
    assert [r.transfer_syntax for r in scp.received] == [
        ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless]


def test_storescp_refuses_compressed_without_transcoding(
    tmp_path: Path, samples: dict[str, Path]
) -> None:
    with storescp_running(tmp_path / "in") as scp:  # default: uncompressed syntaxes only
        result = store_files(dest(scp.port, scp.ae_title), [samples["ct"], samples["mr_rle"]])
        files = scp.files()
    ct, rle = result.outcomes
    assert ct.state is OutcomeState.STORED and ct.transfer_syntax == ExplicitVRLittleEndian
    assert rle.state is OutcomeState.FAILED and not rle.transient and rle.status is None
    assert "RLE Lossless" in rle.message and "never transcoded" in rle.message
    assert len(files) == 1
    _same_dataset(samples["ct"], files[0])


def test_storescp_implicit_only_gets_converted_uncompressed_data(
    tmp_path: Path, samples: dict[str, Path]
) -> None:
    with storescp_running(tmp_path / "in", "+xi") as scp:
        result = store_files(dest(scp.port, scp.ae_title),
                             [samples["ct"], samples["ct_implicit"], samples["sc_deflated"]])
        files = scp.files()
    assert result.ok, [o.message for o in result.failed]
    assert [o.transfer_syntax for o in result.outcomes] == [ImplicitVRLittleEndian] * 3
    assert len(files) == 3
    by_uid = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    for key in ("ct", "sc_deflated"):
        got = pydicom.dcmread(by_uid[pydicom.dcmread(samples[key]).SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        np.testing.assert_array_equal(got.pixel_array, pydicom.dcmread(samples[key]).pixel_array)


STATUS_CASES = [
    (0x0000, OutcomeState.STORED, False),
    (0xB000, OutcomeState.WARNING, False),
    (0xB007, OutcomeState.WARNING, False),
    (0xB006, OutcomeState.WARNING, False),
    (0xA700, OutcomeState.FAILED, True),
    (0xA7FF, OutcomeState.FAILED, True),
    (0xA900, OutcomeState.FAILED, False),
    (0xC000, OutcomeState.FAILED, False),
]


def test_every_status_is_checked(ct_series: list[Path]) -> None:
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_series]
    scp = ScriptedSCP(statuses={uid: code for uid, (code, _, _) in zip(uids, STATUS_CASES,
                                                                      strict=False)})
    with scp.running():
        result = store_files(dest(scp.port, scp.ae_title), ct_series[: len(STATUS_CASES)])
    assert scp.associations == 1
    for out, (code, state, transient) in zip(result.outcomes, STATUS_CASES, strict=True):
        assert out.status == code
        assert out.state is state, f"0x{code:04X}"
        if state is OutcomeState.FAILED:
            assert out.transient is transient, f"0x{code:04X}"
            assert f"0x{code:04X}" in out.message and "scripted status" in out.message
        if state is OutcomeState.WARNING:
            assert out.ok and f"0x{code:04X}" in out.message
    assert len(result.failed) == 4 and len(result.warnings) == 3


def test_unreadable_file_fails_alone(tmp_path: Path, ct_series: list[Path]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("not dicom")
    scp = ScriptedSCP()
    with scp.running():
        result = store_files(dest(scp.port, scp.ae_title), [ct_series[0], junk, ct_series[1]])
    ok1, bad, ok2 = result.outcomes
    assert ok1.ok and ok2.ok
    assert bad.state is OutcomeState.FAILED and not bad.transient
    assert "cannot read DICOM file meta" in bad.message
    assert len(scp.received) == 2


def test_calling_ae_title_from_destination(ct_series: list[Path]) -> None:
    scp = ScriptedSCP()
    with scp.running():
        store_files(dest(scp.port, scp.ae_title), ct_series[:1], calling_ae_title="NODE_A")
        store_files(dest(scp.port, scp.ae_title, calling_ae_title="ROUTER_B"), ct_series[:1],
                    calling_ae_title="NODE_A")
    assert [r.calling_aet for r in scp.received] == ["NODE_A", "ROUTER_B"]


def test_rejected_association_is_transient(ct_series: list[Path]) -> None:
    scp = ScriptedSCP(reject=True)
    with scp.running(), pytest.raises(AssociationFailed) as info:
        store_files(dest(scp.port, scp.ae_title), ct_series[:3])
    err = info.value
    assert isinstance(err, DispatchError) and err.transient
    assert "rejected the association" in str(err) and "Calling AE title not recognised" in str(err)
    assert len(err.outcomes) == 3
    assert all(o.state is OutcomeState.FAILED and o.transient for o in err.outcomes)
    assert scp.received == []


def test_peer_down_is_transient(ct_series: list[Path]) -> None:
    port = free_port()  # nothing listens here
    with pytest.raises(AssociationFailed) as info:
        store_files(dest(port, "NOBODY"), ct_series[:2])
    assert info.value.transient and "cannot connect" in str(info.value)
    assert [o.transient for o in info.value.outcomes] == [True, True]


def test_abort_mid_batch_keeps_acknowledged_outcomes(ct_series: list[Path]) -> None:
    # pynetdicom notices a peer's A-ABORT only when its DIMSE wait ends, hence
    # the short dimse_timeout.
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_series]
    scp = ScriptedSCP(abort_on={uids[2]})
    with scp.running(), pytest.raises(AssociationFailed) as info:
        store_files(dest(scp.port, scp.ae_title), ct_series[:5], dimse_timeout=2)
    states = [o.state for o in info.value.outcomes]
    assert states[:2] == [OutcomeState.STORED, OutcomeState.STORED]
    assert states[2:] == [OutcomeState.FAILED] * 3
    assert all(o.transient for o in info.value.outcomes[2:])
    assert "aborted" in str(info.value)


def test_more_than_128_contexts_split_into_associations(
    tmp_path: Path, samples: dict[str, Path]
) -> None:
    """70 SOP classes x (stored syntax + implicit fallback) = 140 contexts > 128."""
    from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

    classes = sorted(_STORAGE_CLASSES.values())[:70]
    paths = []
    for i, sop_class in enumerate(classes):
        ds = pydicom.dcmread(samples["ct"])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1])
    scp = ScriptedSCP()
    with scp.running():
        result = store_files(dest(scp.port, scp.ae_title), paths)
    assert result.ok and result.associations == 2 and scp.associations == 2
    assert all(len(r) <= 128 for r in scp.requested)
    assert sorted(len(r) for r in scp.requested) == [12, 128]
    assert len(scp.received) == 70


def test_peer_refusing_every_context_is_permanent_per_file(
    tmp_path: Path, samples: dict[str, Path]
) -> None:
    # storescp takes only uncompressed syntaxes: an RLE-only batch gets an
    # association with no accepted context, which no retry can fix.
    with storescp_running(tmp_path / "in") as scp:
        result = store_files(dest(scp.port, scp.ae_title), [samples["mr_rle"]])
    (out,) = result.outcomes
    assert out.state is OutcomeState.FAILED and not out.transient
    assert "accepted no presentation context" in out.message and "RLE Lossless" in out.message


def test_guard_hands_stolen_responses_back(ct_series: list[Path]) -> None:
    """A C-STORE-RSP dequeued by pynetdicom's reactor goes back to the DIMSE queue.

    (The race itself needs a loaded machine to show; here the reactor's hand-off
    is driven directly on a live association.)
    """
    scp = ScriptedSCP()
    with scp.running():
        ae = AE(ae_title="GUARD")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        try:
            guard_reactor_race(assoc)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = 1
            rsp.AffectedSOPClassUID = CTImageStorage
            rsp.AffectedSOPInstanceUID = "1.2.3"
            rsp.Status = 0x0000
            assert rsp.is_valid_response and not rsp.is_valid_request
            assoc._serve_request(rsp, 1)  # what the reactor does with a stolen message
            assert assoc.dimse.get_msg(block=False) == (1, rsp)
            # The association still works afterwards.
            assert assoc.send_c_store(ct_series[0]).Status == 0
        finally:
            assoc.release()
