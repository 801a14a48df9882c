"""The demo's sample series: the bundled Colin27 T1 (2 mm, 91 axial MR slices, see
``dicomnode/demo_data``) written as an MR Image Storage series."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SAMPLE = Path(__file__).resolve().parents[1] / "demo_data" / "colin27_t1_2mm.npz"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_sample_series(out_dir: Path | str, *, study_uid: str | None = None,
                        series_uid: str | None = None, every: int = 1) -> list[Path]:
    """Write the bundled Colin27 T1 sample as an MR Image Storage series.

    Parameters
    ----------
    out_dir
        Folder for the files (created).
    study_uid, series_uid
        Fixed UIDs (default: new ones, so each demo is a new study).
    every
        Keep every n-th slice (spacing grows accordingly); 1 keeps all 91.

    Returns
    -------
    list of Path
        The files in slice order (Explicit VR Little Endian).
    """
    with np.load(SAMPLE) as z:
        array = z["array"][::every]
        spacing = z["spacing"].astype(float) * np.array([every, 1.0, 1.0])
        origin = z["origin"].astype(float)
        orientation = [float(v) for v in z["orientation"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    now = dt.datetime.now()
    paths: list[Path] = []
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MR_IMAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "DEMO0001"
        ds.Modality = "MR"
        ds.Manufacturer = "dicomnode demo (Colin27, MNI)"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "dicomnode demo: brain MR"
        ds.SeriesDescription = "T1 MPRAGE (Colin27 sample)"
        ds.PatientName = "Demo^Colin27"
        ds.PatientID = "DICOMNODE-DEMO"
        ds.PatientBirthDate = ""
        ds.PatientSex = "M"
        ds.BodyPartExamined = "HEAD"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        pos = origin + normal * spacing[0] * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SpacingBetweenSlices = float(spacing[0])
        ds.SliceLocation = round(float(np.dot(pos, normal)), 4)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 18.0
        ds.EchoTime = 10.0
        ds.EchoTrainLength = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(array[k], dtype="<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(MR_IMAGE)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"MR{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
