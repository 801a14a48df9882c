"""lower_priority / worker_niceness and the Ready count (dicomnode/node/children.py).

Real processes (``sleep``) and real semaphores; niceness read back from the kernel.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from dicomnode.node.children import Ready, lower_priority, worker_niceness


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_worker_niceness_adds_to_the_base_and_caps_at_19() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert worker_niceness(3) == min(19, base + 3)
    assert worker_niceness(0) == base
    assert worker_niceness(19) == 19
    assert worker_niceness(30) == 19


def test_lower_priority_lowers_and_never_raises(child: subprocess.Popen[bytes]) -> None:
    base = os.getpriority(os.PRIO_PROCESS, child.pid)
    want = min(19, base + 5)
    assert lower_priority(child.pid, want) == want
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == want
    # Asked for less than it has: left alone (raising a priority needs privileges).
    assert lower_priority(child.pid, base) == want


def test_a_process_already_gone_is_not_an_error(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait()
    assert lower_priority(child.pid, 10) == 10


def test_ready_counts_children() -> None:
    r = Ready()
    assert not r.wait(1, 0.01)
    r.set()
    assert not r.wait(2, 0.05)  # one of two; the one consumed
    r.set()
    r.set()
    assert r.wait(2, 1.0)
