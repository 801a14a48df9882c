"""Small frozen value objects passed between stages.

Stages (receive, store, infer, encode, dispatch, worker) exchange only these
types (plus pydicom datasets where a DICOM object is the value). They hold no
behaviour beyond trivial derived properties.

Array conventions
-----------------
* A :class:`Volume` array is indexed ``[k, row, column]``: ``k`` follows the
  frames in :attr:`Volume.frames` (sorted along the slice normal), ``row`` and
  ``column`` are the DICOM rows and columns of each source frame, untouched.
* ``Volume.affine`` maps the voxel index ``(k, row, column, 1)`` to patient
  coordinates (LPS, millimetres), exactly as DICOM defines them.
* Segmentation masks live on that same grid: ``masks[label_index, k, row, col]``.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

# --------------------------------------------------------------------------- receive / store


@dataclass(frozen=True)
class InstanceRef:
    """One stored DICOM instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    transfer_syntax_uid: str = ""
    instance_number: int | None = None


@dataclass(frozen=True)
class SeriesRef:
    """A version of a series as the store knows it.

    ``version`` starts at 1 and is incremented when an instance arrives after
    the series was declared complete; each version becomes one job.
    """

    study_uid: str
    series_uid: str
    version: int
    modality: str = ""
    instance_count: int = 0
    calling_aet: str = ""
    called_aet: str = ""


class JobState(str, enum.Enum):  # noqa: UP042 - str() semantics relied upon
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    #: Nothing to do: the version added only images the loader leaves out (a late
    #: scout); the job of the version before stays current.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    series_uid: str
    series_version: int
    state: JobState
    attempts: int = 0
    priority: int = 0
    not_before: datetime | None = None
    lease_until: datetime | None = None
    worker_id: str | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: Errors of earlier attempts, oldest first: ``{"attempt", "at", "error", "transient"}``.
    attempt_log: tuple[dict[str, object], ...] = ()
    #: What the pipeline decided besides the outputs: ``excluded`` (images the loader
    #: left out, with the reason), ``refused`` (models a hard constraint refused),
    #: ``skipped`` (why nothing ran).
    notes: dict[str, object] = field(default_factory=dict)


class DeliveryState(str, enum.Enum):  # noqa: UP042
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class OutputObject:
    """A DICOM object the node produced for a job (SEG, SR, SC ...).

    ``path`` is absolute when returned by the store; when handed to the store
    it must lie under ``storage.path`` (see ``Store.write_output``).
    """

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    kind: str = ""  # "seg" | "sr" | "sc" | ...


@dataclass(frozen=True)
class Delivery:
    """One output object queued for one destination (the outbox), or one notification.

    ``kind`` is ``"dicom"`` (C-STORE the file at ``path``) or a notification
    kind (``"webhook"``, ``"hl7"``) whose message is built from ``payload``,
    the JSON result summary; ``destination`` then names the notification target.
    """

    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    state: DeliveryState
    attempts: int = 0
    not_before: datetime | None = None
    deadline: datetime | None = None
    last_error: str | None = None
    peer_status: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    kind: str = "dicom"
    payload: str | None = None


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept (value, scheme designator, meaning), e.g. SNOMED CT."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class LabelSpec:
    """One segmentation output label, as declared in a model manifest."""

    value: int  # 1-based segment number / label value in the model output
    name: str
    category: CodedConcept  # Segmented Property Category
    type: CodedConcept  # Segmented Property Type
    color: tuple[int, int, int] = (255, 0, 0)  # RGB 0-255
    anatomic_region: CodedConcept | None = None


@dataclass(frozen=True)
class ClassSpec:
    """One classification output class."""

    index: int
    name: str
    code: CodedConcept
    threshold: float = 0.5


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model, carried into every object the node emits."""

    name: str
    version: str
    description: str = ""
    family: Literal["AI", "rule-based"] = "AI"
    authors: str = ""
    licence: str = ""
    citation: str = ""
    intended_use: str = ""
    weights_sha256: tuple[str, ...] = ()


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class FrameRef:
    """Which source frame a volume slice came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based for multi-frame sources, None otherwise


@dataclass(frozen=True)
class Exclusion:
    """Images of a series the loader left out of the volume, and why."""

    reason: str
    instances: tuple[str, ...]  # SOP Instance UIDs

    def describe(self) -> str:
        n = len(self.instances)
        return f"{n} image{'s' if n != 1 else ''}: {self.reason}"


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image built from a DICOM series, in source geometry.

    ``array`` is float32 after Rescale Slope/Intercept (HU for CT).
    """

    array: np.ndarray  # (k, rows, columns) float32
    affine: np.ndarray  # 4x4, voxel (k, row, col) -> patient LPS mm
    frames: tuple[FrameRef, ...]  # len == array.shape[0]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    paths: tuple[Path, ...] = ()  # source files, for encoders that need the datasets
    #: Images of the series the loader left out (scouts, other stacks), by reason.
    excluded: tuple[Exclusion, ...] = ()
    #: The stack's plane: ``axial``, ``coronal``, ``sagittal`` or ``oblique``.
    plane: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (k, row, column) in mm, derived from the affine."""
        a = np.asarray(self.affine, dtype=float)
        return tuple(float(np.linalg.norm(a[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Measurement:
    """One number a model reports, for a label (segmentation) or the series."""

    name: Literal["volume", "mean", "min", "max", "std"]
    value: float
    unit: str  # UCUM: "ml", "[hnsf'U]" for HU, "1" for unitless
    label_value: int | None = None  # LabelSpec.value it belongs to


@dataclass(frozen=True, eq=False)
class SegmentationOutput:
    """Binary masks (and optionally probabilities) on the source grid."""

    labels: tuple[LabelSpec, ...]
    masks: np.ndarray  # bool (n_labels, k, rows, columns), same order as labels
    probabilities: np.ndarray | None = None  # float32 in [0,1], same shape, or None


@dataclass(frozen=True, eq=False)
class ClassificationOutput:
    spec: ClassSpec
    probability: float
    saliency: np.ndarray | None = None  # float32 (k, rows, columns) in [0,1], source grid

    @property
    def positive(self) -> bool:
        return self.probability >= self.spec.threshold


@dataclass(frozen=True, eq=False)
class InferenceResult:
    """Everything a model run produced for one series version."""

    model: ModelInfo
    volume: Volume
    segmentation: SegmentationOutput | None = None
    classifications: tuple[ClassificationOutput, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


# --------------------------------------------------------------------------- processes


def worker_identity(role: str, index: int = 0, *, pid: int | None = None) -> str:
    """``role@host:pid[:index]``: unique per process, readable in ``jobs show``.

    The holder of a job's or a delivery's lease; the node's supervisor parses it
    back (:func:`dicomnode.node.supervisor.holder_pid`) to release the work of a
    dead process of this host.
    """
    return (f"{role}@{socket.gethostname()}:{os.getpid() if pid is None else pid}"
            + (f":{index}" if index else ""))


class WakeSignal(Protocol):
    """A "work is due" signal a loop waits on instead of sleeping its poll interval
    (the node's :class:`dicomnode.node.children.WakeUp` across processes)."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float) -> bool: ...
