"""EncodeOptions from destination configuration."""

from __future__ import annotations

import pytest

from dicomnode.config import DestinationConfig
from dicomnode.encode import DEFAULT_CAVEAT, EncodeOptions
from dicomnode.errors import EncodeError


def test_options_follow_the_destination() -> None:
    dest = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                             formats=("seg", "sc"), keep_empty_frames=True)
    opts = EncodeOptions.for_destination(dest, series_version=3)
    assert opts.keep_empty_frames is True and opts.series_version == 3
    assert opts.sc_caveat == DEFAULT_CAVEAT
    assert EncodeOptions().keep_empty_frames is False


def test_serial_number_defaults_to_the_host() -> None:
    assert EncodeOptions().serial_number
    assert EncodeOptions(device_serial_number="SN-1").serial_number == "SN-1"


@pytest.mark.parametrize("kwargs, message", [
    ({"segmentation_type": "labelmap"}, "segmentation_type"),
    ({"sc_max_images": 0}, "sc_max_images"),
    ({"series_version": 0}, "series_version"),
    ({"series_number_base": -1}, "series_number_base"),
    ({"manufacturer": " "}, "must not be empty"),
])
def test_bad_options_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        EncodeOptions(**kwargs)  # type: ignore[arg-type]
