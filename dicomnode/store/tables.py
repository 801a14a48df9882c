"""SQLAlchemy 2 typed ORM models: the database schema of the node.

The schema changes only through alembic migrations in ``migrations/``;
``tests/unit/test_store_migrations.py`` checks that these models and the
migrations agree. Times are stored as naive UTC (``DateTime`` without time zone)
so that SQLite and PostgreSQL behave the same; :mod:`dicomnode.store` converts
them to aware UTC datetimes at its boundary.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names: alembic autogenerate and both backends agree.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Highest version number created so far (versions start at 1).
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class SeriesVersion(Base):
    """One version of a series: instances received until it was declared complete.

    ``instance_count`` is cumulative: every distinct instance of the series
    received up to and including this version.
    """

    __tablename__ = "series_versions"
    __table_args__ = (
        UniqueConstraint("series_id", "version"),
        Index("ix_series_versions_state_last_received_at", "state", "last_received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # 'receiving' | 'complete'
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    called_aet: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_by: Mapped[str | None] = mapped_column(String(16), nullable=True)  # quiet|count


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    # Version of the series in which this instance (or its latest replacement) arrived.
    version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(String(400))  # relative to storage.path
    size: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime)
    # Set by start-up reconciliation when the row's file is gone.
    file_missing: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_uid", "series_version"),
        Index("ix_jobs_state_priority_id", "state", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_version_id: Mapped[int] = mapped_column(ForeignKey("series_versions.id"))
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    series_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # domain.JobState values
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # JSON list: one entry per failed attempt ({attempt, at, error, transient}), oldest first.
    attempt_log: Mapped[str | None] = mapped_column(Text, nullable=True)
    # JSON object: excluded images, refused models, why the job was skipped.
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The state the job had when a newer version superseded it (done | failed | pending...).
    superseded_state: Mapped[str | None] = mapped_column(String(16), nullable=True)


class JobOutput(Base):
    """An object a job produced (the node's own SEG/SR/SC files)."""

    __tablename__ = "job_outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(16), default="")  # seg | sr | sc | ...
    path: Mapped[str] = mapped_column(String(400))  # relative to storage.path
    created_at: Mapped[datetime] = mapped_column(DateTime)


class DeliveryRow(Base):
    """Outbox: one output object to send to one destination, or one notification.

    ``kind`` is ``dicom`` for a C-STORE of the file at ``path``; ``webhook`` or
    ``hl7`` for a notification of one model result to the notification target
    named in ``destination``, whose message is built from ``payload`` (the JSON
    result summary; ``path`` and ``sop_class_uid`` are empty, ``sop_instance_uid``
    is the notification's deterministic id).
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid"),
        Index("ix_deliveries_destination_state", "destination", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))  # relative to storage.path
    state: Mapped[str] = mapped_column(String(16))  # domain.DeliveryState values
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    peer_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String(16), default="dicom", server_default="dicom")
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
