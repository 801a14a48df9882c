"""TID 1500 Measurement Report in a Comprehensive 3D SR, via highdicom.

Content, following TID 1500 and the IHE AI Results (AIR) profile:

* observation context: the device observer is the node + model (UID derived
  from both), so a viewer shows who made the findings;
* procedure reported from the source modality, language of content;
* per SEG segment a TID 1411 volumetric ROI group referencing the segment
  (SEG SOP Instance + segment number, source series), finding type and
  category from the manifest, finding site, algorithm identification, and
  the measurements: volume (mL) and intensity statistics (mean HU for CT);
* per classification a TID 1501 group with a qualitative evaluation
  (finding present/absent at the model's threshold) and the probability.

Measurements are the model's numbers (:class:`dicomnode.domain.Measurement`);
volume and mean are computed from mask and image only where the model did
not report them (``EncodeOptions.compute_measurements``).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept as Code
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.domain import ClassificationOutput, InferenceResult, Measurement
from dicomnode.encode import uids
from dicomnode.encode.common import (
    EncodeOptions,
    add_algorithm_equipment,
    algorithm_equipment,
    arrange_sources,
    copy_source_context,
    hd_code,
    validate_result,
    voxel_volume_ml,
)
from dicomnode.encode.seg import seg_subject, segment_tracking_uid
from dicomnode.errors import EncodeError

_UNITS = {
    "ml": "milliliter",
    "mL": "milliliter",
    "mm3": "cubic millimeter",
    "cm3": "cubic centimeter",
    "l": "liter",
    "[hnsf'U]": "Hounsfield unit",
    "1": "no units",
    "%": "percent",
    "mm": "millimeter",
    "{ratio}": "ratio",
}
_DERIVATION = {
    "mean": codes.SCT.Mean,
    "min": codes.SCT.Minimum,
    "max": codes.SCT.Maximum,
    "std": codes.SCT.StandardDeviation,
}
_PROCEDURE = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}
_LANGUAGES = {
    "en-US": "English (United States)",
    "en": "English",
    "en-GB": "English (United Kingdom)",
    "de": "German",
    "de-DE": "German (Germany)",
    "fr": "French",
    "fr-FR": "French (France)",
    "da": "Danish",
    "da-DK": "Danish (Denmark)",
}
PROBABILITY = Code("122157", "DCM", "Probability")


def unit_code(unit: str) -> Code:
    """UCUM unit as a coded concept; unknown codes keep the code as meaning."""
    if unit == "mL":
        unit = "ml"
    return Code(unit, "UCUM", _UNITS.get(unit, unit))


def intensity_concept(modality: str) -> Code:
    """Concept name for image intensity statistics of ``modality``."""
    if modality == "CT":
        return Code("112031", "DCM", "Attenuation Coefficient")
    if modality == "MR":
        return Code("110852", "DCM", "MR signal intensity")
    return Code("246205007", "SCT", "Quantity")


def _measurement(m: Measurement, modality: str, algo: hd.sr.AlgorithmIdentification,
                 ) -> hd.sr.Measurement:
    if m.name == "volume":
        return hd.sr.Measurement(name=codes.SCT.Volume, value=float(m.value),
                                 unit=unit_code(m.unit), algorithm_id=algo)
    if m.name in _DERIVATION:
        return hd.sr.Measurement(name=intensity_concept(modality), value=float(m.value),
                                 unit=unit_code(m.unit), derivation=_DERIVATION[m.name],
                                 algorithm_id=algo)
    raise EncodeError(f"measurement {m.name!r} has no DICOM concept mapping")


def computed_measurements(result: InferenceResult, index: int) -> list[Measurement]:
    """Volume (mL) and mean intensity of label ``index``, from mask and image."""
    assert result.segmentation is not None
    lab = result.segmentation.labels[index]
    mask = result.segmentation.masks[index]
    # Restrict to the slices the label touches, then reduce with where=: no
    # copy of the selected voxels and no pass over empty slices.
    touched = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    k0, k1 = (int(touched[0]), int(touched[-1]) + 1) if len(touched) else (0, 0)
    count = int(np.count_nonzero(mask[k0:k1]))
    out = [Measurement("volume", count * voxel_volume_ml(result), "ml", lab.value)]
    if count:
        total = float(np.add.reduce(result.volume.array[k0:k1], axis=None, dtype=np.float64,
                                    where=mask[k0:k1], initial=0.0))
        unit = "[hnsf'U]" if result.volume.modality == "CT" else "1"
        out.append(Measurement("mean", total / count, unit, lab.value))
    return out


def device_observer(result: InferenceResult, options: EncodeOptions) -> hd.sr.ObserverContext:
    model = result.model
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(options.manufacturer, options.device_name, model),
            name=f"{options.device_name} {model.name}"[:64],
            manufacturer_name=options.manufacturer[:64],
            model_name=f"{model.name} {model.version}"[:64],
            serial_number=options.serial_number[:64],
        ),
    )


def _algorithm(result: InferenceResult) -> hd.sr.AlgorithmIdentification:
    model = result.model
    params = [f"family={model.family}"]
    params += [f"weights_sha256={h}" for h in model.weights_sha256]
    # What the loader left out of the series (a scout, another stack), so that a
    # reader of the report knows which images the result is about.
    params += [f"left out: {e.describe()}" for e in result.volume.excluded]
    return hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                         parameters=params)


def _classification_group(c: ClassificationOutput, result: InferenceResult,
                          options: EncodeOptions, algo: hd.sr.AlgorithmIdentification,
                          ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    present = codes.SCT.Present if c.positive else codes.SCT.Absent
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.result_uid("tracking", "sr", result.volume.series_uid,
                                options.series_version, result.model, "class", c.spec.index),
            identifier=c.spec.name[:64],
        ),
        finding_type=hd_code(c.spec.code),
        algorithm_id=algo,
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(c.probability),
                                        unit=unit_code("1"), algorithm_id=algo)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=hd_code(c.spec.code),
                                                             value=present)],
    )


def _uids_only(ds: Dataset) -> Dataset:
    out = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        out[kw] = ds[kw]
    return out


def encode_sr(
    result: InferenceResult,
    sources: Sequence[Dataset],
    seg: Dataset | None = None,
    options: EncodeOptions | None = None,
    *,
    validated: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for ``result``.

    Parameters
    ----------
    seg
        The SEG built for the same result; segment groups reference it. When
        ``None`` (SEG not produced), segment findings are reported as TID 1501
        groups without a region reference.
    """
    options = options or EncodeOptions()
    if not validated:
        validate_result(result)
    layout = arrange_sources(result, sources)
    model = result.model
    vol = result.volume
    algo = _algorithm(result)
    groups: list[object] = []

    seg_out = result.segmentation
    if seg_out is not None:
        for i, lab in enumerate(seg_out.labels):
            given = [m for m in result.measurements if m.label_value == lab.value]
            names = {m.name for m in given}
            if options.compute_measurements and not {"volume", "mean"} <= names:
                # Only what the model did not report (both need a pass over the mask).
                given += [m for m in computed_measurements(result, i) if m.name not in names]
            common = dict(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment_tracking_uid(result, options, lab.value),
                    identifier=lab.name[:64]),
                finding_type=hd_code(lab.type),
                finding_category=hd_code(lab.category),
                algorithm_id=algo,
                finding_sites=[hd.sr.FindingSite(hd_code(lab.anatomic_region))]
                if lab.anatomic_region else None,
                measurements=[_measurement(m, vol.modality, algo) for m in given] or None,
            )
            if seg is not None:
                groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        segment_number=i + 1,
                        source_series=hd.sr.SourceSeriesForSegmentation(vol.series_uid),
                    ),
                    **common,  # type: ignore[arg-type]
                ))
            else:
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))  # type: ignore[arg-type]
    series_level = [m for m in result.measurements if m.label_value is None]
    if series_level:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.result_uid("tracking", "sr", vol.series_uid, options.series_version,
                                    model, "series"),
                identifier="series measurements"),
            algorithm_id=algo,
            measurements=[_measurement(m, vol.modality, algo) for m in series_level],
        ))
    for c in result.classifications:
        groups.append(_classification_group(c, result, options, algo))
    if not groups:
        raise EncodeError(f"model {model.name!r} reported nothing to put in a structured report")

    language = hd.sr.LanguageOfContentItemAndDescendants(
        language=Code(options.language, "RFC5646", _LANGUAGES.get(options.language,
                                                                   options.language)))
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(
                observer_device_context=device_observer(result, options)),
            procedure_reported=_PROCEDURE.get(vol.modality, codes.SCT.ImagingProcedure),
            imaging_measurements=groups,  # type: ignore[arg-type]
            language_of_content_item_and_descendants=language,
        )
        # highdicom copies patient/study from evidence[0] and only reads four
        # UIDs from the rest; slim stand-ins halve its evidence bookkeeping.
        evidence = [layout.first, *(_uids_only(d) for d in layout.datasets[1:])]
        if seg is not None:
            evidence.append(seg)
        src0 = layout.first
        subject = seg_subject(result) if seg_out is not None else \
            ", ".join(c.spec.name for c in result.classifications)[:40]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=uids.result_uid("series", "sr", vol.series_uid,
                                                options.series_version, model),
            series_number=uids.series_number("sr", src0.get("SeriesNumber"),
                                              options.series_number_base),
            sop_instance_uid=uids.result_uid("instance", "sr", vol.series_uid,
                                             options.series_version, model),
            instance_number=1,
            manufacturer=options.manufacturer,
            is_complete=True,
            is_final=False,  # unreviewed AI output: PRELIMINARY until a physician verifies
            is_verified=False,
            series_description=uids.series_description("sr", model, subject),
            manufacturer_model_name=options.device_name,
            software_versions=f"dicomnode {options.node_version}",
            device_serial_number=options.serial_number,
            institution_name=options.institution_name or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"highdicom refused the report of {model.name!r}: {exc}") from exc
    sr["SoftwareVersions"].value = [f"dicomnode {options.node_version}",
                                    f"{model.name} {model.version}"]
    add_algorithm_equipment(sr, algorithm_equipment(model, options))
    copy_source_context(sr, src0)
    return sr
