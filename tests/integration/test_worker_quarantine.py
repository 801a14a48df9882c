"""A stored file that cannot be read (truncated on disk) is left out of the volume,
quarantined with its reason, and the job succeeds on the rest: the worker against a
real store (SQLite file + alembic), the real ct-tissue model, dciodvfy on every
object, ``dicomnode db check`` afterwards."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomnode.domain import JobState
from dicomnode.store import Store
from dicomnode.store.parse import read_meta
from dicomnode.worker import Worker
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import Orthanc, dciodvfy, orthanc_running
from tests.support.pipeline_env import destination, ingest_series, pipeline_settings

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"], "send": ["pacs"]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Orthanc:
    with orthanc_running(workdir=tmp_path_factory.mktemp("orthanc")) as o:
        yield o


def test_truncated_file_is_quarantined_and_the_job_succeeds(tmp_path: Path,
                                                            pacs: Orthanc) -> None:
    ct = cranium_ct_series(k_range=(40, 60))
    settings = pipeline_settings(tmp_path, routes=[CT_RULE], destinations=[
        destination("pacs", pacs.dicom_port, pacs.aet)])
    with Store.open(settings, migrate=True) as store:
        v = ingest_series(store, list(ct.paths))
        refs = store.series_instances(ct.series_uid, v)
        assert len(refs) == 20
        bad = refs[0]  # an end of the stack: the other 19 stay regularly spaced
        data = Path(bad.path).read_bytes()
        Path(bad.path).write_bytes(data[:len(data) - 5000])  # cut in its pixel data
        rel = Path(bad.path).relative_to(store.root)
        job = store.enqueue(ct.series_uid, v)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        done = store.get_job(job.id)
        [ex] = done.notes["excluded"]  # type: ignore[misc]
        assert ex["reason"].startswith("unreadable: truncated"), ex
        assert ex["instances"] == [bad.sop_instance_uid]
        assert done.notes["quarantined"] == [bad.sop_instance_uid]
        # Moved aside with its reason; its row flagged, so the series no longer lists it.
        moved = store.root / "quarantine" / rel
        assert moved.read_bytes() == data[:len(data) - 5000]
        reason = moved.with_name(moved.name + ".reason.txt").read_text()
        assert reason.startswith("unreadable: truncated")
        assert not Path(bad.path).exists()
        left = store.series_instances(ct.series_uid, v)
        assert bad.sop_instance_uid not in {r.sop_instance_uid for r in left}
        assert len(left) == 19
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output
        seg = pydicom.dcmread(next(o.path for o in report.outputs if o.kind == "seg"))
        seg_refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                    for r in s.ReferencedInstanceSequence}
        assert len(seg_refs) == 19 and bad.sop_instance_uid not in seg_refs
        check = store.check()
        assert check.ok, check.problems
        assert check.counts["quarantined instances"] == 1
        # Start-up reconciliation leaves the quarantine alone (never re-indexed).
        rec = store.reconcile()
        assert not rec.indexed, rec
        assert store.check().ok
        # The sender sends the instance again: stored afresh, out of quarantine.
        meta = read_meta(data).with_peer("TESTSCU", "DICOMNODE")
        store.ingest(meta, data)
        assert Path(bad.path).read_bytes() == data
        assert len(store.series_instances(ct.series_uid)) == 20
        assert store.check().counts["quarantined instances"] == 0


def test_unreadable_slice_in_the_middle_fails_with_the_reason_and_is_quarantined(
        tmp_path: Path, pacs: Orthanc) -> None:
    """A gap in the middle of the stack makes the rest unusable: the job fails naming
    the unreadable file, which is still quarantined so that a re-send recovers."""
    ct = cranium_ct_series(k_range=(40, 50))
    settings = pipeline_settings(tmp_path, routes=[CT_RULE], destinations=[
        destination("pacs", pacs.dicom_port, pacs.aet)])
    with Store.open(settings, migrate=True) as store:
        v = ingest_series(store, list(ct.paths))
        refs = store.series_instances(ct.series_uid, v)
        bad = refs[5]
        data = Path(bad.path).read_bytes()
        Path(bad.path).write_bytes(data[:1000])  # cut in its header
        job = store.enqueue(ct.series_uid, v)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.FAILED, report
        assert report.error is not None and "unreadable: truncated" in report.error
        failed = store.get_job(job.id)
        assert failed.notes["quarantined"] == [bad.sop_instance_uid]
        rel = Path(bad.path).relative_to(store.root)
        assert (store.root / "quarantine" / rel).exists()
        assert store.check().ok
        # The modality sends the slice again: a new version, and its job succeeds.
        meta = read_meta(data).with_peer("TESTSCU", "DICOMNODE")
        v2 = store.ingest(meta, data).series_version
        store.enqueue(ct.series_uid, v2)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
