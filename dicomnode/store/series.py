"""Series bookkeeping: instance rows, series versions and completeness.

A series version is ``receiving`` until it is complete: no new instance for
``completion.series_quiet_seconds``, or at once when the number of instances
reaches the count the sender announced (Number of Series Related Instances or
Images in Acquisition). Completion turns the version into exactly one job.
An instance that arrives after completion opens version N+1 (``receiving``);
its job will supersede version N's (see :func:`dicomnode.store.queue.enqueue`).

Every state change is a conditional UPDATE (``... WHERE state='receiving'``) so
that concurrent receivers and the completeness tracker never both win.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from dicomnode.domain import InstanceRef, Job, SeriesRef
from dicomnode.errors import StoreError
from dicomnode.store import queue
from dicomnode.store._common import insert_ignore, instances, series, studies, versions
from dicomnode.store.parse import InstanceMeta

RECEIVING = "receiving"
COMPLETE = "complete"


@dataclass(frozen=True)
class Recorded:
    """Outcome of :func:`record_instance`."""

    replaced_path: str | None  # previous file of a replaced instance, if it moved
    was_duplicate: bool
    version: int
    job: Job | None  # set when this instance completed its series version


class IdCache:
    """Per-process cache of study/series ids (they never change once created)."""

    def __init__(self) -> None:
        self.studies: dict[str, int] = {}
        self.series: dict[str, int] = {}


def study_id(conn: Connection, m: InstanceMeta, now: datetime, cache: IdCache) -> int:
    sid = cache.studies.get(m.study_uid)
    if sid is not None:
        return sid
    q = select(studies.c.id).where(studies.c.study_uid == m.study_uid)
    sid = conn.execute(q).scalar()
    if sid is None:
        insert_ignore(conn, studies, dict(
            study_uid=m.study_uid, patient_id=m.patient_id, patient_name=m.patient_name,
            study_date=m.study_date, accession_number=m.accession_number,
            description=m.study_description, created_at=now), ["study_uid"])
        sid = conn.execute(q).scalar_one()
    cache.studies[m.study_uid] = sid
    return int(sid)


def series_id(conn: Connection, m: InstanceMeta, st_id: int, now: datetime,
              cache: IdCache) -> int:
    sid = cache.series.get(m.series_uid)
    if sid is not None:
        return sid
    q = select(series.c.id, series.c.study_id).where(series.c.series_uid == m.series_uid)
    row = conn.execute(q).first()
    if row is None:
        insert_ignore(conn, series, dict(
            study_id=st_id, series_uid=m.series_uid, modality=m.modality,
            description=m.series_description, series_number=m.series_number,
            current_version=1, created_at=now), ["series_uid"])
        row = conn.execute(q).one()
    cache.series[m.series_uid] = int(row.id)
    return int(row.id)


# Hot-path statements are built once: building SQLAlchemy constructs per
# instance costs more than executing them.
_SEL_OLD = select(instances.c.id, instances.c.path, instances.c.series_id).where(
    instances.c.sop_instance_uid == bindparam("b_sop"))
# At most one version of a series is 'receiving' (only the newest can be).
_UPD_OPEN = (update(versions)
             .where(versions.c.series_id == bindparam("b_sid"), versions.c.state == RECEIVING)
             .values(last_received_at=bindparam("b_now"),
                     instance_count=versions.c.instance_count + bindparam("b_inc"),
                     expected_count=func.coalesce(bindparam("b_exp"), versions.c.expected_count))
             .returning(versions.c.id, versions.c.version, versions.c.instance_count,
                        versions.c.expected_count))
_SEL_LATEST = (select(versions.c.version, versions.c.instance_count)
               .where(versions.c.series_id == bindparam("b_sid"))
               .order_by(versions.c.version.desc()).limit(1))
_INS_INSTANCE = instances.insert()
_UPD_INSTANCE = update(instances).where(instances.c.id == bindparam("b_id")).values(
    series_id=bindparam("b_series_id"), version=bindparam("b_version"),
    sop_class_uid=bindparam("b_sop_class_uid"),
    transfer_syntax_uid=bindparam("b_transfer_syntax_uid"),
    instance_number=bindparam("b_instance_number"), path=bindparam("b_path"),
    size=bindparam("b_size"), calling_aet=bindparam("b_calling_aet"),
    received_at=bindparam("b_received_at"), file_missing=bindparam("b_file_missing"))


def _touch_version(conn: Connection, se_id: int, m: InstanceMeta, inc: int,
                   now: datetime) -> tuple[int, int, int, int | None]:
    """Count an instance into the open version (creating one if needed).

    Returns ``(version row id, version, instance_count, expected_count)``.
    """
    r = conn.execute(_UPD_OPEN, {"b_sid": se_id, "b_now": now, "b_inc": inc,
                                 "b_exp": m.expected_count}).first()
    if r is not None:
        return int(r.id), int(r.version), int(r.instance_count), r.expected_count
    cur = conn.execute(_SEL_LATEST, {"b_sid": se_id}).first()
    prev_count, new_version = (0, 1) if cur is None else (cur.instance_count, cur.version + 1)
    # A unique-constraint race here (two receivers opening the same version on
    # PostgreSQL) raises IntegrityError; Store retries the whole transaction.
    vid = conn.execute(versions.insert().values(
        series_id=se_id, version=new_version, state=RECEIVING,
        instance_count=prev_count + inc, expected_count=m.expected_count,
        calling_aet=m.calling_aet, called_aet=m.called_aet,
        first_received_at=now, last_received_at=now,
    )).inserted_primary_key[0]  # type: ignore[index]
    conn.execute(update(series).where(series.c.id == se_id)
                 .values(current_version=new_version))
    return int(vid), new_version, prev_count + inc, m.expected_count


def record_instance(conn: Connection, m: InstanceMeta, *, relpath: str, size: int,
                    now: datetime, cache: IdCache, use_expected_counts: bool,
                    priority: int = 0) -> Recorded:
    """Insert or replace an instance row and count it into its series version."""
    st_id = study_id(conn, m, now, cache)
    se_id = series_id(conn, m, st_id, now, cache)
    old = conn.execute(_SEL_OLD, {"b_sop": m.sop_instance_uid}).first()
    # A replacement within the same series does not add to the count.
    inc = 0 if (old is not None and old.series_id == se_id) else 1
    v_id, version, count, expected = _touch_version(conn, se_id, m, inc, now)
    values = dict(series_id=se_id, version=version, sop_class_uid=m.sop_class_uid,
                  transfer_syntax_uid=m.transfer_syntax_uid, instance_number=m.instance_number,
                  path=relpath, size=size, calling_aet=m.calling_aet, received_at=now,
                  file_missing=False)
    if old is None:
        conn.execute(_INS_INSTANCE, {"sop_instance_uid": m.sop_instance_uid, **values})
    else:
        conn.execute(_UPD_INSTANCE, {"b_id": old.id, **{f"b_{k}": v for k, v in values.items()}})
    job = None
    if use_expected_counts and expected and count >= expected:
        job = complete_version(conn, v_id, by="count", now=now, priority=priority)
    return Recorded(
        replaced_path=old.path if old is not None and old.path != relpath else None,
        was_duplicate=old is not None, version=version, job=job)


def complete_version(conn: Connection, version_id: int, *, by: str, now: datetime,
                     priority: int = 0, quiet_cutoff: datetime | None = None) -> Job | None:
    """Mark a receiving version complete and enqueue its job; ``None`` if someone else did."""
    cond = [versions.c.id == version_id, versions.c.state == RECEIVING]
    if quiet_cutoff is not None:
        cond.append(versions.c.last_received_at <= quiet_cutoff)
    res = conn.execute(update(versions).where(*cond).values(
        state=COMPLETE, completed_at=now, completed_by=by))
    if res.rowcount != 1:
        return None
    r = conn.execute(
        select(versions.c.version, series.c.series_uid, studies.c.study_uid)
        .select_from(versions.join(series, series.c.id == versions.c.series_id)
                     .join(studies, studies.c.id == series.c.study_id))
        .where(versions.c.id == version_id)).one()
    return queue.enqueue(conn, series_version_id=version_id, study_uid=r.study_uid,
                         series_uid=r.series_uid, version=r.version, priority=priority, now=now)


def quiet_versions(conn: Connection, cutoff: datetime) -> list[int]:
    return list(conn.execute(select(versions.c.id).where(
        versions.c.state == RECEIVING, versions.c.last_received_at <= cutoff)
        .order_by(versions.c.last_received_at)).scalars())


def _series_and_version(conn: Connection, series_uid: str, version: int | None) -> tuple[Any, int]:
    """The series row (id, current version, study UID) and the version meant
    (default: the newest); StoreError when the series is unknown."""
    se = conn.execute(select(series.c.id, series.c.current_version, studies.c.study_uid)
                      .join(studies, studies.c.id == series.c.study_id)
                      .where(series.c.series_uid == series_uid)).first()
    if se is None:
        raise StoreError(f"series {series_uid}: not in the store")
    return se, se.current_version if version is None else version


def enqueue_version(conn: Connection, *, series_uid: str, version: int | None, priority: int,
                    now: datetime) -> Job:
    """Complete a series version (default: newest) by command and create (or return) its job."""
    se, v = _series_and_version(conn, series_uid, version)
    vid = conn.execute(select(versions.c.id).where(
        versions.c.series_id == se.id, versions.c.version == v)).scalar()
    if vid is None:
        raise StoreError(f"series {series_uid}: no version {v}")
    conn.execute(update(versions).where(versions.c.id == vid, versions.c.state == RECEIVING)
                 .values(state=COMPLETE, completed_at=now, completed_by="command"))
    return queue.enqueue(conn, series_version_id=vid, study_uid=se.study_uid,
                         series_uid=series_uid, version=v, priority=priority, now=now)


# ---------------------------------------------------------------------- instance rows


def existing_instance(conn: Connection, sop_uid: str) -> tuple[str, bool, int] | None:
    """``(relative path, file missing, version)`` of an instance's row, if it has one."""
    r = conn.execute(select(instances.c.path, instances.c.file_missing, instances.c.version)
                     .where(instances.c.sop_instance_uid == sop_uid)).first()
    return None if r is None else (r.path, bool(r.file_missing), r.version)


def series_usage(conn: Connection, series_uid: str, except_sop_uid: str, *,
                 with_bytes: bool = True) -> tuple[int, int]:
    """``(instances, bytes)`` the series holds, not counting ``except_sop_uid`` (an
    instance received again replaces itself).

    The count is the newest version's cumulative ``instance_count`` (one row, not a
    scan); the bytes (only ``with_bytes``, else 0) sum the sizes of its instance
    rows whose file is present.
    """
    se = conn.execute(select(series.c.id, versions.c.instance_count)
                      .join(versions, (versions.c.series_id == series.c.id)
                            & (versions.c.version == series.c.current_version))
                      .where(series.c.series_uid == series_uid)).first()
    if se is None:
        return 0, 0
    count = int(se.instance_count)
    if except_sop_uid and conn.execute(select(instances.c.id).where(
            instances.c.sop_instance_uid == except_sop_uid,
            instances.c.series_id == se.id)).first() is not None:
        count -= 1
    nbytes = 0
    if with_bytes:
        nbytes = int(conn.execute(
            select(func.coalesce(func.sum(instances.c.size), 0)).where(
                instances.c.series_id == se.id, instances.c.sop_instance_uid != except_sop_uid,
                instances.c.file_missing.is_(False))).scalar_one())
    return max(count, 0), nbytes


def flag_file_missing(conn: Connection, sop_uid: str, relpath: str) -> None:
    """Flag the row of an instance whose file at ``relpath`` failed to become durable."""
    conn.execute(update(instances).where(instances.c.sop_instance_uid == sop_uid,
                                         instances.c.path == relpath).values(file_missing=True))


def instance_paths(conn: Connection) -> dict[str, tuple[str, bool]]:
    """Every instance row: relative path -> ``(SOP Instance UID, file missing)``."""
    rows = conn.execute(select(instances.c.path, instances.c.sop_instance_uid,
                               instances.c.file_missing))
    return {r.path: (r.sop_instance_uid, bool(r.file_missing)) for r in rows}


def set_file_missing(conn: Connection, sop_uids: Sequence[str], missing: bool) -> None:
    """Set ``file_missing`` on these instances' rows (in chunks of 500 UIDs)."""
    for chunk in range(0, len(sop_uids), 500):
        conn.execute(update(instances).where(instances.c.sop_instance_uid.in_(
            list(sop_uids[chunk:chunk + 500]))).values(file_missing=missing))


def instance_refs(conn: Connection, series_uid: str, version: int | None,
                  root: Path) -> list[InstanceRef]:
    """Instances of a series version (default: newest) whose file is present, ordered by
    Instance Number (versions are cumulative: a version holds every earlier instance)."""
    se, v = _series_and_version(conn, series_uid, version)
    rows = conn.execute(select(instances).where(
        instances.c.series_id == se.id, instances.c.version <= v,
        instances.c.file_missing.is_(False)))
    refs = [InstanceRef(se.study_uid, series_uid, r.sop_instance_uid, r.sop_class_uid,
                        root / r.path, r.transfer_syntax_uid, r.instance_number)
            for r in rows]
    refs.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0,
                             i.sop_instance_uid))
    return refs


def series_ref(conn: Connection, series_uid: str, version: int | None) -> SeriesRef:
    """A series version (default: newest) as the worker sees it."""
    se = conn.execute(select(series, studies.c.study_uid)
                      .join(studies, studies.c.id == series.c.study_id)
                      .where(series.c.series_uid == series_uid)).first()
    if se is None:
        raise StoreError(f"series {series_uid}: not in the store")
    v = se.current_version if version is None else version
    sv = conn.execute(select(versions).where(versions.c.series_id == se.id,
                                             versions.c.version == v)).first()
    if sv is None:
        raise StoreError(f"series {series_uid}: no version {v}")
    return SeriesRef(se.study_uid, series_uid, v, se.modality, sv.instance_count,
                     sv.calling_aet, sv.called_aet)
