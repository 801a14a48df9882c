"""Encoder start-up work: highdicom tables loaded once, IOD lookups memoised, same answers."""

from __future__ import annotations

import pytest
from highdicom import _standard_utils as su

from dicomnode.compat.highdicom import install_iod_cache
from dicomnode.encode import common

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def test_warm_up_loads_highdicom_tables() -> None:
    common.warm_up()
    for table in (su.get_sop_class_iod_map, su.get_iod_module_map, su.get_module_attribute_map):
        assert table.cache_info().currsize == 1


def test_memoised_iod_lookup_gives_highdicom_answers() -> None:
    install_iod_cache()
    install_iod_cache()  # idempotent: the original is wrapped once
    cached = su.is_attribute_in_iod
    assert getattr(cached, "_dicomnode_cached", False)
    original = cached._dicomnode_original
    assert not getattr(original, "_dicomnode_cached", False)  # wrapped once, not twice
    cases = [("PerFrameFunctionalGroupsSequence", CT, None),
             ("PerFrameFunctionalGroupsSequence", ENHANCED_CT, None),
             ("PixelData", SEG, ["IconImageSequence"]),
             ("ContentDate", SEG, None),
             ("NoSuchKeyword", CT, None)]
    expected = [original(a, c, e) for a, c, e in cases]
    assert expected[:2] == [False, True]  # single-frame CT vs enhanced CT
    assert [cached(a, c, e) for a, c, e in cases] == expected
    assert [cached(a, c, e) for a, c, e in cases] == expected  # now from the cache
    with pytest.raises(KeyError):
        cached("PixelData", "1.2.3.4")  # unknown SOP class: highdicom's error, not cached
