"""The worker pipeline in-process against a real store (SQLite + files), real models and a
real PACS (Orthanc): routing actions, failures, leases, supersession and the dispatcher."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.domain import DeliveryState, JobState
from dicomnode.errors import VolumeError
from dicomnode.store import Store
from dicomnode.worker import Pipeline, Worker, _Heartbeat, classify
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import Orthanc, dciodvfy, free_port, orthanc_running
from tests.support.pipeline_env import (
    destination,
    ingest_series,
    orthanc_by_modality,
    pipeline_settings,
)
from tests.support.series import write_series

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct-tissue", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
           "send": ["pacs"]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Orthanc:
    with orthanc_running(workdir=tmp_path_factory.mktemp("orthanc")) as o:
        yield o


@pytest.fixture(scope="module")
def ct_small() -> object:
    """20 real CT slices (InVesalius Cranium, 256 x 256)."""
    return cranium_ct_series(k_range=(40, 60))


def _open(tmp: Path, pacs_port: int, pacs_aet: str, routes: list[dict], **kw: object) -> Store:
    settings = pipeline_settings(tmp, routes=routes,
                                 destinations=[destination("pacs", pacs_port, pacs_aet,
                                                           **kw.pop("dest", {}))],  # type: ignore[arg-type]
                                 **kw)  # type: ignore[arg-type]
    return Store.open(settings, migrate=True)


def _job(store: Store, fx: object) -> int:
    v = ingest_series(store, fx.paths)  # type: ignore[attr-defined]
    return store.enqueue(fx.series_uid, v).id  # type: ignore[attr-defined]


def test_ct_job_outputs_deliveries_and_pacs(tmp_path: Path, pacs: Orthanc, ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        job_id = _job(store, ct_small)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, report
        assert report.rule == "routes[0] (ct-tissue)"
        assert {o.kind for o in report.outputs} == {"seg", "sr"}
        for key in ("route", "load", "model", "encode", "write", "finish"):
            assert key in report.timings
        # Outputs and deliveries were recorded with the job, one per (object, destination).
        assert [o.sop_instance_uid for o in store.job_outputs(job_id)] == \
            [o.sop_instance_uid for o in report.outputs]
        dels = store.list_deliveries(job_id=job_id)
        assert sorted(d.sop_instance_uid for d in dels) == \
            sorted(o.sop_instance_uid for o in report.outputs)
        assert all(d.state is DeliveryState.PENDING for d in dels)
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output

        reports = Dispatcher(store.settings, store).poll_once()
        assert [(r.sent, r.failed, r.associations) for r in reports] == [(2, 0, 1)]
        assert {d.state for d in store.list_deliveries(job_id=job_id)} == {DeliveryState.DONE}
        assert {d.peer_status for d in store.list_deliveries(job_id=job_id)} == {0}
        held = orthanc_by_modality(pacs, ct_small.study_uid)
        assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
        # Nothing left to do: a second round sends nothing.
        assert Dispatcher(store.settings, store).poll_once() == []
        assert Worker(store.settings, store).poll_once() is None


def test_forward_discard_and_no_match(tmp_path: Path, pacs: Orthanc) -> None:
    vol = np.full((4, 16, 16), 40.0, dtype=np.float32)
    fwd = write_series(vol, tmp_path / "fwd", modality="CT", series_description="FORWARD ME")
    drop = write_series(vol, tmp_path / "drop", modality="CT", series_description="SCOUT")
    other = write_series(vol, tmp_path / "other", modality="MR", series_description="other")
    routes = [
        {"name": "scouts", "when": {"SeriesDescription": {"regex": "SCOUT"}}, "discard": True},
        {"name": "archive", "when": {"Modality": "CT", "calling_aet": "SCANNER1"},
         "forward": ["pacs"]},
    ]
    with _open(tmp_path, pacs.dicom_port, pacs.aet, routes) as store:
        jobs = {}
        for name, paths in (("fwd", fwd), ("drop", drop), ("other", other)):
            v = ingest_series(store, paths, calling_aet="SCANNER1")
            uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
            jobs[name] = store.enqueue(uid, v).id
        worker = Worker(store.settings, store)
        reports = {r.job_id: r for r in iter(worker.poll_once, None)}
        assert {r.state for r in reports.values()} == {JobState.DONE}
        assert reports[jobs["drop"]].rule == "routes[0] (scouts)"
        assert reports[jobs["other"]].rule is None  # no rule matched: stored only
        assert not store.list_deliveries(job_id=jobs["drop"])
        assert not store.list_deliveries(job_id=jobs["other"])
        fwd_dels = store.list_deliveries(job_id=jobs["fwd"])
        assert len(fwd_dels) == 4 and not store.job_outputs(jobs["fwd"])
        Dispatcher(store.settings, store).poll_once()
        study = str(pydicom.dcmread(fwd[0]).StudyInstanceUID)
        held = orthanc_by_modality(pacs, study)
        assert len(held["CT"]) == 1 and len(held["CT"][0]["Instances"]) == 4


def test_permanent_failure_is_visible_and_retriable(tmp_path: Path, pacs: Orthanc) -> None:
    # Two slices with a different orientation: not one volume (VolumeError).
    vol = np.full((4, 16, 16), 40.0, dtype=np.float32)
    paths = write_series(vol, tmp_path / "bad", modality="CT")
    tilted = write_series(vol[:2], tmp_path / "tilted", modality="CT",
                          orientation=(1, 0, 0, 0, 0.8, 0.6),
                          study_uid=str(pydicom.dcmread(paths[0]).StudyInstanceUID),
                          series_uid=str(pydicom.dcmread(paths[0]).SeriesInstanceUID))
    for i, p in enumerate(tilted):  # distinct instance numbers/UIDs in the same series
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 10 + i
        ds.save_as(p)
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        v = ingest_series(store, [*paths, *tilted])
        uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
        job_id = store.enqueue(uid, v).id
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.FAILED
        job = store.get_job(job_id)
        assert job.state is JobState.FAILED and job.attempts == 1
        assert job.last_error and job.last_error.startswith("volume: "), job.last_error
        assert not store.list_deliveries(job_id=job_id)
        # The operator re-queues it; the same data fails the same way (no hidden state).
        assert store.retry_job(job_id).state is JobState.PENDING
        assert Worker(store.settings, store).poll_once().state is JobState.FAILED


def test_model_not_applicable_fails_naming_the_model(tmp_path: Path, pacs: Orthanc,
                                                     ct_small) -> None:
    rule = {"name": "wrong", "when": {"Modality": "CT"}, "models": ["deepbet-brain"],
            "send": ["pacs"]}
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [rule]) as store:
        job_id = _job(store, ct_small)
        Worker(store.settings, store).poll_once()
        job = store.get_job(job_id)
        assert job.state is JobState.FAILED
        assert "deepbet-brain does not apply" in (job.last_error or ""), job.last_error


def test_transient_failure_backs_off_then_gives_up(tmp_path: Path, pacs: Orthanc,
                                                   ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE],
               worker={"max_attempts": 2, "backoff_base_seconds": 0.3,
                       "backoff_max_seconds": 0.3}) as store:
        job_id = _job(store, ct_small)
        # The job's output folder cannot be created (a file is in the way): OSError.
        blocker = store.root / "outputs" / f"job-{job_id}"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("in the way")
        worker = Worker(store.settings, store)
        worker.poll_once()
        job = store.get_job(job_id)
        assert job.state is JobState.PENDING and job.not_before is not None, job
        assert worker.poll_once() is None  # backing off
        time.sleep(0.4)
        worker.poll_once()
        job = store.get_job(job_id)
        assert job.state is JobState.FAILED and job.attempts == 2
        assert "gave up after 2 attempt(s)" in (job.last_error or ""), job.last_error
        # Fixed by the operator: retry succeeds.
        blocker.unlink()
        blocker.mkdir()
        store.retry_job(job_id)
        assert worker.poll_once().state is JobState.DONE


def test_crashed_worker_job_is_reclaimed_after_lease(tmp_path: Path, pacs: Orthanc,
                                                     ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE],
               worker={"lease_seconds": 1}) as store:
        job_id = _job(store, ct_small)
        dead = store.claim_job("worker@crashed:1")  # claims, then never heartbeats
        assert dead is not None and dead.id == job_id
        live = Worker(store.settings, store)
        assert live.poll_once() is None  # lease still valid
        time.sleep(1.2)
        report = live.poll_once()
        assert report is not None and report.job_id == job_id and report.state is JobState.DONE
        assert store.get_job(job_id).attempts == 2
        assert len(store.list_deliveries(job_id=job_id)) == 2


def test_heartbeat_keeps_the_lease_and_sees_cancel(tmp_path: Path, pacs: Orthanc,
                                                   ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE],
               worker={"lease_seconds": 0.8}) as store:
        job_id = _job(store, ct_small)
        job = store.claim_job("w1")
        assert job is not None
        with _Heartbeat(store, job_id, "w1", 0.8) as hb:
            time.sleep(2.0)  # > 2 leases: only the heartbeat keeps it
            assert store.claim_job("w2") is None
            assert not hb.lost.is_set()
            store.cancel_job(job_id)
            deadline = time.monotonic() + 5
            while not hb.lost.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hb.lost.is_set()
        assert store.get_job(job_id).state is JobState.CANCELLED


def test_cancelled_while_running_queues_nothing(tmp_path: Path, pacs: Orthanc,
                                                ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        job_id = _job(store, ct_small)
        pipeline = Pipeline(store.settings, store)
        job = store.claim_job("w1")
        store.cancel_job(job_id)  # the operator cancels while the model would run
        report = pipeline.process(job, "w1")
        assert report.state is JobState.CANCELLED
        assert not store.list_deliveries(job_id=job_id)


def test_superseded_while_running_sends_nothing_old(tmp_path: Path, pacs: Orthanc) -> None:
    fx = cranium_ct_series(k_range=(60, 70))
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        v1 = ingest_series(store, fx.paths[:-1])
        old = store.enqueue(fx.series_uid, v1)
        job = store.claim_job("w1")
        assert job is not None and job.id == old.id
        v2 = ingest_series(store, fx.paths[-1:])  # a late instance: version 2
        assert v2 == v1 + 1
        new = store.enqueue(fx.series_uid, v2)
        report = Pipeline(store.settings, store).process(job, "w1")
        assert report.state is JobState.SUPERSEDED
        assert not store.list_deliveries(job_id=old.id)
        assert Worker(store.settings, store).poll_once().job_id == new.id
        assert len(store.list_deliveries(job_id=new.id)) == 2


def test_pacs_down_retries_until_up_then_deadline_fails(tmp_path: Path, ct_small) -> None:
    down_port = free_port()  # nothing listens here
    with _open(tmp_path, down_port, "NOBODY", [CT_RULE],
               dest={"retry_deadline_seconds": 1.5},
               worker={"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.2}) as store:
        job_id = _job(store, ct_small)
        Worker(store.settings, store).poll_once()
        disp = Dispatcher(store.settings, store)
        reports = disp.poll_once()
        assert [(r.sent, r.retrying, r.failed) for r in reports] == [(0, 2, 0)]
        dels = store.list_deliveries(job_id=job_id)
        assert {d.state for d in dels} == {DeliveryState.PENDING}
        assert all("cannot connect" in (d.last_error or "") for d in dels), dels
        assert all(d.attempts == 1 and d.not_before is not None for d in dels)
        assert disp.poll_once() == []  # backing off
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            disp.poll_once()
            if {d.state for d in store.list_deliveries(job_id=job_id)} == {DeliveryState.FAILED}:
                break
            time.sleep(0.1)
        dels = store.list_deliveries(job_id=job_id)
        assert {d.state for d in dels} == {DeliveryState.FAILED}, dels
        assert all("retry deadline passed" in (d.last_error or "") for d in dels)


def test_orphan_destination_fails_visibly(tmp_path: Path, pacs: Orthanc, ct_small) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        job_id = _job(store, ct_small)
        Worker(store.settings, store).poll_once()
    # The destination is renamed in the config while its deliveries wait.
    settings = pipeline_settings(tmp_path, routes=[],
                                 destinations=[destination("pacs2", pacs.dicom_port, pacs.aet)])
    with Store.open(settings) as store:
        Dispatcher(settings, store).poll_once()
        dels = store.list_deliveries(job_id=job_id)
        assert {d.state for d in dels} == {DeliveryState.FAILED}
        assert all("'pacs' is not configured" in (d.last_error or "") for d in dels)


def test_classify() -> None:
    assert classify(VolumeError("gap")) == (False, "volume: gap")
    assert classify(OSError(28, "No space left on device"))[0] is True
    assert classify(ZeroDivisionError("x"))[0] is False


def test_worker_loop_stops(tmp_path: Path, pacs: Orthanc) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        stop = threading.Event()
        t = threading.Thread(target=Worker(store.settings, store).run, args=(stop,))
        t.start()
        time.sleep(0.3)
        stop.set()
        t.join(5)
        assert not t.is_alive()


def test_release_jobs_of_dead_local_workers_only(tmp_path: Path, pacs: Orthanc) -> None:
    import subprocess

    from dicomnode.domain import worker_identity
    from dicomnode.node.supervisor import release_jobs

    gone = subprocess.Popen(["true"])
    gone.wait()
    vol = np.full((4, 16, 16), 40.0, dtype=np.float32)
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        holders = {
            "dead": worker_identity("worker", 1, pid=gone.pid),
            "alive": worker_identity("worker", 1),  # this test process
            "remote": "worker@another-host:1:1",
        }
        jobs = {}
        for name, holder in holders.items():
            paths = write_series(vol, tmp_path / name, modality="CT")
            uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
            jobs[name] = store.enqueue(uid, ingest_series(store, paths)).id
            claimed = store.claim_job(holder)
            assert claimed is not None and claimed.id == jobs[name]
        assert release_jobs(store, "worker lost") == [jobs["dead"]]
        dead = store.get_job(jobs["dead"])
        assert dead.state is JobState.PENDING and dead.last_error == "worker lost"
        assert store.get_job(jobs["alive"]).state is JobState.RUNNING
        assert store.get_job(jobs["remote"]).state is JobState.RUNNING
        # A supervisor releases exactly the children it stopped.
        assert release_jobs(store, "stopped", holders=[holders["remote"]]) == [jobs["remote"]]


def test_release_deliveries_of_dead_local_dispatcher(tmp_path: Path, pacs: Orthanc,
                                                     ct_small) -> None:
    import subprocess

    from dicomnode.domain import worker_identity
    from dicomnode.node.supervisor import release_deliveries

    gone = subprocess.Popen(["true"])
    gone.wait()
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE]) as store:
        job_id = _job(store, ct_small)
        Worker(store.settings, store).poll_once()
        dead = worker_identity("dispatcher", 1, pid=gone.pid)
        claimed = store.claim_deliveries("pacs", dead, limit=1)  # dies while sending it
        assert len(claimed) == 1
        live = worker_identity("dispatcher", 1)
        store.claim_deliveries("pacs", live, limit=1)
        assert store.delivery_holders() == sorted([dead, live])
        assert release_deliveries(store) == 1  # only the dead one's
        states = {d.id: d.state for d in store.list_deliveries(job_id=job_id)}
        assert states[claimed[0].id] is DeliveryState.PENDING
        assert sorted(s.value for s in states.values()) == ["pending", "sending"]
        # Sent again by a live dispatcher (same object: the PACS keeps one copy).
        assert release_deliveries(store, holders=[live]) == 1
        Dispatcher(store.settings, store).poll_once()
        assert {d.state for d in store.list_deliveries(job_id=job_id)} == {DeliveryState.DONE}


def test_rule_priority_reorders_the_queue(tmp_path: Path, pacs: Orthanc) -> None:
    vol = np.full((4, 16, 16), 40.0, dtype=np.float32)
    routine = write_series(vol, tmp_path / "routine", modality="CT",
                           series_description="routine abdomen")
    urgent = write_series(vol, tmp_path / "urgent", modality="CT",
                          series_description="STROKE head")
    routes = [{"name": "stroke", "when": {"SeriesDescription": {"regex": "STROKE"}},
               "forward": ["pacs"], "priority": 10},
              {"name": "routine", "when": {"Modality": "CT"}, "forward": ["pacs"]}]
    with _open(tmp_path, pacs.dicom_port, pacs.aet, routes) as store:
        order = []
        for paths in (routine, urgent):  # the routine series completed first
            uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
            order.append(store.enqueue(uid, ingest_series(store, paths)).id)
        worker = Worker(store.settings, store)
        done = [r.job_id for r in iter(worker.poll_once, None)]
        assert done == [order[1], order[0]]
        assert store.get_job(order[1]).priority == 10
        assert store.get_job(order[0]).priority == 0


def test_two_workers_share_the_queue_without_double_work(tmp_path: Path, pacs: Orthanc) -> None:
    vol = np.full((4, 16, 16), 40.0, dtype=np.float32)
    routes = [{"name": "archive", "when": {"Modality": "CT"}, "forward": ["pacs"]}]
    with _open(tmp_path, pacs.dicom_port, pacs.aet, routes) as store:
        ids = []
        for i in range(6):
            paths = write_series(vol, tmp_path / f"s{i}", modality="CT")
            uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
            ids.append(store.enqueue(uid, ingest_series(store, paths)).id)
        settings = store.settings
    processed: dict[str, list[int]] = {}

    def run(name: str) -> None:
        with Store.open(settings) as own:  # like a separate process: its own engine
            w = Worker(settings, own, worker_id=name)
            processed[name] = [r.job_id for r in iter(w.poll_once, None)]

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done = sorted(j for jobs in processed.values() for j in jobs)
    assert done == sorted(ids)  # every job once, none twice
    with Store.open(settings) as store:
        assert {store.get_job(i).attempts for i in ids} == {1}
        assert len(store.list_deliveries(limit=1000)) == 6 * 4


@pytest.mark.parametrize("routes", [[CT_RULE], []], ids=["rule", "embedded-default"])
def test_enhanced_multiframe_series_counts_frames_not_instances(
        tmp_path: Path, pacs: Orthanc, routes: list[dict]) -> None:
    """One enhanced instance holding 20 frames passes the manifest's minimum slice count."""
    fx = cranium_ct_series(enhanced=True, k_range=(40, 60))
    assert len(fx.paths) == 1
    with _open(tmp_path, pacs.dicom_port, pacs.aet, routes) as store:
        job_id = _job(store, fx)
        report = Worker(store.settings, store).poll_once()
        assert report is not None and report.state is JobState.DONE, store.get_job(job_id)
        assert {o.kind for o in report.outputs} == {"seg", "sr"}
        for o in report.outputs:
            res = dciodvfy(o.path)
            assert not res.errors, res.output


class _HungModelRegistry:
    """The real registry, but every model run first blocks (a hung model)."""

    def __init__(self, inner: object, hang_s: float) -> None:
        self._inner, self._hang_s = inner, hang_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def run(self, name: str, volume: object) -> object:
        time.sleep(self._hang_s)
        return self._inner.run(name, volume)  # type: ignore[attr-defined]


@pytest.mark.parametrize("max_attempts,expected", [(1, JobState.FAILED), (3, JobState.PENDING)])
def test_job_past_its_time_limit_fails_and_restarts_the_worker(
        tmp_path: Path, pacs: Orthanc, ct_small, max_attempts: int, expected: JobState) -> None:
    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE],
               worker={"job_timeout_seconds": 0.8, "max_attempts": max_attempts}) as store:
        job_id = _job(store, ct_small)
        fired = threading.Event()
        plain = Pipeline(store.settings, store)
        pipeline = Pipeline(store.settings, store, registry=_HungModelRegistry(plain.registry, 3.0),
                            on_timeout=fired.set)
        job = store.claim_job("w1")
        assert job is not None
        report = pipeline.process(job, "w1")
        assert fired.is_set()  # a worker process would exit here and be restarted
        after = store.get_job(job_id)
        assert after.state is expected, after
        assert "timed out after 0.8 s" in (after.last_error or "")
        assert report.state is expected
        assert not store.list_deliveries(job_id=job_id)  # nothing half-done was queued


def test_worker_wakes_the_dispatcher(tmp_path: Path, pacs: Orthanc, ct_small) -> None:
    """With a poll interval far longer than the test, deliveries still go out at once:
    the worker's WakeUp (the one ``serve`` shares between its processes) wakes the
    dispatcher when a job queued them."""
    from dicomnode.node.children import WakeUp

    with _open(tmp_path, pacs.dicom_port, pacs.aet, [CT_RULE],
               worker={"poll_seconds": 600}) as store:
        job_id = _job(store, ct_small)
        wake = WakeUp()
        stop = threading.Event()
        disp = threading.Thread(target=Dispatcher(store.settings, store).run, args=(stop,),
                                kwargs={"wake": wake}, daemon=True)
        disp.start()
        time.sleep(0.5)  # the dispatcher found nothing and waits (up to 600 s)
        worker = Worker(store.settings, store)
        worker.on_deliveries = wake.set
        assert worker.poll_once() is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                d.state is not DeliveryState.DONE for d in store.list_deliveries(job_id=job_id)):
            time.sleep(0.1)
        states = {d.state for d in store.list_deliveries(job_id=job_id)}
        stop.set()
        wake.set()
        disp.join(10)
        assert states == {DeliveryState.DONE}
        assert not disp.is_alive()
