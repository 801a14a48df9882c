"""Generate realistic synthetic CT series for ingest benchmarks and tests.

Each slice is a 16-bit CT image with body-like structure (an ellipse of soft
tissue, a "spine" and "organs" of different densities) plus Gaussian noise,
so the pixel data is not trivially compressible, written uncompressed
(Explicit VR Little Endian) like a scanner would send it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

ROOT = "1.2.826.0.1.3680043.10.1234"  # example root for synthetic data


def _uid(*parts: int) -> str:
    return ".".join([ROOT, *(str(p) for p in parts)])


def _phantom(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    img = np.full((size, size), -1000.0, dtype=np.float32)  # air
    body = ((x - c) / (0.42 * size)) ** 2 + ((y - c) / (0.32 * size)) ** 2 <= 1
    img[body] = 40
    spine = (x - c) ** 2 + (y - c - 0.18 * size) ** 2 <= (0.05 * size) ** 2
    img[spine] = 700
    r = 0.08 * size * (1 + 0.3 * np.sin(z / 7))
    organ = (x - c + 0.15 * size) ** 2 + (y - c) ** 2 <= r ** 2
    img[organ] = 60
    lung = (((x - c - 0.17 * size) / (0.12 * size)) ** 2 + ((y - c + 0.02 * size) / (0.16 * size))
            ** 2) <= 1
    img[lung] = -850
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    return np.clip(img + 1024, 0, 4095).astype(np.uint16)


def make_series(out: Path, n: int, *, size: int = 512, study: int = 1, series: int = 1,
                seed: int = 0, expected_count: bool = False, patient: str = "BENCH") -> list[Path]:
    """Write ``n`` CT slices of ``size`` x ``size`` to ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid = _uid(study), _uid(study, series)
    for_uid = _uid(study, series, 0)
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(study, series, i + 1)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PatientName, ds.PatientID = f"{patient}^{study}", f"{patient}{study}"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", f"A{study}"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series, i + 1
        ds.SeriesDescription = "synthetic CT"
        ds.ImagePositionPatient = [-250.0, -250.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [500.0 / size, 500.0 / size]
        ds.SliceThickness = 1.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.ConvolutionKernel = 120, "STANDARD"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        if expected_count:
            ds.ImagesInAcquisition = n
        ds.PixelData = _phantom(size, float(i), rng).tobytes()
        p = out / f"ct_{study:02d}_{series:02d}_{i + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
