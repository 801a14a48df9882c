"""Write proper DICOM image series from arrays, with exact geometry.

Used by tests and benchmarks to turn real volumes (Colin27 MR, Cranium CT)
and generated ones into CT / MR series that exercise the whole DICOM path.

Geometry convention (DICOM): for a voxel ``(k, r, c)`` of ``array``::

    position = origin + k * slice_spacing * normal
                      + c * col_spacing * row_dir + r * row_spacing * col_dir

with ``row_dir = orientation[:3]`` (direction along a row, i.e. increasing
column), ``col_dir = orientation[3:]`` and ``normal = row_dir x col_dir``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def oblique(angle_deg: float = 20.0) -> tuple[float, ...]:
    """Axial orientation rotated about the patient's left-right axis."""
    a = np.deg2rad(angle_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))


def affine_for(
    orientation: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """4x4 mapping voxel (k, r, c, 1) to LPS mm for the convention above."""
    row_dir = np.asarray(orientation[:3], float)
    col_dir = np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    a = np.eye(4)
    a[:3, 0] = normal * spacing[0]
    a[:3, 1] = col_dir * spacing[1]
    a[:3, 2] = row_dir * spacing[2]
    a[:3, 3] = origin
    return a


def write_series(
    array: np.ndarray,
    out_dir: Path | str,
    *,
    modality: str = "CT",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "DN-TEST-001",
    accession_number: str = "ACC0001",
    series_description: str = "",
    series_number: int = 1,
    body_part: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    announce_count: bool = False,
    character_set: str | None = None,
) -> list[Path]:
    """Write ``array`` (k, rows, columns; real-world values, e.g. HU) as a series.

    Parameters
    ----------
    spacing
        (slice spacing, row spacing, column spacing) in mm; PixelSpacing is
        (row spacing, column spacing) as DICOM defines it.
    rescale_intercept
        Default -1024 for CT, 0 for MR. Stored values are
        ``round((value - intercept) / slope)``.
    enhanced
        Also convert to one Legacy Converted Enhanced multi-frame instance
        (highdicom) and return only that file.
    announce_count
        Put NumberOfSeriesRelatedInstances (the sender's expected count) in each instance.

    Returns
    -------
    The written file paths, in slice order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (k, rows, columns), got {array.shape}")
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality}")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    default_intercept = -1024.0 if modality == "CT" else 0.0
    intercept = default_intercept if rescale_intercept is None else rescale_intercept
    stored = np.rint((array.astype(np.float64) - intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    if signed:
        if stored.min() < -32768 or stored.max() > 32767:
            raise ValueError("values do not fit int16 with this rescale")
        stored = stored.astype(np.int16)
    else:
        if stored.max() > 65535:
            raise ValueError("values do not fit uint16 with this rescale")
        stored = stored.astype(np.uint16)
    aff = affine_for(orientation, spacing, origin)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    now = dt.datetime(2024, 1, 15, 10, 30, 0)
    k_count, rows, cols = stored.shape
    datasets: list[Dataset] = []
    for k in range(k_count):
        ds = Dataset()
        ds.SpecificCharacterSet = character_set or "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.AcquisitionDate = ds.StudyDate
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AcquisitionTime = ds.StudyTime
        ds.AccessionNumber = accession_number
        ds.Modality = modality
        ds.Manufacturer = "dicomnode-test"
        ds.InstitutionName = "Test Hospital"
        ds.ReferringPhysicianName = "Referring^Doctor"
        ds.StudyDescription = "Test study"
        ds.SeriesDescription = series_description or f"{modality} test series"
        ds.ManufacturerModelName = "series-writer"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientAge = "054Y"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [round(float(v), 6) for v in aff[:3, 3] + aff[:3, 0] * k]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SpacingBetweenSlices = float(spacing[0])
        ds.SliceLocation = round(float(np.dot(aff[:3, 3] + aff[:3, 0] * k,
                                              np.cross(orientation[:3], orientation[3:]))), 6)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = rescale_slope
        ds.RescaleType = "HU" if modality == "CT" else "US"
        if modality == "CT":
            ds.KVP = 120
            ds.ConvolutionKernel = "STANDARD"
            ds.WindowCenter = 40
            ds.WindowWidth = 400
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = 2000.0
            ds.EchoTime = 3.0
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 3.0
        if announce_count:
            ds.NumberOfSeriesRelatedInstances = k_count
        ds.PixelData = stored[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        datasets.append(ds)

    if enhanced:
        import highdicom as hd

        cls = (hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT"
               else hd.legacy.LegacyConvertedEnhancedMRImage)
        mf = cls(
            legacy_datasets=datasets,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
        path = out / "enhanced.dcm"
        mf.save_as(path, enforce_file_format=True)
        return [path]

    paths = []
    for k, ds in enumerate(datasets):
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(UID(transfer_syntax))
        path = out / f"{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_back(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]
