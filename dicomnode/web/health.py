"""``/readyz``: is the node able to take studies and deliver results right now?

Each check returns ``(ok, detail)``; :func:`readiness` runs them all (one
failing does not stop the others) and names each in the answer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicomnode.config import Settings
from dicomnode.errors import DicomNodeError
from dicomnode.store import Store
from dicomnode.web.metrics import model_states


class NodeView(Protocol):
    """What the HTTP side may ask of the running node (implemented by ``node.Node``)."""

    settings: Settings
    store: Store | None

    def scp_listening(self) -> bool: ...

    def service_states(self) -> Sequence[tuple[str, bool]]: ...


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass
class Readiness:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"status": "ready" if self.ok else "not ready",
                "checks": {c.name: c.as_dict() for c in self.checks}}


def check_database(node: NodeView) -> tuple[bool, str]:
    if node.store is None:
        return False, "store not open"
    node.store.ping()
    return True, "answers"


def check_storage(node: NodeView) -> tuple[bool, str]:
    if node.store is None:
        return False, "store not open"
    root = node.store.root
    probe = root / f".readyz-{uuid.uuid4().hex}.tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        return False, f"{root} is not writable: {exc.strerror or exc}"
    free = node.store.free_mb()
    need = node.settings.storage.min_free_mb
    if free < need:
        return False, (f"{root}: {free:.0f} MiB free, below storage.min_free_mb {need} "
                       "(C-STOREs are refused with 0xA700)")
    return True, f"{root} writable, {free:.0f} MiB free (minimum {need})"


def check_scp(node: NodeView) -> tuple[bool, str]:
    n = node.settings.node
    if node.scp_listening():
        return True, f"{n.ae_title} listening on {n.host}:{n.port}"
    return False, f"not listening on {n.host}:{n.port}"


def check_services(node: NodeView) -> tuple[bool, str]:
    states = list(node.service_states())
    dead = [name for name, alive in states if not alive]
    if dead:
        return False, "not running: " + ", ".join(dead)
    return True, "running: " + (", ".join(name for name, _ in states) or "none")


def check_models(node: NodeView) -> tuple[bool, str]:
    """The worker processes report every model they validated (0) and loaded (1)."""
    if not any(name == "worker" for name, _ in node.service_states()):
        return True, "no worker processes in this node (dicomnode worker runs them)"
    states = model_states()
    if not states:
        return False, "the worker processes have not reported their models yet"
    loaded = sorted(m for m, v in states.items() if v >= 1)
    loadable = sorted(m for m, v in states.items() if v < 1)
    parts = []
    if loaded:
        parts.append("loaded: " + ", ".join(loaded))
    if loadable:
        parts.append("loadable (load on first job): " + ", ".join(loadable))
    return True, "; ".join(parts)


CHECKS: tuple[tuple[str, Callable[[NodeView], tuple[bool, str]]], ...] = (
    ("database", check_database),
    ("storage", check_storage),
    ("scp", check_scp),
    ("services", check_services),
    ("models", check_models),
)


def readiness(node: NodeView) -> Readiness:
    out = Readiness()
    for name, fn in CHECKS:
        try:
            ok, detail = fn(node)
        except DicomNodeError as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        out.checks.append(Check(name, ok, detail))
    return out


__all__ = ["CHECKS", "Check", "NodeView", "Readiness", "readiness"]
