"""Real test volumes written as DICOM series, with their reference masks.

Two real data sets shipped by Debian packages are turned into proper DICOM
image series (via :func:`tests.support.series.write_series`) so that tests,
encoders and end-to-end runs exercise the whole DICOM path:

* **Colin27 T1 MR** (``mricron-data``: ``templates/ch2.nii.gz``), with the
  reference brain mask from the skull-stripped ``ch2bet.nii.gz``.
* **Cranium head CT** (``invesalius-examples``: ``examples/Cranium.inv3``, a
  tar.gz holding ``matrix.dat`` (int16 HU) and InVesalius masks). Its
  ``mask_0`` was thresholded in InVesalius with ``threshold_range`` [226, 3071]
  HU (read from ``mask_0.plist``); the volume's maximum is 2986 HU, so the
  stored bone mask equals ``HU >= 226`` exactly.

Generated series are cached under :func:`cache_root` keyed by their
parameters, so the suite writes each one once (writes are atomic: a temp
folder renamed into place, so parallel test runs do not collide).

Public, stable signatures (used by the infer, encode and end-to-end tests)::

    colin27_mr_series(out_dir=None, *, enhanced=False, transfer_syntax=EXPLICIT,
                      orientation=AXIAL) -> SeriesFixture
    cranium_ct_series(out_dir=None, *, enhanced=False, transfer_syntax=EXPLICIT,
                      k_range=None) -> SeriesFixture
    load_colin27() -> RawVolume ; load_cranium() -> RawVolume

and the session-scoped pytest fixtures ``colin27_mr`` and ``cranium_ct``.
"""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from tests.support.series import AXIAL, affine_for, write_series

COLIN27_T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
CRANIUM_INV3 = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

# Bump when the way series are written changes, so stale caches are ignored.
_CACHE_VERSION = "1"

# Fixed UIDs so that cached series keep the same identity between runs.
_UID_ROOT = "1.2.826.0.1.3680043.10.1440."


@dataclass(frozen=True)
class RawVolume:
    """A real volume as an array on the DICOM grid (k, rows, columns)."""

    array: np.ndarray  # real-world values (HU for CT), float32
    reference_mask: np.ndarray  # bool, same shape
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    orientation: tuple[float, ...]  # ImageOrientationPatient
    origin: tuple[float, float, float]  # LPS of voxel (0, 0, 0)
    modality: str
    note: str = ""

    @property
    def affine(self) -> np.ndarray:
        return affine_for(self.orientation, self.spacing, self.origin)


@dataclass(frozen=True)
class SeriesFixture:
    """A written DICOM series and what a test needs to check results on it."""

    directory: Path
    paths: tuple[Path, ...]  # in slice order (one path for enhanced multi-frame)
    array: np.ndarray  # float32 (k, rows, columns), the values written
    reference_mask: np.ndarray  # bool (k, rows, columns) on the written grid
    affine: np.ndarray  # 4x4 voxel (k, row, col) -> LPS mm
    modality: str
    study_uid: str
    series_uid: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))  # type: ignore[return-value]


# --------------------------------------------------------------------------- raw volumes


def _require(path: Path, package: str) -> None:
    if not path.exists():
        pytest.skip(f"{path} missing: install the Debian package {package}")


@lru_cache(maxsize=1)
def load_colin27() -> RawVolume:
    """Colin27 T1 (1 mm, 181 x 217 x 181) as axial slices, mask from ch2bet.

    The NIfTI is RAS; DICOM is LPS. Axial slices with orientation
    (1,0,0, 0,1,0) have columns running to the patient's left and rows to
    posterior, so the canonical RAS array is flipped along i and j.
    The reference mask is ``ch2bet > 0`` with enclosed holes filled (ch2bet
    zeroes a few dark CSF voxels inside the brain; a brain mask, like
    deepbet's, includes them).
    """
    import nibabel as nib
    from scipy import ndimage

    _require(COLIN27_T1, "mricron-data")
    img = nib.as_closest_canonical(nib.load(COLIN27_T1))
    bet = nib.as_closest_canonical(nib.load(COLIN27_BET))
    data = np.asanyarray(img.dataobj)
    bet_data = np.asanyarray(bet.dataobj)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # (i, j, k) RAS -> (k, rows = -j, cols = -i)
    arr = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0)).astype(np.float32)
    mask = bet_data[::-1, ::-1, :].transpose(2, 1, 0) > 0
    mask = np.ascontiguousarray(ndimage.binary_fill_holes(mask))
    ni, nj, _ = data.shape
    ras = img.affine @ np.array([ni - 1, nj - 1, 0, 1.0])
    origin = (-float(ras[0]), -float(ras[1]), float(ras[2]))
    return RawVolume(
        array=arr,
        reference_mask=mask,
        spacing=(zooms[2], zooms[1], zooms[0]),
        orientation=AXIAL,
        origin=origin,
        modality="MR",
        note="Colin27 T1 (mricron-data ch2.nii.gz); mask: ch2bet > 0, holes filled",
    )


@lru_cache(maxsize=1)
def _cranium_members() -> dict[str, bytes]:
    _require(CRANIUM_INV3, "invesalius-examples")
    out: dict[str, bytes] = {}
    with tarfile.open(CRANIUM_INV3, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[Path(m.name).name] = f.read()
    return out


def cranium_bone_threshold() -> tuple[int, int]:
    """The HU threshold range InVesalius used for the stored bone mask (mask_0)."""
    plist = plistlib.loads(_cranium_members()["mask_0.plist"])
    lo, hi = plist["threshold_range"]
    return int(lo), int(hi)


@lru_cache(maxsize=1)
def load_cranium() -> RawVolume:
    """The InVesalius Cranium head CT (108 x 256 x 256 int16 HU) and its bone mask.

    Shape, dtype and spacing come from ``main.plist``. InVesalius masks carry
    one extra leading slice/row/column (its bookkeeping border) and use 255
    for "inside": the mask on the image grid is ``mask[1:, 1:, 1:] >= 127``.
    """
    members = _cranium_members()
    main = plistlib.loads(members["main.plist"])
    shape = tuple(int(v) for v in main["matrix"]["shape"])
    dtype = np.dtype(main["matrix"]["dtype"])
    arr = np.frombuffer(members[main["matrix"]["filename"]], dtype=dtype).reshape(shape)
    m0 = plistlib.loads(members["mask_0.plist"])
    mshape = tuple(int(v) for v in m0["mask_shape"])
    raw_mask = np.frombuffer(members[m0["mask_file"]], dtype=np.uint8).reshape(mshape)
    mask = np.ascontiguousarray(raw_mask[1:, 1:, 1:] >= 127)
    sx, sy, sz = (float(v) for v in main["spacing"])
    lo, hi = cranium_bone_threshold()
    return RawVolume(
        array=arr.astype(np.float32),
        reference_mask=mask,
        spacing=(sz, sy, sx),
        orientation=AXIAL,
        origin=(-sx * shape[2] / 2, -sy * shape[1] / 2, 0.0),
        modality="CT",
        note=f"InVesalius Cranium.inv3; bone mask_0 threshold_range [{lo}, {hi}] HU",
    )


# --------------------------------------------------------------------------- series writing


def cache_root() -> Path:
    """Where generated series are cached (``DICOMNODE_TEST_CACHE`` or a temp dir)."""
    env = os.environ.get("DICOMNODE_TEST_CACHE")
    root = Path(env) if env else Path(tempfile.gettempdir()) / "dicomnode-test-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _uid(*parts: object) -> str:
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24], 16)
    return (_UID_ROOT + str(digest))[:64]


def _jpeg_lossless_via_dcmtk(paths: Sequence[Path]) -> None:
    """pydicom cannot encode JPEG Lossless SV1: let DCMTK's dcmcjpeg do it in place."""
    dcmcjpeg = "/usr/bin/dcmcjpeg"
    if not Path(dcmcjpeg).exists():
        pytest.skip("DCMTK dcmcjpeg missing (Debian package dcmtk)")
    for p in paths:
        tmp = p.with_suffix(".jpg.dcm")
        subprocess.run([dcmcjpeg, "+e1", str(p), str(tmp)], check=True, capture_output=True)
        tmp.replace(p)


def _write(
    raw: RawVolume,
    out_dir: Path,
    *,
    name: str,
    enhanced: bool,
    transfer_syntax: str,
    k_range: tuple[int, int] | None,
    orientation: Sequence[float] | None,
    body_part: str | None,
    description: str,
) -> SeriesFixture:
    array, mask = raw.array, raw.reference_mask
    origin = np.asarray(raw.origin, float)
    orient = tuple(raw.orientation if orientation is None else orientation)
    if k_range is not None:
        k0, k1 = k_range
        array, mask = array[k0:k1], mask[k0:k1]
        origin = origin + k0 * affine_for(raw.orientation, raw.spacing, raw.origin)[:3, 0]
    key = (name, enhanced, transfer_syntax, k_range, orient)
    study_uid = _uid("study", name)
    series_uid = _uid("series", *key)
    write_ts = ExplicitVRLittleEndian if transfer_syntax == JPEGLosslessSV1 else transfer_syntax
    paths = write_series(
        array,
        out_dir,
        modality=raw.modality,
        spacing=raw.spacing,
        orientation=orient,
        origin=tuple(origin),
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=_uid("for", name),
        patient_name="Colin27^Template" if raw.modality == "MR" else "Cranium^Example",
        patient_id=f"DN-{name.upper()}",
        series_description=description,
        body_part=body_part,
        enhanced=enhanced,
        transfer_syntax=write_ts,
    )
    if transfer_syntax == JPEGLosslessSV1 and not enhanced:
        _jpeg_lossless_via_dcmtk(paths)
    if enhanced:
        import pydicom

        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return SeriesFixture(
        directory=Path(out_dir),
        paths=tuple(paths),
        array=np.ascontiguousarray(array, dtype=np.float32),
        reference_mask=np.ascontiguousarray(mask),
        affine=affine_for(orient, raw.spacing, tuple(origin)),
        modality=raw.modality,
        study_uid=study_uid,
        series_uid=series_uid,
    )


def _cached(params: dict[str, object], build) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    final = cache_root() / f"{params['name']}-{digest[:16]}"
    meta_file = final / "fixture.json"
    if not meta_file.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_root()))
        try:
            fx: SeriesFixture = build(tmp / "series")
            np.save(tmp / "reference_mask.npy", fx.reference_mask)
            np.save(tmp / "affine.npy", fx.affine)
            (tmp / "fixture.json").write_text(json.dumps({
                "paths": [str(p.relative_to(tmp)) for p in fx.paths],
                "modality": fx.modality, "study_uid": fx.study_uid, "series_uid": fx.series_uid,
            }))
            try:
                tmp.rename(final)
            except OSError:  # another process won the race; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = json.loads(meta_file.read_text())
    return meta


def _from_cache(params: dict[str, object], raw: RawVolume, build) -> SeriesFixture:
    meta = _cached(params, build)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    final = cache_root() / f"{params['name']}-{digest[:16]}"
    k_range = params.get("k_range")
    array = raw.array if k_range is None else raw.array[k_range[0]:k_range[1]]  # type: ignore[index]
    return SeriesFixture(
        directory=final / "series",
        paths=tuple(final / p for p in meta["paths"]),
        array=np.ascontiguousarray(array, dtype=np.float32),
        reference_mask=np.load(final / "reference_mask.npy"),
        affine=np.load(final / "affine.npy"),
        modality=meta["modality"],
        study_uid=meta["study_uid"],
        series_uid=meta["series_uid"],
    )


def colin27_mr_series(
    out_dir: Path | str | None = None,
    *,
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    orientation: Sequence[float] | None = None,
) -> SeriesFixture:
    """Colin27 T1 as an MR series (181 slices of 217 x 181, 1 mm; modality MR, HEAD).

    With ``out_dir=None`` the series is written once into :func:`cache_root`.
    """
    raw = load_colin27()

    def build(d: Path) -> SeriesFixture:
        return _write(raw, d, name="colin27", enhanced=enhanced, transfer_syntax=transfer_syntax,
                      k_range=None, orientation=orientation, body_part="HEAD",
                      description="T1 MPRAGE Colin27")

    if out_dir is not None:
        return build(Path(out_dir))
    params = {"v": _CACHE_VERSION, "name": "colin27", "enhanced": enhanced,
              "ts": str(transfer_syntax), "orientation": orientation, "k_range": None}
    return _from_cache(params, raw, build)


def cranium_ct_series(
    out_dir: Path | str | None = None,
    *,
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    k_range: tuple[int, int] | None = None,
) -> SeriesFixture:
    """The Cranium head CT as a CT series (108 slices of 256 x 256, 1.5 mm; HEAD).

    ``k_range=(k0, k1)`` writes only those slices (geometry shifted to match),
    for quicker compressed / multi-frame tests.
    """
    raw = load_cranium()

    def build(d: Path) -> SeriesFixture:
        return _write(raw, d, name="cranium", enhanced=enhanced, transfer_syntax=transfer_syntax,
                      k_range=k_range, orientation=None, body_part="HEAD",
                      description="Head CT Cranium")

    if out_dir is not None:
        return build(Path(out_dir))
    params = {"v": _CACHE_VERSION, "name": "cranium", "enhanced": enhanced,
              "ts": str(transfer_syntax), "orientation": None,
              "k_range": list(k_range) if k_range else None}
    return _from_cache(params, raw, build)


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def colin27_mr() -> SeriesFixture:
    """Colin27 T1 MR series (cached), with the ch2bet reference brain mask."""
    return colin27_mr_series()


@pytest.fixture(scope="session")
def cranium_ct() -> SeriesFixture:
    """Cranium head CT series (cached), with InVesalius's stored bone mask."""
    return cranium_ct_series()
