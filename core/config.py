"""Deployment configuration: ``deployments/<name>.yaml``.

A deployment names the execution targets (engine, region, capabilities), the
feature store, the trainer, the serving target and the factsheet publisher.
Secrets are never values here: a setting that holds one is written
``{env: VAR_NAME}`` or ``{secret: NAME, key: KEY}`` and resolved at use time.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from .errors import ConfigError, unknown_name, validation_problems

__all__ = [
    "SecretRef",
    "Target",
    "ComponentSpec",
    "Deployment",
    "S3Settings",
    "StorageSettings",
    "DagsterSettings",
    "DagsterPostgres",
    "COMPONENT_KEYS",
    "load_deployment",
    "deployment_path",
    "DEFAULT_DEPLOYMENT",
    "config_error",
]

DEFAULT_DEPLOYMENT = "local"
_SLUG = r"^[a-z][a-z0-9-]*$"
# Setting names that must never hold a literal value: the whole name, or its last
# `_`/`-` part (`api_key`, `hmac-secret`), not any name that contains one (`max_new_tokens`).
_SECRET_KEY = re.compile(r"(^|[_-])(token|password|passwd|secret|api[_-]?key|credentials?)$", re.IGNORECASE)
_REFERENCE_KEYS = {"env", "secret", "key"}

# A number in a deployment file is a number: `gpus: true` is not 1, and `min: .inf` is no bound.
_Count = Annotated[int, Strict()]
_Number = Annotated[float, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _region_name(region: object) -> str:
    """Region names compare as residency tags do, lower-cased and stripped: ``EU`` and ``eu`` are one region."""
    return str(region).strip().lower()


class SecretRef(_Strict):
    """A reference to a secret: an environment variable, or a Kubernetes Secret key."""

    env: str | None = None
    secret: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SecretRef":
        if bool(self.env) == bool(self.secret):
            raise ValueError("a secret reference names exactly one of 'env' or 'secret' (with 'key')")
        if self.secret and not self.key:
            raise ValueError("a Kubernetes secret reference needs 'key'")
        return self

    def resolve(self) -> str:
        """The secret's value, read now from the environment (a mounted Secret arrives as env too)."""
        var = self.env_var
        try:
            value = os.environ[var]
        except KeyError:
            raise ConfigError(
                f"Secret {self!r} is not set: export {var}=... (or mount the Secret as that variable)"
            ) from None
        if not value:
            raise ConfigError(f"Secret {self!r} is empty: set {var} to a non-empty value")
        return value

    @property
    def env_var(self) -> str:
        """The environment variable the value is read from (a mounted Secret's key arrives as one)."""
        return self.env or _k8s_env_name(self.secret or "", self.key or "")

    def __repr__(self) -> str:
        if self.env:
            return f"SecretRef(env={self.env!r})"
        return f"SecretRef(secret={self.secret!r}, key={self.key!r})"

    __str__ = __repr__


def _k8s_env_name(secret: str, key: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", f"{secret}_{key}".upper())


class S3Settings(_Strict):
    """How to reach an S3-compatible store. Keys are references, resolved where the store is opened."""

    endpoint: str | None = None
    """``https://s3.eu-de.cloud-object-storage.appdomain.cloud``, ``http://127.0.0.1:9000``; empty: AWS."""
    region: str = "us-east-1"
    """Signing region; S3-compatible stores accept any, AWS wants the bucket's."""
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    path_style: bool = True
    """``http://host/bucket/key`` (what MinIO, COS and loopback servers need) instead of ``http://bucket.host/key``."""
    checksums: Literal["when_required", "when_supported"] = "when_required"
    """When the S3 clients add integrity checksums to a request. ``when_required``: plain bodies,
    which every S3-compatible store accepts, and what aiplane's content-addressed artifacts need
    (each is checked against its sha256 when fetched). ``when_supported``: the AWS SDKs' default
    since 2025, a CRC trailer in an ``aws-chunked`` body, which not every S3-compatible store takes.
    Set for the process (``AWS_REQUEST_CHECKSUM_CALCULATION``, read by every AWS SDK when it makes
    a client) unless that variable is already set."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {value!r} needs its scheme, e.g. 'https://{value}'")
        return value or None

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`pyarrow.fs.S3FileSystem`, secrets resolved now.

        Also applies :attr:`checksums` to the clients made after this call: pyarrow has no
        argument for it, so it goes where the AWS SDKs read it, the environment.
        """
        # The first setting in a process wins, and an explicit variable wins over it.
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", self.checksums.upper())
        kwargs: dict[str, Any] = {"region": self.region, "force_virtual_addressing": not self.path_style}
        if self.endpoint:
            kwargs["endpoint_override"] = self.endpoint  # its scheme chooses http or https
        if self.access_key_id or self.secret_access_key:
            if not (self.access_key_id and self.secret_access_key):
                raise ConfigError("storage.s3: give both access_key_id and secret_access_key, or neither")
            kwargs["access_key"] = self.access_key_id.resolve()
            kwargs["secret_key"] = self.secret_access_key.resolve()
        return kwargs

    def pyiceberg_properties(self) -> dict[str, str]:
        """The ``s3.*`` FileIO properties pyiceberg reads, secrets resolved now."""
        kwargs = self.pyarrow_kwargs()
        props = {"s3.region": self.region, "s3.force-virtual-addressing": str(not self.path_style).lower()}
        if self.endpoint:
            props["s3.endpoint"] = self.endpoint
        if "access_key" in kwargs:
            props["s3.access-key-id"] = kwargs["access_key"]
            props["s3.secret-access-key"] = kwargs["secret_key"]
        return props


class RegionStorage(_Strict):
    """One region's storage location, and how to reach it when that is not ``storage.s3``."""

    root: str
    """``s3://bucket/prefix`` or a local path."""
    s3: S3Settings | None = None
    """The region's own S3-compatible store (another cloud's, with its own keys); unset: ``storage.s3``."""


class StorageSettings(_Strict):
    """Where artifacts (adapters, checkpoints, factsheets, pipeline results) are stored, by URI."""

    root: str = ""
    """``s3://bucket/prefix`` or a local path; empty: ``<home>/artifacts``."""
    regions: dict[str, RegionStorage] = Field(default_factory=dict)
    """Region -> location for workloads placed there: a root, or ``{root, s3}`` for a region whose
    store is reached with settings of its own. When given, every target's region needs one: what a
    workload placed in ``eu`` writes goes under ``eu``'s root, and nowhere else."""
    s3: S3Settings | None = None
    """How to reach the S3-compatible store the ``s3://`` roots are in (a region's own ``s3`` aside)."""
    cache: str = ""
    """Local directory where objects fetched from storage are kept, by digest; empty: ``<home>/cache``."""

    @field_validator("regions", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {_region_name(r): {"root": v} if isinstance(v, str) else v for r, v in value.items()}
        return value

    @model_validator(mode="after")
    def _stores(self) -> "StorageSettings":
        from .storage import within

        def overlap(a: str, b: str) -> bool:
            try:
                return within(a, b) or within(b, a)
            except ConfigError:
                return False  # a scheme no storage handles: the preflight names it

        for region, where in self.regions.items():
            if where.s3 is not None and not where.root.lower().startswith("s3://"):
                raise ValueError(f"regions.{region}: s3 is set, but its root {where.root!r} is not in object storage (s3://...)")
        # Each region's location is its own: a root holding another would let one region write into the other.
        for a, b in itertools.combinations(self.regions, 2):
            ra, rb = self.regions[a].root, self.regions[b].root
            if overlap(ra, rb):
                raise ValueError(f"regions: the locations of {a!r} ({ra}) and {b!r} ({rb}) overlap; give each its own")
        # The AWS SDKs read it from the process environment (see S3Settings.checksums): one per process.
        policies = {s.checksums for s in (self.s3, *self.routes().values()) if s is not None}
        if len(policies) > 1:
            raise ValueError(
                f"the S3 stores' checksums settings differ ({', '.join(sorted(policies))}); "
                "the S3 clients of one process share one, so give every store the same"
            )
        return self

    def routes(self, region: str | None = None) -> dict[str, S3Settings]:
        """Root -> settings of the regions reached otherwise than with :attr:`s3` (only ``region``'s, if given).

        What a workload placed in ``region`` gets: its own store, and :attr:`s3` for
        the rest (a base model in the deployment's bucket), not the other regions' keys.
        """
        return {
            where.root: where.s3
            for r, where in self.regions.items()
            if where.s3 is not None and (region is None or r == region)
        }


class DagsterPostgres(_Strict):
    """Dagster's run, event-log and schedule storage on PostgreSQL (``dagster-postgres``); the password by reference."""

    hostname: str
    port: _Count = Field(default=5432, gt=0, lt=65536)
    db_name: str = "dagster"
    username: str = "dagster"
    password: SecretRef
    """Read by Dagster from the reference's environment variable (``dagster.yaml`` names the variable, never the value)."""
    params: dict[str, str] = Field(default_factory=dict)
    """libpq connection parameters, e.g. ``sslmode: verify-full``."""


class DagsterSettings(_Strict):
    """The orchestrator's own state, the Dagster instance aiplane opens (``$DAGSTER_HOME/dagster.yaml``)."""

    postgres: DagsterPostgres | None = None
    """Runs, events and schedules on PostgreSQL; empty: SQLite under ``DAGSTER_HOME`` (the embedded default)."""


class Target(_Strict):
    """Somewhere workloads can run: an engine in a region, with capabilities."""

    name: str = Field(pattern=_SLUG)
    engine: str
    region: str
    """Compared lower-cased and stripped, as residency tags and the regions a residency rule allows are."""
    gpus: _Count = Field(default=0, ge=0)
    gpu_type: str | None = None
    sla: tuple[Literal["batch", "interactive", "critical"], ...] = ("batch",)
    settings: dict[str, Any] = Field(default_factory=dict)
    """Engine settings (a Ray address, a KFP host); secrets by reference only."""

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _region_name(value)


class ComponentSpec(_Strict):
    """Which plugin component to use, with its settings."""

    name: str
    settings: dict[str, Any] = Field(default_factory=dict)
    gpus: _Count = Field(default=0, ge=0)
    sla: Literal["batch", "interactive", "critical"] = "batch"
    target: str | None = None
    """Pin this component's workloads to one target (still checked by placement)."""


class Threshold(_Strict):
    """A bound on one training metric; a bare number in YAML is a minimum."""

    min: _Number | None = None
    max: _Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, value: Any) -> Any:
        return {"min": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _some_bound(self) -> "Threshold":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both (a bare number is a minimum)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class GovernanceSettings(_Strict):
    """The governance gate: what an adapter must show before it serves. Empty: no gate."""

    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    """Training metric -> bound: ``eval_accuracy: 0.6`` (a minimum), ``eval_loss: {max: 2.5}``.
    A metric the adapter does not have fails the gate: a rule cannot pass on missing evidence."""
    required_facts: tuple[str, ...] = ()
    """Dotted paths into the draft factsheet that must be present and not empty, e.g.
    ``training.metrics.eval_accuracy``, ``features.snapshot_id``, ``training.execution.target``."""


class BaseModelSpec(_Strict):
    uri: str = "builtin:tiny-granite"
    """``builtin:tiny-granite`` (built locally) or a local directory of a Hugging Face model."""


COMPONENT_KEYS = ("feature_store", "trainer", "serving", "factsheet")
"""The deployment keys that name a component; a region may set its own (``regions.<region>.<key>``)."""


def _merged_spec(base: ComponentSpec, override: dict[str, Any]) -> ComponentSpec:
    """``base`` with a region's keys, each given replacing the base's; ``settings`` key by key, unless the
    region names another component, whose settings start empty (the base's are for another plugin)."""
    fields = base.model_dump()
    if override.get("name", base.name) != base.name:
        fields["settings"] = {}
    settings = {**fields["settings"], **override.get("settings", {})}
    return ComponentSpec.model_validate({**fields, **override, "settings": settings})


class Deployment(_Strict):
    """One deployment file, validated."""

    name: str = Field(pattern=_SLUG)
    description: str = ""
    home: Path
    """Where local state lives (catalog, artifacts, servers); ``AIPLANE_HOME`` or ``./.aiplane``."""
    residency: dict[str, tuple[str, ...] | Literal["any"]] = Field(default_factory=dict)
    """Residency policy: a data tag maps to the regions allowed to process it, or ``any``.

    Rows tagged with a tag listed nowhere here are processed nowhere (fail closed).
    Tags are compared lower-cased and stripped, as rows are normalized on ingest; so are
    the regions (``eu: [EU]`` allows the targets in region ``eu``)."""
    targets: tuple[Target, ...] = Field(min_length=1)
    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    feature_store: ComponentSpec
    trainer: ComponentSpec
    serving: ComponentSpec
    factsheet: ComponentSpec
    also_publish: tuple[ComponentSpec, ...] = ()
    """More publishers, each given what ``factsheet`` is (``model-registry`` beside ``local`` or
    ``watsonx-governance``). The ``factsheet`` asset publishes to ``factsheet`` first, then to each of
    these in turn, every one placed as ``factsheet`` is and told where those before it published;
    the asset's record is ``factsheet``'s. The same for every region."""
    storage: StorageSettings = Field(default_factory=StorageSettings)
    dagster: DagsterSettings = Field(default_factory=DagsterSettings)
    """Where the orchestrator keeps its runs, events and schedules."""
    governance: GovernanceSettings = Field(default_factory=GovernanceSettings)
    """What an adapter must show before it serves (thresholds on its evaluation, facts on record)."""
    observers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Settings for observer plugins, keyed by plugin name (e.g. ``openlineage``)."""
    regions: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    """Per-region adapters: each region named here is a Dagster partition of ``features``,
    ``adapter_weights``, ``served_endpoint`` and ``factsheet``. A partition holds only the rows
    whose residency allows its region, and places every workload on a target in it. A region
    may give its own ``feature_store``, ``trainer``, ``serving`` or ``factsheet`` (another
    component, or only some settings of the deployment's); a list of names gives none. Empty:
    one unpartitioned chain, every row placed by residency alone."""
    source: str | None = None
    """The file this deployment was loaded from."""

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: tuple[Target, ...]) -> tuple[Target, ...]:
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dupes)}")
        return targets

    @field_validator("residency", mode="before")
    @classmethod
    def _normalize_residency(cls, policy: Any) -> Any:
        if not isinstance(policy, dict):
            return policy
        out: dict[str, Any] = {}
        for tag, regions in policy.items():
            key = str(tag).strip().lower()
            if key in out:
                raise ValueError(f"tag {tag!r} is listed twice (tags are compared lower-cased and stripped)")
            if isinstance(regions, str) and regions.strip().lower() == "any":
                regions = "any"
            elif isinstance(regions, str):
                raise ValueError(f"{key}: give a list of regions (e.g. [eu]) or `any`, not {regions!r}")
            elif isinstance(regions, (list, tuple)):
                regions = tuple(dict.fromkeys(_region_name(r) for r in regions))
            out[key] = regions
        return out

    @field_validator("regions", mode="before")
    @classmethod
    def _region_list(cls, regions: Any) -> Any:
        if isinstance(regions, (list, tuple)):
            names = [str(r) for r in regions]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"regions are listed once each; repeated: {', '.join(dupes)}")
            return {name: {} for name in names}
        if isinstance(regions, dict):
            return {name: overrides or {} for name, overrides in regions.items()}  # `eu:` with nothing under it
        return regions

    @field_validator("regions")
    @classmethod
    def _region_specs(cls, regions: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
        for region, overrides in regions.items():
            if not re.match(_SLUG, region):
                raise ValueError(f"region {region!r} is not a lower-case name (letters, digits, '-'), as a partition key must be")
            unknown = sorted(set(overrides) - set(COMPONENT_KEYS))
            if unknown:
                raise ValueError(
                    f"{region}: {', '.join(unknown)} cannot be set per region; a region sets {', '.join(COMPONENT_KEYS)}"
                )
        return regions

    @model_validator(mode="after")
    def _pins_exist(self) -> "Deployment":
        names = [t.name for t in self.targets]
        for region in [None, *self.regions]:
            where = f"regions.{region}." if region else ""
            for key in ("trainer", "serving", "factsheet"):
                try:
                    pin = self.spec(key, region).target
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
                if pin and pin not in names:
                    raise ValueError(f"{where}{key}.target: " + unknown_name("target", pin, names))
        for i, spec in enumerate(self.also_publish):
            if spec.target and spec.target not in names:
                raise ValueError(f"also_publish[{i}].target: " + unknown_name("target", spec.target, names))
        return self

    def publishers(self, region: str | None = None) -> tuple[ComponentSpec, ...]:
        """Every publisher the ``factsheet`` asset publishes to, in order: ``factsheet`` (as ``region`` sets it), then ``also_publish``."""
        return (self.spec("factsheet", region), *self.also_publish)

    def spec(self, key: str, region: str | None = None) -> ComponentSpec:
        """The component spec ``key`` names, as region ``region`` sets it (``None``: the deployment's own)."""
        base: ComponentSpec = getattr(self, key)
        override = self.regions.get(region, {}).get(key) if region else None
        if not override:
            return base
        try:
            return _merged_spec(base, override)
        except ValidationError as exc:
            problems = "; ".join(validation_problems(exc, ComponentSpec))
            raise ConfigError(f"regions.{region}.{key}: {problems}") from None

    def in_region(self, region: str | None) -> "Deployment":
        """This deployment as region ``region``'s partitions run it: its components as the region sets them."""
        if region is None:
            return self
        if region not in self.regions:
            raise ConfigError(unknown_name("region", region, list(self.regions), known_as="the deployment's"))
        return self.model_copy(update={key: self.spec(key, region) for key in COMPONENT_KEYS})

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(unknown_name("target", name, [t.name for t in self.targets]))

    def artifact_root(self, region: str | None = None) -> str:
        """The storage root (a URI) for what a workload placed in ``region`` writes.

        With ``storage.regions`` set, a region without its own root is an error
        (fail closed): data placed in a region is never written elsewhere.
        """
        from .storage import normalize_uri

        regions = self.storage.regions
        if regions and region is not None:
            if region not in regions:
                raise ConfigError(
                    f"storage.regions has no location for region {region!r} (it has: {', '.join(sorted(regions))}); "
                    "add one, so what is made there has a place in that region."
                )
            return normalize_uri(regions[region].root)
        return normalize_uri(self.storage.root or self.home / "artifacts")

    def cache_dir(self) -> Path:
        """Local directory for objects fetched from storage, kept by digest."""
        return Path(self.storage.cache).expanduser() if self.storage.cache else self.home / "cache"


def deployment_path(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """Find a deployment file by name (``deployments/<name>.yaml``) or path.

    The name comes from the argument, else ``AIPLANE_DEPLOYMENT``, else ``local``.
    Names are looked up in ``AIPLANE_DEPLOYMENTS_DIR``, ``./deployments`` and the
    checkout this package was installed from.
    """
    ref = str(name_or_path or os.environ.get("AIPLANE_DEPLOYMENT") or DEFAULT_DEPLOYMENT)
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        path = Path(ref)
        if not path.is_file():
            raise ConfigError(f"Deployment file {ref!r} does not exist")
        return path
    dirs = [Path(d) for d in [os.environ.get("AIPLANE_DEPLOYMENTS_DIR")] if d]
    dirs += [Path.cwd() / "deployments", Path(__file__).resolve().parents[1] / "deployments"]
    for d in dirs:
        candidate = d / f"{ref}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(
        unknown_name("deployment", ref, known, hint=f"Looked in: {', '.join(str(d) for d in dirs)}.")
    )


def _find_literal_secrets(value: Any, where: str) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        if value and set(value) <= _REFERENCE_KEYS:
            return found  # {env: NAME} or {secret: NAME, key: KEY}: a reference, which is the point
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v != "":
                found.append(path)
            else:
                found += _find_literal_secrets(v, path)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _find_literal_secrets(v, f"{where}[{i}]")
    return found


def _substitute_home(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace("{home}", home)
    if isinstance(value, dict):
        return {k: _substitute_home(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_home(v, home) for v in value]
    return value


def config_error(source: str, exc: ValidationError) -> ConfigError:
    """A ConfigError naming the file, each bad key and what is allowed there."""
    return ConfigError(f"{source}: invalid deployment:\n" + "\n".join(f"  {p}" for p in validation_problems(exc, Deployment)))


def load_deployment(name_or_path: str | os.PathLike[str] | None = None, home: str | os.PathLike[str] | None = None) -> Deployment:
    """Load and validate a deployment. Plugin names are checked later, against what is installed."""
    path = deployment_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a deployment is a mapping with keys name, targets, feature_store, ...; got {type(raw).__name__}")
    secrets = _find_literal_secrets(raw, "")
    if secrets:
        raise ConfigError(
            f"{path}: {', '.join(secrets)} hold a literal value; secrets are referenced, never stored: "
            "write e.g. `api_key: {env: WATSONX_APIKEY}`"
        )
    file_home = raw.pop("home", None)
    home = Path(home or os.environ.get("AIPLANE_HOME") or file_home or Path.cwd() / ".aiplane").resolve()
    raw = _substitute_home(raw, str(home))
    try:
        return Deployment.model_validate({**raw, "home": home, "source": str(path)})
    except ValidationError as exc:
        raise config_error(str(path), exc) from None
