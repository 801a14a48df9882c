"""Every object the shipped models produce on the real test volumes is valid DICOM.

Colin27 MR and Cranium CT (real data from Debian packages) go through the
node's own loader and the shipped models; the SEG, SR and SC built from their
results must pass ``dciodvfy`` with zero errors, ``dcentvfy`` must find them
consistent with the source series, and the SEG must read back to the model's
exact masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

from dicomnode.encode import EncodeOptions, encode_results
from tests.support.encode_models import shipped_model_results  # noqa: F401 (fixture)
from tests.support.peers import dcentvfy, dciodvfy

pytestmark = pytest.mark.slow


def test_shipped_model_outputs_are_valid_and_consistent(
        shipped_model_results: list[tuple[str, Any, Any]],  # noqa: F811
        tmp_path: Path) -> None:
    report: dict[str, tuple[str, ...]] = {}
    for name, series, result in shipped_model_results:
        objects = encode_results(result, formats=("seg", "sr", "sc"),
                                 options=EncodeOptions(sc_max_images=2))
        kinds = [str(d.Modality) for d in objects]
        if result.segmentation is not None:
            assert kinds[:2] == ["SEG", "SR"], (name, kinds)
        files = []
        for i, ds in enumerate(objects):
            path = tmp_path / f"{name}-{series.modality}-{i}-{ds.Modality}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            r = dciodvfy(path)
            assert r.errors == (), f"{path.name}:\n{r.output}"
            report[path.name] = r.warnings
        r = dcentvfy(*series.paths, *files)
        assert r.errors == (), f"{name}: {r.output}"
        assert all("Different information entities" in w for w in r.warnings), r.output
        if result.segmentation is not None:
            seg = hd.seg.segread(files[0])
            frames = result.volume.frames
            n = len(result.segmentation.labels)
            px = seg.get_pixels_by_source_instance(
                [f.sop_instance_uid for f in frames], segment_numbers=list(range(1, n + 1)),
                combine_segments=False) if frames[0].frame_number is None else \
                seg.get_pixels_by_source_frame(
                    frames[0].sop_instance_uid, [int(f.frame_number) for f in frames],
                    segment_numbers=list(range(1, n + 1)), combine_segments=False)
            assert np.array_equal(np.moveaxis(px.astype(bool), -1, 0),
                                  result.segmentation.masks), name
    print("dciodvfy warnings on shipped-model outputs:", {k: v for k, v in report.items() if v})
