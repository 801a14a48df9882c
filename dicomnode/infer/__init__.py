"""Model runtime: DICOM series to volume, model manifests, backends and shipped models.

Public API (used by the worker)::

    load_volume(paths) -> Volume              # raises VolumeError with a reason
    load_manifest(path) -> Manifest           # raises ModelError naming file and key
    ModelRegistry(models_dir, enabled=(), threads=0)
        .names() / .manifest(name) / .run(name, volume) -> InferenceResult
"""

from __future__ import annotations

from dicomnode.infer.volume import load_volume

__all__ = ["load_volume"]
