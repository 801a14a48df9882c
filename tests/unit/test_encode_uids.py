"""Deterministic identity of result objects (pure functions)."""

from __future__ import annotations

import uuid

import pytest
from pydicom.uid import UID

from dicomnode.domain import ModelInfo
from dicomnode.encode import uids

MODEL = ModelInfo(name="deepbet-brain", version="1.0")


def test_derived_uid_is_valid_deterministic_and_sensitive_to_every_part() -> None:
    a = uids.result_uid("instance", "seg", "1.2.3", 1, MODEL)
    assert a == uids.result_uid("instance", "seg", "1.2.3", 1, MODEL)
    assert UID(a).is_valid and a.startswith("2.25.") and len(a) <= 64
    others = {
        uids.result_uid("series", "seg", "1.2.3", 1, MODEL),
        uids.result_uid("instance", "sr", "1.2.3", 1, MODEL),
        uids.result_uid("instance", "seg", "1.2.4", 1, MODEL),
        uids.result_uid("instance", "seg", "1.2.3", 2, MODEL),
        uids.result_uid("instance", "seg", "1.2.3", 1, ModelInfo("deepbet-brain", "1.1")),
        uids.result_uid("instance", "seg", "1.2.3", 1, ModelInfo("other", "1.0")),
        uids.result_uid("instance", "seg", "1.2.3", 1, MODEL, 7),
    }
    assert a not in others and len(others) == 7


def test_derived_uid_is_an_rfc9562_version_8_uuid() -> None:
    u = uuid.UUID(int=int(uids.derive_uid("x").split(".", 2)[2]))
    assert u.version == 8 and u.variant == uuid.RFC_4122


def test_none_and_empty_parts_differ() -> None:
    assert uids.derive_uid(None) != uids.derive_uid("")
    assert uids.derive_uid("a", "b") != uids.derive_uid("ab")


def test_series_numbers_are_readable_and_deterministic() -> None:
    assert uids.series_number("seg", 3, 1000) == 1031
    assert uids.series_number("sr", 3, 1000) == 1032
    assert uids.series_number("sc", None, 1000) == 1003
    assert uids.series_number("seg", "12", 500) == 621  # IS values arrive as strings too
    with pytest.raises(ValueError, match="unknown object kind"):
        uids.series_number("pdf", 1, 1000)


def test_series_description_names_subject_model_and_version() -> None:
    assert uids.series_description("seg", MODEL, "brain") == "AI brain mask (deepbet-brain 1.0)"
    rb = ModelInfo("ct-bone", "0.3", family="rule-based")
    assert uids.series_description("sr", rb, "bone") == "Rule-based bone report (ct-bone 0.3)"
    long = uids.series_description("seg", MODEL, "x" * 100)
    assert len(long) <= 64 and long.endswith("(deepbet-brain 1.0)")


def test_content_label_is_a_valid_code_string() -> None:
    assert uids.content_label(ModelInfo("deepbet-brain", "1")) == "DEEPBET_BRAIN"
    assert uids.content_label(ModelInfo("ünïcode model with a long name", "1")) == \
        "N_CODE MODEL WIT"
    assert uids.content_label(ModelInfo("---", "1")) == "AI_RESULT"
