"""Build ``colin27_t1_2mm.npz``, the real sample series ``dicomnode demo`` sends.

Source: the Colin27 T1 template (``ch2.nii.gz``) as shipped by Debian's
``mricron-data`` (BSD-3-Clause; Colin27 itself: Holmes et al. 1998, MNI,
freely redistributable). Averaged over 2x2x2 voxel blocks to 2 mm
(91 x 109 x 91), stored as int16 axial slices in DICOM's LPS layout
(k: inferior -> superior, rows: anterior -> posterior, columns: right -> left).

Run: ``python -m dicomnode.demo_data.build_sample [path/to/ch2.nii.gz]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/mricron/templates/ch2.nii.gz")
OUT = Path(__file__).with_name("colin27_t1_2mm.npz")


def build(source: Path = SOURCE, out: Path = OUT) -> Path:
    import nibabel as nib  # a development dependency: only the maintainer rebuilds the sample

    img = nib.as_closest_canonical(nib.load(source))  # RAS
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # (i, j, k) RAS -> (k, rows = -j, cols = -i): axial slices, LPS columns/rows.
    arr = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    k, r, c = (s - s % 2 for s in arr.shape)
    arr = arr[:k, :r, :c].reshape(k // 2, 2, r // 2, 2, c // 2, 2).mean(axis=(1, 3, 5))
    ni, nj, _ = data.shape
    # LPS position of the first voxel (i = ni-1, j = nj-1, k = 0) of the block grid:
    # the centre of the first 2x2x2 block.
    ras = img.affine @ np.array([ni - 1.5, nj - 1.5, 0.5, 1.0])
    origin = np.array([-ras[0], -ras[1], ras[2]])
    spacing = np.array([zooms[2] * 2, zooms[1] * 2, zooms[0] * 2])
    np.savez_compressed(out, array=np.round(arr).astype(np.int16), spacing=spacing,
                        origin=origin, orientation=np.array([1.0, 0, 0, 0, 1.0, 0]),
                        description=np.array("Colin27 T1 (MNI), 2 mm, from mricron-data ch2"))
    return out


if __name__ == "__main__":
    p = build(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)
    print(f"{p}: {p.stat().st_size / 1e6:.2f} MB")
