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
from collections.abc import Mapping, Sequence
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
    max_instance_mb: float = 0
    """Largest data set (MiB) accepted in one C-STORE; a larger one is refused with
    0xA702 and never written (the fast receive path stops keeping its bytes as soon as
    the limit is passed). 0: unlimited. Allowed: 0 or more."""
    max_series_instances: int = 0
    """Most instances one series may hold; the instance that would exceed it is refused
    with 0xA703 (an instance received again does not count twice). 0: unlimited.
    Allowed: 0 or more."""
    max_series_mb: float = 0
    """Most bytes (MiB) of data sets one series may hold; the instance that would exceed
    it is refused with 0xA703. 0: unlimited. Allowed: 0 or more."""

    def validate(self) -> None:
        if self.min_free_mb < 0:
            raise ConfigError("storage.min_free_mb: must be >= 0")
        for name in ("max_instance_mb", "max_series_instances", "max_series_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"storage.{name}: must be 0 (unlimited) or more")


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
    """A PACS that receives results or forwarded instances: a C-STORE SCP (``kind: dicom``)
    or a DICOMweb server (``kind: dicomweb``, STOW-RS)."""

    name: str
    """The name routing rules use in ``send:`` and ``forward:``. Allowed: distinct
    among destinations and from every notification name."""
    kind: Literal["dicom", "dicomweb"] = "dicom"
    """``dicom``: C-STORE over a DICOM association to ``ae_title``@``host``:``port``;
    ``dicomweb``: STOW-RS (HTTP POST of multipart/related DICOM) to ``url``."""
    ae_title: str = ""
    """dicom: the peer's AE title. Allowed: for dicom, 1-16 printable ASCII characters,
    no backslash."""
    host: str = ""
    """dicom: the peer's host name or address. Allowed: required for dicom."""
    port: int = 0
    """dicom: the peer's DICOM port. Allowed: for dicom, 1-65535."""
    url: str = ""
    """dicomweb: the DICOMweb service root, e.g. ``https://pacs.example.org/dicom-web``
    (instances are POSTed to ``<url>/studies``). Allowed: for dicomweb, starts with
    ``http://`` or ``https://``."""
    auth: Literal["none", "basic", "bearer"] = "none"
    """dicomweb: HTTP authentication: ``basic`` (``username`` and the password in the
    environment variable ``password_env``) or ``bearer`` (the token in the environment
    variable ``token_env``)."""
    username: str = ""
    """dicomweb: the user name for ``auth: basic``."""
    password_env: str = ""
    """dicomweb: name of the environment variable holding the password for ``auth: basic``
    (read when sending; never written to the configuration)."""
    token_env: str = ""
    """dicomweb: name of the environment variable holding the bearer token for
    ``auth: bearer`` (read when sending)."""
    verify_tls: bool = True
    """dicomweb: verify the server's TLS certificate (https). Turn off only for a test
    server; prefer ``ca_bundle`` for an in-house certificate authority."""
    ca_bundle: Path | None = None
    """dicomweb: a PEM file of the certificate authorities to trust instead of the system's."""
    formats: tuple[str, ...] = ("seg", "sr")
    """Result objects this destination receives: ``seg`` (Segmentation), ``sr``
    (TID 1500 report), ``sc`` (Secondary Capture overlay). Allowed: seg, sr, sc."""
    keep_empty_frames: bool = False
    """Keep SEG frames without segmented pixels (some viewers place frames wrongly when
    empty ones are omitted); by default they are omitted."""
    calling_ae_title: str = ""
    """dicom: our AE title on associations to this peer; empty: ``node.ae_title``."""
    retry_deadline_seconds: float = 3600.0
    """Transient failures are retried with backoff until this many seconds after the
    delivery was queued; then it is ``failed``."""
    max_pdu: int = 0
    """dicom: maximum PDU we receive on associations to this peer, in bytes; ``0``:
    unlimited."""
    timeout_seconds: float = 60.0
    """dicomweb: seconds to wait for the server's answer to one STOW-RS request.
    Allowed: more than 0."""

    def validate(self, key: str) -> None:
        if self.kind == "dicom":
            _check_aet(f"{key}.ae_title", self.ae_title)
            if not self.host:
                raise ConfigError(f"{key}.host: a dicom destination needs the peer's host")
            if not 0 < self.port < 65536:
                raise ConfigError(f"{key}.port: {self.port} is not a TCP port (1-65535)")
        else:
            if not self.url.startswith(("http://", "https://")):
                raise ConfigError(f"{key}.url: a dicomweb destination needs an http:// or "
                                  "https:// URL")
            if self.auth == "basic" and not (self.username and self.password_env):
                raise ConfigError(f"{key}.auth: basic needs username and password_env")
            if self.auth == "bearer" and not self.token_env:
                raise ConfigError(f"{key}.auth: bearer needs token_env")
            if self.timeout_seconds <= 0:
                raise ConfigError(f"{key}.timeout_seconds: must be > 0")
        bad = [f for f in self.formats if f not in ("seg", "sr", "sc")]
        if bad:
            raise ConfigError(f"{key}.formats: unknown format(s) {bad}; use seg, sr, sc")


@dataclass(frozen=True)
class NotificationConfig:
    """Where result summaries go besides PACS: a JSON webhook, HL7 v2 ORU^R01 over MLLP, or
    a FHIR R4 server (a transaction Bundle with a DiagnosticReport and Observations)."""

    name: str
    """The name routing rules use in ``notify:``. Allowed: not empty, distinct among
    notifications and from every destination name."""
    kind: Literal["webhook", "hl7", "fhir"]
    """``webhook``: POST a JSON summary; ``hl7``: send an HL7 v2.5.1 ORU^R01 over MLLP;
    ``fhir``: POST a FHIR R4 transaction Bundle to the server's base URL."""
    url: str = ""
    """webhook: the http(s) URL receiving a POST of the JSON summary; fhir: the server's
    base URL (e.g. ``https://fhir.example.org/fhir``).
    Allowed: for a webhook or fhir, starts with ``http://`` or ``https://``."""
    auth_token: str = ""
    """webhook, fhir: sent as ``Authorization: Bearer <token>`` when set (prefer
    ``auth_token_env``)."""
    auth_token_env: str = ""
    """webhook, fhir: name of the environment variable holding the bearer token (read
    when sending; takes precedence over ``auth_token``)."""
    signing_secret: str = ""
    """webhook: HMAC-SHA256 secret; when set (here or via ``signing_secret_env``) every
    body is signed: header ``X-Dicomnode-Signature: t=<unix time>,v1=<hex HMAC of
    "<t>.<body>">``."""
    signing_secret_env: str = ""
    """webhook: name of the environment variable holding the signing secret (takes
    precedence over ``signing_secret``)."""
    verify_tls: bool = True
    """webhook, fhir: verify the server's TLS certificate (https)."""
    result_status: Literal["preliminary", "final"] = "preliminary"
    """hl7, fhir: the status results are reported with: HL7 OBR-25 / OBX-11 ``P`` or ``F``,
    FHIR ``status`` ``preliminary`` or ``final``. AI results are unverified: keep
    ``preliminary`` unless a person confirms them before they reach this target."""
    patient_identifier_system: str = "urn:dicomnode:patient-id"
    """fhir: the system (namespace URI) of the Patient identifier built from the DICOM
    Patient ID: set it to the hospital's MRN system so the report lands on the right
    patient."""
    accession_identifier_system: str = "urn:dicomnode:accession"
    """fhir: the system (namespace URI) of the accession number identifier (the order's
    ``ServiceRequest`` the report is ``basedOn``): the RIS's accession namespace."""
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
        if self.kind in ("webhook", "fhir") and not self.url.startswith(("http://",
                                                                           "https://")):
            raise ConfigError(f"{key}.url: a {self.kind} needs an http:// or "
                              "https:// URL")
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
class RetentionConfig:
    """How long received instances and results are kept, and the disk high-water mark
    (``dicomnode storage usage | purge``; docs/operations.md). Nothing still being
    processed or still to be sent is ever purged."""

    instances_days: float = 0
    """Purge a study's received instances this many days after its last instance
    arrived. 0: keep them until the disk high-water mark needs the space. Allowed: 0 or
    more."""
    per_calling_aet: Mapping[str, float] = field(default_factory=dict)
    """Days per calling AE title, instead of ``instances_days`` for studies from that
    sender (``{CT_SCANNER_1: 7, RESEARCH: 1}``; 0 keeps them). A study from several
    senders is kept as long as the longest of theirs. Allowed: 0 or more days each."""
    results_days: float = 0
    """Purge the node's own result objects (SEG, SR, SC files) this many days after
    their job finished, once all their deliveries are done or failed. 0: keep them.
    Allowed: 0 or more."""
    high_water_percent: float = 0
    """When the storage file system is fuller than this (percent used), purge the
    studies that may go, oldest last arrival first, down to ``low_water_percent``.
    0: off. Allowed: 0, or 1 to 99."""
    low_water_percent: float = 0
    """Where a high-water purge stops (percent used). 0: 5 points below
    ``high_water_percent``. Allowed: 0, or below ``high_water_percent``."""
    interval_seconds: float = 600
    """How often ``dicomnode serve`` applies the rules above (0: only
    ``dicomnode storage purge`` does). Allowed: 0 or more."""

    def validate(self) -> None:
        for name in ("instances_days", "results_days", "interval_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"retention.{name}: must be 0 or more")
        for aet, days in self.per_calling_aet.items():
            _check_aet(f"retention.per_calling_aet.{aet}", str(aet))
            if not isinstance(days, int | float) or isinstance(days, bool) or days < 0:
                raise ConfigError(f"retention.per_calling_aet.{aet}: {days!r} is not a number "
                                  "of days (0 or more)")
        if self.high_water_percent and not 1 <= self.high_water_percent <= 99:
            raise ConfigError(f"retention.high_water_percent: {self.high_water_percent} is "
                              "not within 1-99 (0: off)")
        if self.low_water_percent and (self.low_water_percent < 0 or
                                       self.low_water_percent >= self.high_water_percent):
            raise ConfigError("retention.low_water_percent: must be below "
                              "retention.high_water_percent")

    def days_for(self, calling_aets: Sequence[str]) -> float:
        """Days a study from these senders is kept (0: kept, no age limit)."""
        days = [float(self.per_calling_aet.get(a, self.instances_days)) for a in calling_aets]
        if not days:
            return float(self.instances_days)
        return 0.0 if 0.0 in days else max(days)


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail: security-relevant events, append-only and hash-chained
    (``dicomnode audit``; docs/operations.md)."""

    enabled: bool = True
    """Record application start/stop, configuration loaded, associations accepted and
    rejected, instances received and sent per study, and operators' actions."""
    path: Path | None = None
    """The trail: one JSON record per line, each chained to the one before by SHA-256.
    Every process of the node (and the CLI) appends to this one file. Default:
    ``audit.jsonl`` in the folder that holds ``storage.path`` (``./var/audit.jsonl``)."""
    fsync: bool = True
    """Flush each record to disk before going on."""
    syslog_host: str = ""
    """Also send each record as an RFC 5424 syslog message to this host (empty: no)."""
    syslog_port: int = 514
    """Port of the syslog collector. Allowed: 1-65535."""
    syslog_protocol: Literal["udp", "tcp"] = "udp"
    """Transport to the syslog collector."""

    def validate(self) -> None:
        if not 0 < self.syslog_port < 65536:
            raise ConfigError(f"audit.syslog_port: {self.syslog_port} is not a TCP/UDP port "
                              "(1-65535)")


@dataclass(frozen=True)
class HttpConfig:
    """The node's HTTP side: ``/healthz``, ``/readyz`` and ``/metrics`` (``docs/operations.md``)."""

    enabled: bool = True
    """Serve HTTP from the node process (``dicomnode serve``); ``false``: no HTTP port."""
    host: str = "127.0.0.1"
    """Listen address; ``0.0.0.0`` listens on every interface (set ``http.public`` too, or
    every client but loopback gets 403). Allowed: a host name or address, not empty."""
    port: int = 8080
    """HTTP port. A port already in use stops the node at start with an error naming
    ``http.port``. Allowed: 1-65535."""
    public: bool = False
    """Serve the read-only endpoints (``/readyz``, ``/metrics``) to any client; ``false``:
    loopback clients only, others get 403 (logged). ``/healthz`` answers everyone."""
    token: str = ""
    """Bearer token required by the endpoints that change state (none yet); better set
    from the environment: ``DICOMNODE_HTTP__TOKEN``. Empty: those endpoints are off."""

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"http.port: {self.port} is not a TCP port (1-65535)")
        if not self.host.strip():
            raise ConfigError("http.host: must not be empty")


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
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """How long instances and results are kept; the disk high-water mark."""
    audit: AuditConfig = field(default_factory=AuditConfig)
    """The audit trail: security-relevant events, append-only and hash-chained."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """Health, readiness and metrics over HTTP."""
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
