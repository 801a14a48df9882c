"""Build InferenceResults for the encoder tests from series written by tests.support.series.

Volumes come from the node's own loader (:func:`dicomnode.infer.load_volume`);
masks are asymmetric shapes so that flips, shifts and frame-order mistakes
change the voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dicomnode.domain import (
    ClassificationOutput,
    ClassSpec,
    CodedConcept,
    InferenceResult,
    LabelSpec,
    Measurement,
    ModelInfo,
    SegmentationOutput,
    Volume,
)
from dicomnode.infer import load_volume

TISSUE = CodedConcept("85756007", "SCT", "Tissue")
ORGAN = CodedConcept("123037004", "SCT", "Anatomical Structure")
LABELS = (
    LabelSpec(1, "brain", ORGAN, CodedConcept("12738006", "SCT", "Brain"), (230, 60, 60),
              CodedConcept("69536005", "SCT", "Head")),
    LabelSpec(2, "lesion", CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
              CodedConcept("52988006", "SCT", "Lesion"), (40, 200, 40)),
    LabelSpec(3, "bone", TISSUE, CodedConcept("3138006", "SCT", "Bone tissue"), (60, 90, 255)),
)
MODEL = ModelInfo(name="test-seg", version="1.0", description="test segmentation model",
                  family="AI", weights_sha256=("ab" * 32,))


def volume_from_paths(paths: Sequence[Path]) -> Volume:
    """The node's own loader (:func:`dicomnode.infer.load_volume`)."""
    return load_volume(list(paths))


def ball(shape: tuple[int, int, int], center: Sequence[float], radius: float) -> np.ndarray:
    k, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((k - center[0]) ** 2 + (r - center[1]) ** 2 + (c - center[2]) ** 2) <= radius**2


def make_masks(shape: tuple[int, int, int], n_labels: int = 3) -> np.ndarray:
    """Non-overlapping, asymmetric masks (so flips and shifts are detectable)."""
    k, r, c = shape
    brain = ball(shape, (k * 0.5, r * 0.45, c * 0.5), min(shape) * 0.35)
    lesion = ball(shape, (k * 0.6, r * 0.35, c * 0.62), min(shape) * 0.12)
    brain &= ~lesion
    bone = np.zeros(shape, bool)
    bone[:, : max(r // 8, 1), : c // 3] = True  # an L-shaped corner: orientation-sensitive
    bone[: max(k // 2, 1), :, : max(c // 10, 1)] = True
    bone &= ~(brain | lesion)
    return np.stack([brain, lesion, bone][:n_labels])


def phantom(shape: tuple[int, int, int], modality: str = "CT") -> np.ndarray:
    """Image values: CT in HU (air, soft tissue, bone), MR in arbitrary units."""
    masks = make_masks(shape)
    img = np.full(shape, -1000.0 if modality == "CT" else 5.0, dtype=np.float32)
    vals = (40.0, 70.0, 900.0) if modality == "CT" else (300.0, 500.0, 100.0)
    for m, v in zip(masks, vals, strict=True):
        img[m] = v
    rng = np.random.default_rng(0)
    img += rng.normal(0, 5, shape).astype(np.float32)
    return np.rint(img)


def seg_result(volume: Volume, masks: np.ndarray | None = None, *, n_labels: int = 3,
               model: ModelInfo = MODEL, measurements: tuple[Measurement, ...] = (),
               classifications: tuple[ClassificationOutput, ...] = (),
               probabilities: np.ndarray | None = None) -> InferenceResult:
    if masks is None:
        masks = make_masks(volume.shape, n_labels)
    return InferenceResult(
        model=model,
        volume=volume,
        segmentation=SegmentationOutput(labels=LABELS[: masks.shape[0]], masks=masks,
                                        probabilities=probabilities),
        classifications=classifications,
        measurements=measurements,
    )


HEMORRHAGE = ClassSpec(0, "haemorrhage", CodedConcept("50960005", "SCT", "Hemorrhage"), 0.5)


def classification_result(volume: Volume, probability: float = 0.83) -> InferenceResult:
    k, r, c = volume.shape
    sal = ball(volume.shape, (k * 0.6, r * 0.35, c * 0.62), min(volume.shape) * 0.2)
    saliency = np.where(sal, 0.9, 0.0).astype(np.float32)
    return InferenceResult(
        model=ModelInfo(name="test-cls", version="2.1", family="AI"),
        volume=volume,
        classifications=(ClassificationOutput(HEMORRHAGE, probability, saliency),),
    )
