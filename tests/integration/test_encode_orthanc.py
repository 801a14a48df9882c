"""SEG, SR and SC sent to a real PACS (Orthanc) by C-STORE land in the source study."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context

from dicomnode.encode import EncodeOptions, encode_results
from tests.support.encode_data import phantom, seg_result, volume_from_paths
from tests.support.peers import orthanc_running
from tests.support.series import oblique, write_series

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")


def _send(datasets: list[pydicom.Dataset], port: int, aet: str) -> list[int]:
    ae = AE(ae_title="DICOMNODE")
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    ae.requested_contexts = [build_context(c, [t]) for c, t in contexts]
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established, "Orthanc refused the association"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_seg_sr_and_sc_stored_in_the_source_study(tmp_path: Path) -> None:
    paths = write_series(phantom((10, 32, 36), "CT"), tmp_path / "ct",
                         orientation=oblique(15.0), spacing=(2.0, 0.8, 0.8))
    result = seg_result(volume_from_paths(paths))
    objects = encode_results(result, formats=("seg", "sr", "sc"),
                             options=EncodeOptions(sc_max_images=2))
    assert [str(d.Modality) for d in objects] == ["SEG", "SR", "OT", "OT"]
    with orthanc_running(workdir=tmp_path / "orthanc") as orthanc:
        for p in paths:
            orthanc.upload(p)
        assert _send(objects, orthanc.dicom_port, orthanc.aet) == [0x0000] * 4
        # Re-sending the same result replaces, it does not duplicate.
        again = encode_results(result, formats=("seg", "sr", "sc"),
                               options=EncodeOptions(sc_max_images=2))
        assert _send(again, orthanc.dicom_port, orthanc.aet) == [0x0000] * 4

        found = orthanc.post("/tools/lookup", result.volume.study_uid.encode())
        studies = [f for f in found if f["Type"] == "Study"]
        assert len(studies) == 1, found
        series = orthanc.get(f"/studies/{studies[0]['ID']}/series")
        by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
        assert set(by_modality) == {"CT", "SEG", "SR", "OT"}
        assert len(by_modality["CT"]["Instances"]) == 10
        assert len(by_modality["OT"]["Instances"]) == 2
        for ds in objects:
            s = by_modality[str(ds.Modality)]
            assert s["MainDicomTags"]["SeriesInstanceUID"] == ds.SeriesInstanceUID
            assert len(s["Instances"]) == (2 if ds.Modality == "OT" else 1)
            sop_uids = set()
            for inst in s["Instances"]:
                tags = orthanc.get(f"/instances/{inst}/simplified-tags")
                sop_uids.add(tags["SOPInstanceUID"])
            assert ds.SOPInstanceUID in sop_uids
            tags = orthanc.get(f"/instances/{s['Instances'][0]}/simplified-tags")
            assert tags["StudyInstanceUID"] == result.volume.study_uid
            assert tags["PatientID"] == "DN-TEST-001"
            assert tags["SeriesDescription"] == str(ds.SeriesDescription)
