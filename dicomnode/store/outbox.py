"""Outbox of deliveries: output objects queued per destination, retried with backoff.

Notifications (webhook, HL7) are deliveries too: ``kind`` says which, the
``destination`` column names the notification target and ``payload`` holds the
result summary they are built from; they are claimed, retried, listed and
re-queued exactly like C-STORE deliveries.

A delivery is created in the same transaction that finishes its job
(:meth:`dicomnode.store.Store.finish_job`), so a result is never finished
without its deliveries or queued without its job being done. The dispatcher
claims due deliveries for one destination (``pending`` and due, or ``sending``
whose lease expired after a crash), then marks each done or failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update

from dicomnode.domain import Delivery, DeliveryState, OutputObject
from dicomnode.errors import StoreError
from dicomnode.store._common import aware, deliveries, seconds
from dicomnode.store.retry import RetryStrategy


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to create when a job finishes.

    ``deadline`` (aware or naive UTC) bounds retries; ``None`` uses the
    destination's ``retry_deadline_seconds`` from the settings (or no deadline if
    the destination is not configured).

    A notification has ``kind`` ``webhook`` or ``hl7``, ``destination`` the
    notification target's name, ``payload`` the JSON result summary, and an
    ``output`` whose SOP Instance UID is the notification's id (no file).
    """

    destination: str
    output: OutputObject
    deadline: datetime | None = None
    kind: str = "dicom"
    payload: str | None = None

    @property
    def is_notification(self) -> bool:
        return self.kind != "dicom"


def row_to_delivery(r: Any, root: Path) -> Delivery:
    return Delivery(
        id=r.id, job_id=r.job_id, destination=r.destination,
        sop_instance_uid=r.sop_instance_uid, sop_class_uid=r.sop_class_uid,
        path=root / r.path if r.path else Path(), state=DeliveryState(r.state), attempts=r.attempts,
        not_before=aware(r.not_before), deadline=aware(r.deadline), last_error=r.last_error,
        peer_status=r.peer_status, created_at=aware(r.created_at), updated_at=aware(r.updated_at),
        kind=r.kind or "dicom", payload=r.payload,
    )


def add(conn: Connection, *, job_id: int, destination: str, sop_instance_uid: str,
        sop_class_uid: str, relpath: str, deadline: datetime | None, now: datetime,
        kind: str = "dicom", payload: str | None = None) -> None:
    # A job re-run by command queues the same (job, destination, object) again:
    # the existing row goes back to pending (sent again), it is not duplicated.
    res = conn.execute(update(deliveries).where(
        deliveries.c.job_id == job_id, deliveries.c.destination == destination,
        deliveries.c.sop_instance_uid == sop_instance_uid).values(
        sop_class_uid=sop_class_uid, path=relpath, state=DeliveryState.PENDING.value,
        attempts=0, not_before=None, lease_until=None, last_error=None, peer_status=None,
        deadline=deadline, updated_at=now, kind=kind, payload=payload))
    if res.rowcount:
        return
    conn.execute(deliveries.insert().values(
        job_id=job_id, destination=destination, sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid, path=relpath, state=DeliveryState.PENDING.value,
        attempts=0, deadline=deadline, created_at=now, updated_at=now, kind=kind,
        payload=payload))


def _due(now: datetime) -> Any:
    return or_(
        and_(deliveries.c.state == DeliveryState.PENDING.value,
             or_(deliveries.c.not_before.is_(None), deliveries.c.not_before <= now)),
        and_(deliveries.c.state == DeliveryState.SENDING.value, deliveries.c.lease_until < now),
    )


def claim(conn: Connection, *, destination: str, worker_id: str, limit: int,
          lease_seconds: float, now: datetime, root: Path) -> list[Delivery]:
    q = (select(deliveries.c.id).where(deliveries.c.destination == destination, _due(now))
         .order_by(deliveries.c.id).limit(limit))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    ids = list(conn.execute(q).scalars())
    claimed: list[int] = []
    for i in ids:
        res = conn.execute(update(deliveries).where(deliveries.c.id == i, _due(now)).values(
            state=DeliveryState.SENDING.value, attempts=deliveries.c.attempts + 1,
            worker_id=worker_id, lease_until=now + seconds(lease_seconds), updated_at=now))
        if res.rowcount == 1:
            claimed.append(i)
    if not claimed:
        return []
    rows = conn.execute(select(deliveries).where(deliveries.c.id.in_(claimed))
                        .order_by(deliveries.c.id))
    return [row_to_delivery(r, root) for r in rows]


def get(conn: Connection, delivery_id: int, root: Path) -> Delivery:
    r = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
    if r is None:
        raise StoreError(f"delivery {delivery_id}: no such delivery")
    return row_to_delivery(r, root)


def mark_done(conn: Connection, *, delivery_id: int, peer_status: int | None, now: datetime,
              root: Path) -> Delivery:
    get(conn, delivery_id, root)
    conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(
        state=DeliveryState.DONE.value, peer_status=peer_status, lease_until=None,
        last_error=None, updated_at=now))
    return get(conn, delivery_id, root)


def mark_failed(conn: Connection, *, delivery: Delivery, error: str, transient: bool,
                peer_status: int | None, strategy: RetryStrategy, now: datetime,
                root: Path) -> Delivery:
    """Record a failed send of ``delivery`` (as read in this transaction): back to
    pending at the ``strategy``'s next attempt time (bounded by the row's deadline), or
    ``failed`` with the reason appended to ``error``."""
    deadline = delivery.deadline.replace(tzinfo=None) if delivery.deadline else None
    decision = strategy.decide(attempts=delivery.attempts, now=now, deadline=deadline,
                               transient=transient)
    if decision.retry_at is not None:
        values: dict[str, Any] = dict(state=DeliveryState.PENDING.value,
                                      not_before=decision.retry_at)
    else:
        error = f"{error} ({decision.reason})"
        values = dict(state=DeliveryState.FAILED.value)
    conn.execute(update(deliveries).where(deliveries.c.id == delivery.id).values(
        last_error=error[:4000], peer_status=peer_status, lease_until=None, updated_at=now,
        **values))
    return get(conn, delivery.id, root)


def retry(conn: Connection, *, delivery_id: int, deadline: datetime | None, now: datetime,
          root: Path) -> Delivery:
    d = get(conn, delivery_id, root)
    if d.state is not DeliveryState.FAILED:
        raise StoreError(
            f"delivery {delivery_id}: is {d.state.value}; only failed ones are retried")
    conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(
        state=DeliveryState.PENDING.value, attempts=0, not_before=None, lease_until=None,
        deadline=deadline, updated_at=now))
    return get(conn, delivery_id, root)


def list_(conn: Connection, *, root: Path, job_id: int | None = None,
          states: Sequence[DeliveryState] = (), destination: str | None = None,
          limit: int = 100) -> list[Delivery]:
    q = select(deliveries)
    if job_id is not None:
        q = q.where(deliveries.c.job_id == job_id)
    if states:
        q = q.where(deliveries.c.state.in_([DeliveryState(s).value for s in states]))
    if destination:
        q = q.where(deliveries.c.destination == destination)
    q = q.order_by(deliveries.c.id.desc()).limit(limit)
    return [row_to_delivery(r, root) for r in conn.execute(q)]


def sending_holders(conn: Connection) -> list[str]:
    """Distinct ids of the dispatchers holding deliveries in ``sending``."""
    rows = conn.execute(select(deliveries.c.worker_id).where(
        deliveries.c.state == DeliveryState.SENDING.value,
        deliveries.c.worker_id.is_not(None)).distinct())
    return sorted(str(r[0]) for r in rows)


def release(conn: Connection, *, worker_ids: Sequence[str], now: datetime) -> int:
    """Deliveries ``sending`` for these (dead) dispatchers go back to ``pending`` now.

    The claim already counted the attempt; whether the peer stored the object is
    unknown, and re-sending it is harmless (same SOP Instance UID).
    """
    if not worker_ids:
        return 0
    res = conn.execute(update(deliveries).where(
        deliveries.c.state == DeliveryState.SENDING.value,
        deliveries.c.worker_id.in_(list(worker_ids))).values(
        state=DeliveryState.PENDING.value, lease_until=None, not_before=None, updated_at=now))
    return int(res.rowcount or 0)
