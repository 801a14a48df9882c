"""Minimal NIfTI-1 writer for masks (no nibabel needed at runtime).

Masks live on the DICOM grid ``[k, row, column]`` with an LPS affine. NIfTI
stores ``data[i, j, k]`` (i fastest) with an affine to RAS; the writer uses
``i = column, j = row, k = slice`` (as DICOM-to-NIfTI converters do) and
negates x and y to go from LPS to RAS, so any NIfTI viewer overlays the mask
on the same series converted by dcm2niix or similar.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_DTYPES = {np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.uint16): (512, 16),
           np.dtype(np.float32): (16, 32)}


def nifti_affine(affine_kri: np.ndarray) -> np.ndarray:
    """NIfTI (i=col, j=row, k=slice) -> RAS affine from the volume's (k, row, col) -> LPS one."""
    a = np.asarray(affine_kri, float)
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = a[:3, 2], a[:3, 1], a[:3, 0], a[:3, 3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ out


def write_nifti(path: Path | str, array_kri: np.ndarray, affine_kri: np.ndarray,
                description: str = "") -> Path:
    """Write a (k, rows, cols) array as NIfTI-1 (``.nii`` or ``.nii.gz``)."""
    path = Path(path)
    arr = np.asarray(array_kri)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {arr.dtype} for NIfTI output")
    code, bitpix = _DTYPES[arr.dtype]
    data = arr.transpose(2, 1, 0)  # (i=col, j=row, k)
    aff = nifti_affine(affine_kri)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    hdr[38:39] = b"r"
    struct.pack_into("<8h", hdr, 40, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, code, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, *zooms, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)  # scl_slope, scl_inter: values as stored
    hdr[123] = 2  # xyzt_units: millimetres
    hdr[148:148 + 80] = description.encode("ascii", "replace")[:79].ljust(80, b"\0")
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    for row in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *aff[row])
    hdr[344:348] = b"n+1\0"
    payload = bytes(hdr) + np.asarray(data).tobytes(order="F")
    tmp = path.with_name(path.name + ".part")
    if path.name.endswith(".gz"):
        with gzip.open(tmp, "wb", compresslevel=6) as f:
            f.write(payload)
    else:
        tmp.write_bytes(payload)
    tmp.replace(path)  # no half-written file under the final name
    return path
