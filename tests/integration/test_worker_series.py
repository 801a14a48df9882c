"""Series as scanners send them, and routes decide: the worker against a real store
(SQLite file + alembic), the real ct-tissue model, Orthanc as the PACS, dciodvfy on
every object, and the ``dicomnode jobs show`` / ``jobs list`` commands."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from dicomnode.cli import main
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.domain import JobState
from dicomnode.infer import resolve_models_dir
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.support.infer_data import cranium_ct_series, load_colin27
from tests.support.peers import Orthanc, dciodvfy, orthanc_running
from tests.support.pipeline_env import (
    destination,
    ingest_series,
    orthanc_by_modality,
    pipeline_settings,
    write_config,
)
from tests.support.series import CORONAL, write_series

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"], "send": ["pacs"]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Orthanc:
    with orthanc_running(workdir=tmp_path_factory.mktemp("orthanc")) as o:
        yield o


@pytest.fixture(scope="module")
def ct() -> object:
    """20 real CT slices (InVesalius Cranium, 256 x 256)."""
    return cranium_ct_series(k_range=(40, 60))


def _config(tmp: Path, pacs: Orthanc, routes: list[dict], **kw: object) -> dict:
    return dict(routes=routes, destinations=[destination("pacs", pacs.dicom_port, pacs.aet)],
                **kw)


def _open(tmp: Path, pacs: Orthanc, routes: list[dict], **kw: object) -> Store:
    return Store.open(pipeline_settings(tmp, **_config(tmp, pacs, routes, **kw)),  # type: ignore[arg-type]
                      migrate=True)


def _scout(tmp: Path, fx: object, number: int = 1) -> Path:
    """A LOCALIZER image of the same series, as a scanner puts it in: coronal, 512 x 512."""
    first = pydicom.dcmread(fx.paths[0])  # type: ignore[attr-defined]
    [p] = write_series(np.full((1, 64, 64), -500.0), tmp / "scout", modality="CT",
                       orientation=CORONAL, study_uid=first.StudyInstanceUID,
                       series_uid=first.SeriesInstanceUID,
                       frame_of_reference_uid=first.FrameOfReferenceUID,
                       patient_name=str(first.PatientName), patient_id=first.PatientID,
                       accession_number=first.AccessionNumber)
    ds = pydicom.dcmread(p)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = number
    ds.save_as(p)
    return p


def _texts(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT content item of an SR, however deep."""
    out = [str(ds.TextValue)] if "TextValue" in ds else []
    for el in ds:
        if el.VR == "SQ":
            for item in el.value:
                out += _texts(item)
    return out


def _cli(tmp: Path, pacs: Orthanc, routes: list[dict], capsys: pytest.CaptureFixture[str],
         *args: str, **kw: object) -> str:
    cfg = write_config(tmp, **_config(tmp, pacs, routes, **kw))  # type: ignore[arg-type]
    capsys.readouterr()
    assert main(["-c", str(cfg), *args]) == 0
    return capsys.readouterr().out


def test_scout_mixed_in_is_left_out_and_reported(tmp_path: Path, pacs: Orthanc, ct: object,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    scout = _scout(tmp_path, ct)
    scout_uid = str(pydicom.dcmread(scout).SOPInstanceUID)
    with _open(tmp_path, pacs, [CT_RULE]) as store:
        v = ingest_series(store, [scout, *ct.paths])  # type: ignore[attr-defined]
        job = store.enqueue(ct.series_uid, v)  # type: ignore[attr-defined]
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        done = store.get_job(job.id)
        assert done.last_error is None
        [ex] = done.notes["excluded"]  # type: ignore[misc]
        assert ex["reason"] == "LOCALIZER (scout) image" and ex["instances"] == [scout_uid]
        assert ex["models"] == ["ct-tissue"]
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output
        seg = pydicom.dcmread(next(o.path for o in report.outputs if o.kind == "seg"))
        refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                for r in s.ReferencedInstanceSequence}
        assert len(refs) == 20 and scout_uid not in refs
        sr = pydicom.dcmread(next(o.path for o in report.outputs if o.kind == "sr"))
        assert "left out: 1 image: LOCALIZER (scout) image" in _texts(sr)
    out = _cli(tmp_path, pacs, [CT_RULE], capsys, "jobs", "show", str(job.id))
    assert "left out of the volume:\n    1 image: LOCALIZER (scout) image (for ct-tissue)" in out


def test_late_scout_does_not_supersede_a_good_result(tmp_path: Path, pacs: Orthanc,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fx = cranium_ct_series(k_range=(60, 75))
    with _open(tmp_path, pacs, [CT_RULE]) as store:
        v1 = ingest_series(store, fx.paths)
        first = store.enqueue(fx.series_uid, v1)
        worker = Worker(store.settings, store)
        assert worker.poll_once().state is JobState.DONE  # type: ignore[union-attr]
        Dispatcher(store.settings, store).poll_once()
        # The scanner sends the scout afterwards: version 2 of the series.
        v2 = ingest_series(store, [_scout(tmp_path, fx, number=0)])
        assert v2 == v1 + 1
        second = store.enqueue(fx.series_uid, v2)
        assert store.get_job(first.id).state is JobState.SUPERSEDED
        report = worker.poll_once()
        assert report is not None and report.job_id == second.id
        assert report.state is JobState.SKIPPED, report
        assert not report.outputs and not store.list_deliveries(job_id=second.id)
        skipped = store.get_job(second.id)
        assert skipped.notes["skipped"] == (
            "version 2 added only images left out of the volume (1 image: LOCALIZER (scout) "
            f"image); the result of job {first.id} (version 1) stays current")
        # The good result is current again: done, superseded by nothing.
        again = store.get_job(first.id)
        assert again.state is JobState.DONE and store.job_superseded_by(first.id) is None
        assert len(store.job_outputs(first.id)) == 2
        assert Dispatcher(store.settings, store).poll_once() == []
        held = orthanc_by_modality(pacs, fx.study_uid)
        assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
        # Run again by an operator: skipped again, the first stays current.
        store.retry_job(second.id)
        assert worker.poll_once().state is JobState.SKIPPED  # type: ignore[union-attr]
        assert store.get_job(first.id).state is JobState.DONE
    out = _cli(tmp_path, pacs, [CT_RULE], capsys, "jobs", "list")
    assert f"job {second.id:<6} skipped" in out and "stays current" in out
    assert f"job {first.id:<6} done" in out


def test_late_real_slice_still_supersedes(tmp_path: Path, pacs: Orthanc) -> None:
    fx = cranium_ct_series(k_range=(75, 90))
    with _open(tmp_path, pacs, [CT_RULE]) as store:
        v1 = ingest_series(store, fx.paths[:-1])
        first = store.enqueue(fx.series_uid, v1)
        worker = Worker(store.settings, store)
        assert worker.poll_once().state is JobState.DONE  # type: ignore[union-attr]
        v2 = ingest_series(store, fx.paths[-1:])
        second = store.enqueue(fx.series_uid, v2)
        assert worker.poll_once().state is JobState.DONE  # type: ignore[union-attr]
        assert store.get_job(first.id).state is JobState.SUPERSEDED
        assert store.job_superseded_by(first.id) == second.id


def _model_copy(tmp: Path, **applies_to: object) -> Path:
    """models/ct-tissue with its manifest's applies_to changed (same weights)."""
    src = resolve_models_dir(None) / "ct-tissue"
    dest = tmp / "models" / "ct-tissue"
    shutil.copytree(src, dest)
    data = yaml.safe_load((dest / "model.yaml").read_text())
    data["applies_to"].update(applies_to)
    (dest / "model.yaml").write_text(yaml.safe_dump(data))
    return dest.parent


def test_route_runs_a_model_whose_soft_hints_do_not_match(tmp_path: Path, pacs: Orthanc,
                                                          ct: object) -> None:
    models = _model_copy(tmp_path, series_description="^knee mri$", body_parts=["KNEE"])
    with _open(tmp_path, pacs, [CT_RULE], models={"path": str(models)}) as store:
        v = ingest_series(store, ct.paths)  # type: ignore[attr-defined]
        job = store.enqueue(ct.series_uid, v)  # type: ignore[attr-defined]
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        assert report.models == ("ct-tissue",) and len(report.outputs) == 2
        assert "refused" not in store.get_job(job.id).notes
    # Without routes (the embedded default) the same hints select: the model does not run.
    with _open(tmp_path / "default", pacs, [], models={"path": str(models)}) as store:
        v = ingest_series(store, ct.paths)  # type: ignore[attr-defined]
        store.enqueue(ct.series_uid, v)  # type: ignore[attr-defined]
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE
        assert report.models == () and not report.outputs


def test_hard_constraint_refuses_a_routed_model(tmp_path: Path, pacs: Orthanc, ct: object,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    models = _model_copy(tmp_path, planes=["sagittal"])
    kw = {"models": {"path": str(models)}}
    with _open(tmp_path, pacs, [CT_RULE], **kw) as store:
        v = ingest_series(store, ct.paths)  # type: ignore[attr-defined]
        job = store.enqueue(ct.series_uid, v)  # type: ignore[attr-defined]
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.FAILED
        failed = store.get_job(job.id)
        assert "ct-tissue does not apply to this series: hard constraint applies_to.planes: " \
               "no sagittal stack" in (failed.last_error or "")
        [refused] = failed.notes["refused"]  # type: ignore[misc]
        assert refused["constraint"] == "applies_to.planes"
    out = _cli(tmp_path, pacs, [CT_RULE], capsys, "jobs", "show", str(job.id), **kw)
    assert "models refused:\n    ct-tissue: applies_to.planes: no sagittal stack" in out
    assert "failed attempts: 1" in out


def test_errors_of_earlier_attempts_are_history_once_the_job_succeeds(
        tmp_path: Path, pacs: Orthanc, ct: object, capsys: pytest.CaptureFixture[str]) -> None:
    kw = {"worker": {"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.2}}
    with _open(tmp_path, pacs, [CT_RULE], **kw) as store:
        v = ingest_series(store, ct.paths)  # type: ignore[attr-defined]
        job = store.enqueue(ct.series_uid, v)  # type: ignore[attr-defined]
        # The job's output folder cannot be created (a file is in the way): OSError.
        blocker = store.root / "outputs" / f"job-{job.id}"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        worker = Worker(store.settings, store)
        assert worker.poll_once().state is JobState.PENDING  # type: ignore[union-attr]
        assert store.get_job(job.id).last_error
        blocker.unlink()
        report = None
        for _ in range(100):  # the backoff is 0.2 s
            report = worker.poll_once()
            if report is not None:
                break
            time.sleep(0.05)
        assert report is not None and report.state is JobState.DONE, report
        done = store.get_job(job.id)
        assert done.last_error is None and done.attempts == 2
        [earlier] = done.attempt_log
        assert earlier["attempt"] == 1 and earlier["transient"] is True
        assert "job-" in str(earlier["error"])
    out = _cli(tmp_path, pacs, [CT_RULE], capsys, "jobs", "show", str(job.id), **kw)
    assert "error:" not in out.splitlines()[0]
    assert "failed attempts: 1" in out and "attempt 1 at " in out
    shown = json.loads(_cli(tmp_path, pacs, [CT_RULE], capsys, "jobs", "show", str(job.id),
                            "--json", **kw))
    assert shown["error"] is None and shown["state"] == "done"
    assert [a["attempt"] for a in shown["attempt_log"]] == [1]


def test_models_asking_for_different_stacks_each_get_theirs(tmp_path: Path, pacs: Orthanc
                                                            ) -> None:
    # One CT series covered in two acquisitions: ct-tissue takes the whole stack, a
    # second model (same graph) asks for the last acquisition only.
    fx = cranium_ct_series(tmp_path / "src", k_range=(30, 50))
    for k, p in enumerate(fx.paths):
        ds = pydicom.dcmread(p)
        ds.AcquisitionNumber = 1 if k < 12 else 2
        ds.save_as(p)
    models = _model_copy(tmp_path)
    late = models / "ct-late"
    shutil.copytree(models / "ct-tissue", late)
    data = yaml.safe_load((late / "model.yaml").read_text())
    data["name"] = "ct-late"
    data["input"]["stack"] = {"split_by": "acquisition", "select": "last"}
    (late / "model.yaml").write_text(yaml.safe_dump(data))
    rule = {**CT_RULE, "models": ["ct-tissue", "ct-late"]}
    with _open(tmp_path, pacs, [rule], models={"path": str(models)}) as store:
        v = ingest_series(store, fx.paths)
        job = store.enqueue(fx.series_uid, v)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        assert report.models == ("ct-tissue", "ct-late") and len(report.outputs) == 4
        segs = [pydicom.dcmread(o.path) for o in report.outputs if o.kind == "seg"]
        counts = sorted(len({r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                             for r in s.ReferencedInstanceSequence}) for seg in segs)
        assert counts == [8, 20]
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output
        [ex] = store.get_job(job.id).notes["excluded"]  # type: ignore[misc]
        assert ex["models"] == ["ct-late"] and ex["count"] == 12
        assert ex["reason"] == "another stack: AcquisitionNumber 1 (the volume is " \
                               "AcquisitionNumber 2)"


def test_routed_deepbet_runs_on_a_t1_whatever_its_description_with_a_scout_in_it(
        tmp_path: Path, pacs: Orthanc) -> None:
    # The case: "GEOM a_axial_inf2sup" does not match deepbet-brain's description
    # hint, and a LOCALIZER sits in the series; the route names the model: it runs.
    raw = load_colin27()
    paths = write_series(raw.array, tmp_path / "t1", modality="MR", spacing=raw.spacing,
                         orientation=raw.orientation, origin=tuple(raw.origin),
                         series_description="GEOM a_axial_inf2sup")
    first = pydicom.dcmread(paths[0])
    scout = tmp_path / "scout.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.InstanceNumber = 0
    ds.save_as(scout)
    rule = {"name": "brain", "when": {"Modality": "MR"}, "models": ["deepbet-brain"],
            "send": ["pacs"]}
    with _open(tmp_path, pacs, [rule]) as store:
        v = ingest_series(store, [scout, *paths])
        job = store.enqueue(str(first.SeriesInstanceUID), v)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        assert report.models == ("deepbet-brain",)
        done = store.get_job(job.id)
        assert done.last_error is None and "refused" not in done.notes
        assert [e["reason"] for e in done.notes["excluded"]] == [  # type: ignore[union-attr]
            "LOCALIZER (scout) image"]
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output


def test_a_series_of_scouts_only_fails_with_the_reason(tmp_path: Path, pacs: Orthanc) -> None:
    paths = write_series(np.full((4, 32, 32), 100.0), tmp_path / "scouts", modality="CT",
                         orientation=CORONAL)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(p)
    with _open(tmp_path, pacs, [CT_RULE]) as store:
        v = ingest_series(store, paths)
        job = store.enqueue(str(pydicom.dcmread(paths[0]).SeriesInstanceUID), v)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.FAILED
        assert store.get_job(job.id).last_error == (
            "volume: no image of the series can be part of a volume: 4 images: LOCALIZER "
            "(scout) image")
