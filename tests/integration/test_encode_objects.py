"""SEG / SR / SC objects built from real DICOM series: validity, round trips, identity.

Every object kind is checked with dicom3tools (``dciodvfy`` zero errors,
``dcentvfy`` consistent with the source series) and read back with highdicom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from dicomnode.domain import InferenceResult, Measurement
from dicomnode.encode import EncodeOptions, encode_results, load_sources
from dicomnode.encode.common import voxel_volume_ml
from dicomnode.encode.seg import encode_seg, segment_tracking_uid
from dicomnode.encode.uids import device_uid
from tests.support.encode_data import (
    classification_result,
    make_masks,
    phantom,
    seg_result,
    volume_from_paths,
)
from tests.support.peers import dcentvfy, dciodvfy
from tests.support.series import CORONAL, SAGITTAL, oblique, write_series

SHAPE = (12, 40, 48)
SERIES = {
    "axial_ct": dict(modality="CT", spacing=(2.5, 0.7, 0.8), series_number=3),
    "oblique_mr": dict(modality="MR", orientation=oblique(25.0), spacing=(1.5, 0.9, 1.1)),
    "coronal_ct": dict(modality="CT", orientation=CORONAL, spacing=(2.0, 1.0, 0.75)),
    "sagittal_enhanced_mr": dict(modality="MR", orientation=SAGITTAL, enhanced=True,
                                 spacing=(1.2, 1.0, 1.0)),
    "unicode_ct": dict(modality="CT", character_set="ISO_IR 192",
                       patient_name="Müller^Jörg", accession_number="ÄCC-42"),
}
MODEL_MEASUREMENTS = (Measurement("volume", 12.345, "ml", 1),
                      Measurement("mean", 901.5, "[hnsf'U]", 3))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("enc-series")
    out = {}
    for name, kw in SERIES.items():
        modality = str(kw["modality"])
        out[name] = write_series(phantom(SHAPE, modality), root / name, **kw)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def results(series: dict[str, list[Path]]) -> dict[str, InferenceResult]:
    out = {}
    for name, paths in series.items():
        vol = volume_from_paths(paths)
        extra = {}
        if name == "axial_ct":
            extra = dict(measurements=MODEL_MEASUREMENTS,
                         classifications=classification_result(vol).classifications)
        out[name] = seg_result(vol, **extra)  # type: ignore[arg-type]
    return out


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _seg_pixels(seg: hd.seg.Segmentation, result: InferenceResult) -> np.ndarray:
    frames = result.volume.frames
    n = len(result.segmentation.labels)  # type: ignore[union-attr]
    if frames[0].frame_number is None:
        px = seg.get_pixels_by_source_instance(
            [f.sop_instance_uid for f in frames], segment_numbers=list(range(1, n + 1)),
            combine_segments=False)
    else:
        px = seg.get_pixels_by_source_frame(
            frames[0].sop_instance_uid, [int(f.frame_number) for f in frames],  # type: ignore[arg-type]
            segment_numbers=list(range(1, n + 1)), combine_segments=False)
    return np.moveaxis(px.astype(bool), -1, 0)  # (labels, k, rows, cols)


# --------------------------------------------------------------------------- validity


def test_every_object_kind_passes_dciodvfy(results: dict[str, InferenceResult],
                                           tmp_path: Path) -> None:
    res = results["axial_ct"]
    probs = res.segmentation.masks.astype(np.float32) * 0.8  # type: ignore[union-attr]
    fractional = dataclasses.replace(res, segmentation=dataclasses.replace(
        res.segmentation, probabilities=probs))
    objects: dict[str, pydicom.Dataset] = {}
    seg, sr, *scs = encode_results(res, formats=("seg", "sr", "sc"),
                                   options=EncodeOptions(sc_max_images=2))
    objects.update(seg=seg, sr=sr, sc_mask=scs[0], sc_saliency=scs[-1])
    assert "SALIENCY" not in str(scs[0].DerivationDescription).upper()
    assert "Saliency" in str(scs[-1].DerivationDescription)
    objects["seg_keep_empty"] = encode_results(
        res, formats=("seg",), options=EncodeOptions(keep_empty_frames=True))[0]
    objects["seg_fractional"] = encode_results(
        fractional, formats=("seg",), options=EncodeOptions(segmentation_type="fractional"))[0]
    for name in ("sagittal_enhanced_mr", "oblique_mr", "unicode_ct"):
        for i, ds in enumerate(encode_results(results[name], formats=("seg", "sr", "sc"),
                                              options=EncodeOptions(sc_max_images=1))):
            objects[f"{name}_{i}"] = ds
    warnings: dict[str, tuple[str, ...]] = {}
    for name, ds in objects.items():
        r = dciodvfy(_save(ds, tmp_path / f"{name}.dcm"))
        assert r.errors == (), f"{name}:\n{r.output}"
        warnings[name] = r.warnings
    print("dciodvfy warnings:", {k: v for k, v in warnings.items() if v})
    # Only the known, accepted warnings: SC Laterality copied empty from a source that has it
    # empty, and the IHE AIR Device UID in Contributing Equipment (newer than dicom3tools 2022).
    for name, ws in warnings.items():
        for w in ws:
            if "ContributingEquipmentSequence(0018,a001)[3]/DeviceUID(0018,1002)" in w:
                continue
            assert name.startswith("sc") or name.endswith(("_2", "_3")), (name, w)
            assert "Laterality" in w, (name, w)


def test_results_are_consistent_with_the_source_series(series: dict[str, list[Path]],
                                                       results: dict[str, InferenceResult],
                                                       tmp_path: Path) -> None:
    for name in ("axial_ct", "sagittal_enhanced_mr", "unicode_ct"):
        outs = encode_results(results[name], formats=("seg", "sr", "sc"),
                              options=EncodeOptions(sc_max_images=2))
        files = [_save(ds, tmp_path / f"{name}-{i}.dcm") for i, ds in enumerate(outs)]
        r = dcentvfy(*series[name], *files)
        assert r.errors == (), r.output
        # dicom3tools' own dictionary places AccessionNumber in different IEs for
        # SR and SC; that is the only kind of warning we accept.
        assert all("Different information entities" in w for w in r.warnings), r.output


# --------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("name", ["axial_ct", "oblique_mr", "coronal_ct",
                                  "sagittal_enhanced_mr"])
def test_seg_round_trip_is_voxel_identical_on_the_source_grid(
        name: str, results: dict[str, InferenceResult], tmp_path: Path) -> None:
    res = results[name]
    path = _save(encode_results(res, formats=("seg",))[0], tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert np.array_equal(_seg_pixels(seg, res), res.segmentation.masks)  # type: ignore[union-attr]
    # Geometry, independently of the references: every SEG frame lies where the
    # volume's affine puts the source slice it references, with its orientation.
    vol = res.volume
    slot = {(f.sop_instance_uid, f.frame_number): k for k, f in enumerate(vol.frames)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_dir = np.asarray(vol.affine)[:3, 2] / np.linalg.norm(np.asarray(vol.affine)[:3, 2])
    col_dir = np.asarray(vol.affine)[:3, 1] / np.linalg.norm(np.asarray(vol.affine)[:3, 1])
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                       [*row_dir, *col_dir], atol=1e-5)
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, vol.spacing[1:], atol=1e-5)
    for fg in seg.PerFrameFunctionalGroupsSequence:
        src = fg.DerivationImageSequence[0].SourceImageSequence[0]
        k = slot[(src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber"))]
        expected = np.asarray(vol.affine) @ np.array([k, 0, 0, 1.0])
        assert np.allclose(fg.PlanePositionSequence[0].ImagePositionPatient, expected[:3],
                           atol=1e-4)
    assert seg.FrameOfReferenceUID == vol.frame_of_reference_uid
    assert seg.StudyInstanceUID == vol.study_uid


def test_seg_segments_carry_codes_colour_and_algorithm(results: dict[str, InferenceResult],
                                                       tmp_path: Path) -> None:
    res = results["axial_ct"]
    seg = hd.seg.segread(_save(encode_results(res, formats=("seg",))[0], tmp_path / "s.dcm"))
    assert seg.SegmentationType == "BINARY"
    for i, lab in enumerate(res.segmentation.labels):  # type: ignore[union-attr]
        d = seg.get_segment_description(i + 1)
        assert d.segment_label == lab.name
        assert d.segmented_property_type.value == lab.type.value
        assert d.segmented_property_category.value == lab.category.value
        assert d.tracking_uid == segment_tracking_uid(res, EncodeOptions(), lab.value)
        assert tuple(d.RecommendedDisplayCIELabValue) == tuple(
            hd.color.CIELabColor.from_rgb(*lab.color).value)
        algo = d.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == res.model.name
        assert algo.AlgorithmVersion == res.model.version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI
        assert res.model.weights_sha256[0] in algo.AlgorithmParameters
    brain = seg.get_segment_description(1)
    assert brain.anatomic_regions[0].value == "69536005"


def test_empty_frames_omitted_or_kept(results: dict[str, InferenceResult]) -> None:
    res = results["coronal_ct"]
    masks = res.segmentation.masks  # type: ignore[union-attr]
    nonempty_pairs = int(masks.reshape(masks.shape[0], masks.shape[1], -1).any(axis=2).sum())
    omitted = encode_results(res, formats=("seg",))[0]
    kept = encode_results(res, formats=("seg",), options=EncodeOptions(keep_empty_frames=True))[0]
    assert omitted.NumberOfFrames == nonempty_pairs < masks.shape[0] * masks.shape[1]
    assert kept.NumberOfFrames == masks.shape[0] * masks.shape[1]


def test_overlapping_labels_round_trip(results: dict[str, InferenceResult],
                                       tmp_path: Path) -> None:
    res = results["oblique_mr"]
    masks = res.segmentation.masks.copy()  # type: ignore[union-attr]
    masks[1] |= masks[0]  # lesion label now contains the brain: overlap
    res = dataclasses.replace(res, segmentation=dataclasses.replace(res.segmentation,
                                                                    masks=masks))
    seg = hd.seg.segread(_save(encode_results(res, formats=("seg",))[0], tmp_path / "o.dcm"))
    assert seg.SegmentsOverlap == "YES"
    assert np.array_equal(_seg_pixels(seg, res), masks)


def test_fractional_seg_from_probability_maps(results: dict[str, InferenceResult],
                                              tmp_path: Path) -> None:
    res = results["sagittal_enhanced_mr"]
    rng = np.random.default_rng(1)
    masks = res.segmentation.masks  # type: ignore[union-attr]
    probs = (masks * rng.uniform(0.3, 1.0, masks.shape)).astype(np.float32)
    res = dataclasses.replace(res, segmentation=dataclasses.replace(res.segmentation,
                                                                    probabilities=probs))
    ds = encode_results(res, formats=("seg",),
                        options=EncodeOptions(segmentation_type="fractional"))[0]
    seg = hd.seg.segread(_save(ds, tmp_path / "f.dcm"))
    assert seg.SegmentationType == "FRACTIONAL"
    frames = res.volume.frames
    px = seg.get_pixels_by_source_frame(frames[0].sop_instance_uid,
                                        [int(f.frame_number) for f in frames],  # type: ignore[arg-type]
                                        segment_numbers=[1, 2, 3], combine_segments=False,
                                        rescale_fractional=False)
    got = np.moveaxis(px, -1, 0).astype(np.float32) / 255.0
    assert np.abs(got - probs).max() <= 0.5 / 255 + 1e-6


# --------------------------------------------------------------------------- SR


def test_sr_parses_and_its_measurements_equal_the_inputs(results: dict[str, InferenceResult],
                                                         tmp_path: Path) -> None:
    res = results["axial_ct"]
    seg_ds, sr_ds = encode_results(res, formats=("seg", "sr"))
    sr = hd.sr.srread(_save(sr_ds, tmp_path / "sr.dcm"))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    content = sr.content
    assert content.get_observer_contexts() is not None
    groups = content.get_volumetric_roi_measurement_groups()
    labels = res.segmentation.labels  # type: ignore[union-attr]
    assert len(groups) == len(labels)
    masks = res.segmentation.masks  # type: ignore[union-attr]
    vox_ml = voxel_volume_ml(res)
    for i, (g, lab) in enumerate(zip(groups, labels, strict=True)):
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        assert ref.referenced_segment_numbers == [i + 1] or \
            int(ref.ReferencedSOPSequence[0].ReferencedSegmentNumber) == i + 1
        assert g.tracking_uid == segment_tracking_uid(res, EncodeOptions(), lab.value)
        assert g.finding_type.value == lab.type.value
        got = {(m.name.value, m.derivation.value if m.derivation else None): m for m in
               g.get_measurements()}
        vol_m = got[("118565006", None)]
        assert vol_m.unit.value == "ml"
        expected_volume = 12.345 if lab.value == 1 else int(masks[i].sum()) * vox_ml
        assert vol_m.value == pytest.approx(expected_volume, rel=1e-12)
        mean_m = got[("112031", "373098007")]  # attenuation coefficient, mean
        assert mean_m.unit.value == "[hnsf'U]"
        expected_mean = 901.5 if lab.value == 3 else \
            float(res.volume.array[masks[i]].astype(np.float64).mean())
        assert mean_m.value == pytest.approx(expected_mean, rel=1e-9)
    # Classification: qualitative evaluation + probability, in a TID 1501 group.
    cls = content.get_image_measurement_groups()
    assert len(cls) == 1
    c = res.classifications[0]
    evals = cls[0].get_qualitative_evaluations()
    assert evals[0].name.value == c.spec.code.value
    assert evals[0].value.value == codes.SCT.Present.value
    prob = cls[0].get_measurements()[0]
    assert prob.name.value == "122157" and prob.value == pytest.approx(c.probability)
    # Device observer (node + model), language, procedure, evidence.
    flat = str(sr_ds)
    assert device_uid("dicomnode", "dicomnode", res.model) in flat
    assert "en-US" in flat and "25045-6" in flat  # CT unspecified body region
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
    assert seg_ds.SOPInstanceUID in evidence
    assert {f.sop_instance_uid for f in res.volume.frames} <= evidence


def test_sr_without_seg_references_no_unsent_object(results: dict[str, InferenceResult]) -> None:
    res = results["oblique_mr"]
    (sr_ds,) = encode_results(res, formats=("sr",))
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert len(sr.content.get_image_measurement_groups()) == 3
    seg_uid = encode_results(res, formats=("seg",))[0].SOPInstanceUID
    assert seg_uid not in str(sr_ds)
    assert "110852" in str(sr_ds)  # MR signal intensity for MR means


def test_classification_only_result(results: dict[str, InferenceResult]) -> None:
    res = classification_result(results["coronal_ct"].volume, probability=0.2)
    outs = encode_results(res, formats=("seg", "sr", "sc"),
                          options=EncodeOptions(sc_max_images=2))
    assert [str(d.Modality) for d in outs] == ["SR", "OT", "OT"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(outs[0])
    g = sr.content.get_image_measurement_groups()[0]
    assert g.get_qualitative_evaluations()[0].value.value == codes.SCT.Absent.value


# --------------------------------------------------------------------------- SC


def test_secondary_capture_renders_overlay_legend_and_caveat(
        results: dict[str, InferenceResult], tmp_path: Path) -> None:
    res = results["axial_ct"]
    caveat = "Research use only - verify before reporting"
    opts = EncodeOptions(sc_max_images=3, sc_caveat=caveat)
    scs = [d for d in encode_results(res, formats=("sc",), options=opts)
           if "Mask" in str(d.DerivationDescription)]
    assert 1 <= len(scs) <= 3
    ds = scs[len(scs) // 2]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
    assert ds.ImageComments == caveat
    img = ds.pixel_array
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] == 8 * SHAPE[2]  # upscaled
    Image.fromarray(img).save(tmp_path / "sc.png")
    colours = {tuple(int(v) for v in lab.color) for lab in res.segmentation.labels}  # type: ignore[union-attr]
    present = {tuple(p) for p in img.reshape(-1, 3)[::7]}
    assert colours & present, "no label outline colour in the image"
    # The caveat is burned in: a different text changes the pixels.
    other = encode_results(res, formats=("sc",),
                           options=dataclasses.replace(opts, sc_caveat="x"))[len(scs) // 2]
    assert not np.array_equal(other.pixel_array, img)
    ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref in {f.sop_instance_uid for f in res.volume.frames}


# --------------------------------------------------------------------------- identity


def test_identity_is_deterministic_and_copied_from_the_source(
        results: dict[str, InferenceResult], series: dict[str, list[Path]],
        tmp_path: Path) -> None:
    res = results["unicode_ct"]
    first = encode_results(res, formats=("seg", "sr", "sc"),
                           options=EncodeOptions(sc_max_images=2))
    again = encode_results(res, sources=load_sources(res), formats=("seg", "sr", "sc"),
                           options=EncodeOptions(sc_max_images=2))
    assert [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in first] == \
        [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in again]
    v2 = encode_results(res, formats=("seg",), options=EncodeOptions(series_version=2))[0]
    assert v2.SOPInstanceUID != first[0].SOPInstanceUID
    assert len({d.SOPInstanceUID for d in first}) == len(first)
    src = pydicom.dcmread(series["unicode_ct"][0])
    assert [d.SeriesNumber for d in first[:3]] == [1011, 1012, 1013]
    assert first[0].SeriesDescription == "AI brain, lesion, bone mask (test-seg 1.0)"
    for i, ds in enumerate(first):
        back = pydicom.dcmread(_save(ds, tmp_path / f"u{i}.dcm"))
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate",
                   "SpecificCharacterSet", "ReferringPhysicianName"):
            assert back.get(kw) == src.get(kw), (kw, back.get(kw), src.get(kw))
        assert str(back.PatientName) == "Müller^Jörg"


def test_headers_only_sources_suffice(results: dict[str, InferenceResult]) -> None:
    res = results["oblique_mr"]
    sources = load_sources(res)
    assert all("PixelData" not in ds for ds in sources)
    a = encode_seg(res, sources)
    b = encode_seg(res, [pydicom.dcmread(p) for p in res.volume.paths])
    assert a.PixelData == b.PixelData and a.SOPInstanceUID == b.SOPInstanceUID


def test_masks_from_make_masks_are_asymmetric() -> None:
    # The round-trip tests rely on masks that change under flips.
    m = make_masks(SHAPE)
    for axis in (1, 2, 3):
        assert not np.array_equal(m, np.flip(m, axis=axis))
