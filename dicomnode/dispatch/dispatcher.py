"""The dispatcher loop: drains the outbox.

::

    claim due deliveries of a destination -> one association per batch (C-STORE SCU)
        -> done | retry with backoff | failed (with the peer's status) after the deadline

Notifications (webhook / HL7 / FHIR) are outbox rows too: claimed the same way, sent one
by one (:mod:`dicomnode.dispatch.notify`), and their outcome recorded by the same
:meth:`Dispatcher._record` as a C-STORE's. Any number of dispatchers may share a
database: deliveries are claimed atomically with a lease.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomnode.audit import AuditEvent, AuditLog
from dicomnode.config import DestinationConfig, NotificationConfig, Settings
from dicomnode.dispatch.notify import ResultSummary, notify
from dicomnode.dispatch.scu import AssociationFailed, FileOutcome, OutcomeState, store_files
from dicomnode.domain import Delivery, DeliveryState, WakeSignal, worker_identity
from dicomnode.errors import DispatchError, StoreError
from dicomnode.logs import kv
from dicomnode.store import Store
from dicomnode.telemetry import METRICS, guard

log = logging.getLogger(__name__)

#: Deliveries are bounded by their destination's retry deadline, not by a count.
_NO_ATTEMPT_LIMIT = 1_000_000


@dataclass
class DispatchReport:
    """What one claimed batch to one destination (or notification target) did."""

    destination: str
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    associations: int = 0
    seconds: float = 0.0


class Dispatcher:
    """Drains the outbox: per destination, one association per claimed batch."""

    def __init__(self, settings: Settings, store: Store, *, worker_id: str | None = None,
                 batch: int = 64, lease_seconds: float = 300.0) -> None:
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or worker_identity("dispatcher")
        self.batch = batch
        self.lease_seconds = lease_seconds
        self._orphans_checked = 0.0
        self.audit = AuditLog.from_settings(settings, role="dispatcher")
        for key, var in self.unset_secrets():
            log.warning("secret environment variable not set: its deliveries will fail until "
                        "it is", extra=kv(setting=key, variable=var))

    def unset_secrets(self) -> list[tuple[str, str]]:
        """(setting, variable) of each secret named by an environment variable that is not
        set in this process (told at start, not first at the next result)."""
        out = []
        for i, d in enumerate(self.settings.destinations):
            for name in ("password_env", "token_env"):
                var = getattr(d, name)
                used = (d.auth == "basic") if name == "password_env" else (d.auth == "bearer")
                if var and used and not os.environ.get(var):
                    out.append((f"destinations[{i}].{name}", var))
        for i, n in enumerate(self.settings.notifications):
            for name in ("auth_token_env", "signing_secret_env"):
                var = getattr(n, name)
                if var and not os.environ.get(var):
                    out.append((f"notifications[{i}].{name}", var))
        return out

    def poll_once(self) -> list[DispatchReport]:
        """Send every due delivery once (batch by batch); the reports of this round."""
        reports = []
        for dest in self.settings.destinations:
            reports += self._drain(dest.name, lambda claimed, d=dest: self.send(d, claimed))
        for target in self.settings.notifications:
            reports += self._drain(target.name,
                                   lambda claimed, t=target: self.notify(t, claimed))
        if time.monotonic() - self._orphans_checked > 30:
            self._fail_orphans()
        return reports

    def _drain(self, name: str, handle: Any) -> list[DispatchReport]:
        """Claim ``name``'s due deliveries batch by batch and hand each batch to ``handle``."""
        reports = []
        while True:
            claimed = self.store.claim_deliveries(name, self.worker_id, limit=self.batch,
                                                  lease_seconds=self.lease_seconds)
            if not claimed:
                break
            reports.append(handle(claimed))
            if len(claimed) < self.batch:
                break
        return reports

    def send(self, dest: DestinationConfig, claimed: Sequence[Delivery]) -> DispatchReport:
        """C-STORE (``kind: dicom``) or STOW-RS (``kind: dicomweb``) ``claimed`` to ``dest``
        and record each delivery's outcome."""
        node = self.settings.node
        rep = DispatchReport(dest.name)
        t0 = time.perf_counter()
        try:
            if dest.kind == "dicomweb":
                # Imported on first use: dicomweb-client + requests cost ~0.45 s of start-up
                # per process (measured), paid only by a node with a dicomweb destination.
                from dicomnode.dispatch.stow import stow_files

                outcomes = stow_files(dest, [d.path for d in claimed])
            else:
                result = store_files(dest, [d.path for d in claimed],
                                     calling_ae_title=node.ae_title,
                                     acse_timeout=node.acse_timeout,
                                     dimse_timeout=node.dimse_timeout,
                                     network_timeout=node.network_timeout)
                outcomes, rep.associations = result.outcomes, result.associations
        except AssociationFailed as exc:
            outcomes = exc.outcomes
            rep.associations = 1
        except Exception as exc:  # noqa: BLE001 - a bug or OS error must not strand 'sending'
            log.exception("dispatch batch failed unexpectedly", extra=kv(destination=dest.name))
            outcomes = tuple(FileOutcome(d.path, d.sop_instance_uid, d.sop_class_uid,
                                         OutcomeState.FAILED, None, True,
                                         f"{type(exc).__name__}: {exc}") for d in claimed)
        for d, o in zip(claimed, outcomes, strict=True):
            self._record(rep, d, "delivery", ok=o.ok, status=o.status,
                         error=o.message or f"status {o.status_hex}", transient=o.transient,
                         sop_instance_uid=d.sop_instance_uid, peer_status=o.status_hex)
        self._summary(rep, "dispatched", t0, kind=dest.kind, associations=rep.associations)
        self._audit_sent(dest, claimed, outcomes)
        return rep

    def _audit_sent(self, dest: DestinationConfig, claimed: Sequence[Delivery],
                    outcomes: Sequence[FileOutcome]) -> None:
        """One audit record per study: instances sent to ``dest`` (and those not sent)."""
        if not self.audit.enabled:
            return
        per: dict[int, list[int]] = {}  # job id -> [sent, not sent]
        for d, o in zip(claimed, outcomes, strict=True):
            per.setdefault(d.job_id, [0, 0])[0 if o.ok else 1] += 1
        peer: dict[str, str] = ({"destination": dest.name, "url": dest.url}
                                if dest.kind == "dicomweb" else
                                {"destination": dest.name, "called_aet": dest.ae_title,
                                 "peer": f"{dest.host}:{dest.port}"})
        for job_id, (sent, not_sent) in per.items():
            try:
                job = self.store.get_job(job_id)
            except StoreError:
                continue
            self.audit.safe_record(
                AuditEvent.INSTANCES_SENT, "success" if not not_sent else "minor-failure",
                study_uid=job.study_uid, series_uid=job.series_uid, job_id=job_id,
                instances=sent, not_sent=not_sent, **peer)

    def notify(self, target: NotificationConfig, claimed: Sequence[Delivery]) -> DispatchReport:
        """Send each claimed notification (webhook POST, HL7 ORU^R01 or FHIR transaction
        Bundle) and record it.

        Failures follow the C-STORE rules: transient ones (5xx/408/429,
        timeouts, refused connections, HL7 ``AE``) go back to ``pending`` with
        backoff until the target's ``retry_deadline_seconds``; permanent ones
        (other 4xx, HL7 ``AR``), or any past the deadline, end ``failed``.
        """
        rep = DispatchReport(target.name)
        t0 = time.perf_counter()
        for d in claimed:
            status: int | None = None
            err, transient = "", False
            try:
                if d.kind != target.kind:
                    raise DispatchError(f"notification {target.name}: queued as {d.kind}, "
                                        f"configured as {target.kind}", transient=False)
                summary = ResultSummary.from_json(json.loads(d.payload or "{}"))
                if target.kind == "fhir":
                    # Imported on first use: the fhir.resources models (pydantic) cost ~15 MB
                    # and ~0.35 s per process (measured), paid only with a fhir target.
                    from dicomnode.dispatch.fhir import send_fhir

                    status = send_fhir(target, summary, d.sop_instance_uid)
                else:
                    status = notify(target, summary, d.sop_instance_uid)
                ok = True
            except DispatchError as exc:
                ok, err, transient, status = False, str(exc), exc.transient, exc.status
            except Exception as exc:  # noqa: BLE001 - a bug must not strand 'sending'
                log.exception("notification failed unexpectedly", extra=kv(
                    delivery_id=d.id, destination=target.name))
                ok, err, transient = False, f"{type(exc).__name__}: {exc}", False
            self._record(rep, d, "notification", ok=ok, status=status, error=err,
                         transient=transient, kind=target.kind)
        self._summary(rep, "notified", t0, kind=target.kind)
        return rep

    # -- the one outcome recorder (DICOM deliveries and notifications)

    def _record(self, rep: DispatchReport, d: Delivery, what: str, *, ok: bool,
                status: int | None, error: str, transient: bool, **fields: Any) -> None:
        """Record one delivery's outcome: ``done``, or a failure the store turns into
        ``pending`` (retry with backoff, before the deadline) or ``failed``."""
        if ok:
            self.store.delivery_done(d.id, status)
            rep.sent += 1
            self._metric(rep, what, fields, "done")
            return
        after = self.store.delivery_failed(d.id, error, transient=transient,
                                           peer_status=status, max_attempts=_NO_ATTEMPT_LIMIT)
        if after.state is DeliveryState.FAILED:
            self._metric(rep, what, fields, "failed")
            rep.failed += 1
            log.error(f"{what} failed", extra=kv(
                delivery_id=d.id, job_id=d.job_id, destination=rep.destination,
                **fields, error=after.last_error))
        else:
            self._metric(rep, what, fields, "retrying")
            rep.retrying += 1

    @staticmethod
    def _metric(rep: DispatchReport, what: str, fields: dict[str, Any], outcome: str) -> None:
        with guard():
            if what == "notification":
                METRICS.notifications.labels(rep.destination, fields.get("kind", ""),
                                             outcome).inc()
            else:
                METRICS.deliveries.labels(rep.destination, outcome).inc()
            if outcome == "retrying":
                METRICS.retries.labels(what).inc()

    @staticmethod
    def _summary(rep: DispatchReport, message: str, t0: float, **fields: Any) -> None:
        rep.seconds = time.perf_counter() - t0
        log.log(logging.INFO if not (rep.failed or rep.retrying) else logging.WARNING,
                message, extra=kv(destination=rep.destination, **fields, sent=rep.sent,
                                  retrying=rep.retrying, failed=rep.failed,
                                  seconds=round(rep.seconds, 3)))

    def _fail_orphans(self) -> None:
        """Deliveries to a destination (or notification target) no longer configured
        fail visibly (re-triable)."""
        self._orphans_checked = time.monotonic()
        known = ({d.name for d in self.settings.destinations}
                 | {n.name for n in self.settings.notifications})
        pending = self.store.list_deliveries(states=[DeliveryState.PENDING], limit=1000)
        for name in sorted({d.destination for d in pending} - known):
            for d in self.store.claim_deliveries(name, self.worker_id, limit=1000):
                self.store.delivery_failed(
                    d.id, f"destination {name!r} is not configured", transient=False)

    def run(self, stop: threading.Event, *, until_idle: bool = False,
            wake: WakeSignal | None = None) -> int:
        """Loop until ``stop``; returns the number of deliveries sent.

        ``wake``: set by workers when they queue deliveries; the loop then polls
        at once instead of waiting ``worker.poll_seconds``.
        """
        n = 0
        while not stop.is_set():
            if wake is not None:
                wake.clear()  # set again by anything queued from now on
            try:
                reports = self.poll_once()
            except StoreError as exc:
                log.warning("dispatch round failed; retrying", extra=kv(error=str(exc)))
                reports = []
            n += sum(r.sent for r in reports)
            if until_idle and not reports:
                break
            if not reports:
                if wake is not None:
                    wake.wait(self.settings.worker.poll_seconds)
                else:
                    stop.wait(self.settings.worker.poll_seconds)
        return n
