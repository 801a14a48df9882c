"""DICOM Segmentation (SEG) from a model's masks, via highdicom.

One segment per manifest label (SNOMED CT category/type, colour, anatomic
region, algorithm identification with the weights' SHA-256), on the source's
Frame of Reference with a per-frame reference to the exact source instance
(or frame of a multi-frame source). BINARY by default, FRACTIONAL from
probability maps on request.

Memory: the masks arrive as ``bool (labels, k, rows, columns)``. highdicom
wants ``(k, rows, columns, labels)``; we hand it ``np.moveaxis`` of our array,
a view (no copy), in which every frame of a segment is still a contiguous
plane. highdicom's own overlap test on that layout sums over the label axis
into an int64 array (8 bytes per voxel, 630 MB for 300 x 512 x 512), so
:class:`dicomnode.compat.highdicom.Segmentation` replaces it with a plane-by-plane check. Source
datasets are headers only.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.compat import highdicom as hd_compat
from dicomnode.domain import InferenceResult, ModelInfo
from dicomnode.encode import uids
from dicomnode.encode.common import (
    EncodeOptions,
    SourceLayout,
    add_algorithm_equipment,
    algorithm_equipment,
    arrange_sources,
    copy_source_context,
    hd_code,
    validate_result,
)
from dicomnode.errors import EncodeError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# CID 7162 Algorithm Family. A rule-based model (thresholds, connected
# components, hole filling) is closest to "Morphological Operations".
_FAMILY = {"AI": codes.DCM.ArtificialIntelligence, "rule-based": codes.DCM.MorphologicalOperations}


def algorithm_identification(model: ModelInfo, manufacturer: str,
                             ) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence: name, family, version, weights' SHA-256."""
    params: dict[str, str] = {"family": model.family}
    if model.weights_sha256:
        params["weights_sha256"] = ",".join(model.weights_sha256)
    return hd.AlgorithmIdentificationSequence(
        name=model.name[:64],
        family=_FAMILY.get(model.family, codes.DCM.ArtificialIntelligence),
        version=model.version[:64],
        source=manufacturer[:64] or None,
        parameters=params,
    )


def segment_tracking_uid(result: InferenceResult, options: EncodeOptions, label_value: int) -> str:
    """Tracking UID shared by the SEG segment and the SR measurement group."""
    return uids.result_uid("tracking", "seg", result.volume.series_uid, options.series_version,
                           result.model, label_value)


def seg_subject(result: InferenceResult) -> str:
    """Readable subject for the series description: label names, shortened."""
    assert result.segmentation is not None
    names = [lab.name for lab in result.segmentation.labels]
    if len(names) <= 3:
        return ", ".join(names)
    return f"{len(names)}-label"


def _to_source_frames(array: np.ndarray, layout: SourceLayout, axis: int = 0) -> np.ndarray:
    """Reorder/pad volume slices to the multi-frame source's frame order."""
    if not layout.multiframe:
        return array
    index = np.asarray(layout.frame_index)
    if layout.n_frames == len(index) and np.array_equal(index, np.arange(len(index))):
        return array
    shape = list(array.shape)
    shape[axis] = layout.n_frames
    out = np.zeros(shape, dtype=array.dtype)
    sl: list[slice | np.ndarray] = [slice(None)] * array.ndim
    sl[axis] = index
    out[tuple(sl)] = array
    return out


def encode_seg(
    result: InferenceResult,
    sources: Sequence[Dataset],
    options: EncodeOptions | None = None,
    *,
    validated: bool = False,
) -> hd.seg.Segmentation:
    """Build the DICOM SEG for ``result`` on the grid of ``sources``.

    Parameters
    ----------
    result
        Must carry a segmentation.
    sources
        Source instances (headers suffice), any order.
    options
        Encoding options; defaults if ``None``.

    Raises
    ------
    EncodeError
        Wrong mask shape, labels missing, no Frame of Reference, ...
    """
    options = options or EncodeOptions()
    if not validated:
        validate_result(result)
    seg_out = result.segmentation
    if seg_out is None:
        raise EncodeError(f"model {result.model.name!r} produced no segmentation to encode")
    layout = arrange_sources(result, sources)
    model = result.model
    vol = result.volume

    descriptions = []
    algo = algorithm_identification(model, options.manufacturer)
    for i, lab in enumerate(seg_out.labels):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=lab.name[:64],
            segmented_property_category=hd_code(lab.category),
            segmented_property_type=hd_code(lab.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=segment_tracking_uid(result, options, lab.value),
            tracking_id=lab.name[:64],
            anatomic_regions=[hd_code(lab.anatomic_region)] if lab.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in lab.color)),
        ))

    if options.segmentation_type == "fractional":
        if seg_out.probabilities is None:
            raise EncodeError(
                f"FRACTIONAL SEG requested but model {model.name!r} gave no probability maps")
        probs = np.asarray(seg_out.probabilities, dtype=np.float32)
        if not np.isfinite(probs).all() or probs.min() < 0.0 or probs.max() > 1.0:
            raise EncodeError("probability maps must be finite and within [0, 1]")
        pixels = np.moveaxis(_to_source_frames(probs, layout, axis=1), 0, -1)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        # highdicom's stacked layout as a view of our masks: no copy, and each
        # frame of a segment is a contiguous plane of the caller's array.
        pixels = np.moveaxis(_to_source_frames(seg_out.masks, layout, axis=1), 0, -1)
        seg_type = hd.seg.SegmentationTypeValues.BINARY

    src0 = layout.first
    try:
        seg = hd_compat.Segmentation(
            source_images=list(layout.datasets),
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=uids.result_uid("series", "seg", vol.series_uid,
                                                options.series_version, model),
            series_number=uids.series_number("seg", src0.get("SeriesNumber"),
                                              options.series_number_base),
            sop_instance_uid=uids.result_uid("instance", "seg", vol.series_uid,
                                             options.series_version, model),
            instance_number=1,
            manufacturer=options.manufacturer,
            manufacturer_model_name=options.device_name,
            software_versions=f"dicomnode {options.node_version}",
            device_serial_number=options.serial_number,
            content_label=uids.content_label(model),
            content_description=f"{model.name} {model.version}"[:64],
            content_creator_name=None,
            omit_empty_frames=not options.keep_empty_frames,
            series_description=uids.series_description("seg", model, seg_subject(result)),
            institution_name=options.institution_name or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"highdicom refused the segmentation of {model.name!r}: {exc}") from exc
    # Multi-valued LO: highdicom only takes one string without a warning.
    seg["SoftwareVersions"].value = [f"dicomnode {options.node_version}",
                                     f"{model.name} {model.version}"]
    add_algorithm_equipment(seg, algorithm_equipment(model, options))
    copy_source_context(seg, src0)
    return seg
