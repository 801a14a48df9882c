"""``dicomnode check``: is this configuration ready to run? Run it after every change.

One line per check, ``PASS`` / ``WARN`` / ``FAIL`` with the reason; exit 0 when
nothing failed (warnings included), 1 otherwise (an unreadable configuration
included). ``--json`` prints the same as one JSON object.

Checks, in order:

* ``config``: the YAML and environment parse and validate (every key named);
* ``routes``: the routing rules name known models, destinations, notifications;
* ``database``: it opens and answers; migrations pending are a warning
  (``dicomnode serve`` applies them at start, ``dicomnode db upgrade`` now);
* ``storage``: the folder is writable, free space above ``storage.min_free_mb``;
* ``model <name>``: every enabled model's weights match their SHA-256;
* ``destination <name>``: C-ECHO with the AE title results are sent with;
* ``notification <name>``: a TCP connection to the HL7 listener or the webhook's
  host (nothing is sent: no fake result reaches a RIS);
* ``http``: ``http.port`` is free (a warning when taken: perhaps by this node).

Nothing is written except a probe file in the storage folder, removed at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dicomnode.config import HttpConfig, NotificationConfig, Settings, load_settings
from dicomnode.errors import DicomNodeError
from dicomnode.logs import setup_logging

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass(frozen=True)
class Result:
    check: str
    status: str  # PASS, WARN, FAIL
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="check the configuration, database, storage, models and every peer",
        description="Validate the configuration, open the database, check the storage "
        "folder and its free space, verify model weights, C-ECHO every destination and "
        "connect to every notification target; one PASS/WARN/FAIL line per check. "
        "Exit 0 when nothing failed, 1 otherwise.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds per network check (default: 5)")
    p.set_defaults(func=_run)


# --------------------------------------------------------------------------- checks


def check_database(settings: Settings) -> Result:
    # On use: SQLAlchemy + alembic cost ~0.3 s to import, every CLI command imports
    # this module (see cli/serve.py).
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from dicomnode.store import db

    url = make_url(settings.database.url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database))
        if not path.exists():
            parent = path.parent if str(path.parent) else Path(".")
            if parent.is_dir() and os.access(parent, os.W_OK):
                return Result("database", WARN, f"{path} does not exist yet: `dicomnode serve` "
                                                "creates it")
            return Result("database", FAIL, f"{path} does not exist and {parent} is not a "
                                            "writable folder")
        if not os.access(path, os.R_OK | os.W_OK):
            return Result("database", FAIL, f"{path} is not readable and writable by this user")
    engine = db.make_engine(settings.database)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = db.current_revision(engine)
        head = db.head_revision()
    except Exception as exc:  # noqa: BLE001 - any failure is the check's answer
        return Result("database", FAIL, f"{shown}: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()
    if current != head:
        at = "empty (no schema yet)" if current is None else f"at revision {current}"
        return Result("database", WARN, f"{shown}: migrations pending ({at}, code expects "
                                        f"{head}): `dicomnode serve` applies them at start, "
                                        "`dicomnode db upgrade` now")
    return Result("database", PASS, f"{shown}: answers, schema at {head}")


def check_storage(settings: Settings) -> Result:
    root = Path(settings.storage.path).resolve()
    probe_dir = root
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent  # the folder is created at start: its nearest parent
    probe = probe_dir / f".dicomnode-check-{uuid.uuid4().hex}.tmp"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return Result("storage", FAIL, f"{probe_dir} is not writable: {exc.strerror or exc}")
    st = os.statvfs(probe_dir)
    free_mb = st.f_bavail * st.f_frsize / 1048576
    need = settings.storage.min_free_mb
    where = str(root) if probe_dir == root else f"{root} (created at start under {probe_dir})"
    if free_mb < need:
        return Result("storage", FAIL, f"{where}: {free_mb:.0f} MiB free, below "
                                       f"storage.min_free_mb {need}: C-STOREs would be "
                                       "refused (0xA700)")
    return Result("storage", PASS, f"{where}: writable, {free_mb:.0f} MiB free "
                                   f"(storage.min_free_mb {need})")


def check_routes(settings: Settings) -> Result:
    # On use: the pipeline (encoders, model registry) costs ~1 s to import.
    from dicomnode.worker import check_settings

    try:
        check_settings(settings)
    except DicomNodeError as exc:
        return Result("routes", FAIL, str(exc))
    return Result("routes", PASS, f"{len(settings.routes)} rule(s) valid")


def check_models(settings: Settings) -> Iterator[Result]:
    from dicomnode.infer import ModelRegistry  # on use: see check_routes

    try:
        reg = ModelRegistry(settings.models.path, settings.models.enabled,
                            settings.models.threads)
    except DicomNodeError as exc:
        yield Result("models", FAIL, str(exc))
        return
    if not reg.names():
        yield Result("models", WARN, f"no model under {reg.models_dir}: jobs cannot run")
    for name in reg.names():
        m = reg.manifest(name)
        try:
            m.verify_weights()
        except DicomNodeError as exc:
            yield Result(f"model {name}", FAIL, str(exc))
            continue
        yield Result(f"model {name}", PASS, f"version {m.info.version}: weights SHA-256 "
                                            f"match ({len(m.weights)} file(s))")


def check_destinations(settings: Settings, timeout: float) -> Iterator[Result]:
    from dicomnode.dispatch.scu import echo  # on use: pynetdicom ~0.3 s to import

    for d in settings.destinations:
        r = echo(d, calling_ae_title=settings.node.ae_title, acse_timeout=timeout,
                 dimse_timeout=timeout, network_timeout=timeout)
        yield Result(f"destination {d.name}", PASS if r.ok else FAIL,
                     f"{r.message} in {r.seconds * 1000:.0f} ms" if r.ok else r.message)


def notification_address(n: NotificationConfig) -> tuple[str, int]:
    if n.kind == "hl7":
        return n.host, n.port
    u = urlsplit(n.url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


def check_notifications(settings: Settings, timeout: float) -> Iterator[Result]:
    for n in settings.notifications:
        host, port = notification_address(n)
        what = "HL7 MLLP listener" if n.kind == "hl7" else f"webhook {n.url}"
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            yield Result(f"notification {n.name}", FAIL,
                         f"cannot connect to {what} at {host}:{port}: "
                         f"{exc.strerror or exc}")
            continue
        yield Result(f"notification {n.name}", PASS,
                     f"{what} at {host}:{port} accepts connections "
                     f"({(time.monotonic() - t0) * 1000:.0f} ms; nothing sent)")


def check_http(cfg: HttpConfig) -> Result:
    if not cfg.enabled:
        return Result("http", PASS, "off (http.enabled: false)")
    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET,
                       socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as exc:
            return Result("http", WARN, f"http.port: {cfg.host}:{cfg.port} is taken "
                                        f"({exc.strerror or exc}): fine if this node is "
                                        "running, else `dicomnode serve` will refuse to start")
    public = "any client" if cfg.public else "loopback clients only"
    return Result("http", PASS, f"{cfg.host}:{cfg.port} free; read-only endpoints for {public}")


def run_checks(settings: Settings, timeout: float = 5.0) -> Iterator[Result]:
    source = str(settings.source) if settings.source else "built-in defaults + environment"
    yield Result("config", PASS, f"{source}: valid")
    steps: list[Callable[[], Iterator[Result] | Result]] = [
        lambda: check_routes(settings),
        lambda: check_database(settings),
        lambda: check_storage(settings),
        lambda: check_models(settings),
        lambda: check_destinations(settings, timeout),
        lambda: check_notifications(settings, timeout),
        lambda: check_http(settings.http),
    ]
    for step in steps:
        try:
            out = step()
            if isinstance(out, Result):
                yield out
            else:
                yield from out
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
            yield Result("check", FAIL, f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- command


def _run(args: argparse.Namespace) -> int:
    # Warnings only: the checks print their own answers, the log would repeat them.
    setup_logging(getattr(args, "log_level", None) or "WARNING",
                  bool(getattr(args, "log_json", False)), None)
    # pynetdicom logs a refused connection as an error; the check line says it already.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        settings = load_settings(getattr(args, "config", None))
    except DicomNodeError as exc:
        results = [Result("config", FAIL, str(exc))]
    else:
        results = []
        for r in run_checks(settings, args.timeout):
            results.append(r)
            if not args.json:
                print(f"{r.status}  {r.check:<24} {r.detail}", flush=True)
    failed = sum(r.failed for r in results)
    if args.json:
        print(json.dumps({"ok": not failed, "failed": failed,
                          "checks": [asdict(r) for r in results]}, indent=2))
    else:
        if len(results) == 1 and results[0].failed:
            print(f"{FAIL}  {'config':<24} {results[0].detail}")
        warned = sum(r.status == WARN for r in results)
        print(f"{len(results) - failed}/{len(results)} checks passed"
              + (f" ({warned} with a warning)" if warned else "")
              + (f"; {failed} FAILED" if failed else ""), file=sys.stdout)
    return 1 if failed else 0


__all__ = ["Result", "check_database", "check_destinations", "check_notifications",
           "check_storage", "register", "run_checks"]
