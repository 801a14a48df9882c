"""Session fixture: every shipped model run once on the real test volumes.

``shipped_model_results`` yields ``(model name, SeriesFixture, InferenceResult)``
for each shipped model and each real series its manifest accepts (Colin27 MR,
Cranium CT). Running deepbet on CPU takes a while, hence session scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom
import pytest

from tests.support.infer_data import SeriesFixture


@pytest.fixture(scope="session")
def shipped_model_results(colin27_mr: SeriesFixture, cranium_ct: SeriesFixture,
                          ) -> Iterator[list[tuple[str, SeriesFixture, Any]]]:
    registry_mod = pytest.importorskip("dicomnode.infer.registry",
                                       reason="model runtime (issue 3) not available")
    from dicomnode.infer import load_volume

    registry = registry_mod.ModelRegistry(registry_mod.SHIPPED_MODELS_DIR)
    names = registry.names()
    if not names:
        pytest.skip("no shipped models found")
    out = []
    for series in (colin27_mr, cranium_ct):
        volume = load_volume(list(series.paths))
        head = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
        for name in registry.applicable(modality=series.modality,
                                        body_part=str(head.get("BodyPartExamined", "")),
                                        series_description=str(head.get("SeriesDescription", "")),
                                        n_slices=volume.shape[0]):
            out.append((name, series, registry.run(name, volume)))
    if not out:
        pytest.skip(f"no shipped model ({names}) applies to the real test volumes")
    yield out
