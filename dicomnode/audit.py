"""The audit trail: an append-only, hash-chained record of security-relevant events.

In the spirit of the DICOM audit messages (PS3.15 Annex A.5): the application
started or stopped, its configuration loaded, an association accepted or
rejected (with the peer's address and AE titles), DICOM instances transferred
in or out (per study, with the peer or destination), and the actions operators
take (retry, cancel, reprioritise).

Each event is one JSON object on one line of ``audit.path``::

    {"seq": 12, "time": "2026-12-03T15:02:11.123456+00:00", "event": "association-accepted",
     "outcome": "success", "source": {"ae_title": "DICOMNODE", "host": "pacs-gw", "pid": 4711},
     ..., "prev": "<hash of line 11>", "hash": "<sha256 of prev + this record>"}

``hash`` is the SHA-256 of the previous line's hash, a newline, and this
record's canonical JSON without ``hash`` (keys sorted, no spaces), so removing,
reordering or editing any line breaks the chain at that line:
:func:`verify` finds it (``dicomnode audit --verify``). The receiving
processes, the dispatcher and the CLI all append to the same file: each append
takes an exclusive ``flock`` on it, reads the last line's hash and sequence
number, writes its line and (with ``audit.fsync``) flushes it to disk before
releasing the lock. Events can also go to a syslog collector as RFC 5424
messages (``audit.syslog_host``), through ``rfc5424-logging-handler``.

The trail is not a log: nothing in it is rotated or rewritten by the node.
"""

from __future__ import annotations

import enum
import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rfc5424logging import Rfc5424SysLogHandler

from dicomnode.config import AuditConfig, Settings
from dicomnode.errors import DicomNodeError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The ``prev`` of the first record of a trail."""


class AuditError(DicomNodeError):
    """The audit trail cannot be written or read."""


class AuditEvent(enum.StrEnum):
    """What happened (after the event IDs of PS3.15 A.5.3)."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    CONFIGURATION_LOADED = "configuration-loaded"
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    INSTANCES_RECEIVED = "instances-received"
    INSTANCES_SENT = "instances-sent"
    USER_ACTION = "user-action"
    INSTANCES_PURGED = "instances-purged"
    RESULTS_PURGED = "results-purged"


def trail_path(settings: Settings) -> Path:
    """Where this node's trail is (``audit.path``, default beside ``storage.path``)."""
    if settings.audit.path is not None:
        return Path(settings.audit.path)
    return Path(settings.storage.path).parent / "audit.jsonl"


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    """``sha256(prev + "\\n" + canonical(record without "hash"))``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(prev.encode() + b"\n" + canonical(body)).hexdigest()


def _last_line(f: Any) -> bytes:
    """The last non-empty line of the open binary file ``f`` (b"" when empty)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    pos, chunk, tail = end, 4096, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return tail.rstrip(b"\n")


class AuditLog:
    """Appends events to the trail of one node (see the module docstring).

    ``AuditLog.disabled()`` records nothing (``audit.enabled: false``).
    """

    def __init__(self, path: Path | None, *, source: dict[str, Any], fsync: bool = True,
                 syslog: tuple[str, int, str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.source = source
        self.fsync = fsync
        self._lock = threading.Lock()  # threads of this process; flock for the others
        self._syslog: logging.Logger | None = None
        if syslog is not None:
            host, port, protocol = syslog
            handler = Rfc5424SysLogHandler(
                address=(host, port),
                socktype=socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM,
                facility=13,  # RFC 5424 "log audit"
                appname="dicomnode", utc_timestamp=True)
            self._syslog = logging.getLogger(f"dicomnode.audit.syslog.{id(self)}")
            self._syslog.propagate = False
            self._syslog.addHandler(handler)
            self._syslog.setLevel(logging.INFO)

    @classmethod
    def disabled(cls) -> AuditLog:
        return cls(None, source={})

    @classmethod
    def from_settings(cls, settings: Settings, *, role: str) -> AuditLog:
        """The trail of this node (``audit:`` settings); ``role`` names the writer
        (``node``, ``receiver``, ``dispatcher``, ``cli``) in each record's source."""
        a: AuditConfig = settings.audit
        if not a.enabled:
            return cls.disabled()
        source = {"ae_title": settings.node.ae_title, "host": socket.gethostname(),
                  "role": role}
        syslog = (a.syslog_host, a.syslog_port, a.syslog_protocol) if a.syslog_host else None
        path = a.path if a.path is not None else trail_path(settings)
        return cls(path, source=source, fsync=a.fsync, syslog=syslog)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, event: AuditEvent, outcome: str = "success",
               **fields: Any) -> dict[str, Any] | None:
        """Append one event; returns the record written (``None`` when disabled).

        Raises :class:`AuditError` when the trail cannot be written: callers on the
        network path log it and go on (a full disk must not stop receiving), the
        CLI reports it.
        """
        if self.path is None:
            return None
        rec: dict[str, Any] = {"time": datetime.now(UTC).isoformat(), "event": str(event),
                               "outcome": outcome,
                               "source": {**self.source, "pid": os.getpid()}, **fields}
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a+b") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                    try:
                        last = _last_line(f)
                        if last:
                            try:
                                prev_rec = json.loads(last)
                                prev, seq = str(prev_rec["hash"]), int(prev_rec["seq"]) + 1
                            except (ValueError, KeyError, TypeError):
                                # A damaged last line: chain on from its bytes, so that
                                # verify reports the damage rather than a gap.
                                prev, seq = hashlib.sha256(last).hexdigest(), -1
                        else:
                            prev, seq = GENESIS, 1
                        rec = {"seq": seq, **rec, "prev": prev}
                        rec["hash"] = chain_hash(prev, rec)
                        f.seek(0, os.SEEK_END)
                        f.write(canonical(rec) + b"\n")
                        f.flush()
                        if self.fsync:
                            os.fsync(f.fileno())
                    finally:
                        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditError(f"audit.path: cannot append to {self.path}: {exc}") from None
        if self._syslog is not None:
            self._syslog.info(canonical(rec).decode(), extra={"msgid": "AUDIT"})
        return rec

    def safe_record(self, event: AuditEvent, outcome: str = "success", **fields: Any) -> None:
        """:meth:`record`, logging (not raising) a failure to write the trail."""
        try:
            self.record(event, outcome, **fields)
        except AuditError as exc:
            log.error("audit record not written", extra={"event": str(event),
                                                          "error": str(exc)})


def config_identity(settings: Settings) -> dict[str, Any]:
    """Which configuration is in force: the file and its SHA-256, or the defaults."""
    if settings.source is None:
        return {"config": "embedded defaults (and environment)"}
    try:
        digest = hashlib.sha256(Path(settings.source).read_bytes()).hexdigest()
    except OSError as exc:
        digest = f"unreadable: {exc}"
    return {"config": str(Path(settings.source).resolve()), "config_sha256": digest}


def user_action(settings: Settings, action: str, **fields: Any) -> None:
    """Record an operator's action from the CLI (the OS user is the actor)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    AuditLog.from_settings(settings, role="cli").record(
        AuditEvent.USER_ACTION, action=action, user=user, **fields)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Problem:
    """A place where the trail is not what was written."""

    line: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}"


def read(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, bytes]]:
    """``(line number, record or None when not JSON, raw line)`` for every line."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                raw = raw.rstrip(b"\n")
                if not raw:
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    rec = None
                yield n, rec if isinstance(rec, dict) else None, raw
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"cannot read the audit trail {path}: {exc}") from None


def verify(lines: Iterable[tuple[int, dict[str, Any] | None, bytes]]) -> tuple[int, list[Problem]]:
    """Check the chain: ``(records read, problems)``; no problems means intact.

    A record whose hash does not match its content was edited; a record whose
    ``prev`` is not the previous line's hash (or whose ``seq`` does not follow
    it) comes after a removed, inserted or reordered line; a trail whose first
    record is not the first of the chain lost its beginning.
    """
    problems: list[Problem] = []
    prev_hash: str | None = None
    prev_seq = 0
    count = 0
    for n, rec, raw in lines:
        count += 1
        if rec is None:
            problems.append(Problem(n, "not a JSON record (damaged or inserted)"))
            prev_hash, prev_seq = hashlib.sha256(raw).hexdigest(), prev_seq + 1
            continue
        h, p, seq = rec.get("hash"), rec.get("prev"), rec.get("seq")
        if not isinstance(h, str) or not isinstance(p, str) or not isinstance(seq, int):
            problems.append(Problem(n, "record without seq / prev / hash"))
            prev_hash, prev_seq = hashlib.sha256(raw).hexdigest(), prev_seq + 1
            continue
        if chain_hash(p, rec) != h:
            problems.append(Problem(n, f"record seq {seq} was edited (its hash does not match "
                                       "its content)"))
        if prev_hash is None:
            if p != GENESIS or seq != 1:
                problems.append(Problem(n, f"the trail starts at seq {seq}: earlier records "
                                           "were removed"))
        elif p != prev_hash:
            problems.append(Problem(n, f"record seq {seq} does not follow the line before it "
                                       "(a record was removed, inserted or reordered)"))
        elif seq != prev_seq + 1:
            problems.append(Problem(n, f"sequence jumps from {prev_seq} to {seq}"))
        prev_hash, prev_seq = h, seq
    return count, problems


__all__ = ["GENESIS", "AuditError", "AuditEvent", "AuditLog", "Problem", "canonical",
           "chain_hash", "config_identity", "read", "trail_path", "user_action", "verify"]
