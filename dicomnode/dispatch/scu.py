"""C-STORE SCU: send stored files to one destination, checking every status.

Files are sent exactly as stored (same transfer syntax, bytes streamed from
disk). One association carries a whole batch; it proposes exactly the SOP
classes and transfer syntaxes the batch needs, one presentation context per
(SOP class, transfer syntax) pair so that the peer can accept or refuse each
syntax separately. For SOP classes whose files are not compressed, explicit
and implicit VR little endian are proposed as a fallback and used only when
the peer refuses the stored syntax; compressed data is never transcoded.

Outcomes
--------
:func:`store_files` returns one :class:`FileOutcome` per input path, in
order, so that the outbox can mark each delivery:

* ``0x0000`` -> ``stored``; ``0xB000``/``0xB006``/``0xB007`` (and the other
  warning codes) -> ``warning`` (the peer kept the instance);
* any other status -> ``failed``, with the status in hex and whether a retry
  can help (:func:`is_transient_status`);
* a file the peer cannot take (SOP class or compressed syntax refused) or
  that cannot be read -> ``failed`` and permanent, ``status`` ``None``.

A connection that cannot be opened, an association the peer rejects or an
association aborted mid-batch raises :class:`AssociationFailed` (a transient
:class:`~dicomnode.errors.DispatchError`) carrying the outcomes known so far:
instances acknowledged before an abort stay ``stored``.
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from dicomnode.compat.pynetdicom import guard_reactor_race, set_store_send_chunked
from dicomnode.config import DestinationConfig
from dicomnode.errors import DispatchError
from dicomnode.logs import kv

log = logging.getLogger(__name__)

# Sending a path streams the dataset bytes from the file instead of decoding
# and re-encoding it: the file goes out exactly as stored, in bounded memory.
# The flag only changes how *paths* are sent (it then requires an exact
# transfer syntax match, which is what we want); datasets are unaffected.
set_store_send_chunked(True)

#: A-ASSOCIATE-RQ carries at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
_FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNING_CODES = {0x0001, 0x0107, 0x0116}
# Failures no retry can fix: the peer judged the data itself, or refuses this
# SOP class / this caller. Everything else (0xA7xx out of resources, 0x0110
# processing failure, unknown codes) is retried until the delivery deadline.
_PERMANENT_CODES = {0x0117, 0x0122, 0x0124}


class OutcomeState(enum.StrEnum):
    STORED = "stored"
    WARNING = "warning"  # stored, with a warning status
    FAILED = "failed"


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    state: OutcomeState
    status: int | None = None  # DIMSE status from the peer; None if no response
    transient: bool = False  # for failures: can a retry help?
    message: str = ""
    transfer_syntax: str = ""  # syntax it was sent in (stored one unless converted)

    @property
    def ok(self) -> bool:
        """The peer holds the instance (success or warning)."""
        return self.state is not OutcomeState.FAILED

    @property
    def status_hex(self) -> str:
        return "" if self.status is None else f"0x{self.status:04X}"


@dataclass(frozen=True)
class SendResult:
    destination: str
    outcomes: tuple[FileOutcome, ...]
    associations: int = 0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def stored(self) -> tuple[FileOutcome, ...]:
        return tuple(o for o in self.outcomes if o.ok)

    @property
    def warnings(self) -> tuple[FileOutcome, ...]:
        return tuple(o for o in self.outcomes if o.state is OutcomeState.WARNING)

    @property
    def failed(self) -> tuple[FileOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)


class AssociationFailure(enum.StrEnum):
    """How an association failed (:attr:`AssociationFailed.kind`)."""

    UNREACHABLE = "unreachable"  # no connection
    REJECTED = "rejected"  # A-ASSOCIATE-RJ
    ABORTED = "aborted"  # aborted during negotiation
    LOST = "lost"  # aborted or broken after it was established


class AssociationFailed(DispatchError):
    """No association, a rejected one, or one lost mid-batch (always transient).

    ``outcomes`` lists every input file: those the peer acknowledged before the
    failure keep their status, the others are failed and transient. ``kind`` says
    how it failed; ``detail`` is the peer's rejection (result, source, reason).
    """

    def __init__(self, message: str, outcomes: Sequence[FileOutcome] = (), *,
                 kind: AssociationFailure = AssociationFailure.LOST, detail: str = ""):
        super().__init__(message, transient=True)
        self.outcomes = tuple(outcomes)
        self.kind = kind
        self.detail = detail


def status_text(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)`` style description."""
    desc = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if desc is None:
        desc = GENERAL_STATUS.get(code)
    return f"0x{code:04X}" + (f" ({desc[1]})" if desc else "")


def is_warning_status(code: int) -> bool:
    return 0xB000 <= code <= 0xBFFF or code in _WARNING_CODES


def is_transient_status(code: int) -> bool:
    """Can a failure status be cured by retrying later?

    0xA7xx (out of resources) and processing failures are transient; 0xA9xx
    (data set does not match SOP class), 0xCxxx (cannot understand), SOP class
    not supported, not authorized and invalid object instance are permanent.
    """
    if 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF:
        return False
    return code not in _PERMANENT_CODES


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    sop_class: UID
    sop_instance: str
    syntax: UID

    @property
    def convertible(self) -> bool:
        # Native little-endian (and deflated) encodings re-encode without loss
        # into the other little-endian syntax; encapsulated pixel data would
        # need transcoding (never done) and big endian a pixel byte swap.
        return not self.syntax.is_encapsulated and self.syntax.is_little_endian


def _read_item(index: int, path: Path) -> _Item | FileOutcome:
    try:
        meta = read_file_meta_info(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a per-file failure
        return FileOutcome(path, "", "", OutcomeState.FAILED, transient=False,
                           message=f"cannot read DICOM file meta: {exc}")
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                           "TransferSyntaxUID") if not meta.get(k)]
    if missing:
        return FileOutcome(path, str(meta.get("MediaStorageSOPInstanceUID", "")),
                           str(meta.get("MediaStorageSOPClassUID", "")), OutcomeState.FAILED,
                           transient=False,
                           message=f"file meta lacks {', '.join(missing)}; cannot send")
    return _Item(index, path, UID(str(meta.MediaStorageSOPClassUID)),
                 str(meta.MediaStorageSOPInstanceUID), UID(str(meta.TransferSyntaxUID)))


def _contexts_for(items: Iterable[_Item]) -> dict[UID, list[UID]]:
    """SOP class -> syntaxes to propose (stored ones first, then fallbacks)."""
    out: dict[UID, list[UID]] = {}
    for it in items:
        syntaxes = out.setdefault(it.sop_class, [])
        if it.syntax not in syntaxes:
            syntaxes.append(it.syntax)
    for sop_class, syntaxes in out.items():
        if any(not s.is_encapsulated and s.is_little_endian for s in syntaxes):
            syntaxes.extend(s for s in _FALLBACK_SYNTAXES if s not in syntaxes)
        out[sop_class] = syntaxes
    return out


def _batches(items: list[_Item]) -> list[tuple[list[_Item], list[PresentationContext]]]:
    """Split items into associations of at most 128 presentation contexts."""
    plan = _contexts_for(items)
    by_class: dict[UID, list[_Item]] = {}
    for it in items:
        by_class.setdefault(it.sop_class, []).append(it)
    batches: list[tuple[list[_Item], list[PresentationContext]]] = []
    cur_items: list[_Item] = []
    cur_cx: list[PresentationContext] = []
    for sop_class, syntaxes in plan.items():
        syntaxes = syntaxes[:MAX_CONTEXTS]
        if len(cur_cx) + len(syntaxes) > MAX_CONTEXTS:
            batches.append((cur_items, cur_cx))
            cur_items, cur_cx = [], []
        for ts in syntaxes:
            cx = PresentationContext()
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = [ts]
            cur_cx.append(cx)
        cur_items.extend(by_class[sop_class])
    if cur_items:
        batches.append((cur_items, cur_cx))
    # Keep the caller's order inside each association.
    return [(sorted(b, key=lambda i: i.index), cx) for b, cx in batches]


# --------------------------------------------------------------------------- sending


def _accepted(assoc: Association) -> dict[UID, list[UID]]:
    """SOP class -> accepted syntaxes, in the order pynetdicom searches them."""
    acc: dict[UID, list[UID]] = {}
    for cx in assoc.accepted_contexts:
        acc.setdefault(UID(str(cx.abstract_syntax)), []).append(UID(cx.transfer_syntax[0]))
    return acc


def _failed(it: _Item, message: str, *, transient: bool, status: int | None = None,
            syntax: str = "") -> FileOutcome:
    return FileOutcome(it.path, it.sop_instance, str(it.sop_class), OutcomeState.FAILED,
                       status=status, transient=transient, message=message,
                       transfer_syntax=syntax)


def _send_one(assoc: Association, it: _Item, accepted: dict[UID, list[UID]]) -> FileOutcome:
    syntaxes = accepted.get(it.sop_class, [])
    if not syntaxes:
        why = (f"peer accepted no presentation context for {it.sop_class.name} "
               f"({it.sop_class}) with {it.syntax.name} ({it.syntax})")
        if it.convertible:
            why += " nor little endian fallbacks"
        else:
            why += "; compressed data is sent as stored, never transcoded"
        return _failed(it, why, transient=False)
    payload: Path | Dataset
    if it.syntax in syntaxes and it.syntax.is_deflated:
        # pynetdicom's streaming of a file sends the raw deflate stream, whose
        # length may be odd: DCMTK-based peers (Orthanc) then fail with "Odd
        # Fragment Length". Decoded and re-deflated by pynetdicom, it is padded.
        try:
            payload = dcmread(it.path)
        except Exception as exc:  # noqa: BLE001
            return _failed(it, f"cannot read file: {exc}", transient=False)
        sent_as = it.syntax
    elif it.syntax in syntaxes:
        payload, sent_as = it.path, it.syntax
    elif it.convertible and (fallback := [s for s in _FALLBACK_SYNTAXES if s in syntaxes]):
        # The peer refused the stored syntax: re-encode the (uncompressed) data
        # set in a little-endian syntax it accepted. pynetdicom picks the
        # accepted uncompressed context and encodes the dataset for it.
        try:
            payload = dcmread(it.path)
        except Exception as exc:  # noqa: BLE001
            return _failed(it, f"cannot read file: {exc}", transient=False)
        sent_as = fallback[0]  # pynetdicom takes the first accepted convertible context
    else:
        return _failed(
            it,
            f"peer refused transfer syntax {it.syntax.name} ({it.syntax}) for "
            f"{it.sop_class.name}; it accepts only {sorted(str(s) for s in syntaxes)} "
            "(compressed data is sent as stored, never transcoded)",
            transient=False)
    try:
        status_ds = assoc.send_c_store(payload)
    except (ValueError, AttributeError) as exc:
        # No usable context or an encoding failure: retrying cannot change it.
        return _failed(it, f"cannot send: {exc}", transient=False)
    except (OSError, RuntimeError) as exc:
        return _failed(it, f"association lost while sending: {exc}", transient=True)
    if "Status" not in status_ds:
        # No response: DIMSE timeout (pynetdicom then aborts) or connection lost.
        return _failed(it, "no C-STORE response (DIMSE timeout or association lost)",
                       transient=True, syntax=str(sent_as))
    code = int(status_ds.Status)
    comment = str(status_ds.get("ErrorComment", "") or "").strip()
    text = status_text(code) + (f": {comment}" if comment else "")
    base = dict(path=it.path, sop_instance_uid=it.sop_instance,
                sop_class_uid=str(it.sop_class), status=code, transfer_syntax=str(sent_as))
    if code == 0x0000:
        return FileOutcome(state=OutcomeState.STORED, message="stored", **base)  # type: ignore[arg-type]
    if is_warning_status(code):
        return FileOutcome(state=OutcomeState.WARNING, message=f"stored with warning {text}",
                           **base)  # type: ignore[arg-type]
    transient = is_transient_status(code)
    return FileOutcome(state=OutcomeState.FAILED, transient=transient,
                       message=f"peer returned {text}", **base)  # type: ignore[arg-type]


def _reject_text(primitive: Any) -> str:
    try:
        return (f"{primitive.result_str}, source: {primitive.source_str}, "
                f"reason: {primitive.reason_str}")
    except Exception:  # noqa: BLE001 - best effort description only
        return "no reason given"


def store_files(
    destination: DestinationConfig,
    paths: Sequence[str | Path],
    *,
    calling_ae_title: str = "DICOMNODE",
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    on_outcome: Callable[[FileOutcome], None] | None = None,
) -> SendResult:
    """Send ``paths`` to ``destination`` by C-STORE, as stored.

    Parameters
    ----------
    destination
        AE title, host, port, optional calling AE title (overrides
        ``calling_ae_title``) and maximum PDU size (0 = unlimited).
    paths
        Stored DICOM files (Part 10, with file meta).
    calling_ae_title
        Our AE title, normally ``node.ae_title``.
    on_outcome
        Called with each file's final outcome as soon as it is known (in the
        order files are settled, not input order): progress reporting.

    Returns
    -------
    SendResult
        One outcome per path, in input order.

    Raises
    ------
    AssociationFailed
        Connection refused, association rejected or aborted (transient);
        ``outcomes`` carries the per-file outcomes known at that point.
    """
    calling = destination.calling_ae_title or calling_ae_title
    files = [Path(p) for p in paths]
    outcomes: dict[int, FileOutcome] = {}

    def settle(index: int, outcome: FileOutcome) -> None:
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    def settle_rest(message: str) -> None:
        for it in items:  # later batches were never tried
            if it.index not in outcomes:
                settle(it.index, _failed(it, message, transient=True))

    items: list[_Item] = []
    for i, p in enumerate(files):
        r = _read_item(i, p)
        if isinstance(r, FileOutcome):
            settle(i, r)
        else:
            items.append(r)

    def ordered() -> tuple[FileOutcome, ...]:
        return tuple(outcomes[i] for i in range(len(files)))

    ae = AE(ae_title=calling)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_pdu_size = destination.max_pdu
    n_assoc = 0
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    for batch, contexts in _batches(items):
        connected: list[bool] = []
        received: list[Any] = []
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, lambda _e, c=connected: c.append(True)),
            (evt.EVT_ACSE_RECV, lambda e, r=received: r.append(e.primitive)),
        ]
        t0 = time.monotonic()
        assoc = ae.associate(destination.host, destination.port, contexts=contexts,
                             ae_title=destination.ae_title, evt_handlers=handlers)
        n_assoc += 1
        if not assoc.is_established and any(
            getattr(p, "result", None) == 0x00 for p in received
        ):
            # A-ASSOCIATE-AC with every presentation context refused
            # (pynetdicom then aborts): the peer takes none of these SOP class /
            # syntax pairs. Asking again will not change that.
            for it in batch:
                settle(it.index, _failed(
                    it, f"{peer} accepted no presentation context for {it.sop_class.name} "
                    f"({it.sop_class}) with {it.syntax.name} ({it.syntax}) or any fallback",
                    transient=False))
            log.warning("dispatch: peer refused every presentation context", extra=kv(
                destination=destination.name, peer=peer, files=len(batch)))
            continue
        if not assoc.is_established:
            detail = ""
            if not connected:
                kind = AssociationFailure.UNREACHABLE
                why = f"cannot connect to {peer} (connection refused or unreachable)"
            elif assoc.is_rejected:
                kind, detail = AssociationFailure.REJECTED, _reject_text(received[-1])
                why = f"{peer} rejected the association: {detail}"
            else:
                kind = AssociationFailure.ABORTED
                why = f"{peer} aborted the association during negotiation"
            for it in batch:
                settle(it.index, _failed(it, why, transient=True))
            settle_rest(f"not sent: {why}")
            log.warning("dispatch association failed", extra=kv(
                destination=destination.name, peer=peer, reason=why, files=len(files)))
            raise AssociationFailed(why, ordered(), kind=kind, detail=detail)
        guard_reactor_race(assoc)
        try:
            # Small PDUs (C-STORE responses, short datasets) must not wait
            # for Nagle's algorithm.
            sock = assoc.dul.socket.socket  # type: ignore[union-attr]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass
        accepted = _accepted(assoc)
        lost: str | None = None
        for it in batch:
            if lost is not None:
                settle(it.index, _failed(it, f"not sent: {lost}", transient=True))
                continue
            out = _send_one(assoc, it, accepted)
            if not assoc.is_established:
                lost = f"association with {peer} was aborted"
                if not out.ok:
                    out = _failed(it, f"{lost} ({out.message})", transient=True,
                                  status=out.status, syntax=out.transfer_syntax)
            settle(it.index, out)
        if lost is None:
            assoc.release()
        else:
            settle_rest(f"not sent: {lost}")
            log.warning("dispatch association lost", extra=kv(
                destination=destination.name, peer=peer, files=len(files)))
            raise AssociationFailed(lost, ordered())
        done = [outcomes[it.index] for it in batch]
        log.info("dispatch batch sent", extra=kv(
            destination=destination.name, peer=peer, files=len(batch),
            stored=sum(o.ok for o in done), failed=sum(not o.ok for o in done),
            seconds=round(time.monotonic() - t0, 3)))
    return SendResult(destination.name, ordered(), n_assoc)


@dataclass(frozen=True)
class EchoResult:
    """The answer of :func:`echo`: ``ok`` with the peer's status, or why not."""

    ok: bool
    message: str
    seconds: float


VERIFICATION = UID("1.2.840.10008.1.1")


def echo(destination: DestinationConfig, *, calling_ae_title: str = "DICOMNODE",
         acse_timeout: float = 10.0, dimse_timeout: float = 10.0,
         network_timeout: float = 10.0) -> EchoResult:
    """C-ECHO ``destination`` with the AE title it is sent results with.

    Says which step failed: no connection, association rejected (with the peer's
    reason), Verification not accepted, no or a non-success C-ECHO response.
    """
    calling = destination.calling_ae_title or calling_ae_title
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    ae = AE(ae_title=calling)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_pdu_size = destination.max_pdu
    ae.add_requested_context(VERIFICATION)
    connected: list[bool] = []
    received: list[Any] = []
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, lambda _e: connected.append(True)),
        (evt.EVT_ACSE_RECV, lambda e: received.append(e.primitive)),
    ]
    t0 = time.monotonic()

    def result(ok: bool, message: str) -> EchoResult:
        return EchoResult(ok, message, time.monotonic() - t0)

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=handlers)
    if not assoc.is_established:
        if not connected:
            return result(False, f"cannot connect to {peer} (connection refused or "
                                 "unreachable)")
        if assoc.is_rejected and received:
            return result(False, f"{peer} rejected the association: "
                                 f"{_reject_text(received[-1])}")
        if any(getattr(p, "result", None) == 0x00 for p in received):
            return result(False, f"{peer} does not accept Verification (C-ECHO)")
        return result(False, f"{peer} aborted the association during negotiation")
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()
    if status is None:
        return result(False, f"{peer} sent no C-ECHO response (timeout or aborted)")
    if int(status) != 0x0000:
        return result(False, f"{peer} answered C-ECHO with status 0x{int(status):04X}")
    return result(True, f"{peer} answered C-ECHO (0x0000)")
