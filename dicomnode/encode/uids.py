"""Deterministic identity of result objects: UIDs, series numbers, descriptions.

Re-running a model on the same version of a series must produce objects with
the *same* Series and SOP Instance UIDs, so that a PACS replaces the earlier
copy instead of showing a duplicate. Every UID is therefore derived from what
identifies a result, never drawn at random:

    (source series UID, series version, model name, model version, object kind [, index])

The derivation follows ISO/IEC 9834-8 / DICOM PS3.5 B.2: a UUID rendered as
the integer under the root ``2.25``. The UUID's 122 free bits come from a
SHA-256 of the parts (RFC 9562 version 8, "custom"), which keeps collisions
as unlikely as for random UUIDs while staying reproducible.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from dicomnode.domain import ModelInfo

#: Object kinds the encoder emits, with the offset added to the series number base.
KIND_OFFSETS: dict[str, int] = {"seg": 1, "sr": 2, "sc": 3}

# Name space mixed into every hash so that our UIDs cannot coincide with
# another product hashing the same strings.
_NAMESPACE = "dicomnode/encode/v1"


def derive_uid(*parts: object) -> str:
    """A ``2.25.`` UID derived deterministically from ``parts``.

    Parameters
    ----------
    parts
        Anything with a stable ``str()``; order matters. ``None`` is allowed
        and distinct from ``""``.

    Returns
    -------
    str
        At most 44 characters, always a valid UID.
    """
    text = "\x1f".join([_NAMESPACE, *("\x00" if p is None else str(p) for p in parts)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    value = int.from_bytes(digest[:16], "big")
    # RFC 9562: version 8 in bits 48-51, variant 0b10 in bits 64-65.
    value &= ~(0xF << 76)
    value |= 0x8 << 76
    value &= ~(0x3 << 62)
    value |= 0x2 << 62
    return f"2.25.{uuid.UUID(int=value).int}"


def result_uid(
    role: str,
    kind: str,
    source_series_uid: str,
    series_version: int,
    model: ModelInfo,
    *extra: object,
) -> str:
    """UID for one role ("series", "instance", "segment" ...) of one result object."""
    return derive_uid(role, kind, source_series_uid, series_version, model.name, model.version,
                      *extra)


def device_uid(manufacturer: str, device_name: str, model: ModelInfo) -> str:
    """UID of the observing device (node + model): the same for every study."""
    return derive_uid("device", manufacturer, device_name, model.name, model.version)


def algorithm_device_uid(model: ModelInfo) -> str:
    """Device UID of the processing algorithm (IHE AIR Contributing Equipment).

    Derived from the model's name, version and weights' SHA-256, so that the
    same algorithm gets the same UID on every node and in every study, and
    retrained weights under an unchanged version string get a new one.
    """
    return derive_uid("algorithm", model.name, model.version, *model.weights_sha256)


def series_number(kind: str, source_series_number: int | None, base: int) -> int:
    """Deterministic, readable Series Number: ``base + 10 * source + kind offset``.

    With the default base 1000, source series 3 gives SEG 1031, SR 1032 and
    SC 1033: the result sorts after and next to its source in a viewer's
    series list. Clamped to the IS value range.
    """
    if kind not in KIND_OFFSETS:
        raise ValueError(f"unknown object kind {kind!r}")
    src = max(int(source_series_number or 0), 0)
    return min(base + 10 * src + KIND_OFFSETS[kind], 2**31 - 1)


_WHAT = {"seg": "mask", "sr": "report", "sc": "overlay"}


def series_description(kind: str, model: ModelInfo, subject: str = "") -> str:
    """E.g. ``"AI brain mask (deepbet-brain 1.0)"``, at most 64 characters (LO)."""
    prefix = "AI" if model.family == "AI" else "Rule-based"
    what = _WHAT.get(kind, kind)
    head = f"{prefix} {subject} {what}" if subject else f"{prefix} {what}"
    tail = f" ({model.name} {model.version})"
    text = head + tail
    if len(text) > 64:
        # Keep the model identity, shorten the subject.
        room = max(64 - len(tail) - 1, 8)
        text = head[:room].rstrip() + "~" + tail
        text = text[:64]
    return text


def content_label(model: ModelInfo) -> str:
    """A Code String (upper case, digits, space, underscore; max 16) naming the model."""
    label = re.sub(r"[^A-Z0-9_ ]+", "_", model.name.upper()).strip("_ ")
    return (label or "AI_RESULT")[:16]
