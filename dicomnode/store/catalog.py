"""What was received, as operators see it: per study, per series (newest version),
counts, missing files and the job's state (``dicomnode studies``).

Read-only queries over the series bookkeeping of :mod:`dicomnode.store.series`
and the jobs of :mod:`dicomnode.store.queue`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, func, select

from dicomnode.domain import JobState
from dicomnode.store._common import aware, instances, jobs, series, studies, versions


@dataclass(frozen=True)
class SeriesSummary:
    series_uid: str
    modality: str
    description: str
    version: int
    state: str  # receiving | complete
    instance_count: int
    expected_count: int | None
    missing_files: int
    last_received_at: datetime | None
    job_id: int | None
    job_state: JobState | None


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    description: str
    series: tuple[SeriesSummary, ...] = field(default_factory=tuple)


def study_summaries(conn: Connection, *, study_uid: str | None, limit: int) -> list[StudySummary]:
    """The newest ``limit`` studies (or the one ``study_uid``), each with its series."""
    sq = select(studies).order_by(studies.c.id.desc()).limit(limit)
    if study_uid:
        sq = sq.where(studies.c.study_uid == study_uid)
    return [StudySummary(st.study_uid, st.patient_id, st.patient_name, st.study_date,
                         st.accession_number, st.description,
                         tuple(_series_summaries(conn, st.id)))
            for st in conn.execute(sq).all()]


def _series_summaries(conn: Connection, study_id: int) -> list[SeriesSummary]:
    rows = conn.execute(
        select(series, versions.c.state, versions.c.instance_count, versions.c.expected_count,
               versions.c.last_received_at, versions.c.version)
        .join(versions, (versions.c.series_id == series.c.id)
              & (versions.c.version == series.c.current_version))
        .where(series.c.study_id == study_id).order_by(series.c.series_number,
                                                       series.c.id)).all()
    summaries = []
    for r in rows:
        missing = conn.execute(select(func.count()).where(
            instances.c.series_id == r.id, instances.c.file_missing.is_(True))).scalar_one()
        job = conn.execute(select(jobs.c.id, jobs.c.state).where(
            jobs.c.series_uid == r.series_uid, jobs.c.series_version == r.version)).first()
        summaries.append(SeriesSummary(
            r.series_uid, r.modality, r.description, r.version, r.state, r.instance_count,
            r.expected_count, missing, aware(r.last_received_at),
            job.id if job else None, JobState(job.state) if job else None))
    return summaries
