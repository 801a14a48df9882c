"""A completed series wakes the node's idle workers: its job does not wait for their poll.

The workers here poll only every 120 s; both ways a series completes (quiet
window, expected count reached) must get its job claimed within seconds.
Without the wake-up the jobs would stay pending for up to two minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.uid import generate_uid

from tests.support.pipeline_node import job_for, start_pipeline_node, wait_until
from tests.support.receive_node import make_instance, store_files

RULE = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"]}


def _series(tmp: Path, n: int, expected: int | None) -> tuple[str, list[Path]]:
    study, series = generate_uid(), generate_uid()
    return series, [make_instance(tmp / series / f"{i}.dcm", study_uid=study, series_uid=series,
                                  instance_number=i + 1, rows=32, images_in_acquisition=expected)
                    for i in range(n)]


def test_completed_series_wake_the_workers(tmp_path: Path) -> None:
    node = start_pipeline_node(tmp_path / "node", routes=[RULE],
                               worker={"poll_seconds": 120},
                               completion={"series_quiet_seconds": 1})
    try:
        # Let the worker finish its first poll and start its 120 s wait.
        wait_until(lambda: "worker process ready" in node.log(), 60, "the worker")
        time.sleep(2)
        quiet, quiet_files = _series(tmp_path, 3, None)
        counted, counted_files = _series(tmp_path, 3, 3)
        assert all(s == 0 for _, s in store_files(node.port, quiet_files + counted_files))
        for series, how in ((counted, "expected count"), (quiet, "quiet window")):
            def claimed(series: str = series) -> bool:
                j = job_for(node.jobs(), series)
                return j is not None and j["state"] != "pending"
            wait_until(claimed, 20, f"the job of a series completed by {how} claimed",
                       on_timeout=lambda: node.log()[-3000:])
    finally:
        node.stop()
