"""pydicom internals dicomnode relies on (written for pydicom 3.0.2).

Only :mod:`dicomnode.codec.part10` uses them, in its per-element hot path: each
name is bound once at import (no wrapper call per element or dataset).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from operator import attrgetter
from typing import Any

import pydicom.filewriter
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from dicomnode.compat import require

require("pydicom", "3.0.2")

__all__ = ["dataset_elements", "is_multi_value"]

#: ``dataset_elements(ds)`` -> ``ds._dict``: the dataset's tag -> element mapping, with
#: raw (undecoded) elements left as they are. The public API (``ds.items()``,
#: ``ds[tag]``) converts every raw element on access and sorts on iteration; the Part
#: 10 writer must see the elements exactly as ``pydicom.filewriter.write_dataset``
#: does (it reads ``_dict`` too) to fall back to pydicom on a raw one. An
#: ``attrgetter``: one C call per dataset, as cheap as the attribute itself.
dataset_elements: Callable[[Dataset], MutableMapping[int, DataElement | RawDataElement]] = \
    attrgetter("_dict")

#: ``is_multi_value(value)`` -> ``pydicom.filewriter._is_multi_value``: the test
#: ``write_number_string`` applies to a DS / IS value to decide between one string and
#: a backslash-joined list; the Part 10 writer mirrors that writer inline for speed and
#: must decide exactly as it does.
is_multi_value: Callable[[Any], bool] = pydicom.filewriter._is_multi_value
