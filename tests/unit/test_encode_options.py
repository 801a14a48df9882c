"""EncodeOptions from destination configuration."""

from __future__ import annotations

from dicomnode.config import DestinationConfig
from dicomnode.encode import DEFAULT_CAVEAT, EncodeOptions


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
