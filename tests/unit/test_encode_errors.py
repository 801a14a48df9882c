"""Bad inputs to the encoders give an EncodeError that names the problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.domain import (
    ClassificationOutput,
    CodedConcept,
    InferenceResult,
    LabelSpec,
    Measurement,
    SegmentationOutput,
)
from dicomnode.encode import EncodeOptions, encode_results, load_sources
from dicomnode.errors import EncodeError
from tests.support.encode_data import (
    HEMORRHAGE,
    LABELS,
    MODEL,
    make_masks,
    phantom,
    seg_result,
    volume_from_paths,
)
from tests.support.series import write_series

SHAPE = (4, 16, 20)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(phantom(SHAPE), tmp_path_factory.mktemp("enc-err") / "ct",
                        spacing=(2.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def good(series: list[Path]) -> InferenceResult:
    return seg_result(volume_from_paths(series))


def _with_seg(result: InferenceResult, **changes: object) -> InferenceResult:
    assert result.segmentation is not None
    return dataclasses.replace(result,
                               segmentation=dataclasses.replace(result.segmentation, **changes))


def test_good_result_encodes(good: InferenceResult) -> None:
    out = encode_results(good, formats=("seg", "sr"))
    assert [str(d.Modality) for d in out] == ["SEG", "SR"]


def test_mask_of_wrong_shape(good: InferenceResult) -> None:
    bad = _with_seg(good, masks=np.zeros((3, 4, 16, 19), bool))
    with pytest.raises(EncodeError, match=r"does not match the source volume \(4, 16, 20\)"):
        encode_results(bad)


def test_mask_not_4d(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="mask must be 4D"):
        encode_results(_with_seg(good, masks=np.zeros(SHAPE, bool)))


def test_labels_missing_from_manifest(good: InferenceResult) -> None:
    bad = _with_seg(good, labels=LABELS[:2])
    with pytest.raises(EncodeError, match="3 label channel.*declares 2 label.*missing"):
        encode_results(bad)


def test_no_labels(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="declares no labels"):
        encode_results(_with_seg(good, labels=(), masks=np.zeros((0, *SHAPE), bool)))


def test_incomplete_label_code(good: InferenceResult) -> None:
    bad_label = LabelSpec(1, "brain", LABELS[0].category, CodedConcept("", "SCT", "Brain"))
    with pytest.raises(EncodeError, match="label 'brain' segmented property type"):
        encode_results(_with_seg(good, labels=(bad_label, *LABELS[1:])))


def test_duplicate_label_values(good: InferenceResult) -> None:
    dup = dataclasses.replace(LABELS[1], value=1)
    with pytest.raises(EncodeError, match="duplicate label values"):
        encode_results(_with_seg(good, labels=(LABELS[0], dup, LABELS[2])))


def test_mask_must_be_boolean(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="boolean"):
        encode_results(_with_seg(good, masks=make_masks(SHAPE).astype(np.uint8)))


def test_volume_without_frame_of_reference(good: InferenceResult) -> None:
    bad = dataclasses.replace(good, volume=dataclasses.replace(good.volume,
                                                               frame_of_reference_uid=""))
    with pytest.raises(EncodeError, match="no Frame of Reference UID"):
        encode_results(bad)


def test_source_headers_without_frame_of_reference(good: InferenceResult) -> None:
    sources = load_sources(good)
    for ds in sources:
        del ds.FrameOfReferenceUID
    with pytest.raises(EncodeError, match="has no Frame of Reference UID"):
        encode_results(good, sources)


def test_sources_from_another_series(good: InferenceResult, tmp_path: Path) -> None:
    other = write_series(phantom(SHAPE), tmp_path / "other")
    with pytest.raises(EncodeError, match="not to the volume's series"):
        encode_results(good, [pydicom.dcmread(p) for p in other])


def test_missing_source_instance(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="missing from the sources"):
        encode_results(good, load_sources(good)[:-1])


def test_unreadable_source_path(good: InferenceResult, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    bad = dataclasses.replace(good, volume=dataclasses.replace(good.volume, paths=(junk,)))
    with pytest.raises(EncodeError, match="cannot read source instance"):
        encode_results(bad)


def test_unknown_format(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match=r"unknown result format\(s\) \['pdf'\]"):
        encode_results(good, formats=("seg", "pdf"))


def test_fractional_without_probabilities(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="FRACTIONAL SEG requested but .* no probability maps"):
        encode_results(good, options=EncodeOptions(segmentation_type="fractional"))


def test_probability_maps_of_wrong_shape(good: InferenceResult) -> None:
    with pytest.raises(EncodeError, match="probability maps of shape"):
        encode_results(_with_seg(good, probabilities=np.zeros((3, 4, 16, 16), np.float32)))


def test_measurement_for_unknown_label(good: InferenceResult) -> None:
    bad = dataclasses.replace(good, measurements=(Measurement("volume", 1.0, "ml", 9),))
    with pytest.raises(EncodeError, match="label value 9, which the manifest does not declare"):
        encode_results(bad)


@pytest.mark.parametrize("m, message", [
    (Measurement("volume", float("nan"), "ml", 1), "not a finite number"),
    (Measurement("median", 1.0, "ml", 1), "'median' is not one of"),  # type: ignore[arg-type]
    (Measurement("mean", 1.0, "", 1), "has no unit"),
])
def test_bad_measurements(good: InferenceResult, m: Measurement, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode_results(dataclasses.replace(good, measurements=(m,)), formats=("sr",))


def test_probability_out_of_range(good: InferenceResult) -> None:
    bad = dataclasses.replace(good, classifications=(ClassificationOutput(HEMORRHAGE, 1.5),))
    with pytest.raises(EncodeError, match=r"probability 1.5 is not in \[0, 1\]"):
        encode_results(bad, formats=("sr",))


def test_saliency_of_wrong_shape(good: InferenceResult) -> None:
    sal = np.zeros((4, 16, 16), np.float32)
    bad = dataclasses.replace(good, classifications=(ClassificationOutput(HEMORRHAGE, 0.2, sal),))
    with pytest.raises(EncodeError, match="saliency map of class 'haemorrhage' has shape"):
        encode_results(bad, formats=("sc",))


def test_nothing_to_report(good: InferenceResult) -> None:
    empty = InferenceResult(model=MODEL, volume=good.volume)
    # A format with nothing to encode is skipped, not invented.
    assert encode_results(empty, formats=("seg", "sr", "sc")) == []
    from dicomnode.encode.sr import encode_sr

    with pytest.raises(EncodeError, match="reported nothing"):
        encode_sr(empty, load_sources(good))


def test_model_without_version(good: InferenceResult) -> None:
    bad = dataclasses.replace(good, model=dataclasses.replace(MODEL, version=""))
    with pytest.raises(EncodeError, match="model name and version"):
        encode_results(bad)


def test_segmentation_output_type_is_the_domain_one() -> None:
    # Guard: the encoder reads these fields by name.
    assert {f.name for f in dataclasses.fields(SegmentationOutput)} >= {"labels", "masks",
                                                                        "probabilities"}
