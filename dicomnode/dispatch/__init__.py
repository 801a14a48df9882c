"""Dispatch: send stored objects to destinations (C-STORE SCU), decide retries, notify."""

from __future__ import annotations

from dicomnode.dispatch.dispatcher import Dispatcher, DispatchReport
from dicomnode.dispatch.notify import ResultSummary, notify
from dicomnode.dispatch.scu import (
    AssociationFailed,
    FileOutcome,
    OutcomeState,
    SendResult,
    is_transient_status,
    is_warning_status,
    status_text,
    store_files,
)

__all__ = [
    "AssociationFailed",
    "DispatchReport",
    "Dispatcher",
    "FileOutcome",
    "OutcomeState",
    "ResultSummary",
    "SendResult",
    "is_transient_status",
    "is_warning_status",
    "notify",
    "status_text",
    "store_files",
]
