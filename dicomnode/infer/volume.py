"""DICOM series -> :class:`dicomnode.domain.Volume`, or a clear refusal.

The loader sorts frames along the slice normal, applies Rescale Slope /
Intercept per frame, supports classic single-frame and enhanced multi-frame
CT/MR (and any compressed transfer syntax pydicom can decode with the
installed pylibjpeg / pyjpegls plug-ins), and keeps the affine and the
voxel-to-source-frame mapping the SEG encoder needs. Files are read by
:mod:`dicomnode.codec.reader` when it can (classic single-frame, uncompressed
little endian: no pydicom objects), by pydicom otherwise; this module only
assembles the volume.

Series as scanners send them
----------------------------
A series often holds more than one stack: a LOCALIZER (scout) image, a
coronal reformat beside the axial slices, the echoes of a multi-echo
acquisition, the time points of a dynamic one, a dose screen. The loader
groups the frames into stacks (same orientation, matrix and pixel spacing,
same Echo Number and Temporal Position) and keeps the largest one; scouts and
images that are not greyscale images are never part of a stack. A model may
ask for another stack (:class:`StackChoice`, the manifest's ``input.stack``):
split by orientation, echo, acquisition number or temporal position and pick
the first, the last, the largest or a given value. Everything left out is
reported in :attr:`~dicomnode.domain.Volume.excluded`, by reason.

It refuses, with a :class:`~dicomnode.errors.VolumeError` naming the problem,
anything that would silently produce a wrong volume from the chosen stack:
mixed series, gantry tilt (slices not stacked along their normal), missing
slices, irregular spacing, duplicate positions and single frames; and a series
in which no stack is left (the reasons of every exclusion are in the message).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.codec import walker
from dicomnode.codec.reader import NATIVE_LE, FastDataset, FileBuffer, read_fast
from dicomnode.domain import Exclusion, FrameRef, Volume
from dicomnode.errors import VolumeError

#: |difference| allowed between direction cosines of two frames.
ORIENTATION_TOLERANCE = 1e-3
#: Absolute (mm) and relative tolerance on the spacing between slices.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_REL = 0.01
#: Largest in-plane offset (mm) of a slice from the line along the normal.
TILT_TOLERANCE_MM = 0.05


@dataclass
class _Frame:
    """Geometry and origin of one 2D frame, before pixels are decoded."""

    path: Path
    index: int  # 0-based frame index within the file
    frame_number: int | None  # 1-based for multi-frame files, else None
    sop_instance_uid: str
    sop_class_uid: str
    position: np.ndarray  # (3,)
    orientation: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    columns: int
    slope: float
    intercept: float
    label: str  # for messages: file name (and frame)
    slot: int | None = None  # volume slice it was placed in while reading (file order)
    echo: float | None = None  # EchoNumbers (enhanced MR: Effective Echo Time)
    acquisition: float | None = None  # AcquisitionNumber (enhanced: Frame Acquisition Number)
    temporal: float | None = None  # TemporalPositionIdentifier (enhanced: TemporalPositionIndex)


class NoStackInPlanes(VolumeError):
    """The series has no stack in the planes a model can handle (``applies_to.planes``)."""


class _Excluded(Exception):  # noqa: N818 - a verdict, not an error: the image is left out
    """An image that is not part of any stack (scout, colour screen...); the reason."""


#: What a model may split a series by (``input.stack.split_by`` in a manifest).
SPLIT_KEYS = ("orientation", "echo", "acquisition", "temporal")
_SPLIT_ATTR = {"echo": "EchoNumbers", "acquisition": "AcquisitionNumber",
               "temporal": "TemporalPositionIdentifier", "orientation": "orientation"}
PLANES = ("axial", "coronal", "sagittal", "oblique")


@dataclass(frozen=True)
class StackChoice:
    """Which stack of a series a model wants (the manifest's ``input.stack``).

    ``split_by`` None: the largest consistent stack (the default). Otherwise the
    series' stacks are told apart by ``split_by`` (``orientation``, ``echo``,
    ``acquisition``, ``temporal``) and ``select`` picks one: ``largest``,
    ``first`` / ``last`` (lowest / highest value), a number (``echo`` 2) or, for
    ``orientation``, a plane (``axial``, ``coronal``, ``sagittal``, ``oblique``).
    ``planes``, when set, are the only planes the model can handle.
    """

    split_by: str | None = None
    select: str = "largest"
    planes: tuple[str, ...] = ()


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plane_of(orientation: np.ndarray) -> str:
    """``axial`` / ``coronal`` / ``sagittal`` when the normal is within 10 degrees of
    an axis of the patient, else ``oblique``."""
    normal = np.cross(orientation[:3], orientation[3:])
    n = float(np.linalg.norm(normal))
    if n == 0:
        return "oblique"
    normal = np.abs(normal / n)
    axis = int(np.argmax(normal))
    if normal[axis] < math.cos(math.radians(10)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _files(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"
            )
            if not files:
                raise VolumeError(f"{p}: folder holds no files")
            return files
        return [p]
    out = [Path(p) for p in paths]
    if not out:
        raise VolumeError("no files given: an empty series is not a volume")
    return out


def _floats(value: Any, n: int, what: str, label: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{label}: {what} is missing or not numeric") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{label}: {what} must have {n} finite values, got {value!r}")
    return arr


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None:
        return None
    seq = seq_owner.get(keyword)
    if not seq:
        return None
    return seq[0]


#: Reasons of files that cannot be read at all start with this (the worker quarantines them).
UNREADABLE = "unreadable: "
# Transfer syntaxes whose data set the strict walker cannot check (deflated, big endian).
_UNWALKABLE_TS = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})


def _uid_of(path: Path) -> str:
    """The SOP Instance UID a stored file is named by (``<SOP UID>.dcm``)."""
    return path.stem if path.suffix == ".dcm" else path.name


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read at all (missing, not Part 10, truncated), or None.

    pydicom reads a truncated file without complaint (it stops at the end of the
    data, so a slice cut in its pixel data loses its pixels or its position
    silently); the file meta and, for little-endian streams, the whole data set
    are walked strictly by :mod:`dicomnode.codec.walker` first.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{UNREADABLE}{exc.strerror or exc}"
    if len(data) < 144 or data[128:132] != b"DICM":
        return f"{UNREADABLE}not a DICOM Part 10 file (no DICM prefix)"
    if data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None  # no File Meta Information Group Length: pydicom decides
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    view = memoryview(data)
    try:
        if meta_end > len(data):
            return f"{UNREADABLE}file meta information runs past the end of the file"
        meta = walker.walk(view[144:meta_end], explicit=True, want=frozenset({0x00020010}))
        ts = meta.get(0x00020010, b"").decode("ascii", "replace").strip("\0 ")
        if ts in _UNWALKABLE_TS:
            return None
        walker.walk(view[meta_end:], explicit=ts != "1.2.840.10008.1.2", want=frozenset())
    except walker.TruncatedError as exc:
        return f"{UNREADABLE}truncated ({exc})"
    except walker.StructureError:
        return None  # maybe another encoding than announced: pydicom decides
    finally:
        view.release()
    return None


def _header_frames(path: Path, ds: Any) -> list[_Frame]:
    """Frames of one file with their geometry (single- or multi-frame)."""
    label = path.name
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise _Excluded(f"not an image (no Pixel Data; SOP class {sop_class})")
    image_type = ds.get("ImageType", [])
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str)
                                           else image_type)]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise _Excluded("LOCALIZER (scout) image")
    spp = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise _Excluded(f"{photometric} image ({spp} samples per pixel), not greyscale")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    if per_frame is None:  # classic single-frame image
        if n_frames != 1:
            raise VolumeError(
                f"{label}: {n_frames} frames without per-frame functional groups cannot be placed"
            )
        tilt = ds.get("GantryDetectorTilt")
        if tilt is not None and abs(float(tilt)) > 1e-3:
            raise VolumeError(f"{label}: gantry tilt of {float(tilt):g} degrees is not supported")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise _Excluded("no Image Position / Orientation (Patient): not a slice of a volume")
        return [_Frame(
            echo=_num(ds.get("EchoNumbers")), acquisition=_num(ds.get("AcquisitionNumber")),
            temporal=_num(ds.get("TemporalPositionIdentifier")),
            path=path, index=0, frame_number=None, sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", label),
            orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", label),
            pixel_spacing=tuple(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", label)),
            rows=rows, columns=cols,
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            label=label,
        )]

    if len(per_frame) != n_frames:
        raise VolumeError(
            f"{label}: {len(per_frame)} per-frame functional groups for {n_frames} frames"
        )
    frames = []
    for i, fg in enumerate(per_frame):
        flabel = f"{label} frame {i + 1}"

        def group(keyword: str, fg: Dataset = fg) -> Dataset | None:
            # A functional group is either per frame or shared (PS3.3 C.7.6.16).
            return _item(fg, keyword) or _item(shared, keyword)

        pos = group("PlanePositionSequence")
        ori = group("PlaneOrientationSequence")
        meas = group("PixelMeasuresSequence")
        pvt = group("PixelValueTransformationSequence")
        mr_echo = group("MREchoSequence")
        content = group("FrameContentSequence")
        if pos is None or ori is None or meas is None:
            raise VolumeError(f"{flabel}: plane position, orientation or pixel measures missing")
        slope = float(pvt.get("RescaleSlope", 1.0)) if pvt is not None else float(
            ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(pvt.get("RescaleIntercept", 0.0)) if pvt is not None else float(
            ds.get("RescaleIntercept", 0.0) or 0.0)
        frames.append(_Frame(
            echo=_num(ds.get("EchoNumbers")) if mr_echo is None else _num(
                mr_echo.get("EffectiveEchoTime")),
            acquisition=_num(content.get("FrameAcquisitionNumber")) if content is not None
            else _num(ds.get("AcquisitionNumber")),
            temporal=_num(content.get("TemporalPositionIndex")) if content is not None
            else None,
            path=path, index=i, frame_number=i + 1, sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            position=_floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", flabel),
            orientation=_floats(ori.get("ImageOrientationPatient"), 6,
                                "ImageOrientationPatient", flabel),
            pixel_spacing=tuple(_floats(meas.get("PixelSpacing"), 2, "PixelSpacing", flabel)),
            rows=rows, columns=cols, slope=slope, intercept=intercept, label=flabel,
        ))
    return frames


def _check_same(frames: list[_Frame]) -> np.ndarray:
    """Same matrix, pixel spacing and orientation everywhere; returns the orientation."""
    ref = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (ref.rows, ref.columns):
            raise VolumeError(
                f"mixed matrix sizes: {ref.label} is {ref.rows}x{ref.columns}, "
                f"{f.label} is {f.rows}x{f.columns}"
            )
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=1e-4, atol=1e-4):
            raise VolumeError(
                f"mixed pixel spacing: {ref.label} has {ref.pixel_spacing}, "
                f"{f.label} has {f.pixel_spacing}"
            )
        if np.max(np.abs(f.orientation - ref.orientation)) > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"mixed orientations: {ref.label} has {ref.orientation.round(4).tolist()}, "
                f"{f.label} has {f.orientation.round(4).tolist()}"
            )
    row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2
            or abs(float(np.dot(row_dir, col_dir))) > 1e-2):
        raise VolumeError(
            f"{ref.label}: ImageOrientationPatient {ref.orientation.tolist()} is not two "
            "orthogonal unit vectors"
        )
    return ref.orientation


@dataclass
class _Stack:
    """Frames that can form one volume: same geometry, echo and temporal position."""

    ref: _Frame
    frames: list[_Frame]
    first: int  # order of appearance, for ties

    @property
    def plane(self) -> str:
        return plane_of(self.ref.orientation)

    def value(self, key: str) -> Any:
        if key == "orientation":
            return self.plane
        return getattr(self.ref, key)

    def describe(self) -> str:
        r = self.ref
        parts = [f"{len(self.frames)} {self.plane}", f"{r.rows}x{r.columns}"]
        for key in ("echo", "temporal", "acquisition"):
            v = getattr(r, key)
            if v is not None:
                parts.append(f"{_SPLIT_ATTR[key]} {v:g}")
        return " ".join(parts)


def _stacks(frames: list[_Frame], by_acquisition: bool) -> list[_Stack]:
    """Group ``frames`` (in file order) into the stacks of the series."""
    stacks: list[_Stack] = []
    for f in frames:
        for st in stacks:
            r = st.ref
            if ((f.rows, f.columns) == (r.rows, r.columns) and f.echo == r.echo
                    and f.temporal == r.temporal
                    and (not by_acquisition or f.acquisition == r.acquisition)
                    and abs(f.pixel_spacing[0] - r.pixel_spacing[0]) <= 1e-4 * (
                        1 + abs(r.pixel_spacing[0]))
                    and abs(f.pixel_spacing[1] - r.pixel_spacing[1]) <= 1e-4 * (
                        1 + abs(r.pixel_spacing[1]))
                    and float(np.max(np.abs(f.orientation - r.orientation)))
                    <= ORIENTATION_TOLERANCE):
                st.frames.append(f)
                break
        else:
            stacks.append(_Stack(f, [f], len(stacks)))
    return stacks


def _why_not(other: _Stack, used: _Stack) -> str:
    """Why the frames of ``other`` are not in the volume built from ``used``."""
    o, u = other.ref, used.ref
    if float(np.max(np.abs(o.orientation - u.orientation))) > ORIENTATION_TOLERANCE:
        return (f"orientation {o.orientation.round(4).tolist()} ({other.plane}) differs from "
                f"the stack used ({u.orientation.round(4).tolist()}, {used.plane})")
    if (o.rows, o.columns) != (u.rows, u.columns):
        return f"matrix {o.rows}x{o.columns} differs from the stack used ({u.rows}x{u.columns})"
    if not np.allclose(o.pixel_spacing, u.pixel_spacing, rtol=1e-4, atol=1e-4):
        return (f"pixel spacing {list(o.pixel_spacing)} differs from the stack used "
                f"({list(u.pixel_spacing)})")
    for key in ("echo", "temporal", "acquisition"):
        ov, uv = getattr(o, key), getattr(u, key)
        if ov != uv:
            show = (lambda v: "none" if v is None else f"{v:g}")  # noqa: E731
            return (f"another stack: {_SPLIT_ATTR[key]} {show(ov)} (the volume is "
                    f"{_SPLIT_ATTR[key]} {show(uv)})")
    return "another stack"  # pragma: no cover - stacks differ in one of the above


def _choose(stacks: list[_Stack], choice: StackChoice) -> _Stack:
    """The stack ``choice`` asks for (default: the largest)."""
    cands = stacks
    found = "; ".join(s.describe() for s in stacks)
    if choice.planes:
        cands = [s for s in cands if s.plane in choice.planes]
        if not cands:
            raise NoStackInPlanes(
                f"no {'/'.join(choice.planes)} stack in the series (the model handles only "
                f"{'/'.join(choice.planes)} slices); stacks found: {found}")
    key, sel = choice.split_by, choice.select
    if key and sel != "largest":
        values = sorted({s.value(key) for s in cands if s.value(key) is not None},
                        key=lambda v: (isinstance(v, str), v))
        if sel in ("first", "last"):
            target: Any = (values[0] if sel == "first" else values[-1]) if values else None
        elif key == "orientation":
            target = sel
        else:
            target = float(sel)
        picked = [s for s in cands if s.value(key) == target]
        if not picked:
            shown = ", ".join(v if isinstance(v, str) else f"{v:g}" for v in values) or "none"
            raise VolumeError(f"no stack with {_SPLIT_ATTR[key]} {sel} in the series "
                              f"(values found: {shown}); stacks found: {found}")
        cands = picked

    def rank(s: _Stack) -> tuple[float, ...]:
        r = s.ref
        return (-len(s.frames), r.echo or 0.0, r.temporal or 0.0, r.acquisition or 0.0,
                float(s.first))

    return min(cands, key=rank)


def _merge(excluded: list[tuple[str, str]]) -> tuple[Exclusion, ...]:
    """(SOP Instance UID, reason) pairs -> one :class:`Exclusion` per reason."""
    by_reason: dict[str, list[str]] = {}
    for uid, reason in excluded:
        uids = by_reason.setdefault(reason, [])
        if uid not in uids:
            uids.append(uid)
    return tuple(Exclusion(r, tuple(u)) for r, u in by_reason.items())


def describe_exclusions(excluded: Iterable[Exclusion]) -> str:
    """``1 image: LOCALIZER (scout) image; 20 images: another stack ...``."""
    return "; ".join(e.describe() for e in excluded)


def _sort_and_check(frames: list[_Frame], orientation: np.ndarray, min_slices: int) -> float:
    """Sort ``frames`` in place along the normal; return the slice spacing (mm)."""
    if len(frames) < min_slices:
        what = frames[0].label if frames else "series"
        raise VolumeError(
            f"{what}: {len(frames)} frame(s) cannot be a volume (need at least {min_slices}); "
            "a single-frame series is a localiser or a 2D image"
        )
    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    frames.sort(key=lambda f: float(np.dot(f.position, normal)))
    dist = np.array([float(np.dot(f.position, normal)) for f in frames])
    gaps = np.diff(dist)
    if len(gaps) == 0:
        return 1.0
    dup = np.flatnonzero(gaps < SPACING_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"two frames at the same position along the normal ({dist[i]:.3f} mm): "
            f"{frames[i].label} and {frames[i + 1].label} (duplicates, or several stacks/echoes "
            "in one series)"
        )
    # In-plane drift of successive slices means the stack is sheared (gantry tilt).
    p0 = frames[0].position
    offsets = np.array([f.position - p0 for f in frames])
    perp = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(perp, axis=1)
    if float(drift.max()) > TILT_TOLERANCE_MM:
        i = int(drift.argmax())
        angle = math.degrees(math.atan2(float(drift[i]), float(dist[i] - dist[0])))
        raise VolumeError(
            f"slices are not stacked along their normal (gantry tilt or sheared stack of "
            f"{angle:.2f} degrees, {drift[i]:.2f} mm in-plane drift at {frames[i].label}); "
            "resample the series to an orthogonal grid first"
        )
    spacing = float(np.median(gaps))
    tol = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    bad = np.flatnonzero(np.abs(gaps - spacing) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) * spacing <= tol:
            n_missing = round(ratio) - 1
            raise VolumeError(
                f"missing slices: {n_missing} slice(s) missing between {frames[i].label} and "
                f"{frames[i + 1].label} (gap {gaps[i]:.3f} mm, spacing {spacing:.3f} mm)"
            )
        raise VolumeError(
            f"irregular slice spacing: {gaps[i]:.3f} mm between {frames[i].label} and "
            f"{frames[i + 1].label}, median {spacing:.3f} mm (tolerance {tol:.3f} mm)"
        )
    return float((dist[-1] - dist[0]) / (len(frames) - 1))


def _pixels(path: Path, ds: Any, n_frames: int) -> tuple[np.ndarray, int]:
    """Stored pixel values (frames, rows, cols) in their integer type, decoded once,
    and how many unused high bits :func:`_place` must still shift out."""
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    bits = int(ds.get("BitsAllocated", 16))
    try:
        stored = int(ds.get("BitsStored", bits) or bits)
        if (ts in NATIVE_LE and "PixelData" in ds and bits in (8, 16)
                and 1 <= stored <= bits):
            # Uncompressed little endian: the bytes are the array.
            dtype = np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{bits // 8}")
            rows, cols = int(ds.Rows), int(ds.Columns)
            count = n_frames * rows * cols
            arr = np.frombuffer(ds.PixelData, dtype=dtype, count=count).reshape(
                n_frames, rows, cols)
            # 12 bits stored in 16 (most CT): the unused high bits may hold
            # anything (PS3.5 8.1.1); load_volume shifts them out (see _place).
            return arr, bits - stored
        if isinstance(ds, FastDataset):  # unusual bit layout: let pydicom decode it
            ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types (missing plug-in, corrupt data...)
        raise VolumeError(f"{path.name}: pixel data cannot be decoded (transfer syntax {ts}: "
                          f"{exc})") from exc
    return (pixels[None] if pixels.ndim == 2 else pixels), 0


def _place(out: np.ndarray, pixels: np.ndarray, shift: int, slope: float, intercept: float,
           scratch: dict[np.dtype, np.ndarray]) -> None:
    """``out[:] = stored value * slope + intercept`` for one frame.

    With ``shift`` unused high bits the stored value is first shifted out and
    back in, exactly as pydicom's decoder does: a logical shift masks unsigned
    values, an arithmetic one sign-extends signed ones. One scratch frame per
    dtype is reused, so a series costs no allocation per slice.
    """
    if shift:
        buf = scratch.get(pixels.dtype)
        if buf is None or buf.shape != pixels.shape:
            buf = scratch[pixels.dtype] = np.empty(pixels.shape, pixels.dtype)
        np.left_shift(pixels, shift, out=buf)
        np.right_shift(buf, shift, out=buf)
        pixels = buf
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)


class VolumeBuffer:
    """Float32 memory reused by successive :func:`load_volume` calls of one worker.

    A worker loads one series at a time, and a fresh 300 x 512 x 512 volume is
    315 MB of pages the kernel must map (and, in a virtual machine, the host
    must back) on first touch: 0.3-0.7 s in the first job of a new worker,
    more than reading the 300 files. The buffer keeps the largest volume loaded
    so far (or what :meth:`prefault` reserved at start) and hands out views of
    it. A volume loaded into it is valid until the next load into the same
    buffer: callers must not keep it across jobs.
    """

    def __init__(self) -> None:
        self._flat: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return 0 if self._flat is None else int(self._flat.nbytes)

    def prefault(self, nbytes: int) -> None:
        """Reserve and touch ``nbytes`` now (a worker calls this at start, in a thread)."""
        with self._lock:
            if nbytes > self.nbytes:
                self._flat = None  # release the smaller one first
                flat = np.empty(nbytes // 4, dtype=np.float32)
                flat.fill(0.0)  # map every page now, not in the first job
                self._flat = flat

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` backed by the buffer (its contents undefined)."""
        n = int(np.prod(shape))
        with self._lock:
            if self._flat is None or self._flat.size < n:
                self._flat = None
                self._flat = np.empty(n, dtype=np.float32)
            return self._flat[:n].reshape(shape)


def _permute_slices(volume: np.ndarray, src: list[int]) -> None:
    """In place: ``volume[k] = old volume[src[k]]``, one slice of scratch memory.

    Slices were placed in file order; this puts them in the order along the
    normal. Files usually come in that order or its reverse: no copy for the
    former, one pass over the volume for the latter.
    """
    done = [False] * len(src)
    tmp: np.ndarray | None = None
    for start in range(len(src)):
        if done[start] or src[start] == start:
            done[start] = True
            continue
        if tmp is None:
            tmp = np.empty_like(volume[0])
        tmp[...] = volume[start]
        k = start
        while True:
            done[k] = True
            j = src[k]
            if j == start:
                volume[k] = tmp
                break
            volume[k] = volume[j]
            k = j


def load_volume(
    paths: Path | str | Iterable[Path | str],
    *,
    min_slices: int = 2,
    buffer: VolumeBuffer | None = None,
    stack: StackChoice | None = None,
) -> Volume:
    """Load one DICOM image series as a float32 volume in source geometry.

    Parameters
    ----------
    paths
        The series' files, or a folder holding only them.
    min_slices
        Fewer frames than this is refused (a volume needs a slice spacing).
    buffer
        Memory to load into, reused between calls (see :class:`VolumeBuffer`):
        the returned volume's array is then only valid until the next call
        with the same buffer. Default: a new array.
    stack
        Which stack of the series to load (see :class:`StackChoice`); default:
        the largest consistent one. The others are reported in ``excluded``.

    Returns
    -------
    Volume
        ``array`` (k, rows, columns) float32 after Rescale Slope/Intercept,
        sorted along the slice normal; ``affine`` maps (k, row, col) to LPS mm;
        ``frames[k]`` names the source instance (and frame) of slice k.

    Raises
    ------
    VolumeError
        When no stack of the series is left, or the chosen one is not a
        coherent, regularly sampled image stack.
    """
    choice = stack or StackChoice()
    excluded: list[tuple[str, str]] = []  # (SOP Instance UID, reason)
    files = _files(paths)
    frames: list[_Frame] = []
    series_uid = study_uid = for_uid = modality = None
    # One read per file, into one reused buffer. A single-frame file's pixels go
    # straight into the float32 volume at the next free slice (file order), so
    # no copy of the series is held on the side; once every header is read and
    # the order along the normal is known, the slices are permuted in place.
    # Other files (multi-frame, decoded by pydicom) keep their decoded pixels in
    # their stored integer type until the order is known.
    file_buffer = FileBuffer()
    volume: np.ndarray | None = None

    def new_array(shape: tuple[int, ...]) -> np.ndarray:
        return buffer.array(shape) if buffer is not None else np.empty(shape, np.float32)

    placed = 0
    scratch: dict[np.dtype, np.ndarray] = {}
    raw: dict[Path, tuple[np.ndarray, int]] = {}
    for path in files:
        ds: Any = read_fast(path, file_buffer)
        if ds is None:
            # A file that cannot be read at all is left out (and quarantined by the
            # worker) rather than failing a series whose other images are usable.
            why = unreadable_reason(path)
            if why is None:
                try:
                    ds = pydicom.dcmread(path)
                except Exception as exc:  # pydicom raises many types for unreadable input
                    why = f"{UNREADABLE}{type(exc).__name__}: {exc}"
            if why is not None:
                excluded.append((_uid_of(path), why))
                continue
        s_uid = str(ds.get("SeriesInstanceUID", ""))
        if series_uid is None:
            series_uid, study_uid = s_uid, str(ds.get("StudyInstanceUID", ""))
            for_uid, modality = str(ds.get("FrameOfReferenceUID", "")), str(ds.get("Modality", ""))
        elif s_uid != series_uid:
            raise VolumeError(
                f"{path.name}: belongs to series {s_uid}, not {series_uid}: one series at a time"
            )
        elif str(ds.get("FrameOfReferenceUID", "")) != for_uid:
            raise VolumeError(f"{path.name}: different Frame of Reference UID within the series")
        try:
            file_frames = _header_frames(path, ds)
        except _Excluded as why:
            excluded.append((str(ds.get("SOPInstanceUID", "") or path.name), str(why)))
            del ds
            continue
        pixels, shift = _pixels(path, ds, len(file_frames))
        in_buffer = isinstance(ds, FastDataset)  # pixels are a view of the reused buffer
        del ds
        f0 = file_frames[0]
        if pixels.shape[1:] != (f0.rows, f0.columns):
            raise VolumeError(f"{f0.label}: decoded pixels {pixels.shape[1:]} do not match "
                              f"Rows/Columns {f0.rows}x{f0.columns}")
        if volume is None and len(files) > 1 and len(file_frames) == 1:
            # Single-frame files: the volume will be (files, rows, columns).
            volume = new_array((len(files), f0.rows, f0.columns))
        if (volume is not None and len(file_frames) == 1 and placed < len(volume)
                and volume.shape[1:] == pixels.shape[1:]):
            _place(volume[placed], pixels[0], shift, f0.slope, f0.intercept, scratch)
            f0.slot = placed
            placed += 1
        else:
            # Kept until the order is known: a view of the reused buffer must be copied.
            raw[path] = (pixels.copy() if in_buffer else pixels, shift)
        frames.extend(file_frames)
        del pixels
    if not frames:
        raise VolumeError("no image of the series can be part of a volume: "
                          + describe_exclusions(_merge(excluded)))
    stacks = _stacks(frames, by_acquisition=choice.split_by == "acquisition")
    used = _choose(stacks, choice)
    for other in stacks:
        if other is not used:
            reason = _why_not(other, used)
            excluded.extend((f.sop_instance_uid, reason) for f in other.frames)
    frames = used.frames
    left_out = _merge(excluded)
    if len(frames) < min_slices and left_out:
        raise VolumeError(
            f"{len(frames)} usable frame(s) cannot be a volume (need at least {min_slices}); "
            f"left out: {describe_exclusions(left_out)}")
    orientation = _check_same(frames)
    try:
        slice_spacing = _sort_and_check(frames, orientation, min_slices)
    except VolumeError as exc:
        if not left_out:
            raise
        raise VolumeError(f"{exc}; left out of the stack: "
                          f"{describe_exclusions(left_out)}") from exc

    ref = frames[0]
    shape = (len(frames), ref.rows, ref.columns)
    if volume is not None and all(f.slot is not None for f in frames):
        # The chosen slices first, in their order along the normal; the slots of
        # left-out frames (and unused ones) after them, then cut off.
        src: list[int] = [f.slot for f in frames if f.slot is not None]
        taken = set(src)
        _permute_slices(volume, src + [k for k in range(len(volume)) if k not in taken])
        volume = volume[:len(frames)]
    else:  # a series mixing single- and multi-frame files, or multi-frame only
        # (the slices placed so far are copied out of the buffer before it is reused)
        placed_slices = volume[:placed].copy() if volume is not None else None
        volume = None
        out = new_array(shape)
        remaining: dict[Path, int] = {}
        for f in frames:
            if f.slot is None:
                remaining[f.path] = remaining.get(f.path, 0) + 1
        for k, f in enumerate(frames):
            if f.slot is not None:
                assert placed_slices is not None
                out[k] = placed_slices[f.slot]
                continue
            pixels, shift = raw[f.path]
            _place(out[k], pixels[f.index], shift, f.slope, f.intercept, scratch)
            remaining[f.path] -= 1
            if not remaining[f.path]:
                del raw[f.path]  # release each file's pixels as soon as they are placed
        volume = out

    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_spacing
    affine[:3, 1] = col_dir * ref.pixel_spacing[0]
    affine[:3, 2] = row_dir * ref.pixel_spacing[1]
    affine[:3, 3] = ref.position
    return Volume(
        array=volume,
        affine=affine,
        frames=tuple(FrameRef(f.sop_instance_uid, f.sop_class_uid, f.frame_number) for f in frames),
        study_uid=study_uid or "",
        series_uid=series_uid or "",
        frame_of_reference_uid=for_uid or "",
        modality=modality or "",
        paths=tuple(dict.fromkeys(f.path for f in frames)),
        excluded=left_out,
        plane=plane_of(orientation),
    )
