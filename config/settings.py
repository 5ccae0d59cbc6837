"""The one settings model of the node (DESIGN.md "Configuration", contract).

Sources, strongest first: keyword arguments (tests), environment variables
``SPINE_NODE_<SECTION>__<KEY>`` (e.g. ``SPINE_NODE_SCHEDULER__STABLE_SECONDS=5``; lists and
tables as JSON, e.g. ``SPINE_NODE_NODE__ALLOWED_CALLING_AES='["CT1","CT2"]'``), the TOML file
(``--config FILE`` or the file named by ``SPINE_NODE_CONFIG``), then the embedded defaults
(SQLite and the file store under ``./var``).

Every problem is reported as :class:`ConfigError`, one line per bad key, naming the key and the
value: ``scheduler.stable_seconds: -1 is not valid: must be >= 0``.
"""
from __future__ import annotations

import contextvars
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

#: Environment variable naming the TOML file when ``--config`` is not given.
CONFIG_ENV = "SPINE_NODE_CONFIG"
ENV_PREFIX = "SPINE_NODE_"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names each bad key and its value."""


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not _AE_RE.match(stripped):
        raise ValueError("an AE title is 1-16 printable ASCII characters without a backslash")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsSettings(_Section):
    """DICOM TLS in the node itself (PS3.15 B.9 BCP 195 profile: TLS 1.2 or newer).

    ``[node.tls]``: with ``enabled``, a TLS listener on ``port`` beside the plain one on
    ``node.port``; ``port = 0`` makes ``node.port`` itself TLS-only (no plain listener).
    """

    enabled: bool = False
    #: 0: node.port speaks TLS only; otherwise a second listener (2762 is DICOM TLS's port).
    port: int = Field(0, ge=0, le=65535)
    #: The node's certificate (PEM, chain allowed) and its private key.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA certificate(s) (PEM) that sign the peers' client certificates.
    ca_file: Path | None = None
    #: Refuse peers without a client certificate signed by ``ca_file`` (mutual TLS).
    require_client_cert: bool = True
    #: A peer must finish the TLS handshake within this many seconds.
    handshake_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _files(self) -> "TlsSettings":
        if not self.enabled:
            return self
        needed = {"cert_file": self.cert_file, "key_file": self.key_file}
        if self.require_client_cert:
            needed["ca_file"] = self.ca_file
        for key, value in needed.items():
            if value is None:
                raise ValueError(f"{key} is required when node.tls.enabled is true")
        for key in ("cert_file", "key_file", "ca_file"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{key} {value} is not a readable file")
        return self


def _check_host_entry(value: str) -> str:
    """An IP address or network (``10.0.0.7``, ``10.0.0.0/24``, ``::1``)."""
    import ipaddress
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (CIDR)") from None
    return value.strip()


class NodeSettings(_Section):
    """The DICOM listener (Storage SCP)."""

    ae_title: str = "SPINENODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    #: Empty: any calling AE may associate; otherwise only these (rejected at association).
    allowed_calling_aes: list[str] = Field(default_factory=list)
    #: Empty: any peer address; otherwise only these IP addresses or networks (CIDR).
    allowed_hosts: list[str] = Field(default_factory=list)
    #: Largest P-DATA PDU we accept (bytes); 0 = unlimited. Larger PDUs mean fewer Python loops.
    max_pdu: int = Field(262144, ge=0)
    max_associations: int = Field(16, ge=1)
    #: Processes that accept associations on the listening socket (``serve`` forks the extra
    #: ones; each has its own GIL, so concurrent senders use more than one core). Limits such
    #: as ``max_associations`` apply per process; /metrics counts the main process only.
    acceptor_processes: int = Field(1, ge=1, le=64)
    #: The storage SCP's fast receive path (dicom_node.fastpath): event-driven waits, C-STORE
    #: data kept as received and served in the reading thread, responses encoded directly; for
    #: the SCP's own associations only, with the pynetdicom versions it was tested with
    #: (another one: stock, with a warning). False: stock pynetdicom receives.
    fast_path: bool = True
    #: Storage SOP classes accepted besides CT Image Storage and Enhanced CT Image Storage.
    extra_storage_sop_classes: list[str] = Field(default_factory=list)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        return [_check_host_entry(v) for v in values]

    @model_validator(mode="after")
    def _tls_port(self) -> "NodeSettings":
        if self.tls.enabled and self.tls.port == self.port:
            raise ValueError(f"node.tls.port {self.tls.port} is node.port; use 0 for a "
                             "TLS-only node.port")
        return self

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [_check_ae(v) for v in values]

    @field_validator("extra_storage_sop_classes")
    @classmethod
    def _uids(cls, values: list[str]) -> list[str]:
        for v in values:
            if len(v) > 64 or not _UID_RE.match(v):
                raise ValueError(f"{v!r} is not a SOP Class UID")
        return values


class StorageSettings(_Section):
    """The index (database) and the storage area (files)."""

    root: Path = Path("./var")
    #: Default: ``sqlite:///<root>/spine-node.db``; any SQLAlchemy URL (postgresql://...) works.
    database_url: str = ""
    #: Below this much free disk the SCP answers Out of Resources (0xA700) and /health is 503.
    min_free_mb: int = Field(1024, ge=0)
    #: fsync every instance file and its directory before answering Success.
    fsync: bool = True
    #: Write instance and result files with O_DIRECT where the file system takes it: straight
    #: from a reused buffer to the device, without a copy into the page cache (which a busy
    #: node would fill with images it does not read again soon). False: through the page cache.
    direct_io: bool = True
    #: SQLite only: PRAGMA synchronous (FULL survives power loss, NORMAL only process crashes).
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"

    @model_validator(mode="after")
    def _default_url(self) -> "StorageSettings":
        if not self.database_url:
            object.__setattr__(self, "database_url",
                               f"sqlite:///{(self.root / 'spine-node.db').as_posix()}")
        return self


class SchedulerSettings(_Section):
    """When a series counts as complete."""

    stable_seconds: float = Field(10, ge=0)
    poll_seconds: float = Field(2, gt=0)


#: Values the node derives from a series' headers, usable in rules beside DICOM keywords
#: (``dicom_node.selection.SeriesFacts`` documents how each is computed).
DERIVED_ATTRIBUTES = ("slices", "slice_thickness_mm", "slice_spacing_mm", "z_coverage_mm",
                      "axial_tilt_deg", "kernel_class")

RuleOperator = Literal["equals", "not_equals", "contains", "not_contains", "regex",
                       "min", "max", "range"]
_NUMERIC_OPERATORS = ("min", "max", "range")


class SelectionRule(_Section):
    """One eligibility rule, data not code (MONAI Deploy's series selector, mercure's rules):
    ``attribute`` (a DICOM keyword such as ``ImageType``, or a derived value of
    :data:`DERIVED_ATTRIBUTES`), ``operator`` and ``value``.

    ``equals``/``not_equals``: the value (strings compared case-insensitively, multi-valued
    attributes joined by a backslash); ``contains``/``not_contains``: one of the values
    (multi-valued, e.g. ImageType) or a substring (single-valued), case-insensitively;
    ``regex``: ``re.search`` on the text; ``min``/``max``/``range`` (``[low, high]``): every
    value, as a number, within the bound(s).
    """

    attribute: str
    operator: RuleOperator
    value: float | str | list[float]

    @field_validator("attribute")
    @classmethod
    def _known_attribute(cls, value: str) -> str:
        from pydicom.datadict import tag_for_keyword
        value = value.strip()
        if value not in DERIVED_ATTRIBUTES and tag_for_keyword(value) is None:
            raise ValueError(f"attribute {value!r} is neither a DICOM keyword nor one of "
                             f"{', '.join(DERIVED_ATTRIBUTES)}")
        return value

    @model_validator(mode="after")
    def _value_fits_operator(self) -> "SelectionRule":
        op, value = self.operator, self.value
        text = f"rule {self.attribute} {op} {value!r}"
        if op == "range":
            if not (isinstance(value, list) and len(value) == 2 and value[0] <= value[1]):
                raise ValueError(f"{text}: range takes [low, high] with low <= high")
        elif op in _NUMERIC_OPERATORS:
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{text}: {op} takes a number") from None
            object.__setattr__(self, "value", number)
        elif isinstance(value, list):
            raise ValueError(f"{text}: {op} takes one value, not a list")
        elif op == "regex":
            try:
                re.compile(str(value))
            except re.error as exc:
                raise ValueError(f"{text}: not a regular expression: {exc}") from None
        elif op in ("contains", "not_contains") and not str(value).strip():
            raise ValueError(f"{text}: {op} takes a non-empty text")
        return self

    def describe(self) -> str:
        """``ImageType contains 'ORIGINAL'``: how reasons name the rule."""
        return f"{self.attribute} {self.operator} {self.value!r}"


def _default_rules() -> list[SelectionRule]:
    # PS3.3 C.8.2.1.1.1 Image Type: value 1 ORIGINAL/DERIVED, value 3 e.g. AXIAL or LOCALIZER.
    return [SelectionRule(attribute="ImageType", operator="contains", value="ORIGINAL"),
            SelectionRule(attribute="ImageType", operator="not_contains", value="LOCALIZER")]


def _default_kernels() -> dict[str, list[str]]:
    # ConvolutionKernel (PS3.3 C.8.2.1) names are the vendor's own: Siemens B70f/Br64/I70f,
    # GE BONE/BONEPLUS/LUNG/STANDARD/SOFT, Philips YC/D/L vs B/C, Canon FC30 vs FC08.
    return {"bone": ["B6*", "B7*", "B8*", "Br6*", "Br7*", "Br8*", "I6*", "I7*", "BONE*",
                     "LUNG*", "DETAIL", "EDGE", "SHARP*", "YC", "YD", "D", "E", "L", "FC3*",
                     "FC5*"],
            "soft": ["B1*", "B2*", "B3*", "B4*", "Br3*", "Br4*", "I3*", "I4*", "STANDARD",
                     "SOFT*", "BODY*", "A", "B", "C", "FC0*", "FC1*"]}


class SelectionSettings(_Section):
    """Which complete series are eligible, and which one of a study is analysed; the others
    become ``skipped`` jobs with the reason (README "Series selection").

    ``max_slice_mm``, ``min_coverage_mm`` and ``axial_tolerance_deg`` are rules too (over the
    derived values ``slice_thickness_mm``/``slice_spacing_mm``, ``z_coverage_mm`` and
    ``axial_tilt_deg``), kept as plain keys so that a site changes a number, not a list.
    """

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    min_slices: int = Field(20, ge=1)
    #: Slice thickness and slice spacing at most this (mm): thick slices blur the end plates.
    max_slice_mm: float = Field(3.0, gt=0)
    #: z extent first to last slice, at least this (mm): two vertebrae and a disc.
    min_coverage_mm: float = Field(50.0, ge=0)
    #: The slice normal within this many degrees of the patient's z axis (90: any plane).
    axial_tolerance_deg: float = Field(10.0, ge=0, le=90)
    #: Further rules over DICOM attributes; all must hold.
    rules: list[SelectionRule] = Field(default_factory=_default_rules)
    #: ConvolutionKernel class -> fnmatch patterns (case-insensitive), in preference order.
    kernels: dict[str, list[str]] = Field(default_factory=_default_kernels)
    #: Look at a few slices of each series that passes the rules for bone where the spine
    #: lies (dicom_node.spine_coverage): a head or extremity CT is skipped, "no spine in view".
    spine_check: bool = True
    #: Slices read per series for the spine check, spread over its length.
    spine_check_slices: int = Field(9, ge=1, le=100)
    #: The spine must be seen in at least this fraction of the slices read.
    spine_min_fraction: float = Field(0.5, gt=0, le=1)

    @field_validator("modalities")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]

    @field_validator("kernels")
    @classmethod
    def _kernel_patterns(cls, values: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in values.items():
            if not name.strip() or not patterns or not all(p.strip() for p in patterns):
                raise ValueError(f"kernel class {name!r} needs a name and non-empty patterns")
        return values


class PipelineSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ``module:function`` the worker calls as ``analyse(series, device=...)``.
    entry_point: str = Field("pipeline.run:analyse",
                             pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
    #: A job whose series would need more memory than this (MB; pipeline.memory's estimate from
    #: the headers) fails with that reason before it is loaded, instead of being killed by the
    #: kernel; 0: no limit. Set it to what the worker's machine or container can give one job.
    memory_budget_mb: float = Field(6144.0, ge=0)


class WorkerSettings(_Section):
    """Job workers inside ``serve`` (``spine-node worker`` runs more elsewhere)."""

    count: int = Field(1, ge=0)
    poll_seconds: float = Field(1.0, gt=0)
    #: A job found ``running`` after this many crashed attempts ends ``failed`` instead.
    max_attempts: int = Field(3, ge=1)
    #: On SIGTERM, how long a running job may take to finish before it is re-queued.
    drain_seconds: float = Field(30.0, ge=0)
    #: A running job's worker refreshes its heartbeat every lease_seconds / 5; a job whose
    #: heartbeat is older than this (its worker died, on any machine) is queued again.
    lease_seconds: float = Field(300.0, ge=5)


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080


class ExporterSettings(_Section):
    """Sending results to the destinations (C-STORE SCU), retried with exponential backoff."""

    backoff_start_s: float = Field(30.0, gt=0)
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max_s: float = Field(3600.0, gt=0)
    max_attempts: int = Field(10, ge=1)
    dimse_timeout_s: float = Field(60.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    poll_seconds: float = Field(2.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: One JSON object per line (default) or plain text.
    json_format: bool = True


ResultObject = Literal["seg", "sr", "key_image"]


class Destination(_Section):
    """A peer that receives our results by C-STORE."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str
    host: str = Field(min_length=1)
    port: Port
    objects: list[ResultObject] = Field(default_factory=lambda: ["seg", "sr", "key_image"])
    #: DICOM TLS towards this destination; its certificate is checked against ``tls_ca_file``
    #: (default: the system's CAs) and its host name unless ``tls_check_hostname`` is false.
    tls: bool = False
    tls_ca_file: Path | None = None
    #: Our client certificate and key, for destinations that require one.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    @model_validator(mode="after")
    def _tls_files(self) -> "Destination":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            value = getattr(self, key)
            if self.tls and value is not None and not Path(value).is_file():
                raise ValueError(f"{key} {value} is not a readable file")
        return self


class Settings(BaseSettings):
    """All settings of a node; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", validate_assignment=True)

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    exporter: ExporterSettings = Field(default_factory=ExporterSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, values: list[Destination]) -> list[Destination]:
        names = [d.name for d in values]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(dupes)}")
        return values

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        toml = _TomlSource(settings_cls, _toml_data.get({}))
        return (init_settings, _EnvSource(settings_cls), toml)


# The TOML content travels to the source through a context variable, so that loading is
# re-entrant (tests build several settings objects in one process).
# No default (a shared mutable one): outside load_settings there is no TOML, read as {}.
_toml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_toml_data")


class _EnvSource(EnvSettingsSource):
    """Environment source that also takes lists as plain comma-separated text (``CT1,CT2``)."""

    def decode_complex_value(self, field_name, field, value):
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
                return [item.strip() for item in value.split(",") if item.strip()]
            raise


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls, data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (in {source})")
            continue
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        msg = re.sub(r"^Input should be greater than or equal to (.*)$", r"must be >= \1", msg)
        msg = re.sub(r"^Input should be greater than (.*)$", r"must be > \1", msg)
        msg = re.sub(r"^Input should be less than or equal to (.*)$", r"must be <= \1", msg)
        msg = re.sub(r"^Input should be ", "must be ", msg)
        value = err.get("input")
        shown = value if isinstance(value, str) and value.strip() else repr(value)
        lines.append(f"{key}: {shown} is not valid: {msg}")
    return "\n".join(lines)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the TOML file, the environment and the defaults.

    ``config_file`` None: the file named by ``SPINE_NODE_CONFIG``, or none (embedded defaults).
    Raises :class:`ConfigError` naming each bad key and value.
    """
    if config_file is None:
        config_file = os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if config_file is not None:
        path = Path(config_file)
        source = f"{path} or the environment"
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"configuration file {path} cannot be read: {exc}") from None
    token = _toml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    except SettingsError as exc:
        raise ConfigError(f"environment {ENV_PREFIX}*: {exc}") from None
    finally:
        _toml_data.reset(token)
