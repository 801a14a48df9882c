"""Small bundled samples for ``dicomnode models verify``.

A model folder may ship ``sample.npz`` (manifest key ``sample``) holding a
small synthetic volume and what the model answered on it when it was
released: ``array`` (k, rows, cols float32), ``affine`` (4x4), ``modality``,
and ``expected_<label value>`` (mask volume in mL) for segmentation models.
``verify`` runs the model on it and compares (a regression check of the
whole runtime on this machine; it says nothing about clinical accuracy).

The samples are synthetic phantoms (no patient data, no licence question),
made by :func:`phantom_ct` and :func:`phantom_mr` and written by
``models/<name>/build.py`` / ``convert.py`` through :func:`write_sample`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.domain import FrameRef, InferenceResult, Volume
from dicomnode.errors import ModelError

#: Relative tolerance on mask volumes (AI models may differ by a few voxels
#: between CPU instruction sets; rule-based ones are exact).
VOLUME_TOLERANCE = 0.01


def _ellipsoid(shape: tuple[int, int, int], spacing: float, radii_mm: tuple[float, ...],
               center_shift: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32)
    c = (np.asarray(shape, np.float32) - 1) / 2 + np.asarray(center_shift, np.float32)
    return sum(((idx[a] - c[a]) * spacing / radii_mm[a]) ** 2 for a in range(3)) <= 1.0


def _axial_affine(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    # (k, row, col) -> (z, y, x): k along +S, rows to +P, columns to +L
    a[:3, :3] = np.array([[0, 0, spacing], [0, spacing, 0], [spacing, 0, 0]], float)
    a[:3, 3] = [-spacing * (shape[2] - 1) / 2, -spacing * (shape[1] - 1) / 2,
                -spacing * (shape[0] - 1) / 2]
    return a


def phantom_mr(shape: tuple[int, int, int] = (90, 108, 90), spacing: float = 2.0) -> np.ndarray:
    """A T1-like head phantom (k=S, rows=P, cols=L): scalp, skull, CSF, grey and white matter."""
    img = np.zeros(shape, np.float32)
    r = {"scalp": (80, 95, 75), "skull": (75, 90, 70), "csf": (71, 86, 66),
         "gm": (68, 83, 63), "wm": (52, 68, 50)}
    for name, value in (("scalp", 90), ("skull", 15), ("csf", 35), ("gm", 110), ("wm", 160)):
        img[_ellipsoid(shape, spacing, r[name])] = value
    img += np.random.default_rng(0).normal(0, 4, shape).astype(np.float32)
    return np.clip(img, 0, None)


def phantom_ct(shape: tuple[int, int, int] = (40, 96, 96), spacing: float = 2.0) -> np.ndarray:
    """A chest-like CT phantom in HU: soft tissue, a bone ring, two lungs, a gas bubble."""
    img = np.full(shape, -1000.0, np.float32)
    body = _ellipsoid(shape, spacing, (200, 70, 85))
    img[body] = 40.0
    ring = _ellipsoid(shape, spacing, (200, 62, 77)) & ~_ellipsoid(shape, spacing, (200, 56, 71))
    img[ring] = 700.0
    for side in (-1, 1):
        img[_ellipsoid(shape, spacing, (30, 35, 22), (0, 0, side * 16))] = -820.0
    img[_ellipsoid(shape, spacing, (6, 6, 6), (0, 22, 0))] = -950.0
    img += np.random.default_rng(1).normal(0, 10, shape).astype(np.float32)
    return img


def sample_volume(array: np.ndarray, affine: np.ndarray, modality: str) -> Volume:
    """Wrap an array as a :class:`Volume` (synthetic frame references)."""
    frames = tuple(FrameRef(f"2.25.{k + 1}", "", None) for k in range(array.shape[0]))
    return Volume(array=np.ascontiguousarray(array, np.float32), affine=affine, frames=frames,
                  study_uid="2.25.1", series_uid="2.25.2", frame_of_reference_uid="2.25.3",
                  modality=modality)


def write_sample(path: Path, array: np.ndarray, modality: str, spacing: float,
                 run: object) -> dict[str, float]:
    """Run ``run(volume) -> InferenceResult`` on the phantom and save it with the answers."""
    affine = _axial_affine(spacing, array.shape)
    stored = np.rint(array).astype(np.int16)  # integers, like DICOM pixels: compresses well
    result = run(sample_volume(stored.astype(np.float32), affine, modality))  # type: ignore[operator]
    expected = _volumes(result)
    arrays: dict[str, Any] = {"array": stored, "affine": affine, "modality": np.array(modality)}
    arrays.update({f"expected_{k}": np.array(v) for k, v in expected.items()})
    np.savez_compressed(path, **arrays)
    return expected


def _volumes(result: InferenceResult) -> dict[str, float]:
    if result.segmentation is None:
        return {f"class_{c.spec.index}": c.probability for c in result.classifications}
    return {str(m.label_value): m.value for m in result.measurements if m.name == "volume"}


@dataclass(frozen=True)
class SampleCheck:
    ok: bool
    expected: dict[str, float]
    actual: dict[str, float]
    message: str


def check_sample(path: Path, run: object) -> SampleCheck:
    """Run the model on a bundled sample and compare with the recorded answers."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read sample ({exc})") from exc
    volume = sample_volume(data["array"].astype(np.float32), data["affine"],
                           str(data["modality"]))
    expected = {k[len("expected_"):]: float(data[k]) for k in data.files
                if k.startswith("expected_")}
    actual = _volumes(run(volume))  # type: ignore[operator]
    bad = []
    for key, exp in expected.items():
        got = actual.get(key)
        if got is None or abs(got - exp) > VOLUME_TOLERANCE * max(abs(exp), 1e-6):
            bad.append(f"{key}: expected {exp:.4g}, got {got if got is None else round(got, 4)}")
    ok = not bad and bool(expected)
    msg = "matches the recorded answer" if ok else ("; ".join(bad) or "no recorded answer")
    return SampleCheck(ok, expected, actual, msg)


def update_manifest_sha256(manifest: Path, file: str, sha256: str) -> bool:
    """Set the ``sha256`` of weights ``file`` in a model.yaml in place (build scripts).

    Edits only that line so comments and layout stay. Returns True when changed.
    """

    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.search(rf"file:\s*{re.escape(file)}\s*$", line):
            for j in range(i + 1, min(i + 4, len(lines))):
                m = re.match(r"(\s*sha256:\s*)([0-9a-fA-F]{64})(\s*)$", lines[j])
                if m:
                    if m.group(2) == sha256:
                        return False
                    lines[j] = f"{m.group(1)}{sha256}{m.group(3)}"
                    manifest.write_text("".join(lines), encoding="utf-8")
                    return True
    raise ModelError(f"{manifest}: no 'file: {file}' entry followed by a sha256 line")
