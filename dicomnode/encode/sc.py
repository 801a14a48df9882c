"""Secondary Capture fallback: source slices with the result burned in.

For PACS and viewers without SEG support, and for classification saliency
maps. Each image is one source slice, windowed (CT: the source's window,
else percentiles), with a translucent fill and a solid outline per label (or
a heat overlay for saliency), a legend naming the model and labels, and the
configurable caveat ("not for diagnostic use without review"). Images are
scaled up by an integer factor so the legend stays legible on small matrices.
The pixel data come from ``Volume.array``; source files are headers only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.domain import InferenceResult
from dicomnode.encode import uids
from dicomnode.encode.common import (
    EncodeOptions,
    SourceLayout,
    add_algorithm_equipment,
    algorithm_equipment,
    arrange_sources,
    copy_source_context,
    validate_result,
)
from dicomnode.encode.seg import seg_subject
from dicomnode.errors import EncodeError

_MIN_SIDE = 448  # upscale until the short side is at least this many pixels
_FILL_ALPHA = 0.28


def _window(result: InferenceResult, src: Dataset) -> tuple[float, float]:
    """(low, high) display range in volume units."""
    vol = result.volume
    if vol.modality == "CT":
        c, w = src.get("WindowCenter"), src.get("WindowWidth")
        try:
            c = float(c[0] if isinstance(c, Sequence) and not isinstance(c, str) else c)
            w = float(w[0] if isinstance(w, Sequence) and not isinstance(w, str) else w)
            if w > 1:
                return c - w / 2, c + w / 2
        except (TypeError, ValueError):
            pass
        return -160.0, 240.0  # soft tissue
    # Subsample: percentiles of a strided view are as good and much cheaper.
    step = max(1, int(round((vol.array.size / 2_000_000) ** (1 / 3))))
    sample = vol.array[::step, ::step, ::step]
    lo, hi = np.percentile(sample, (0.5, 99.5))
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _orientation_letters(affine: np.ndarray) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction), dominant axis letter."""
    def letter(v: np.ndarray) -> str:
        i = int(np.argmax(np.abs(v)))
        return ("L", "P", "H")[i] if v[i] > 0 else ("R", "A", "F")[i]

    a = np.asarray(affine, float)
    return letter(a[:3, 2]), letter(a[:3, 1])  # along a row = +column index


def _select(candidates: np.ndarray, limit: int) -> list[int]:
    if len(candidates) <= limit:
        return [int(k) for k in candidates]
    picks = np.linspace(0, len(candidates) - 1, limit).round().astype(int)
    return sorted({int(candidates[i]) for i in picks})


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:  # type: ignore[arg-type]
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _compose(body: Image.Image, title: str, entries: list[tuple[tuple[int, int, int], str]],
             footer: str, caveat: str) -> Image.Image:
    """Put the legend above and the caveat below the image, never over anatomy."""
    width = body.width
    size = max(12, width // 38)
    font = _font(size)
    pad = size // 2
    line = size + pad
    probe = ImageDraw.Draw(body)
    # Legend entries flow left to right and wrap.
    items: list[tuple[tuple[int, int, int] | None, str, int]] = []
    x, rows_used = pad, 1
    for entry_colour, text in entries:
        w = size + pad // 2 + int(probe.textlength(text, font=font)) + 2 * pad
        if x + w > width and x > pad:
            x, rows_used = pad, rows_used + 1
        items.append((entry_colour, text, rows_used))
        x += w
    top_h = (1 + rows_used) * line + pad
    cav = _wrap(probe, caveat, font, width - 2 * pad) if caveat else []
    bottom_lines = cav + ([footer] if footer else [])
    bottom_h = len(bottom_lines) * line + pad
    img = Image.new("RGB", (width, top_h + body.height + bottom_h), (0, 0, 0))
    img.paste(body, (0, top_h))
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill=(255, 255, 255), font=font)
    x, row = pad, 1
    for colour, text, r in items:
        if r != row:
            x, row = pad, r
        y = pad + r * line
        if colour is not None:
            draw.rectangle([x, y + 2, x + size - 4, y + size - 2], fill=colour,
                           outline=(255, 255, 255))
            x += size + pad // 2
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
        x += int(draw.textlength(text, font=font)) + 2 * pad
    y = top_h + body.height + pad
    for i, text in enumerate(bottom_lines):
        draw.text((pad, y), text, fill=(255, 220, 0) if i < len(cav) else (200, 200, 200),
                  font=font)
        y += line
    return img


def _gray(slice_: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = (np.clip((slice_ - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.float32)
    return np.repeat(g[..., None], 3, axis=2)


def _upscale(a: np.ndarray, f: int) -> np.ndarray:
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def _heat(v: np.ndarray) -> np.ndarray:
    """Black-red-yellow colour map for values in [0, 1]."""
    r = np.clip(v * 2.0, 0, 1)
    g = np.clip(v * 2.0 - 1.0, 0, 1)
    return np.stack([r, g, np.zeros_like(v)], axis=-1) * 255.0


def render_slices(result: InferenceResult, src: Dataset, options: EncodeOptions
                  ) -> list[tuple[int, str, np.ndarray]]:
    """(slice index k, kind, RGB uint8 image) for every image to emit."""
    vol = result.volume
    lo, hi = _window(result, src)
    k_count, rows, cols = vol.shape
    f = max(1, min(8, math.ceil(_MIN_SIDE / max(1, min(rows, cols)))))
    model = result.model
    title = f"{model.name} {model.version} ({model.family})"
    out: list[tuple[int, str, np.ndarray]] = []
    limit = max(1, options.sc_max_images)
    seg = result.segmentation
    if seg is not None:
        n = len(seg.labels)
        per_slice = np.asarray(seg.masks.reshape(n, k_count, -1).any(axis=2))  # (labels, k)
        nonempty = np.flatnonzero(per_slice.any(axis=0))
        ks = _select(nonempty, limit) if len(nonempty) else [k_count // 2]
        for k in ks:
            rgb = _upscale(_gray(vol.array[k], lo, hi), f)
            for i, lab in enumerate(seg.labels):
                if not per_slice[i, k]:
                    continue
                m = _upscale(seg.masks[i, k], f)
                colour = np.asarray(lab.color, np.float32)
                rgb[m] = rgb[m] * (1 - _FILL_ALPHA) + colour * _FILL_ALPHA
                edge = m & ~ndimage.binary_erosion(m, iterations=max(1, f // 2 + 1))
                rgb[edge] = colour
            entries = [(tuple(int(v) for v in lab.color), lab.name) for i, lab in
                       enumerate(seg.labels)]
            if not len(nonempty):
                entries.append(((0, 0, 0), "no region found"))
            out.append((k, "mask", _finish(rgb, title, entries, k, k_count, options)))
    for c in result.classifications:
        label = f"{c.spec.name}: p={c.probability:.2f} " + \
            ("(positive)" if c.positive else "(negative)")
        if c.saliency is None:
            continue
        strength = c.saliency.reshape(k_count, -1).max(axis=1)
        best = float(strength.max())
        cand = np.flatnonzero(strength >= 0.5 * best) if best > 0 else np.array([k_count // 2])
        for k in _select(cand, limit):
            rgb = _upscale(_gray(vol.array[k], lo, hi), f)
            s = _upscale(np.clip(c.saliency[k], 0.0, 1.0).astype(np.float32), f)[..., None]
            alpha = 0.55 * s
            rgb = rgb * (1 - alpha) + _heat(s[..., 0]) * alpha
            out.append((k, f"saliency-{c.spec.index}",
                        _finish(rgb, title, [((255, 160, 0), f"saliency, {label}")], k, k_count,
                                options)))
    return out


def _finish(rgb: np.ndarray, title: str, entries: list, k: int, k_count: int,
            options: EncodeOptions) -> np.ndarray:
    body = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    img = _compose(body, title, entries, f"slice {k + 1}/{k_count}", options.sc_caveat)
    return np.asarray(img, dtype=np.uint8)


def _source_for_slice(layout: SourceLayout, k: int) -> tuple[Dataset, int | None]:
    if layout.multiframe:
        return layout.first, layout.frame_index[k] + 1
    return layout.datasets[k], None


# Body parts (BodyPartExamined, PS3.16 CID 4031 / Annex L) that come in pairs: for
# these Laterality (General Series, Type 2C) is required, empty when the side is unknown.
_PAIRED_BODY_PARTS = frozenset({
    "ACJOINT", "ADRENAL", "ANKLE", "ARM", "AXILLA", "BREAST", "CALCANEUS", "CLAVICLE",
    "EAR", "ELBOW", "EXTREMITY", "EYE", "FEMUR", "FIBULA", "FINGER", "FOOT", "FOREARM",
    "HAND", "HIP", "HUMERUS", "KIDNEY", "KNEE", "LEG", "LOWEREXTREMITY", "LOWERLEG",
    "LUNG", "ORBIT", "OVARY", "PAROTID", "PATELLA", "RADIUS", "SCAPULA", "SCJOINT",
    "SHOULDER", "SIJOINT", "TESTIS", "THIGH", "THUMB", "TIBIA", "TMJ", "TOE", "ULNA",
    "UPRARM", "UPPERARM", "UPPEREXTREMITY", "URETER", "WRIST",
})
# Patient Study module attributes SEG and SR get from highdicom's copy of the source's
# patient/study context, and SC does not (dcentvfy compares them across the study).
_PATIENT_STUDY_KEYWORDS = ("AdditionalPatientHistory", "PatientSexNeutered",
                           "Occupation", "SmokingStatus", "PregnancyStatus",
                           "LastMenstrualDate", "MedicalAlerts", "Allergies")


def _set_laterality(sc: Dataset, src: Dataset) -> None:
    """Laterality (General Series, Type 2C) and Image Laterality from the source.

    * the source names a side (Laterality R / L, or Image Laterality R, L, U, B):
      copied;
    * a paired body part without a side: Laterality present but empty (side unknown);
    * a known unpaired body part (HEAD, CHEST, ABDOMEN, ...): Laterality absent and
      Image Laterality ``U`` (unpaired), which is what makes Laterality not required;
    * no body part: Laterality empty, the DICOM answer for "not known" (the node does
      not claim a body part is unpaired when the source does not say which it is).
    """
    side = str(src.get("Laterality", "") or "").strip().upper()
    image_side = str(src.get("ImageLaterality", "") or "").strip().upper()
    body_part = str(src.get("BodyPartExamined", "") or "").strip().upper()
    if "Laterality" in sc:
        del sc.Laterality
    if side in ("R", "L"):
        sc.Laterality = side
    if image_side in ("R", "L", "U", "B"):
        sc.ImageLaterality = image_side
        if image_side in ("R", "L") and "Laterality" not in sc:
            sc.Laterality = image_side
        return
    if "Laterality" in sc:
        return
    if body_part and body_part not in _PAIRED_BODY_PARTS:
        sc.ImageLaterality = "U"
    else:
        sc.Laterality = ""


def encode_sc(
    result: InferenceResult,
    sources: Sequence[Dataset],
    options: EncodeOptions | None = None,
    *,
    validated: bool = False,
) -> list[Dataset]:
    """Secondary Capture images (one per selected slice) for ``result``."""
    options = options or EncodeOptions()
    if not validated:
        validate_result(result)
    if result.segmentation is None and not any(c.saliency is not None
                                               for c in result.classifications):
        raise EncodeError(
            f"model {result.model.name!r} produced neither a mask nor a saliency map to draw")
    layout = arrange_sources(result, sources)
    model = result.model
    vol = result.volume
    spacing = vol.spacing
    images = render_slices(result, layout.first, options)
    series_uid = uids.result_uid("series", "sc", vol.series_uid, options.series_version, model)
    number = uids.series_number("sc", layout.first.get("SeriesNumber"),
                                options.series_number_base)
    subject = ""
    if result.segmentation is not None:
        subject = seg_subject(result)
    elif result.classifications:
        subject = ", ".join(c.spec.name for c in result.classifications)[:30] + " saliency"
    description = uids.series_description("sc", model, subject)
    orientation = _orientation_letters(vol.affine)
    equipment = algorithm_equipment(model, options)
    out: list[Dataset] = []
    for n, (k, kind, rgb) in enumerate(images):
        f = rgb.shape[1] // vol.shape[2]
        src, frame = _source_for_slice(layout, k)
        try:
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=src,
                pixel_array=rgb,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=series_uid,
                series_number=number,
                sop_instance_uid=uids.result_uid("instance", "sc", vol.series_uid,
                                                 options.series_version, model, kind, k),
                instance_number=n + 1,
                manufacturer=options.manufacturer,
                pixel_spacing=(spacing[1] / f, spacing[2] / f),
                patient_orientation=orientation,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                series_description=description,
                manufacturer_model_name=options.device_name,
                software_versions=f"dicomnode {options.node_version}",
                device_serial_number=options.serial_number,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise EncodeError(f"highdicom refused a secondary capture: {exc}") from exc
        sc["SoftwareVersions"].value = [f"dicomnode {options.node_version}",
                                        f"{model.name} {model.version}"]
        sc.BurnedInAnnotation = "YES"
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ImageComments = options.sc_caveat[:10240] if options.sc_caveat else None
        if not options.sc_caveat:
            del sc.ImageComments
        sc.DerivationDescription = (
            f"{'Mask overlay' if kind == 'mask' else 'Saliency overlay'} by "
            f"{model.name} {model.version}")[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        if frame is not None:
            ref.ReferencedFrameNumber = frame
        sc.SourceImageSequence = [ref]
        _set_laterality(sc, src)
        add_algorithm_equipment(sc, copy.deepcopy(equipment))
        copy_source_context(sc, src)
        for kw in _PATIENT_STUDY_KEYWORDS:  # as highdicom copies them into SEG and SR
            if kw in src and kw not in sc:
                sc[kw] = src[kw]
        out.append(sc)
    return out
