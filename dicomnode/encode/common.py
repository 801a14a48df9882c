"""Options, input validation and source loading shared by the encoders."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pydicom
from highdicom.sr import CodedConcept as HdCodedConcept
from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.compat.highdicom import install_iod_cache, load_standard_tables
from dicomnode.domain import CodedConcept, InferenceResult, LabelSpec, ModelInfo
from dicomnode.encode import uids
from dicomnode.errors import EncodeError

if TYPE_CHECKING:
    from dicomnode.config import DestinationConfig

FORMATS = ("seg", "sr", "sc")
MEASUREMENT_NAMES = ("volume", "mean", "min", "max", "std")
DEFAULT_CAVEAT = "Not for diagnostic use without review by a qualified physician"


@dataclass(frozen=True)
class EncodeOptions:
    """How result objects are written (per destination where it matters).

    Attributes
    ----------
    keep_empty_frames
        Keep SEG frames without any segmented pixel. Some viewers place
        frames wrongly when empty ones are omitted; the default omits them
        (smaller objects), destinations can ask for all frames.
    segmentation_type
        ``"binary"`` (default) or ``"fractional"`` (needs probability maps).
    sc_caveat
        Text burned into every secondary capture and put in ImageComments.
    sc_max_images
        At most this many secondary-capture slices per result (evenly spread
        over the slices that show something).
    series_number_base
        Series numbers are ``base + 10 * source series number + kind offset``.
    series_version
        Version of the source series the result belongs to (see
        :class:`dicomnode.domain.SeriesRef`); part of every derived UID.
    manufacturer, device_name, device_serial_number, node_version
        Identify the node as the device that created the objects.
    institution_name
        Optional Institution Name for the SR/SEG equipment module.
    language
        RFC 5646 tag of the SR content language, e.g. ``"en-US"``.
    compute_measurements
        Add volume and mean intensity per label to the SR when the model
        did not report them.
    """

    keep_empty_frames: bool = False
    segmentation_type: Literal["binary", "fractional"] = "binary"
    sc_caveat: str = DEFAULT_CAVEAT
    sc_max_images: int = 16
    series_number_base: int = 1000
    series_version: int = 1
    manufacturer: str = "dicomnode"
    device_name: str = "dicomnode"
    device_serial_number: str = ""
    node_version: str = __version__
    institution_name: str | None = None
    language: str = "en-US"
    compute_measurements: bool = True

    def __post_init__(self) -> None:
        if self.segmentation_type not in ("binary", "fractional"):
            raise EncodeError(f"segmentation_type: {self.segmentation_type!r} is not "
                              "'binary' or 'fractional'")
        if self.sc_max_images < 1:
            raise EncodeError("sc_max_images: must be at least 1")
        if self.series_version < 1:
            raise EncodeError("series_version: must be at least 1")
        if not 0 <= self.series_number_base < 2**31 - 1000:
            raise EncodeError("series_number_base: must be between 0 and 2^31 - 1000")
        if not self.manufacturer.strip() or not self.device_name.strip():
            raise EncodeError("manufacturer and device_name must not be empty")

    @classmethod
    def for_destination(cls, destination: DestinationConfig, **kwargs: object) -> EncodeOptions:
        """Options for one configured destination (its ``keep_empty_frames``)."""
        return cls(keep_empty_frames=destination.keep_empty_frames, **kwargs)  # type: ignore[arg-type]

    @property
    def serial_number(self) -> str:
        return self.device_serial_number or socket.gethostname()[:64] or "unknown"


def warm_up() -> None:
    """Do the encoders' one-time work now (a worker calls this when it starts).

    Importing highdicom and loading its tables of the standard (IOD modules,
    module attributes: JSON parsed on first use) takes about a second; done
    at start, the first study after a restart is encoded as fast as the rest.
    """
    install_iod_cache()
    load_standard_tables()


def hd_code(c: CodedConcept) -> HdCodedConcept:
    """Domain coded concept -> highdicom coded concept."""
    return HdCodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    out = tuple(str(f).lower() for f in formats)
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise EncodeError(f"unknown result format(s) {bad}: use one of {list(FORMATS)}")
    return out


def _check_code(where: str, c: CodedConcept | None) -> None:
    if c is None or not str(c.value).strip() or not str(c.scheme).strip() \
            or not str(c.meaning).strip():
        raise EncodeError(f"{where}: coded concept is missing or incomplete ({c!r})")


def validate_result(result: InferenceResult) -> None:
    """Raise :class:`EncodeError` naming the first problem with ``result``."""
    vol = result.volume
    if vol.array.ndim != 3:
        raise EncodeError(
            f"volume array must be 3D (k, rows, columns), got shape {vol.array.shape}")
    if len(vol.frames) != vol.array.shape[0]:
        raise EncodeError(
            f"volume has {vol.array.shape[0]} slices but {len(vol.frames)} frame references")
    if not vol.frame_of_reference_uid:
        raise EncodeError(
            f"source series {vol.series_uid} has no Frame of Reference UID: "
            "result objects could not be placed on the source images")
    if not result.model.name or not result.model.version:
        raise EncodeError("model name and version are required to identify results")
    seg = result.segmentation
    if seg is not None:
        masks = seg.masks
        if not seg.labels:
            raise EncodeError(
                f"segmentation of model {result.model.name!r} declares no labels "
                "(the manifest must list every output label)")
        if masks.ndim != 4:
            raise EncodeError(
                f"mask must be 4D (labels, k, rows, columns), got shape {masks.shape}")
        if masks.shape[0] != len(seg.labels):
            raise EncodeError(
                f"mask has {masks.shape[0]} label channel(s) but the manifest of "
                f"{result.model.name!r} declares {len(seg.labels)} label(s): "
                "labels missing from the manifest")
        if masks.shape[1:] != vol.array.shape:
            raise EncodeError(
                f"mask of shape {masks.shape[1:]} (k, rows, columns) does not match the "
                f"source volume {vol.array.shape}: masks must be on the source grid")
        if masks.dtype != np.bool_:
            raise EncodeError(f"mask must be boolean, got dtype {masks.dtype}")
        values = [lab.value for lab in seg.labels]
        if len(set(values)) != len(values):
            raise EncodeError(f"duplicate label values in the manifest: {values}")
        names = [lab.name for lab in seg.labels]
        if len(set(names)) != len(names):
            raise EncodeError(f"duplicate label names in the manifest: {names}")
        for lab in seg.labels:
            _check_label(lab)
        if seg.probabilities is not None and seg.probabilities.shape != masks.shape:
            raise EncodeError(
                f"probability maps of shape {seg.probabilities.shape} do not match the "
                f"masks {masks.shape}")
        known = set(values)
        for m in result.measurements:
            if m.label_value is not None and m.label_value not in known:
                raise EncodeError(
                    f"measurement {m.name!r} refers to label value {m.label_value}, "
                    f"which the manifest does not declare (known: {sorted(known)})")
    else:
        for m in result.measurements:
            if m.label_value is not None:
                raise EncodeError(
                    f"measurement {m.name!r} refers to label {m.label_value} but the "
                    "result has no segmentation")
    for m in result.measurements:
        if m.name not in MEASUREMENT_NAMES:
            raise EncodeError(
                f"measurement {m.name!r} is not one of {list(MEASUREMENT_NAMES)}")
        if not np.isfinite(m.value):
            raise EncodeError(f"measurement {m.name!r} (label {m.label_value}) is not a "
                              f"finite number: {m.value}")
        if not str(m.unit).strip():
            raise EncodeError(f"measurement {m.name!r} (label {m.label_value}) has no unit")
    for c in result.classifications:
        _check_code(f"class {c.spec.name!r}", c.spec.code)
        if not 0.0 <= float(c.probability) <= 1.0 or not np.isfinite(c.probability):
            raise EncodeError(
                f"class {c.spec.name!r}: probability {c.probability} is not in [0, 1]")
        if c.saliency is not None and c.saliency.shape != vol.array.shape:
            raise EncodeError(
                f"saliency map of class {c.spec.name!r} has shape {c.saliency.shape}, "
                f"the source volume {vol.array.shape}")


def _check_label(lab: LabelSpec) -> None:
    if not lab.name.strip():
        raise EncodeError(f"label value {lab.value} has no name")
    _check_code(f"label {lab.name!r} segmented property category", lab.category)
    _check_code(f"label {lab.name!r} segmented property type", lab.type)
    if lab.anatomic_region is not None:
        _check_code(f"label {lab.name!r} anatomic region", lab.anatomic_region)
    if len(lab.color) != 3 or any(not 0 <= int(v) <= 255 for v in lab.color):
        raise EncodeError(f"label {lab.name!r}: colour {lab.color} is not RGB 0-255")


def load_sources(result: InferenceResult) -> list[Dataset]:
    """Read the source headers (no pixel data) from ``result.volume.paths``."""
    paths = result.volume.paths
    if not paths:
        raise EncodeError(
            "no source datasets given and the volume lists no source paths")
    out: list[Dataset] = []
    for p in paths:
        try:
            out.append(pydicom.dcmread(Path(p), stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise EncodeError(f"cannot read source instance {p}: {exc}") from None
    return out


@dataclass(frozen=True)
class SourceLayout:
    """The source datasets in the order highdicom needs, and how to map slices.

    ``datasets`` are the single-frame instances in volume slice order, or the
    one multi-frame instance. For a multi-frame source ``frame_index[k]`` is
    the 0-based source frame of volume slice ``k`` and ``n_frames`` the
    number of frames in the instance.
    """

    datasets: tuple[Dataset, ...]
    multiframe: bool
    frame_index: tuple[int, ...]
    n_frames: int

    @property
    def first(self) -> Dataset:
        return self.datasets[0]


def arrange_sources(result: InferenceResult, sources: Sequence[Dataset]) -> SourceLayout:
    """Match source datasets to the volume's frames and check they are usable."""
    # Every encoder arranges its sources before highdicom sees them: the first use,
    # where the IOD lookups get memoised if warm_up() did not do it already.
    install_iod_cache()
    vol = result.volume
    if not sources:
        raise EncodeError("no source datasets")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise EncodeError("a source dataset has no SOP Instance UID")
        by_uid[uid] = ds
    for ds in by_uid.values():
        if str(ds.get("SeriesInstanceUID", "")) != vol.series_uid:
            raise EncodeError(
                f"source instance {ds.SOPInstanceUID} belongs to series "
                f"{ds.get('SeriesInstanceUID')}, not to the volume's series {vol.series_uid}")
        if str(ds.get("StudyInstanceUID", "")) != vol.study_uid:
            raise EncodeError(
                f"source instance {ds.SOPInstanceUID} belongs to study "
                f"{ds.get('StudyInstanceUID')}, not to the volume's study {vol.study_uid}")
        for_uid = ds.get("FrameOfReferenceUID")
        if not for_uid:
            raise EncodeError(
                f"source instance {ds.SOPInstanceUID} has no Frame of Reference UID: "
                "a SEG cannot be placed on it")
        if str(for_uid) != vol.frame_of_reference_uid:
            raise EncodeError(
                f"source instance {ds.SOPInstanceUID} has Frame of Reference {for_uid}, "
                f"the volume {vol.frame_of_reference_uid}")
    multiframe = any(f.frame_number is not None for f in vol.frames)
    missing = sorted({f.sop_instance_uid for f in vol.frames} - set(by_uid))
    if missing:
        raise EncodeError(
            f"{len(missing)} source instance(s) referenced by the volume are missing "
            f"from the sources, e.g. {missing[0]}")
    if multiframe:
        uids = {f.sop_instance_uid for f in vol.frames}
        if len(uids) != 1:
            raise EncodeError(
                "a volume built from several multi-frame instances is not supported "
                f"({len(uids)} instances)")
        ds = by_uid[next(iter(uids))]
        n_frames = int(ds.get("NumberOfFrames", 1))
        index = []
        for f in vol.frames:
            if f.frame_number is None or not 1 <= f.frame_number <= n_frames:
                raise EncodeError(
                    f"frame number {f.frame_number} is outside the source's {n_frames} frames")
            index.append(f.frame_number - 1)
        if len(set(index)) != len(index):
            raise EncodeError("the volume references the same source frame twice")
        return SourceLayout((ds,), True, tuple(index), n_frames)
    ordered = tuple(by_uid[f.sop_instance_uid] for f in vol.frames)
    if len({d.SOPInstanceUID for d in ordered}) != len(ordered):
        raise EncodeError("the volume references the same source instance twice")
    return SourceLayout(ordered, False, tuple(range(len(ordered))), len(ordered))


def voxel_volume_ml(result: InferenceResult) -> float:
    """Volume of one voxel in millilitres, from the affine."""
    return float(abs(np.linalg.det(np.asarray(result.volume.affine, float)[:3, :3]))) / 1000.0


# Patient- and study-level attributes copied from the source when the object
# lacks them, so that dcentvfy finds every study attribute consistent across
# the source series and our results. Values are copied, never invented.
_CONTEXT_KEYWORDS = (
    "StudyDescription", "PatientAge", "PatientSize", "PatientWeight", "PatientBirthTime",
    "IssuerOfPatientID", "OtherPatientIDsSequence", "EthnicGroup", "PatientComments",
    "AdmittingDiagnosesDescription", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "PatientIdentityRemoved", "DeidentificationMethod",
)


def copy_source_context(ds: Dataset, src: Dataset) -> None:
    """Copy the source's character set and missing patient/study attributes into ``ds``."""
    for kw in _CONTEXT_KEYWORDS:
        if kw in src and kw not in ds:
            ds[kw] = src[kw]
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet


#: IHE AI Results (AIR) Purpose of Reference of the algorithm's Contributing
#: Equipment item: (Newcode1, 99IHE, "Processing Algorithm").
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")


def algorithm_equipment(model: ModelInfo, options: EncodeOptions) -> Dataset:
    """The IHE AIR Contributing Equipment item that identifies the algorithm.

    Manufacturer is the model's authors when the manifest names them, else the
    node's manufacturer; Manufacturer's Model Name the model name; Software
    Versions the model version and the node version; Device UID derived from
    name, version and weights (:func:`dicomnode.encode.uids.algorithm_device_uid`).
    Built once per result object (never per frame). highdicom's own
    ``ContributingEquipment`` only accepts DCM purposes, hence a plain dataset.
    """
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = \
        PROCESSING_ALGORITHM
    item = Dataset()
    # LO: at most 64 characters, no backslash (it would split the value).
    item.Manufacturer = _lo(model.authors.strip() or options.manufacturer)
    item.ManufacturerModelName = _lo(model.name)
    item.SoftwareVersions = [model.version[:64], f"dicomnode {options.node_version}"[:64]]
    item.DeviceUID = uids.algorithm_device_uid(model)
    item.ContributionDescription = (
        f"{model.family} processing algorithm {model.name} {model.version}"
        + (f", weights SHA-256 {', '.join(model.weights_sha256)}"
           if model.weights_sha256 else ""))[:1024]
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _lo(text: str) -> str:
    return " ".join(text.replace("\\", "/").split())[:64]


def add_algorithm_equipment(ds: Dataset, item: Dataset) -> None:
    """Append ``item`` to ds's Contributing Equipment Sequence, keeping what is there
    (highdicom's acquisition-equipment and highdicom items)."""
    existing = list(ds.get("ContributingEquipmentSequence") or [])
    ds.ContributingEquipmentSequence = [*existing, item]
