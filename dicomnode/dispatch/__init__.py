"""Dispatch: send stored objects to destinations (C-STORE SCU) and decide retries."""

from __future__ import annotations

from dicomnode.dispatch.retry import RetryPolicy
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
    "FileOutcome",
    "OutcomeState",
    "RetryPolicy",
    "SendResult",
    "is_transient_status",
    "is_warning_status",
    "status_text",
    "store_files",
]
