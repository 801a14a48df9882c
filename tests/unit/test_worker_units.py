"""Pure parts of the worker: failure classification, format union, embedded default routing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicomnode.domain import worker_identity
from dicomnode.errors import (
    ConfigError,
    EncodeError,
    InvalidInstanceError,
    ModelError,
    RoutingError,
    StoreError,
    VolumeError,
)
from dicomnode.routing import SendTarget
from dicomnode.store import Store
from dicomnode.worker import Pipeline, _Prefetch, classify
from tests.support.pipeline_env import destination, pipeline_settings


@pytest.mark.parametrize(("exc", "transient", "prefix"), [
    (VolumeError("slice gap"), False, "volume: slice gap"),
    (ModelError("bad weights"), False, "model: bad weights"),
    (EncodeError("no frames"), False, "encode: no frames"),
    (RoutingError("routes[0]"), False, "routing: routes[0]"),
    (ConfigError("x"), False, "routing: x"),
    (InvalidInstanceError("bad UID"), False, "instance: bad UID"),
    (StoreError("database is locked"), True, "store: database is locked"),
    (OSError(28, "No space left on device"), True, "OSError: [Errno 28]"),
    (PermissionError(13, "denied"), True, "PermissionError"),
    (TimeoutError("slow disk"), True, "TimeoutError: slow disk"),
    (MemoryError(), True, "out of memory"),
    (ValueError("shapes differ"), False, "unexpected ValueError: shapes differ"),
])
def test_classify(exc: BaseException, transient: bool, prefix: str) -> None:
    t, reason = classify(exc)
    assert t is transient
    assert reason.startswith(prefix), reason


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    settings = pipeline_settings(tmp_path, destinations=[
        destination("pacs", 104, "PACS"),
        destination("research", 105, "RESEARCH", keep_empty_frames=True, formats=["seg"]),
    ])
    store = Store.open(settings, migrate=True)
    yield Pipeline(settings, store)
    store.close()


def test_formats_union_and_keep_empty(pipeline: Pipeline) -> None:
    assert pipeline._formats(()) == (("seg", "sr"), False)
    assert pipeline._formats([SendTarget("pacs", ("sr",))]) == (("sr",), False)
    assert pipeline._formats([SendTarget("pacs", ("seg", "sr")),
                              SendTarget("research", ("sc", "seg"))]) == \
        (("seg", "sr", "sc"), True)


def _header(modality: str, description: str = "", body: str = "") -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SeriesDescription = modality, description
    if body:
        ds.BodyPartExamined = body
    return ds


def test_embedded_default_runs_the_applicable_models(pipeline: Pipeline) -> None:
    assert not pipeline.table.rules
    ct = pipeline._embedded_default(_header("CT"), 50)
    assert ct.models == ("ct-tissue",) and not ct.send and not ct.forward
    mr = pipeline._embedded_default(_header("MR", "T1 MPRAGE", "HEAD"), 120)
    assert mr.models == ("deepbet-brain",)
    assert pipeline._embedded_default(_header("MR", "FLAIR", "HEAD"), 120).models == ()
    assert pipeline._embedded_default(_header("US"), 50).models == ()


def test_prefetch_reraises_in_caller() -> None:
    def boom() -> None:
        raise EncodeError("cannot read source instance x")
    with pytest.raises(EncodeError, match="cannot read source"):
        _Prefetch(boom).get()
    assert _Prefetch(lambda: 42).get() == 42


def test_worker_identity_is_readable_and_unique_per_index() -> None:
    a, b = worker_identity("worker", 1), worker_identity("worker", 2)
    assert a.startswith("worker@") and a != b


def test_children_log_like_the_parent(tmp_path: Path) -> None:
    import logging

    from dicomnode.logs import setup_logging
    from dicomnode.node.children import parent_logging

    settings = pipeline_settings(tmp_path)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("DEBUG", json_lines=True)  # as `dicomnode --log-json --log-level DEBUG`
        child = parent_logging(settings)
        assert (child.logging.level, child.logging.json) == ("DEBUG", True)
        assert (settings.logging.level, settings.logging.json) == ("INFO", False)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_later_versions_are_marked_in_the_description() -> None:
    from dicomnode.worker import _mark_version

    ds = Dataset()
    ds.SeriesDescription = "AI brain mask (deepbet-brain 1.0.2-onnx.1)"
    _mark_version(ds, 1)
    assert ds.SeriesDescription == "AI brain mask (deepbet-brain 1.0.2-onnx.1)"
    _mark_version(ds, 3)
    assert ds.SeriesDescription == "AI brain mask (deepbet-brain 1.0.2-onnx.1) v3"
    # Too long for LO: the subject is shortened, the model identity kept.
    ds.SeriesDescription = "Rule-based Body, Bone, Air inside body mask (ct-tissue 1.0.0)"
    _mark_version(ds, 2)  # 61 + 3 characters: fits
    assert ds.SeriesDescription.endswith("body mask (ct-tissue 1.0.0) v2")
    ds.SeriesDescription = "Rule-based Body, Bone, Air inside body mask (ct-tissue 1.0.0)"
    _mark_version(ds, 10)  # 61 + 4: the subject gives way
    assert ds.SeriesDescription == ("Rule-based Body, Bone, Air inside body ma~"
                                    " (ct-tissue 1.0.0) v10")
    assert len(ds.SeriesDescription) <= 64
    ds.SeriesDescription = "x" * 64
    _mark_version(ds, 12)
    assert ds.SeriesDescription == "x" * 59 + "~ v12"


def _wait_forever(wake: object) -> None:
    wake.wait(3600)  # type: ignore[attr-defined]


def _set(wake: object) -> None:
    wake.set()  # type: ignore[attr-defined]


def test_wakeup_crosses_processes_and_survives_a_killed_waiter() -> None:
    """A WakeUp set in another process wakes a waiter here; one whose waiter was
    killed mid-wait can still be set (a multiprocessing.Event would block the
    setter forever, waiting for the dead sleeper to acknowledge)."""
    import multiprocessing as mp

    from dicomnode.node.children import WakeUp

    ctx = mp.get_context("spawn")
    wake = WakeUp()
    assert wake.wait(0.01) is False
    setter = ctx.Process(target=_set, args=(wake,))
    setter.start()
    assert wake.wait(60) is True
    setter.join(30)
    assert wake.wait(0) is True  # stays set until cleared
    wake.clear()
    assert wake.wait(0) is False

    waiter = ctx.Process(target=_wait_forever, args=(wake,))
    waiter.start()
    time.sleep(1.0)
    waiter.kill()
    waiter.join(30)
    done = threading.Event()
    t = threading.Thread(target=lambda: (wake.set(), done.set()), daemon=True)
    t.start()
    assert done.wait(30), "setting the WakeUp blocked after its waiter died"


def test_a_zombie_holder_is_not_alive() -> None:
    """A killed worker that nobody reaped yet (its node was killed too) still has a
    pid; its job must be released at restart all the same."""
    import subprocess
    import sys

    from dicomnode.node.supervisor import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited, not waited for: a zombie
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.05)
    try:
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait(10)
    assert not pid_alive(child.pid)
