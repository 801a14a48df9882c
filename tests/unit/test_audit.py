"""The audit trail: hash chain, tamper detection, concurrent writers, syslog, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.audit import (
    GENESIS,
    AuditError,
    AuditEvent,
    AuditLog,
    chain_hash,
    read,
    trail_path,
    verify,
)
from dicomnode.config import load_settings


def _log(path: Path, **kw: object) -> AuditLog:
    return AuditLog(path, source={"ae_title": "DICOMNODE", "role": "test"}, **kw)  # type: ignore[arg-type]


def _write(path: Path, n: int) -> list[dict]:
    a = _log(path)
    return [a.record(AuditEvent.INSTANCES_RECEIVED, study_uid=f"1.2.3.{i}", instances=i)
            for i in range(1, n + 1)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_records_are_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _write(path, 3)
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev"] == GENESIS
    assert recs[1]["prev"] == recs[0]["hash"] and recs[2]["prev"] == recs[1]["hash"]
    assert all(chain_hash(r["prev"], r) == r["hash"] for r in recs)
    on_disk = [json.loads(x) for x in _lines(path)]
    assert on_disk == recs
    assert on_disk[1]["event"] == "instances-received" and on_disk[1]["instances"] == 2
    assert on_disk[0]["source"]["role"] == "test" and "pid" in on_disk[0]["source"]
    count, problems = verify(read(path))
    assert (count, problems) == (3, [])


def test_edited_record_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 4)
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["instances"] = 999  # someone changes what was received
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    _, problems = verify(read(path))
    assert [p.line for p in problems] == [2]
    assert "edited" in problems[0].what


def test_edited_record_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 4)
    lines = _lines(path)
    rec = json.loads(lines[1])
    rec["instances"] = 999
    rec["hash"] = chain_hash(rec["prev"], rec)  # a careful forger
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    _, problems = verify(read(path))
    assert [p.line for p in problems] == [3]
    assert "does not follow" in problems[0].what


def test_removed_reordered_inserted_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5)
    good = _lines(path)

    path.write_text("\n".join(good[:2] + good[3:]) + "\n")  # line 3 removed
    _, problems = verify(read(path))
    assert [p.line for p in problems] == [3] and "removed" in problems[0].what

    path.write_text("\n".join([good[0], good[2], good[1], *good[3:]]) + "\n")  # swapped
    _, problems = verify(read(path))
    assert problems and problems[0].line == 2

    path.write_text("\n".join([*good[:2], "not json", *good[2:]]) + "\n")  # inserted
    _, problems = verify(read(path))
    assert problems[0].line == 3 and "not a JSON record" in problems[0].what

    path.write_text("\n".join(good[2:]) + "\n")  # beginning cut off
    _, problems = verify(read(path))
    assert [p.line for p in problems] == [1] and "starts at seq 3" in problems[0].what


def _append_many(path: str, n: int) -> None:
    a = AuditLog(Path(path), source={"role": "child"})
    for i in range(n):
        a.record(AuditEvent.ASSOCIATION_ACCEPTED, calling_aet="CT1", i=i)


def test_concurrent_processes_keep_one_chain(tmp_path: Path) -> None:
    """Receivers, the dispatcher and the CLI append to one file at the same time."""
    path = tmp_path / "audit.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), 40)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    count, problems = verify(read(path))
    assert problems == []
    assert count == 160
    assert [json.loads(x)["seq"] for x in _lines(path)] == list(range(1, 161))
    assert len({json.loads(x)["source"]["pid"] for x in _lines(path)}) == 4


def test_disabled_records_nothing(tmp_path: Path) -> None:
    a = AuditLog.disabled()
    assert a.record(AuditEvent.APPLICATION_START) is None
    assert not a.enabled
    assert list(tmp_path.iterdir()) == []


def test_unwritable_trail_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    a = _log(blocker / "audit.jsonl")  # a folder that is a file
    with pytest.raises(AuditError, match="audit.path: cannot append to"):
        a.record(AuditEvent.APPLICATION_START)
    a.safe_record(AuditEvent.APPLICATION_START)  # logged, not raised


def test_syslog_copy_is_rfc5424(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    port = rx.getsockname()[1]
    try:
        a = _log(tmp_path / "audit.jsonl", syslog=("127.0.0.1", port, "udp"))
        rec = a.record(AuditEvent.ASSOCIATION_REJECTED, "minor-failure", calling_aet="LAPTOP",
                       reason="calling AE title not allowed")
        data = rx.recv(65536).decode()
    finally:
        rx.close()
    # <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
    head, _, msg = data.partition(" - ")
    assert head.startswith("<") and ">1 " in head, data
    assert " dicomnode " in head and " AUDIT" in head
    body = json.loads(msg[msg.index("{"):])
    assert rec is not None and body["hash"] == rec["hash"] and body["calling_aet"] == "LAPTOP"


def test_default_path_is_beside_the_storage(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"storage: {{path: {tmp_path / 'data' / 'storage'}}}\n")
    assert trail_path(load_settings(cfg, environ={})) == tmp_path / "data" / "audit.jsonl"
    cfg.write_text(f"audit: {{path: {tmp_path / 'elsewhere.jsonl'}}}\n")
    assert trail_path(load_settings(cfg, environ={})) == tmp_path / "elsewhere.jsonl"


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", "audit", "--config", str(cfg),
                           *args], capture_output=True, text=True, timeout=60)


def test_cli_lists_filters_and_verifies(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"audit: {{path: {trail}}}\n")
    r = _cli(cfg)
    assert r.returncode == 2 and "no audit trail at" in r.stderr and "Traceback" not in r.stderr
    _write(trail, 3)
    r = _cli(cfg)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    r = _cli(cfg, "--study", "1.2.3.2", "--json")
    assert [json.loads(x)["instances"] for x in r.stdout.splitlines()] == [2]
    r = _cli(cfg, "--since", "2999-01-01")
    assert r.returncode == 0 and r.stdout == ""
    r = _cli(cfg, "--since", "yesterday")
    assert r.returncode == 2 and "not an ISO date" in r.stderr
    r = _cli(cfg, "--verify")
    assert r.returncode == 0 and "intact, 3 record(s)" in r.stdout
    lines = _lines(trail)
    trail.write_text("\n".join([lines[0], lines[2]]) + "\n")
    r = _cli(cfg, "--verify")
    assert r.returncode == 1 and "BROKEN line 2" in r.stdout
