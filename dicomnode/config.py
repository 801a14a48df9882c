"""Settings: loaded once from YAML + environment, validated, passed in (never global).

Precedence (highest first): environment variables, the YAML file, defaults.

Environment variables are named ``DICOMNODE_<SECTION>__<KEY>`` (double
underscore between path parts), e.g. ``DICOMNODE_NODE__PORT=11113`` or
``DICOMNODE_NODE__ALLOWED_CALLING_AETS='[ORTHANC, CT1]'``. Values are parsed as
YAML scalars/lists so numbers, booleans and lists work.

Every validation error names the full key (``node.port``) and the problem.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dicomnode.errors import ConfigError

ENV_PREFIX = "DICOMNODE_"
_AET_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_aet(key: str, value: str) -> None:
    if not value.strip() or not _AET_RE.match(value) or "\\" in value:
        raise ConfigError(
            f"{key}: {value!r} is not a valid AE title (1-16 printable ASCII, no backslash)"
        )


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM service: who we are, where we listen, whom we accept."""

    ae_title: str = "DICOMNODE"
    """Our AE title; an association calling another title is rejected (A-ASSOCIATE-RJ
    permanent, reason 7 *called AE title not recognised*).
    Allowed: 1-16 printable ASCII characters, no backslash."""
    host: str = "127.0.0.1"
    """Listen address; ``0.0.0.0`` accepts connections from the network."""
    port: int = 11112
    """DICOM port. Allowed: 1-65535."""
    allowed_calling_aets: tuple[str, ...] = ()
    """Calling AE titles accepted; others are rejected (reason 3 *calling AE title not
    recognised*). Empty: accept any caller (logged as a warning at start).
    Allowed: each 1-16 printable ASCII characters, no backslash."""
    max_associations: int = 16
    """Concurrent associations per receiving process; more are rejected (transient,
    local limit). Allowed: at least 1."""
    max_pdu: int = 0
    """Maximum PDU we receive, in bytes; ``0`` is unlimited (the fastest: DCMTK then sends
    128 KiB PDUs). Allowed: 0 or positive."""
    acse_timeout: float = 30.0
    """Seconds to wait for an association negotiation or release message (on the
    dispatcher's outgoing associations too)."""
    dimse_timeout: float = 60.0
    """Seconds to wait for the next part of a DIMSE message (on the dispatcher's outgoing
    associations too)."""
    network_timeout: float = 60.0
    """Seconds without any traffic after which an association is closed (on the
    dispatcher's outgoing associations too)."""
    receivers: int = 1
    """Receiving processes. The node process accepts every connection and hands it to the
    least busy one (itself included); more use more cores: set it to the number of cores
    when several modalities send at once. Allowed: at least 1."""
    fast_receive: bool = True
    """Read the C-STORE and C-ECHO requests of an accepted association straight from the
    socket (``dicomnode/receive/pump.py``); ``false``: pynetdicom's own reactor serves
    them (slower; for diagnosis)."""

    def validate(self) -> None:
        _check_aet("node.ae_title", self.ae_title)
        for i, aet in enumerate(self.allowed_calling_aets):
            _check_aet(f"node.allowed_calling_aets[{i}]", aet)
        if not 0 < self.port < 65536:
            raise ConfigError(f"node.port: {self.port} is not a TCP port (1-65535)")
        if self.max_associations < 1:
            raise ConfigError("node.max_associations: must be at least 1")
        if self.max_pdu < 0:
            raise ConfigError("node.max_pdu: must be 0 (unlimited) or positive")
        if self.receivers < 1:
            raise ConfigError("node.receivers: must be at least 1")


@dataclass(frozen=True)
class StorageConfig:
    """Where received instances and the node's own results are kept."""

    path: Path = Path("./var/storage")
    """Folder of the received instances (``<StudyUID>/<SeriesUID>/<SOPUID>.dcm``) and of
    the node's own outputs."""
    min_free_mb: int = 1024
    """Below this free disk space (MiB) a C-STORE is refused with 0xA700 before anything
    is written. Allowed: 0 or more."""
    duplicate_policy: Literal["replace", "keep"] = "replace"
    """A SOP Instance UID received again: ``replace`` the file and its row, or ``keep``
    the first copy. Either way there is never a second row."""
    fsync: bool = True
    """Flush each file's data (fdatasync) before its rename and fsync its folder after,
    before acknowledging. Leave it on outside benchmarks of the disk."""

    def validate(self) -> None:
        if self.min_free_mb < 0:
            raise ConfigError("storage.min_free_mb: must be >= 0")


@dataclass(frozen=True)
class DatabaseConfig:
    """The job table: SQLite by default, PostgreSQL with the same code."""

    url: str = "sqlite:///./var/dicomnode.db"
    """SQLAlchemy URL, e.g. ``postgresql+psycopg2://user@host/db`` for PostgreSQL.
    Allowed: a URL containing ``://``."""
    busy_timeout_ms: int = 30000
    """SQLite: how long a writer waits for the database lock, in milliseconds."""
    echo: bool = False
    """Log every SQL statement."""

    def validate(self) -> None:
        if "://" not in self.url:
            raise ConfigError(f"database.url: {self.url!r} is not a SQLAlchemy URL")


@dataclass(frozen=True)
class CompletionConfig:
    """When a series counts as complete (and becomes a job)."""

    series_quiet_seconds: float = 10.0
    """A series with no new instance for this many seconds is complete.
    Allowed: more than 0."""
    check_interval_seconds: float = 1.0
    """How often, in seconds, the completeness tracker looks. Allowed: more than 0."""
    use_expected_counts: bool = True
    """Complete a series at once when as many instances as the sender announced (Number
    of Series Related Instances, else Images in Acquisition) are in."""

    def validate(self) -> None:
        if self.series_quiet_seconds <= 0:
            raise ConfigError("completion.series_quiet_seconds: must be > 0")
        if self.check_interval_seconds <= 0:
            raise ConfigError("completion.check_interval_seconds: must be > 0")


@dataclass(frozen=True)
class ModelsConfig:
    """Which models are installed and offered."""

    path: Path = Path("./models")
    """Folder with one sub-folder (``model.yaml``, weights, licence) per model. When the
    default ``./models`` does not exist in the current directory, the repository's
    shipped ``models/`` is used."""
    enabled: tuple[str, ...] = ()
    """Names of the models offered; empty: every model found under ``models.path``."""
    threads: int = 0
    """onnxruntime intra-op threads; ``0``: onnxruntime's default. Allowed: 0 or more."""

    def validate(self) -> None:
        if self.threads < 0:
            raise ConfigError("models.threads: must be >= 0")


@dataclass(frozen=True)
class WorkerConfig:
    """The worker processes (inference) and the dispatcher (deliveries)."""

    processes: int = 1
    """Worker processes ``dicomnode serve`` starts; ``0``: receive only.
    Allowed: 0 or more."""
    lease_seconds: float = 600.0
    """A claimed job returns to the queue if its worker does not renew the lease within
    this many seconds (a heartbeat renews it every quarter lease while a model runs).
    Allowed: more than 0."""
    poll_seconds: float = 0.5
    """How often an idle worker looks for jobs, and the dispatcher for deliveries. On one
    node a series completing wakes the workers, and a job queuing deliveries wakes the
    dispatcher, at once; the poll finds work queued by other hosts, and retries."""
    max_attempts: int = 5
    """Attempts (claims) of a job before it is ``failed``. Allowed: at least 1."""
    backoff_base_seconds: float = 5.0
    """Retry delay after the first failure of a job, delivery or notification; it doubles
    with each further failure (base x 2^(n-1)), up to ``worker.backoff_max_seconds``."""
    backoff_max_seconds: float = 600.0
    """The longest retry delay, in seconds."""
    job_timeout_seconds: float = 3600.0
    """A job running longer is failed as transient (retried with backoff up to
    ``worker.max_attempts``) and its worker process restarted: a hung model must not hold
    a lease forever. ``0``: no limit. Allowed: 0 or more."""
    volume_buffer_mb: int = 320
    """Float32 volume memory (MiB) each worker reserves and touches at start, then reuses
    for every series (it grows to the largest volume seen): a fresh 300-slice CT volume
    otherwise costs 0.3-0.7 s of page faults in the first job. ``0``: reserve nothing at
    start (the memory is still reused between jobs). Allowed: 0 or more."""
    nice: int = 10
    """How much lower the CPU priority of worker processes is than the node's (added to
    the node's niceness, as ``nice -n``; capped at 19), from the moment they start, so
    their start-up (imports, model tables, ``worker.volume_buffer_mb``) and a running model
    leave the cores to receiving (C-STORE) and the dispatcher, which keep the node's
    priority. ``0``: same priority as receiving. Allowed: 0-19."""

    def validate(self) -> None:
        if self.volume_buffer_mb < 0:
            raise ConfigError("worker.volume_buffer_mb: must be >= 0 (0 = reserve nothing)")
        if self.job_timeout_seconds < 0:
            raise ConfigError("worker.job_timeout_seconds: must be >= 0 (0 = no limit)")
        if self.processes < 0:
            raise ConfigError("worker.processes: must be >= 0 (0 = no worker in serve)")
        if self.lease_seconds <= 0:
            raise ConfigError("worker.lease_seconds: must be > 0")
        if self.max_attempts < 1:
            raise ConfigError("worker.max_attempts: must be at least 1")
        if not 0 <= self.nice <= 19:
            raise ConfigError("worker.nice: must be 0-19 (0 = same CPU priority as receiving)")


@dataclass(frozen=True)
class DestinationConfig:
    """A PACS (or any C-STORE SCP) that receives results or forwarded instances."""

    name: str
    """The name routing rules use in ``send:`` and ``forward:``. Allowed: distinct
    among destinations and from every notification name."""
    ae_title: str
    """The peer's AE title. Allowed: 1-16 printable ASCII characters, no backslash."""
    host: str
    """The peer's host name or address."""
    port: int
    """The peer's DICOM port. Allowed: 1-65535."""
    formats: tuple[str, ...] = ("seg", "sr")
    """Result objects this destination receives: ``seg`` (Segmentation), ``sr``
    (TID 1500 report), ``sc`` (Secondary Capture overlay). Allowed: seg, sr, sc."""
    keep_empty_frames: bool = False
    """Keep SEG frames without segmented pixels (some viewers place frames wrongly when
    empty ones are omitted); by default they are omitted."""
    calling_ae_title: str = ""
    """Our AE title on associations to this peer; empty: ``node.ae_title``."""
    retry_deadline_seconds: float = 3600.0
    """Transient failures are retried with backoff until this many seconds after the
    delivery was queued; then it is ``failed``."""
    max_pdu: int = 0
    """Maximum PDU we receive on associations to this peer, in bytes; ``0``: unlimited."""

    def validate(self, key: str) -> None:
        _check_aet(f"{key}.ae_title", self.ae_title)
        if not 0 < self.port < 65536:
            raise ConfigError(f"{key}.port: {self.port} is not a TCP port (1-65535)")
        bad = [f for f in self.formats if f not in ("seg", "sr", "sc")]
        if bad:
            raise ConfigError(f"{key}.formats: unknown format(s) {bad}; use seg, sr, sc")


@dataclass(frozen=True)
class NotificationConfig:
    """Where result summaries go besides PACS: a JSON webhook or HL7 v2 ORU^R01 over MLLP."""

    name: str
    """The name routing rules use in ``notify:``. Allowed: not empty, distinct among
    notifications and from every destination name."""
    kind: Literal["webhook", "hl7"]
    """``webhook``: POST a JSON summary; ``hl7``: send an HL7 v2.5.1 ORU^R01 over MLLP."""
    url: str = ""
    """webhook: the http(s) URL receiving a POST of the JSON summary.
    Allowed: for a webhook, starts with ``http://`` or ``https://``."""
    auth_token: str = ""
    """webhook: sent as ``Authorization: Bearer <token>`` when set."""
    host: str = ""
    """hl7: the MLLP listener's host. Allowed: required for hl7."""
    port: int = 0
    """hl7: the MLLP listener's port. Allowed: for hl7, 1-65535."""
    sending_application: str = "DICOMNODE"
    """hl7: MSH-3, sending application."""
    sending_facility: str = ""
    """hl7: MSH-4, sending facility."""
    receiving_application: str = ""
    """hl7: MSH-5, receiving application."""
    receiving_facility: str = ""
    """hl7: MSH-6, receiving facility."""
    timeout_seconds: float = 10.0
    """Seconds to wait for the HTTP response or the HL7 ACK. Allowed: more than 0."""
    retry_deadline_seconds: float = 3600.0
    """Transient failures are retried with backoff until this many seconds after the
    notification was queued; then it is ``failed``. Allowed: more than 0."""

    def validate(self, key: str) -> None:
        if not self.name.strip():
            raise ConfigError(f"{key}.name: must not be empty")
        if self.kind == "webhook" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url: a webhook needs an http:// or https:// URL")
        if self.kind == "hl7":
            if not self.host:
                raise ConfigError(f"{key}.host: an hl7 notification needs the MLLP host")
            if not 0 < self.port < 65536:
                raise ConfigError(f"{key}.port: {self.port} is not a TCP port (1-65535)")
        if self.timeout_seconds <= 0:
            raise ConfigError(f"{key}.timeout_seconds: must be > 0")
        if self.retry_deadline_seconds <= 0:
            raise ConfigError(f"{key}.retry_deadline_seconds: must be > 0")


@dataclass(frozen=True)
class LoggingConfig:
    """What the node logs, and where."""

    level: str = "INFO"
    """Log level; ``DEBUG`` logs every stored instance.
    Allowed: DEBUG, INFO, WARNING, ERROR, CRITICAL (any case)."""
    json: bool = False
    """One JSON object per line (also the ``--log-json`` option)."""
    file: Path | None = None
    """Log to this file instead of stderr."""

    def validate(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"logging.level: {self.level!r} is not a log level")


@dataclass(frozen=True)
class Settings:
    """Every setting of the node: one section per field, lists for peers and rules."""

    node: NodeConfig = field(default_factory=NodeConfig)
    """The DICOM service: who we are, where we listen, whom we accept."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where received instances and the node's own results are kept."""
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    """The job table."""
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    """When a series counts as complete."""
    models: ModelsConfig = field(default_factory=ModelsConfig)
    """Which models are installed and offered."""
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    """The worker processes and the dispatcher."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """What the node logs, and where."""
    destinations: tuple[DestinationConfig, ...] = ()
    """PACS to send results (and forwarded instances) to."""
    # Routing rules stay raw here; dicomnode.routing validates them against
    # the known models and destinations.
    routes: tuple[Mapping[str, Any], ...] = ()
    """Ordered routing rules: which models run on which series, where results go
    (``docs/routing.md``). Empty: every installed model whose manifest applies runs and
    nothing is sent."""
    notifications: tuple[NotificationConfig, ...] = ()
    """Webhooks and HL7 listeners told about each result."""
    source: Path | None = None
    """Not a configuration key: the YAML file the settings came from, if any."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate") and not isinstance(v, tuple):
                v.validate()
        names: set[str] = set()
        for i, d in enumerate(self.destinations):
            key = f"destinations[{i}]"
            d.validate(key)
            if d.name in names:
                raise ConfigError(f"{key}.name: duplicate destination name {d.name!r}")
            names.add(d.name)
        for i, r in enumerate(self.routes):
            if not isinstance(r, Mapping):
                raise ConfigError(f"routes[{i}]: must be a mapping, got {type(r).__name__}")
        notification_names: set[str] = set()
        for i, n in enumerate(self.notifications):
            n.validate(f"notifications[{i}]")
            if n.name in notification_names:
                raise ConfigError(f"notifications[{i}].name: duplicate name {n.name!r}")
            if n.name in names:
                # Both queue in the same outbox, keyed by name.
                raise ConfigError(f"notifications[{i}].name: {n.name!r} is also a destination "
                                  "name; destinations and notifications need distinct names")
            notification_names.add(n.name)

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"destinations: no destination named {name!r}")


# --------------------------------------------------------------------------- loading


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/env value to the annotated type, naming ``key`` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(key, tp, value)
    if origin is not None and issubclass(origin, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        truthy, falsy = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
        if isinstance(value, str) and value.lower() in truthy + falsy:
            return value.lower() in truthy
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected a path, got {type(value).__name__}")
        return Path(value)
    return value


def _build(prefix: str, cls: Any, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(key, hints[name], value)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    return cls(**kwargs)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict of overrides from ``DICOMNODE_SECTION__KEY`` variables."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "DICOMNODE_CONFIG":
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not parts:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another DICOMNODE_ variable")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and validate settings.

    Parameters
    ----------
    path
        YAML file; ``None`` uses ``$DICOMNODE_CONFIG`` if set, else defaults only.
    environ
        Environment to read overrides from (default ``os.environ``).
    overrides
        Nested dict applied last (used by tests and CLI flags).
    """
    env = os.environ if environ is None else environ
    if path is None and env.get("DICOMNODE_CONFIG"):
        path = env["DICOMNODE_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    settings: Settings = _build("", Settings, data)
    if path is not None:
        settings = dataclasses.replace(settings, source=Path(path))
    settings.validate()
    return settings
