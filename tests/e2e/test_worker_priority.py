"""Receiving first: worker processes run at ``worker.nice`` below the node's CPU priority,
from their start on; the node process, its receiving processes and the dispatcher do not.

The node listens only once those processes run. Real ``dicomnode serve`` processes;
niceness read from ``/proc/<pid>/task/<tid>/stat`` (field 19), for every thread.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil
import pytest

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError
from tests.support.pipeline_node import PipelineNode, start_pipeline_node, wait_until


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid``."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        # "pid (comm) state ..." - comm may hold spaces: split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        out.add(int(fields[16]))  # field 19 of stat = index 16 after pid and comm
    return out


def _started(node: PipelineNode, service: str) -> list[int]:
    found = re.findall(rf"child processes started .*?service={service} pids=\[([\d, ]+)\]",
                       node.log())
    return [int(p) for p in found[-1].split(",")] if found else []


def _roles(node: PipelineNode) -> tuple[list[int], list[int], list[int]]:
    workers = wait_until(lambda: _started(node, "worker"), 60, "worker pids in the log",
                         interval=0.1, on_timeout=node.log)
    dispatcher = wait_until(lambda: _started(node, "dispatcher"), 60,
                            "dispatcher pid in the log", interval=0.1, on_timeout=node.log)
    kids = {k.pid for k in psutil.Process(node.process.pid).children(recursive=False)}
    receivers = sorted(kids - set(workers) - set(dispatcher))
    return workers, dispatcher, receivers


@pytest.mark.parametrize(("nice", "expected"), [(None, 10), (4, 4), (0, 0)])
def test_workers_run_niced_receivers_and_dispatcher_do_not(
        tmp_path: Path, nice: int | None, expected: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    worker = {"processes": 2} | ({} if nice is None else {"nice": nice})
    node = start_pipeline_node(tmp_path / "node", node={"receivers": 2}, worker=worker)
    try:
        workers, dispatcher, receivers = _roles(node)
        assert len(workers) == 2 and len(dispatcher) == 1
        # The receiving process and the resource tracker (spawn's helper) remain.
        assert receivers, "the receiving process was not found"
        wait_until(lambda: node.log().count("worker process ready") >= 2, 90,
                   "both workers ready", interval=0.2, on_timeout=node.log)
        want = min(19, base + expected)
        for pid in workers:
            assert _niceness(pid) == {want}, f"worker {pid}: {_niceness(pid)}, want {want}"
            assert f"niceness={want}" in node.log()
        for pid in [node.process.pid, *dispatcher, *receivers]:
            assert _niceness(pid) == {base}, f"process {pid} should keep niceness {base}"
    finally:
        node.stop()


def test_a_restarted_worker_is_niced_again(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    node = start_pipeline_node(tmp_path / "node", worker={"processes": 1, "nice": 7})
    try:
        (first,), _, _ = _roles(node)
        wait_until(lambda: "worker process ready" in node.log(), 90, "the worker ready",
                   interval=0.2, on_timeout=node.log)
        before = {k.pid for k in psutil.Process(node.process.pid).children()}
        psutil.Process(first).kill()

        def restarted() -> int:
            now = {k.pid for k in psutil.Process(node.process.pid).children()}
            return next(iter(now - before), 0)

        second = wait_until(restarted, 60, "the worker restarted", interval=0.05,
                            on_timeout=node.log)
        wait_until(lambda: node.log().count("worker process ready") >= 2, 90,
                   "the new worker ready", interval=0.2, on_timeout=node.log)
        assert _niceness(second) == {min(19, base + 7)}
    finally:
        node.stop()


@pytest.mark.parametrize("value", [-1, 20])
def test_worker_nice_out_of_range_is_refused(tmp_path: Path, value: int) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"worker:\n  nice: {value}\n")
    with pytest.raises(ConfigError, match=r"worker\.nice: must be 0-19"):
        load_settings(cfg)


def test_the_node_answers_only_once_its_workers_and_dispatcher_run(tmp_path: Path) -> None:
    # start_pipeline_node returns at the first C-ECHO the node answers.
    node = start_pipeline_node(tmp_path / "node", node={"receivers": 2},
                               worker={"processes": 2})
    try:
        log = node.log()
        assert log.count("worker process ready") == 2, log[-3000:]
        assert "dispatcher process ready" in log, log[-3000:]
        assert "not ready in time" not in log
        wait_until(lambda: "node ready" in node.log(), 30, "node ready", interval=0.1)
        log = node.log()
        assert log.index("dispatcher process ready") < log.index("node ready")
    finally:
        node.stop()
