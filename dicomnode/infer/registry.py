"""The model registry: finds manifests, keeps loaded models (and their sessions) warm."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from dicomnode.domain import InferenceResult, Volume
from dicomnode.errors import ModelError
from dicomnode.infer.manifest import Manifest, load_manifest
from dicomnode.infer.runner import ModelRunner
from dicomnode.logs import kv

log = logging.getLogger(__name__)

#: The models folder shipped with the source tree (``<repo>/models``).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def resolve_models_dir(path: Path | str | None) -> Path:
    """Where to look for models.

    An absolute path is taken as is. A relative one is resolved against the
    current directory; when it does not exist there and it is the default
    ``models``, the repository's shipped ``models/`` folder is used, so the CLI
    works from any directory.
    """
    p = Path(path) if path is not None else Path("models")
    if p.is_absolute():
        return p
    if (Path.cwd() / p).is_dir():
        return (Path.cwd() / p).resolve()
    if p.parts in (("models",), (".", "models")) or str(p) in ("models", "./models"):
        return SHIPPED_MODELS_DIR
    return (Path.cwd() / p).resolve()


class ModelRegistry:
    """Models found under ``models_dir`` (one folder with a ``model.yaml`` each).

    Manifests are read and validated at construction (a broken manifest of
    an enabled model is an error now, not at 3 a.m.); weights are verified
    and sessions created on first use, then reused for every run.

    Parameters
    ----------
    models_dir
        Folder holding one sub-folder per model.
    enabled
        Names to offer; empty means every model found.
    threads
        Intra-op threads for every backend (0: the manifest's, else the runtime default).
    """

    def __init__(self, models_dir: Path | str, enabled: Iterable[str] = (), threads: int = 0):
        self.models_dir = resolve_models_dir(models_dir)
        self.threads = threads
        self._manifests: dict[str, Manifest] = {}
        self._runners: dict[str, ModelRunner] = {}
        self._lock = threading.Lock()
        if not self.models_dir.is_dir():
            raise ModelError(f"models.path: {self.models_dir} is not a folder")
        wanted = tuple(enabled)
        found = sorted(p.parent.name for p in self.models_dir.glob("*/model.yaml"))
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ModelError(f"models.enabled: {missing} not found under {self.models_dir} "
                             f"(available: {found})")
        for name in wanted or found:
            self._manifests[name] = load_manifest(self.models_dir / name / "model.yaml")

    def names(self) -> list[str]:
        return sorted(self._manifests)

    def manifest(self, name: str) -> Manifest:
        try:
            return self._manifests[name]
        except KeyError:
            raise ModelError(f"unknown model {name!r} (available: {self.names()})") from None

    def runner(self, name: str) -> ModelRunner:
        """The loaded model (weights verified, sessions created once, then cached)."""
        manifest = self.manifest(name)
        with self._lock:
            runner = self._runners.get(name)
            if runner is None:
                runner = ModelRunner(manifest, self.threads)
                self._runners[name] = runner
                log.info("model loaded", extra=kv(model=name, version=manifest.info.version,
                                                  backend=manifest.backend))
        return runner

    def applicable(self, modality: str = "", body_part: str = "", series_description: str = "",
                   n_slices: int | None = None) -> list[str]:
        """Names of the models whose manifest accepts a series with these attributes."""
        return [n for n in self.names()
                if self._manifests[n].applies_to(modality, body_part, series_description,
                                                 n_slices)[0]]

    def run(self, name: str, volume: Volume) -> InferenceResult:
        """Run model ``name`` on ``volume``; masks come back on the volume's grid."""
        result = self.runner(name).run(volume)
        log.info("inference done", extra=kv(model=name, series=volume.series_uid,
                                            shape="x".join(map(str, volume.shape)),
                                            **{f"{k}_s": round(v, 3)
                                               for k, v in result.timings.items()}))
        return result
