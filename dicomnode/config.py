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
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: accept any (warned at start)
    max_associations: int = 16
    max_pdu: int = 0  # 0 = unlimited
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    receivers: int = 1  # number of receiving processes sharing the port (SO_REUSEPORT)
    fast_receive: bool = True  # serve C-STORE/C-ECHO from the socket (receive/pump.py)

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
    path: Path = Path("./var/storage")
    min_free_mb: int = 1024
    duplicate_policy: Literal["replace", "keep"] = "replace"
    fsync: bool = True

    def validate(self) -> None:
        if self.min_free_mb < 0:
            raise ConfigError("storage.min_free_mb: must be >= 0")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///./var/dicomnode.db"
    busy_timeout_ms: int = 30000
    echo: bool = False

    def validate(self) -> None:
        if "://" not in self.url:
            raise ConfigError(f"database.url: {self.url!r} is not a SQLAlchemy URL")


@dataclass(frozen=True)
class CompletionConfig:
    series_quiet_seconds: float = 10.0
    check_interval_seconds: float = 1.0
    use_expected_counts: bool = True

    def validate(self) -> None:
        if self.series_quiet_seconds <= 0:
            raise ConfigError("completion.series_quiet_seconds: must be > 0")
        if self.check_interval_seconds <= 0:
            raise ConfigError("completion.check_interval_seconds: must be > 0")


@dataclass(frozen=True)
class ModelsConfig:
    path: Path = Path("./models")
    enabled: tuple[str, ...] = ()  # empty: every model found under path
    threads: int = 0  # 0: onnxruntime default

    def validate(self) -> None:
        if self.threads < 0:
            raise ConfigError("models.threads: must be >= 0")


@dataclass(frozen=True)
class WorkerConfig:
    processes: int = 1
    lease_seconds: float = 600.0
    poll_seconds: float = 0.5
    max_attempts: int = 5
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    # A job running longer than this is failed as transient (retried with backoff up
    # to max_attempts) and its worker process restarted: a hung model must not hold
    # a lease forever. 0 disables the limit.
    job_timeout_seconds: float = 3600.0
    # Float32 volume memory each worker reserves and touches at start, then reuses
    # for every series (it grows to the largest volume seen): a fresh 300-slice CT
    # volume costs 0.3-0.7 s of page faults in the first job otherwise. 0: reserve
    # nothing at start (the memory is still reused between jobs).
    volume_buffer_mb: int = 320

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


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    ae_title: str
    host: str
    port: int
    formats: tuple[str, ...] = ("seg", "sr")
    keep_empty_frames: bool = False
    calling_ae_title: str = ""  # default: node.ae_title
    retry_deadline_seconds: float = 3600.0
    max_pdu: int = 0

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
    kind: Literal["webhook", "hl7"]
    url: str = ""  # webhook: http(s) URL receiving a POST of the JSON summary
    auth_token: str = ""  # webhook: sent as "Authorization: Bearer <token>" when set
    host: str = ""  # hl7: MLLP listener
    port: int = 0
    sending_application: str = "DICOMNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_seconds: float = 10.0
    retry_deadline_seconds: float = 3600.0

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
    level: str = "INFO"
    json: bool = False
    file: Path | None = None

    def validate(self) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"logging.level: {self.level!r} is not a log level")


@dataclass(frozen=True)
class Settings:
    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    # Routing rules stay raw here; dicomnode.routing validates them against
    # the known models and destinations.
    routes: tuple[Mapping[str, Any], ...] = ()
    notifications: tuple[NotificationConfig, ...] = ()
    source: Path | None = None  # the YAML file the settings came from, if any

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
