"""Model runtime: DICOM series to volume, model manifests, backends and shipped models.

Public API (used by the worker)::

    load_volume(paths, buffer=None) -> Volume # raises VolumeError with a reason;
                                              # buffer: a VolumeBuffer reused between jobs
    load_manifest(path) -> Manifest           # raises ModelError naming file and key
    ModelRegistry(models_dir, enabled=(), threads=0)
        .names() / .manifest(name) / .run(name, volume) -> InferenceResult
        .applicable(modality, body_part, series_description) -> [names]
    Manifest.applies_to(modality, body_part, series_description, n_slices) -> (ok, reason)
"""

from __future__ import annotations

from dicomnode.infer.manifest import Manifest, load_manifest
from dicomnode.infer.registry import ModelRegistry, resolve_models_dir
from dicomnode.infer.volume import StackChoice, VolumeBuffer, load_volume

__all__ = ["Manifest", "ModelRegistry", "StackChoice", "VolumeBuffer", "load_manifest",
           "load_volume", "resolve_models_dir"]
