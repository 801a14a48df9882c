"""Notifications through the outbox, in-process against a real store, the real ct-tissue
model and real receivers (HTTP server, python-hl7 MLLP listener) on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.dispatch.notify import control_id_for
from dicomnode.domain import DeliveryState, JobState
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.support.infer_data import cranium_ct_series
from tests.support.notify_peers import mllp_server, webhook_server
from tests.support.pipeline_env import ingest_series, pipeline_settings, write_config

RULE = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
        "notify": ["dash", "ris"]}


@pytest.fixture(scope="module")
def ct_small() -> Any:
    return cranium_ct_series(k_range=(40, 52))


def _store(tmp: Path, notifications: list[dict[str, Any]],
           routes: list[dict[str, Any]] | None = None) -> Store:
    settings = pipeline_settings(tmp, routes=[RULE] if routes is None else routes,
                                 notifications=notifications)  # type: ignore[arg-type]
    return Store.open(settings, migrate=True)


def _run_job(store: Store, fx: Any) -> int:
    version = ingest_series(store, fx.paths)
    job_id = store.enqueue(fx.series_uid, version).id
    report = Worker(store.settings, store).poll_once()
    assert report is not None and report.state is JobState.DONE, report
    return job_id


def test_notifications_are_queued_with_the_job_and_sent(tmp_path: Path, ct_small: Any) -> None:
    with webhook_server(200) as hook, mllp_server("AA") as (port, messages), _store(
            tmp_path, [{"name": "dash", "kind": "webhook", "url": hook.url, "auth_token": "t0k"},
                       {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port,
                        "receiving_application": "RIS"}]) as store:
        job_id = _run_job(store, ct_small)
        rows = {d.destination: d for d in store.list_deliveries(job_id=job_id)}
        assert {(n, d.kind, d.state) for n, d in rows.items()} == {
            ("dash", "webhook", DeliveryState.PENDING), ("ris", "hl7", DeliveryState.PENDING)}
        assert not hook.bodies and not messages  # nothing is sent before the job is done

        reports = Dispatcher(store.settings, store).poll_once()
        assert sorted((r.destination, r.sent, r.failed) for r in reports) == [
            ("dash", 1, 0), ("ris", 1, 0)]
        outputs = {o.kind: o.sop_instance_uid for o in store.job_outputs(job_id)}
        (headers, body), = hook.bodies
        assert headers["Authorization"] == "Bearer t0k"
        assert body["job_id"] == job_id and body["study_instance_uid"] == ct_small.study_uid
        assert body["series_instance_uid"] == ct_small.series_uid
        assert body["model"]["name"] == "ct-tissue"
        assert {o["kind"]: o["sop_instance_uid"] for o in body["objects"]} == outputs
        assert {m["label"] for m in body["measurements"]} >= {"Body", "Bone"}
        (msg,) = messages
        assert str(msg.segment("MSH")[10]) == control_id_for(rows["ris"].sop_instance_uid)
        assert str(msg.segment("OBR")[3]) == ct_small.study_uid
        obx = {str(s[3][0][0]): str(s[5]) for s in msg.segments("OBX")}
        assert obx["DICOM.SEG"] == outputs["seg"] and obx["DICOM.SR"] == outputs["sr"]
        after = {d.destination: d for d in store.list_deliveries(job_id=job_id)}
        assert after["dash"].state is DeliveryState.DONE and after["dash"].peer_status == 200
        assert after["ris"].state is DeliveryState.DONE
        assert Dispatcher(store.settings, store).poll_once() == []  # sent once


def test_rerun_replaces_the_notification_instead_of_duplicating(tmp_path: Path,
                                                                ct_small: Any) -> None:
    with webhook_server(200) as hook, _store(
            tmp_path, [{"name": "dash", "kind": "webhook", "url": hook.url}],
            routes=[{**RULE, "notify": ["dash"]}]) as store:
        job_id = _run_job(store, ct_small)
        Dispatcher(store.settings, store).poll_once()
        store.retry_job(job_id)  # a done job is run again
        assert Worker(store.settings, store).poll_once() is not None
        rows = store.list_deliveries(job_id=job_id)
        assert len(rows) == 1 and rows[0].state is DeliveryState.PENDING
        Dispatcher(store.settings, store).poll_once()
        assert len(hook.bodies) == 2  # sent again (same id), one row


def test_transient_failures_back_off_until_the_deadline_then_retry_by_command(
        tmp_path: Path, ct_small: Any) -> None:
    with webhook_server(503) as hook:
        notifications = [{"name": "dash", "kind": "webhook", "url": hook.url,
                          "retry_deadline_seconds": 1.5}]
        with _store(tmp_path, notifications, routes=[{**RULE, "notify": ["dash"]}]) as store:
            job_id = _run_job(store, ct_small)
            disp = Dispatcher(store.settings, store)
            (rep,) = disp.poll_once()
            assert (rep.sent, rep.retrying, rep.failed) == (0, 1, 0)
            (d,) = store.list_deliveries(job_id=job_id)
            assert d.state is DeliveryState.PENDING and d.not_before is not None
            assert "HTTP 503" in (d.last_error or "") and d.peer_status == 503
            deadline = time.monotonic() + 30
            while d.state is not DeliveryState.FAILED and time.monotonic() < deadline:
                disp.poll_once()
                time.sleep(0.1)
                (d,) = store.list_deliveries(job_id=job_id)
            assert d.state is DeliveryState.FAILED, d
            assert "retry deadline passed" in (d.last_error or "")
            assert len(hook.bodies) >= 2  # retried before giving up

        # The operator's view and command: listed with its kind, re-queued, sent.
        cfg = write_config(tmp_path, routes=[{**RULE, "notify": ["dash"]}],
                           notifications=notifications)  # type: ignore[arg-type]
        hook.answer(200)

        def cli(*args: str) -> str:
            res = subprocess.run([sys.executable, "-m", "dicomnode", "--config", str(cfg), *args],
                                 capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert res.returncode == 0, res.stderr
            return res.stdout

        listed = json.loads(cli("deliveries", "list", "--destination", "dash", "--json"))
        assert [(x["kind"], x["state"], x["peer_status"]) for x in listed] == [
            ("webhook", "failed", "503")]
        assert "webhook notification" in cli("deliveries", "list", "--state", "failed")
        assert "queued again" in cli("deliveries", "retry", "--all-failed")
        with _store(tmp_path, notifications, routes=[{**RULE, "notify": ["dash"]}]) as store:
            (rep,) = Dispatcher(store.settings, store).poll_once()
            assert rep.sent == 1
            (d,) = store.list_deliveries(job_id=job_id)
            assert d.state is DeliveryState.DONE and d.peer_status == 200


@pytest.mark.parametrize(("kind", "answer"), [("webhook", 400), ("hl7", "AR")])
def test_permanent_failures_fail_at_once(tmp_path: Path, ct_small: Any, kind: str,
                                         answer: Any) -> None:
    if kind == "webhook":
        ctx: Any = webhook_server(answer)
    else:
        ctx = mllp_server(answer)
    with ctx as peer:
        target = ({"name": "x", "kind": "webhook", "url": peer.url} if kind == "webhook" else
                  {"name": "x", "kind": "hl7", "host": "127.0.0.1", "port": peer[0]})
        with _store(tmp_path, [target], routes=[{**RULE, "notify": ["x"]}]) as store:
            job_id = _run_job(store, ct_small)
            (rep,) = Dispatcher(store.settings, store).poll_once()
            assert (rep.sent, rep.retrying, rep.failed) == (0, 0, 1)
            (d,) = store.list_deliveries(job_id=job_id)
            assert d.state is DeliveryState.FAILED
            assert "permanent failure" in (d.last_error or "")


def test_without_rules_every_notification_hears_of_every_result(tmp_path: Path,
                                                                ct_small: Any) -> None:
    with webhook_server(200) as hook, _store(
            tmp_path, [{"name": "dash", "kind": "webhook", "url": hook.url}], routes=[]) as store:
        job_id = _run_job(store, ct_small)
        assert [d.kind for d in store.list_deliveries(job_id=job_id)] == ["webhook"]
        Dispatcher(store.settings, store).poll_once()
        assert len(hook.bodies) == 1
