"""Exception hierarchy: one root, a few meaningful subclasses.

Every error the node raises on purpose derives from :class:`DicomNodeError`
so that the CLI can turn it into a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Root of every error raised on purpose by dicomnode."""


class ConfigError(DicomNodeError):
    """Invalid configuration: the message names the key and the problem."""


class StoreError(DicomNodeError):
    """Storage or database failure."""


class InvalidInstanceError(DicomNodeError):
    """A received or loaded DICOM instance is unusable (bad UID, missing tags...)."""


class VolumeError(DicomNodeError):
    """A series cannot be turned into a volume (mixed orientation, gaps, tilt...)."""


class ModelError(DicomNodeError):
    """A model manifest or its weights are invalid, or inference failed."""


class EncodeError(DicomNodeError):
    """A result cannot be encoded as a DICOM object."""


class DispatchError(DicomNodeError):
    """Sending a result to a destination failed.

    ``transient`` tells the retry policy whether trying again can help.
    """

    def __init__(self, message: str, *, transient: bool = True, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class RoutingError(DicomNodeError):
    """Invalid routing rule (names the rule)."""


class EvaluationError(DicomNodeError):
    """A reference result cannot be read or does not fit the series it belongs to."""
