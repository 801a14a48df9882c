"""Helpers for worker / pipeline tests: settings in a temp folder, ingest, Orthanc lookups.

``pipeline_settings(tmp, routes=..., destinations=...)`` gives validated
settings with storage and a SQLite database under ``tmp``;
``ingest_series(store, paths, calling_aet=...)`` stores files exactly as the
SCP would (then ``store.enqueue`` makes the job). The Orthanc helpers read
what a PACS holds for a study over its REST API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dicomnode.config import Settings, load_settings
from dicomnode.store import Store, read_meta
from tests.support.peers import Orthanc


def pipeline_settings(tmp: Path, *, routes: Sequence[dict[str, Any]] = (),
                      destinations: Sequence[dict[str, Any]] = (),
                      **sections: dict[str, Any]) -> Settings:
    data = pipeline_config(tmp, routes=routes, destinations=destinations, **sections)
    return load_settings(None, environ={}, overrides=data)


def write_config(tmp: Path, **kwargs: Any) -> Path:
    """The same configuration as :func:`pipeline_settings`, as ``tmp/node.yaml`` for the CLI."""
    import yaml

    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(tmp, **kwargs)))
    return path


def pipeline_config(tmp: Path, *, routes: Sequence[dict[str, Any]] = (),
                    destinations: Sequence[dict[str, Any]] = (),
                    **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1"},
        "storage": {"path": str(tmp / "storage"), "min_free_mb": 0, "fsync": False},
        "database": {"url": f"sqlite:///{tmp / 'dicomnode.db'}"},
        "worker": {"processes": 1, "lease_seconds": 30, "poll_seconds": 0.1,
                   "backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0},
        "routes": list(routes),
        "destinations": list(destinations),
        "http": {"enabled": False},  # nodes run in parallel: no fixed port 8080
    }
    for name, values in sections.items():
        if isinstance(values, list):  # e.g. notifications: a list, not a mapping
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return data


def destination(name: str, port: int, aet: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port, **extra}


def ingest_series(store: Store, paths: Iterable[Path], *, calling_aet: str = "MODALITY",
                  called_aet: str = "DICOMNODE") -> int:
    """Ingest files as the SCP does; returns the series version they landed in."""
    version = 0
    for p in paths:
        data = Path(p).read_bytes()
        meta = read_meta(data).with_peer(calling_aet, called_aet)
        version = store.ingest(meta, data).series_version
    return version


def orthanc_study_series(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    """Every series Orthanc holds for ``study_uid`` (REST ``/studies/{id}/series``)."""
    found = orthanc.post("/tools/lookup", study_uid.encode())
    studies = [f for f in found if f["Type"] == "Study"]
    if not studies:
        return []
    return list(orthanc.get(f"/studies/{studies[0]['ID']}/series"))


def orthanc_by_modality(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in orthanc_study_series(orthanc, study_uid):
        out.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s)
    return out


def orthanc_instance_file(orthanc: Orthanc, instance_id: str, dest: Path) -> Path:
    """Download an instance Orthanc stored (``/instances/{id}/file``) to ``dest``."""
    import urllib.request

    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file",
                                timeout=60) as r:
        dest.write_bytes(r.read())
    return dest
