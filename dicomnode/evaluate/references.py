"""Reference results for ``dicomnode models evaluate``, read onto the series grid.

* **DICOM SEG** (any producer): found by the Referenced Series Instance UID it
  declares, read with highdicom's Segmentation reader (``hd.seg.segread``).
  Frames are placed on the series grid by the source SOP Instance (and frame)
  UIDs each SEG frame references; a SEG without usable references (none of the
  series, or frames not stating Spatial Locations Preserved, as dcmqi writes
  them, which highdicom then refuses to index by source) is placed by its
  plane positions (``Segmentation.get_volume``), which must fall exactly on
  the series voxels (same Frame of Reference, axes along the series axes, same
  spacing). Nothing is assumed from frame order.
* **NIfTI** (nibabel), named after the series (its SeriesInstanceUID or its
  folder name): a label map ``<name>.nii[.gz]`` (voxel value ``v`` is label
  ``v``), or a folder ``<name>/`` of one mask per label,
  ``mask-<value>-<anything>.nii[.gz]`` (overlapping labels, as
  ``dicomnode models run --out`` writes them), else its ``labels.nii.gz``.
  Images must lie on the series grid (any axis order or flip, checked with the
  affines; no resampling).
* **CSV** for classifiers: a header with ``series``, ``class``, ``label``;
  ``series`` is a SeriesInstanceUID or a series folder name, ``class`` a class
  name or index of the model, ``label`` 1/0 (also yes/no, true/false,
  positive/negative).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.domain import ClassSpec, LabelSpec, Volume
from dicomnode.errors import EvaluationError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: |error| tolerated on the direction / scale terms and on voxel offsets of an alignment.
_AXIS_TOL = 1e-3
_OFFSET_TOL = 1e-2


@dataclass(frozen=True, eq=False)
class ReferenceSegment:
    number: int  # segment number (SEG) or label value (NIfTI)
    name: str
    type_code: tuple[str, str] | None  # (CodeValue, CodingSchemeDesignator) of the property type
    mask: np.ndarray  # bool (k, rows, columns) on the series grid


@dataclass(frozen=True, eq=False)
class SegReference:
    path: Path
    kind: str  # "seg" | "nifti"
    placed_by: str  # how the frames were put on the series grid
    segments: tuple[ReferenceSegment, ...]


# --------------------------------------------------------------------------- grid mapping


def onto_grid(src: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int],
              dst_affine: np.ndarray, what: str) -> np.ndarray:
    """Place ``src`` (3D, voxel -> LPS ``src_affine``) on the grid ``dst_affine`` exactly.

    The voxel axes of both must be parallel (any order, any sign), with equal
    spacing and integer offsets; voxels of ``src`` outside the destination
    must be empty. Raises :class:`EvaluationError` naming the mismatch.
    """
    m = np.linalg.inv(np.asarray(dst_affine, float)) @ np.asarray(src_affine, float)
    r, t = m[:3, :3], m[:3, 3]
    perm = np.argmax(np.abs(r), axis=1)  # dst axis d <- src axis perm[d]
    signs = np.sign(r[np.arange(3), perm])
    expected = np.zeros((3, 3))
    expected[np.arange(3), perm] = signs
    if sorted(perm.tolist()) != [0, 1, 2] or np.abs(r - expected).max() > _AXIS_TOL:
        raise EvaluationError(
            f"{what} is not on the series grid: its voxel axes or spacing differ from the "
            "series' (resample it onto the series first)")
    if np.abs(t - np.round(t)).max() > _OFFSET_TOL:
        raise EvaluationError(f"{what} is not on the series grid: it is shifted by a "
                              f"fraction of a voxel ({np.round(t, 3).tolist()})")
    a = np.transpose(np.asarray(src), perm)
    offsets = []
    for d in range(3):
        n = a.shape[d]
        if signs[d] < 0:
            a = np.flip(a, axis=d)
            offsets.append(int(round(t[d])) - (n - 1))
        else:
            offsets.append(int(round(t[d])))
    out = np.zeros(tuple(dst_shape), dtype=a.dtype)
    src_sl, dst_sl = [], []
    for d in range(3):
        lo, hi = max(0, offsets[d]), min(dst_shape[d], offsets[d] + a.shape[d])
        if hi <= lo:
            if a.any():
                raise EvaluationError(f"{what} lies entirely outside the series")
            return out
        src_sl.append(slice(lo - offsets[d], hi - offsets[d]))
        dst_sl.append(slice(lo, hi))
    inside = a[tuple(src_sl)]
    if int(np.count_nonzero(inside)) != int(np.count_nonzero(a)):
        raise EvaluationError(f"{what} has labelled voxels outside the series")
    out[tuple(dst_sl)] = inside
    return out


# --------------------------------------------------------------------------- SEG


def _seg_frames_by_source(seg: hd.seg.Segmentation, volume: Volume,
                          numbers: list[int]) -> np.ndarray | None:
    """(k, rows, cols, segments) through the source instances / frames each SEG frame names."""
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    uids = [f.sop_instance_uid for f in volume.frames]
    if not referenced or not referenced & set(uids):
        return None
    try:
        if all(f.frame_number is None for f in volume.frames):
            return np.asarray(seg.get_pixels_by_source_instance(
                uids, segment_numbers=numbers, assert_missing_frames_are_empty=True,
                skip_overlap_checks=True))
        if len(set(uids)) == 1:  # one enhanced multi-frame instance
            frames = [int(f.frame_number or 1) for f in volume.frames]
            return np.asarray(seg.get_pixels_by_source_frame(
                uids[0], frames, segment_numbers=numbers, assert_missing_frames_are_empty=True,
                skip_overlap_checks=True))
    except (ValueError, KeyError, RuntimeError):
        # references incomplete, ambiguous, or spatial locations not declared preserved
        # (highdicom's RuntimeError): the caller places the frames by their positions
        return None
    return None


def read_seg(path: Path, volume: Volume) -> SegReference:
    """A DICOM SEG's segments on ``volume``'s grid."""
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises many types on a malformed object
        raise EvaluationError(f"{path}: not a readable DICOM SEG ({exc})") from exc
    numbers = [int(n) for n in seg.segment_numbers]
    if not numbers:
        raise EvaluationError(f"{path}: the SEG has no segments")
    arr = _seg_frames_by_source(seg, volume, numbers)
    placed_by = "referenced source SOP instances"
    if arr is None:
        for_uid = str(getattr(seg, "FrameOfReferenceUID", ""))
        if for_uid and volume.frame_of_reference_uid and for_uid != volume.frame_of_reference_uid:
            raise EvaluationError(
                f"{path}: its frames reference no image of the series and its Frame of "
                f"Reference ({for_uid}) is not the series' ({volume.frame_of_reference_uid})")
        try:
            hv = seg.get_volume(segment_numbers=numbers, skip_overlap_checks=True)
        except Exception as exc:  # noqa: BLE001 - highdicom's reason is passed on
            raise EvaluationError(f"{path}: its frames reference no image of the series "
                                  f"and do not form a volume ({exc})") from exc
        stack = np.asarray(hv.array)
        if stack.ndim == 3:
            stack = stack[..., None]
        arr = np.stack([onto_grid(stack[..., i], hv.affine, volume.shape, volume.affine,
                                  f"{path.name} segment {numbers[i]}")
                        for i in range(stack.shape[-1])], axis=-1)
        placed_by = "plane positions"
    segments = []
    for i, n in enumerate(numbers):
        desc = seg.get_segment_description(n)
        code = desc.segmented_property_type
        segments.append(ReferenceSegment(
            number=n, name=str(desc.segment_label),
            type_code=(str(code.value), str(code.scheme_designator)),
            mask=np.ascontiguousarray(arr[..., i] >= 0.5)))
    return SegReference(path, "seg", placed_by, tuple(segments))


# --------------------------------------------------------------------------- NIfTI


def _nifti_on_grid(path: Path, volume: Volume) -> np.ndarray:
    """A NIfTI image of whole non-negative numbers placed on ``volume``'s grid."""
    try:
        img: Any = nib.load(str(path))  # a Nifti1Image / Nifti2Image
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types on a malformed file
        raise EvaluationError(f"{path}: not a readable NIfTI image ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(f"{path}: a 3D label map is needed, got shape {data.shape}")
    values = np.rint(data).astype(np.int64) if data.dtype.kind == "f" else data.astype(np.int64)
    if data.dtype.kind == "f" and not np.allclose(values, data):
        raise EvaluationError(f"{path}: voxel values are not whole label numbers")
    if values.min() < 0:
        raise EvaluationError(f"{path}: negative label values")
    return onto_grid(values, _LPS_FROM_RAS @ img.affine, volume.shape, volume.affine, path.name)


def read_nifti(path: Path, volume: Volume) -> SegReference:
    """A NIfTI label map on ``volume``'s grid: one segment per label value present."""
    grid = _nifti_on_grid(path, volume)
    present = [int(v) for v in np.unique(grid) if v > 0]
    segments = tuple(ReferenceSegment(v, f"label {v}", None, grid == v) for v in present)
    return SegReference(path, "nifti", "NIfTI affine", segments)


_MASK_FILE = re.compile(r"^mask-(\d+)(-.*)?\.nii(\.gz)?$")


def read_mask_folder(folder: Path, volume: Volume) -> SegReference:
    """A folder of ``mask-<value>-*.nii[.gz]`` files: one segment per file (masks may overlap)."""
    segments = []
    for p in sorted(folder.iterdir()):
        m = _MASK_FILE.match(p.name)
        if m is None:
            continue
        grid = _nifti_on_grid(p, volume)
        if grid.max(initial=0) > 1:
            raise EvaluationError(f"{p}: a mask file must hold 0 / 1 only")
        segments.append(ReferenceSegment(int(m.group(1)), (m.group(2) or "").lstrip("-")
                                         or f"label {m.group(1)}", None, grid > 0))
    if not segments:
        raise EvaluationError(f"{folder}: no mask-<value>-*.nii.gz files")
    return SegReference(folder, "nifti", "NIfTI affine", tuple(segments))


# --------------------------------------------------------------------------- the folder


def _nifti_key(p: Path) -> str | None:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


class ReferenceFolder:
    """A ``--reference`` folder scanned once: SEG files by series UID, NIfTI files by name."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise EvaluationError(f"--reference: {root} is not a folder")
        self.root = root
        self.segs: dict[str, list[Path]] = {}
        self.niftis: dict[str, Path] = {}
        self.ignored: list[Path] = []
        labelmaps: dict[str, Path] = {}
        for p in sorted(x for x in root.rglob("*") if x.is_file()):
            key = _nifti_key(p)
            if key is not None:
                if p.parent != root and _MASK_FILE.match(p.name):
                    self.niftis[p.parent.name] = p.parent  # a folder of masks: preferred
                elif key == "labels" and p.parent != root:  # a models run --out folder
                    labelmaps.setdefault(p.parent.name, p)
                else:
                    labelmaps.setdefault(key, p)
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True,
                                     specific_tags=["SOPClassUID", "ReferencedSeriesSequence"])
            except (InvalidDicomError, OSError, ValueError, EOFError):
                self.ignored.append(p)
                continue
            if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
                self.ignored.append(p)
                continue
            for item in ds.get("ReferencedSeriesSequence", []):
                uid = str(item.get("SeriesInstanceUID", ""))
                if uid:
                    self.segs.setdefault(uid, []).append(p)
        for key, p in labelmaps.items():
            self.niftis.setdefault(key, p)

    def find(self, series_uid: str, folder: Path) -> Path | None:
        """The reference of one series, or None; two SEGs for one series is an error."""
        segs = self.segs.get(series_uid, [])
        if len(segs) > 1:
            raise EvaluationError(f"series {series_uid}: more than one reference SEG "
                                  f"({', '.join(str(p) for p in segs)})")
        if segs:
            return segs[0]
        return self.niftis.get(series_uid) or self.niftis.get(folder.name)

    def load(self, path: Path, volume: Volume) -> SegReference:
        if path.is_dir():
            return read_mask_folder(path, volume)
        if _nifti_key(path) is not None:
            return read_nifti(path, volume)
        return read_seg(path, volume)


def match_labels(labels: Sequence[LabelSpec], ref: SegReference
                 ) -> list[tuple[LabelSpec, ReferenceSegment | None, str]]:
    """Each model label with its reference segment and the rule that matched them.

    SEG: the same Segmented Property Type code, else the same label name, else
    the same segment number; None when the SEG has no such segment. NIfTI: the
    same label value (a value absent from the map is an empty reference).
    """
    out: list[tuple[LabelSpec, ReferenceSegment | None, str]] = []
    for lab in labels:
        if ref.kind == "nifti":
            seg = next((s for s in ref.segments if s.number == lab.value), None)
            out.append((lab, seg, "label value"))
            continue
        by_code = [s for s in ref.segments
                   if s.type_code == (lab.type.value, lab.type.scheme)]
        by_name = [s for s in ref.segments if s.name.casefold() == lab.name.casefold()]
        by_number = [s for s in ref.segments if s.number == lab.value]
        if len(by_code) == 1:
            out.append((lab, by_code[0], "property type code"))
        elif len(by_name) == 1:
            out.append((lab, by_name[0], "segment label"))
        elif by_number:
            out.append((lab, by_number[0], "segment number"))
        else:
            out.append((lab, None, "no matching segment"))
    return out


# --------------------------------------------------------------------------- CSV

_TRUE = {"1", "yes", "true", "positive", "pos", "y"}
_FALSE = {"0", "no", "false", "negative", "neg", "n"}


@dataclass(frozen=True)
class ClassLabel:
    series: str  # SeriesInstanceUID or folder name, as written
    class_index: int
    positive: bool
    line: int


def read_class_csv(path: Path, classes: Iterable[ClassSpec]) -> list[ClassLabel]:
    """The rows of a classification reference CSV, classes resolved against the model's."""
    classes = list(classes)
    by_name = {c.name.casefold(): c.index for c in classes}
    by_index = {str(c.index): c.index for c in classes}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"--reference: cannot read {path} ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    fields = {(f or "").strip().casefold(): f for f in reader.fieldnames or []}
    missing = [c for c in ("series", "class", "label") if c not in fields]
    if missing:
        raise EvaluationError(f"{path}: the header must name the columns series, class, label "
                              f"(missing: {', '.join(missing)})")
    rows: list[ClassLabel] = []
    seen: set[tuple[str, int]] = set()
    for row in reader:
        n = reader.line_num  # the file's line, blank lines counted
        series = (row.get(fields["series"]) or "").strip()
        cls = (row.get(fields["class"]) or "").strip()
        lab = (row.get(fields["label"]) or "").strip().casefold()
        if not series and not cls and not lab:
            continue
        idx = by_name.get(cls.casefold(), by_index.get(cls))
        if idx is None:
            known = ", ".join(f"{c.index} ({c.name})" for c in classes)
            raise EvaluationError(f"{path} line {n}: class {cls!r} is not one of the model's: "
                                  f"{known}")
        if lab not in _TRUE | _FALSE:
            raise EvaluationError(f"{path} line {n}: label {lab!r} must be 1/0, yes/no, "
                                  "true/false or positive/negative")
        if not series:
            raise EvaluationError(f"{path} line {n}: empty series")
        if (series, idx) in seen:
            raise EvaluationError(f"{path} line {n}: series {series} class {cls} given twice")
        seen.add((series, idx))
        rows.append(ClassLabel(series, idx, lab in _TRUE, n))
    if not rows:
        raise EvaluationError(f"{path}: no reference rows")
    return rows
