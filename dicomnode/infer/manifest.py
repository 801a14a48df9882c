"""Model manifests (``models/<name>/model.yaml``): parsing and validation.

A manifest says everything the node needs to run a model it has never seen:
identity (for the DICOM outputs), applicability (which series), input
preparation, runtime, outputs and measurements. Every problem is reported as
:class:`~dicomnode.errors.ModelError` naming the file and the key, e.g.
``models/x/model.yaml: input.patch_size: must be 3 positive integers``.

See docs/models.md for a worked example of every key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from dicomnode.domain import ClassSpec, CodedConcept, LabelSpec, ModelInfo
from dicomnode.errors import ModelError
from dicomnode.infer.volume import PLANES, SPLIT_KEYS, StackChoice, plane_of

ORIENTATION_CODES = {"R", "L", "A", "P", "S", "I"}
NORMALIZATIONS = ("clip", "scale", "zscore", "percentile", "affine")
ACTIVATIONS = ("none", "softmax", "sigmoid", "argmax", "labelmap")
MEASUREMENTS = ("volume", "mean", "min", "max", "std")


@dataclass(frozen=True)
class WeightsFile:
    file: str
    sha256: str
    role: str = "model"  # "model" or "localizer"


@dataclass(frozen=True)
class Applicability:
    """Which series a model applies to (routing asks :meth:`Manifest.applies_to`)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()  # empty: any (BodyPartExamined, upper case)
    series_description: str | None = None  # regex, searched case-insensitively
    min_slices: int = 2
    planes: tuple[str, ...] = ()  # empty: any; else axial / coronal / sagittal / oblique


@dataclass(frozen=True)
class Refusal:
    """Why a model does not run on a series: the constraint (its manifest key) and why.

    ``hard`` constraints (modality, minimum slices, planes) refuse a model even
    when a route names it; soft hints (series description, body part) only
    select models for the embedded default (no ``routes:``).
    """

    constraint: str  # e.g. "applies_to.modalities"
    reason: str
    hard: bool

    def __str__(self) -> str:
        kind = "hard constraint" if self.hard else "hint"
        return f"{kind} {self.constraint}: {self.reason}"


@dataclass(frozen=True)
class NormStep:
    """One intensity normalisation step, applied in order.

    ``clip``: clip to [min, max]; ``scale``: (x - offset) * factor (e.g. HU
    window); ``zscore``: (x - mean) / std over the tensor (or over voxels
    above ``mask_above``); ``percentile``: map [p_low, p_high] to [0, 1] and
    clip; ``affine``: x * scale + offset.
    """

    type: str
    params: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Localizer:
    """Optional first stage: a coarse network that finds the region to crop.

    The volume is resized (nearest) to ``shape``, run through the localizer,
    channel ``channel`` thresholded, its largest component's bounding box
    grown by ``margin`` (fraction of its size per side) and the full-resolution
    volume cropped to it before the main network (deepbet's two-stage scheme).
    """

    weights: str
    shape: tuple[int, int, int]
    channel: int = 1
    threshold: float = 0.5
    margin: float = 0.1


@dataclass(frozen=True)
class InputSpec:
    orientation: str = "source"  # "source" or a 3-letter code like "RAS" / "LPS"
    spacing: tuple[float, float, float] | None = None  # target spacing along network axes
    resize: tuple[int, int, int] | None = None  # fixed network input shape (nearest)
    normalization: tuple[NormStep, ...] = ()
    statistics_from: Literal["input", "localizer"] = "input"
    channels: int = 1
    patch_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    batch_size: int = 1
    blend: Literal["gaussian", "constant"] = "gaussian"
    crop_foreground: float | None = None  # crop to bbox of values > this before the network
    crop_margin: int = 2  # voxels
    dtype: Literal["float32", "float16"] = "float32"
    stack: StackChoice = StackChoice()  # which stack of the series (input.stack)


@dataclass(frozen=True)
class PostProcess:
    largest_component: bool = False
    fill_holes: Literal["none", "3d", "2d"] = "none"
    min_size_ml: float = 0.0
    within: str | None = None  # keep only voxels inside this (post-processed) label


@dataclass(frozen=True)
class LabelOutput:
    spec: LabelSpec
    channel: int
    postprocess: PostProcess = PostProcess()


@dataclass(frozen=True)
class SaliencySpec:
    method: Literal["none", "occlusion", "gradcam"] = "none"
    patch: tuple[int, int, int] = (8, 8, 8)
    stride: tuple[int, int, int] | None = None
    baseline: float = 0.0
    layer: str | None = None  # Grad-CAM: feature-extractor submodule (TorchScript attribute)
    head: str | None = None  # Grad-CAM: submodule mapping the layer's output to logits


@dataclass(frozen=True)
class OutputSpec:
    task: Literal["segmentation", "classification"]
    activation: str = "none"
    threshold: float = 0.5
    labels: tuple[LabelOutput, ...] = ()
    classes: tuple[ClassSpec, ...] = ()
    saliency: SaliencySpec = SaliencySpec()
    output_index: int = 0  # which network output holds the result


@dataclass(frozen=True)
class MeasurementSpec:
    name: str
    labels: tuple[int, ...] = ()  # label values; empty: all labels


@dataclass(frozen=True)
class Manifest:
    """A validated model manifest. ``folder`` holds the weights files."""

    path: Path
    info: ModelInfo
    weights: tuple[WeightsFile, ...]
    applicability: Applicability
    backend: Literal["onnx", "torchscript"]
    threads: int
    input: InputSpec
    output: OutputSpec
    measurements: tuple[MeasurementSpec, ...]
    localizer: Localizer | None = None
    sample: str | None = None  # small bundled sample (.npz with "array" and "affine")

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def folder(self) -> Path:
        return self.path.parent

    def weights_path(self, role: str = "model") -> Path:
        for w in self.weights:
            if w.role == role:
                return self.folder / w.file
        raise ModelError(f"{self.path}: weights: no file with role {role!r}")

    def verify_weights(self) -> None:
        """Check every weights file against its SHA-256; refuse on mismatch."""
        for i, w in enumerate(self.weights):
            p = self.folder / w.file
            if not p.is_file():
                raise ModelError(f"{self.path}: weights[{i}].file: {p} does not exist")
            digest = sha256_file(p)
            if digest != w.sha256:
                raise ModelError(
                    f"{self.path}: weights[{i}].sha256: {w.file} has SHA-256 {digest}, "
                    f"manifest says {w.sha256}; refusing to load a modified or corrupt model"
                )

    @property
    def stack(self) -> StackChoice:
        """The stack of a series this model runs on (``input.stack``, ``applies_to.planes``)."""
        s = self.input.stack
        return StackChoice(s.split_by, s.select, self.applicability.planes)

    def refusal(
        self,
        modality: str = "",
        n_slices: int | None = None,
        orientation: Sequence[float] | None = None,
        *,
        body_part: str | None = None,
        series_description: str | None = None,
    ) -> Refusal | None:
        """The first constraint of ``applies_to`` a series fails, or ``None``.

        Hard constraints are always checked: Modality, the number of frames
        (when known) and the plane of ImageOrientationPatient (when given).
        The soft hints, BodyPartExamined and SeriesDescription, only when
        passed (``None``: not checked, as for a model a route names).
        """
        a = self.applicability
        if a.modalities and modality.upper() not in a.modalities:
            return Refusal("applies_to.modalities",
                           f"modality {modality or '(none)'} not in {list(a.modalities)}", True)
        if n_slices is not None and n_slices < a.min_slices:
            return Refusal("applies_to.min_slices",
                           f"{n_slices} slice(s), the model needs at least {a.min_slices}", True)
        if a.planes and orientation is not None and len(orientation) == 6:
            try:
                plane = plane_of(np.asarray([float(v) for v in orientation]))
            except (TypeError, ValueError):
                plane = ""
            if plane and plane not in a.planes:
                return Refusal("applies_to.planes",
                               f"{plane} slices; the model handles only {list(a.planes)}", True)
        # Many MR series carry no BodyPartExamined: only a present, different value excludes.
        if (a.body_parts and body_part is not None and body_part
                and body_part.upper() not in a.body_parts):
            return Refusal("applies_to.body_parts",
                           f"body part {body_part} not in {list(a.body_parts)}", False)
        if (a.series_description and series_description is not None
                and not re.search(a.series_description, series_description, re.IGNORECASE)):
            return Refusal("applies_to.series_description",
                           f"series description {series_description!r} does not match "
                           f"{a.series_description!r}", False)
        return None

    def applies_to(
        self,
        modality: str = "",
        body_part: str = "",
        series_description: str = "",
        n_slices: int | None = None,
        orientation: Sequence[float] | None = None,
    ) -> tuple[bool, str]:
        """Whether this model should run on a series without routes; returns (ok, reason).

        The embedded default (no ``routes:``) calls this with the series'
        Modality, BodyPartExamined, SeriesDescription, the number of frames
        and ImageOrientationPatient: hard constraints and soft hints alike.
        """
        r = self.refusal(modality, n_slices, orientation, body_part=body_part,
                         series_description=series_description)
        return (True, "matches") if r is None else (False, str(r))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- parsing helpers


class _Reader:
    """Typed access to a YAML mapping; errors name the file and dotted key."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix
        self.used: set[str] = set()

    def error(self, key: str, msg: str) -> ModelError:
        return ModelError(f"{self.path}: {self.prefix}{key}: {msg}")

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, required: bool = False,
            choices: Sequence[str] | None = None) -> Any:
        v = self.get(key, default, required)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise self.error(key, f"must be a string, got {type(v).__name__}")
        v = str(v)
        if choices is not None and v not in choices:
            raise self.error(key, f"{v!r} is not one of {list(choices)}")
        return v

    def number(self, key: str, default: float | None = None, required: bool = False,
            lo: float | None = None, hi: float | None = None, integer: bool = False) -> Any:
        v = self.get(key, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and
                                                                       not isinstance(v, int)):
            raise self.error(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
        if lo is not None and v < lo:
            raise self.error(key, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise self.error(key, f"must be <= {hi}, got {v}")
        return v

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {v!r}")
        return v

    def triple(self, key: str, integer: bool, default: Any = None) -> Any:
        v = self.get(key, default)
        if v is None:
            return None
        what = "positive integers" if integer else "positive numbers"
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, int if integer else (int, float))
                       or x <= 0 for x in v)):
            raise self.error(key, f"must be 3 {what}, got {v!r}")
        return tuple(int(x) if integer else float(x) for x in v)

    def items(self, key: str, required: bool = False) -> list[Any]:
        v = self.get(key, [], required)
        if not isinstance(v, list):
            raise self.error(key, f"must be a list, got {type(v).__name__}")
        if required and not v:
            raise self.error(key, "must not be empty")
        return v

    def sub(self, key: str, required: bool = False) -> _Reader:
        v = self.get(key, {}, required)
        if not isinstance(v, Mapping):
            raise self.error(key, f"must be a mapping, got {type(v).__name__}")
        return _Reader(self.path, v, f"{self.prefix}{key}.")

    def item(self, key: str, i: int, v: Any) -> _Reader:
        if not isinstance(v, Mapping):
            raise self.error(f"{key}[{i}]", f"must be a mapping, got {type(v).__name__}")
        return _Reader(self.path, v, f"{self.prefix}{key}[{i}].")

    def done(self) -> None:
        """Unknown keys are errors: a typo must not silently change behaviour."""
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise self.error(extra[0], f"unknown key (known: {sorted(self.used)})")


def _code(r: _Reader, key: str) -> CodedConcept:
    c = r.sub(key, required=True)
    out = CodedConcept(
        value=c.text("value", required=True),
        scheme=c.text("scheme", "SCT"),
        meaning=c.text("meaning", required=True),
    )
    c.done()
    return out


def _color(r: _Reader, key: str) -> tuple[int, int, int]:
    v = r.get(key, [255, 0, 0])
    if (not isinstance(v, list) or len(v) != 3
            or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= 255 for x in v)):
        raise r.error(key, f"must be 3 integers 0-255 (RGB), got {v!r}")
    return (int(v[0]), int(v[1]), int(v[2]))


def _norm_steps(r: _Reader) -> tuple[NormStep, ...]:
    steps = []
    for i, raw in enumerate(r.items("normalization")):
        s = r.item("normalization", i, raw)
        t = s.text("type", required=True, choices=NORMALIZATIONS)
        params: dict[str, float] = {}
        if t == "clip":
            params = {"min": s.number("min", required=True), "max": s.number("max", required=True)}
            if params["min"] >= params["max"]:
                raise s.error("max", "must be greater than min")
        elif t == "scale":
            params = {"offset": s.number("offset", 0.0),
                      "factor": s.number("factor", required=True)}
        elif t == "zscore":
            above = s.number("mask_above")
            params = {} if above is None else {"mask_above": above}
        elif t == "percentile":
            params = {"low": s.number("low", 0.5, lo=0, hi=100),
                      "high": s.number("high", 99.5, lo=0, hi=100)}
            if params["low"] >= params["high"]:
                raise s.error("high", "must be greater than low")
        elif t == "affine":
            params = {"scale": s.number("scale", 1.0), "offset": s.number("offset", 0.0)}
        s.done()
        steps.append(NormStep(t, params))
    return tuple(steps)


def _orientation(r: _Reader) -> str:
    v = r.text("orientation", "source")
    if v == "source":
        return v
    v = v.upper()
    axes = {"R": "x", "L": "x", "A": "y", "P": "y", "S": "z", "I": "z"}
    if len(v) != 3 or set(v) - ORIENTATION_CODES or len({axes[c] for c in v}) != 3:
        raise r.error("orientation", f"{v!r} must be 'source' or 3 letters from R/L, A/P, S/I "
                                     "(one per axis), e.g. RAS or LPS")
    return v


def _stack(r: _Reader) -> StackChoice:
    """``input.stack: {split_by: echo, select: first}``: which stack of a series to use."""
    if r.get("stack") is None:
        return StackChoice()
    s = r.sub("stack")
    split_by = s.text("split_by", required=True, choices=SPLIT_KEYS)
    select = s.text("select", "largest")
    if split_by == "orientation":
        if select not in ("largest", *PLANES):
            s.done()
            raise s.error("select", f"{select!r}: for orientation use largest or one of "
                                    f"{list(PLANES)}")
    elif select not in ("largest", "first", "last"):
        try:
            float(select)
        except ValueError:
            raise s.error("select", f"{select!r}: use largest, first, last or a number "
                                    f"(the {split_by} value)") from None
    s.done()
    return StackChoice(split_by, select)


def load_manifest(path: Path | str) -> Manifest:
    """Read and validate ``model.yaml``; raise :class:`ModelError` naming file and key.

    Weights hashes are checked separately (:meth:`Manifest.verify_weights`), at load.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read manifest ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ModelError(f"{path}: must be a YAML mapping at the top level")
    r = _Reader(path, data)

    name = r.text("name", required=True)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise r.error("name", f"{name!r}: use lower-case letters, digits, '.', '_', '-'")
    if path.parent.name != name:
        raise r.error("name", f"{name!r} must equal the folder name {path.parent.name!r}")
    family = r.text("family", required=True, choices=("AI", "rule-based"))

    weights: list[WeightsFile] = []
    for i, raw in enumerate(r.items("weights", required=True)):
        w = r.item("weights", i, raw)
        file = w.text("file", required=True)
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise w.error("file", f"{file!r} must be a path inside the model folder")
        sha = w.text("sha256", required=True).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise w.error("sha256", "must be 64 hexadecimal digits")
        weights.append(WeightsFile(file, sha, w.text("role", "model",
                                                    choices=("model", "localizer"))))
        w.done()
    if sum(w.role == "model" for w in weights) != 1:
        raise r.error("weights", "exactly one file must have role 'model'")

    info = ModelInfo(
        name=name,
        version=r.text("version", required=True),
        description=r.text("description", required=True),
        family=family,
        authors=r.text("authors", required=True),
        licence=r.text("licence", required=True),
        citation=r.text("citation", ""),
        intended_use=r.text("intended_use", required=True),
        weights_sha256=tuple(w.sha256 for w in weights),
    )

    a = r.sub("applies_to", required=True)
    modalities = tuple(str(m).upper() for m in a.items("modalities", required=True))
    applicability = Applicability(
        modalities=modalities,
        body_parts=tuple(str(b).upper() for b in a.items("body_parts")),
        series_description=a.text("series_description"),
        min_slices=a.number("min_slices", 2, lo=1, integer=True),
        planes=tuple(str(p).lower() for p in a.items("planes")),
    )
    bad = sorted(set(applicability.planes) - set(PLANES))
    if bad:
        raise a.error("planes", f"{bad[0]!r} is not one of {list(PLANES)}")
    if applicability.series_description:
        try:
            re.compile(applicability.series_description)
        except re.error as exc:
            raise a.error("series_description", f"invalid regular expression ({exc})") from exc
    a.done()

    rt = r.sub("runtime")
    backend = rt.text("backend", "onnx", choices=("onnx", "torchscript"))
    threads = rt.number("threads", 0, lo=0, integer=True)
    rt.done()

    i_ = r.sub("input", required=True)
    inp = InputSpec(
        orientation=_orientation(i_),
        spacing=i_.triple("spacing", integer=False),
        resize=i_.triple("resize", integer=True),
        normalization=_norm_steps(i_),
        statistics_from=i_.text("statistics_from", "input", choices=("input", "localizer")),
        channels=i_.number("channels", 1, lo=1, hi=1, integer=True),
        patch_size=i_.triple("patch_size", integer=True),
        overlap=i_.number("overlap", 0.25, lo=0.0, hi=0.9),
        batch_size=i_.number("batch_size", 1, lo=1, integer=True),
        blend=i_.text("blend", "gaussian", choices=("gaussian", "constant")),
        crop_foreground=i_.number("crop_foreground"),
        crop_margin=i_.number("crop_margin", 2, lo=0, integer=True),
        dtype=i_.text("dtype", "float32", choices=("float32", "float16")),
        stack=_stack(i_),
    )
    if inp.resize and inp.patch_size:
        raise i_.error("patch_size", "cannot be combined with resize (the network input is fixed)")
    if inp.resize and inp.spacing:
        raise i_.error("spacing", "cannot be combined with resize")
    i_.done()

    localizer = None
    if "localizer" in data:
        lo_ = r.sub("localizer")
        localizer = Localizer(
            weights=lo_.text("weights", required=True),
            shape=lo_.triple("shape", integer=True) or (128, 128, 128),
            channel=lo_.number("channel", 1, lo=0, integer=True),
            threshold=lo_.number("threshold", 0.5),
            margin=lo_.number("margin", 0.1, lo=0.0, hi=1.0),
        )
        lo_.done()
        if localizer.weights not in {w.file for w in weights if w.role == "localizer"}:
            raise lo_.error("weights", f"{localizer.weights!r} is not listed in weights with "
                                       "role 'localizer'")
    elif inp.statistics_from == "localizer":
        raise i_.error("statistics_from", "'localizer' needs a localizer section")

    o = r.sub("output", required=True)
    task = o.text("task", required=True, choices=("segmentation", "classification"))
    labels: list[LabelOutput] = []
    classes: list[ClassSpec] = []
    if task == "segmentation":
        seen: set[int] = set()
        for i, raw in enumerate(o.items("labels", required=True)):
            lr = o.item("labels", i, raw)
            value = lr.number("value", required=True, lo=1, hi=65535, integer=True)
            if value in seen:
                raise lr.error("value", f"duplicate label value {value}")
            seen.add(value)
            pp = lr.sub("postprocess")
            post = PostProcess(
                largest_component=pp.flag("largest_component"),
                fill_holes=pp.text("fill_holes", "none", choices=("none", "3d", "2d")),
                min_size_ml=pp.number("min_size_ml", 0.0, lo=0.0),
                within=pp.text("within"),
            )
            pp.done()
            region = _code(lr, "anatomic_region") if lr.get("anatomic_region") else None
            spec = LabelSpec(
                value=value,
                name=lr.text("name", required=True),
                category=_code(lr, "category"),
                type=_code(lr, "type"),
                color=_color(lr, "color"),
                anatomic_region=region,
            )
            labels.append(LabelOutput(spec, lr.number("channel", value, lo=0, integer=True), post))
            lr.done()
        names = {lab.spec.name for lab in labels}
        for i, lab in enumerate(labels):
            if lab.postprocess.within is not None and lab.postprocess.within not in names:
                raise ModelError(f"{path}: output.labels[{i}].postprocess.within: no label named "
                                 f"{lab.postprocess.within!r}")
    else:
        for i, raw in enumerate(o.items("classes", required=True)):
            cr = o.item("classes", i, raw)
            classes.append(ClassSpec(
                index=cr.number("index", i, lo=0, integer=True),
                name=cr.text("name", required=True),
                code=_code(cr, "code"),
                threshold=cr.number("threshold", 0.5, lo=0.0, hi=1.0),
            ))
            cr.done()
    sr = o.sub("saliency")
    saliency = SaliencySpec(
        method=sr.text("method", "none", choices=("none", "occlusion", "gradcam")),
        patch=sr.triple("patch", integer=True) or (8, 8, 8),
        stride=sr.triple("stride", integer=True),
        baseline=sr.number("baseline", 0.0),
        layer=sr.text("layer"),
        head=sr.text("head"),
    )
    sr.done()
    if saliency.method != "none" and task != "classification":
        raise sr.error("method", "saliency maps are for classification models")
    if saliency.method == "gradcam" and (backend != "torchscript" or not saliency.layer
                                         or not saliency.head):
        raise sr.error("method", "gradcam needs runtime.backend torchscript, saliency.layer "
                                 "and saliency.head")
    output = OutputSpec(
        task=task,
        activation=o.text("activation", "none", choices=ACTIVATIONS),
        threshold=o.number("threshold", 0.5, lo=0.0, hi=1.0),
        labels=tuple(labels),
        classes=tuple(classes),
        saliency=saliency,
        output_index=o.number("output_index", 0, lo=0, integer=True),
    )
    o.done()

    measurements = []
    label_values = {lab.spec.value for lab in labels}
    for i, raw in enumerate(r.items("measurements")):
        m = r.item("measurements", i, raw)
        mname = m.text("name", required=True, choices=MEASUREMENTS)
        mlabels = tuple(int(v) for v in m.items("labels"))
        unknown = set(mlabels) - label_values
        if unknown:
            raise m.error("labels", f"unknown label value(s) {sorted(unknown)}")
        if task != "segmentation":
            raise m.error("name", "measurements need segmentation labels")
        measurements.append(MeasurementSpec(mname, mlabels))
        m.done()

    sample = r.text("sample")
    for key in ("homepage", "notes"):
        r.get(key)  # free-text keys, informative only
    r.done()
    return Manifest(
        path=path, info=info, weights=tuple(weights), applicability=applicability,
        backend=backend, threads=threads, input=inp, output=output,
        measurements=tuple(measurements), localizer=localizer, sample=sample,
    )
