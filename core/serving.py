"""What every serving target on vLLM shares: the endpoint's record, its version names, the settings that mean
the same flags everywhere, and the first completion a new version must answer.

The ``vllm`` target (a server on this machine), the ``kserve`` target (an
InferenceService) and the ``kserve-llm`` target (an LLMInferenceService) serve
an adapter the same way: the endpoint name routes to the newest version, each
version is also served as ``<endpoint>@<digest>`` for rollback, and the
endpoint's record pins what is served where. Those promises live here, once,
so no serving plugin imports another. Pure functions and pydantic models: no
Kubernetes client, no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .kube import Toleration, check_cpu, check_memory
from .errors import AiplaneError, ConfigError, InputError, PluginError, WorkloadError
from .records import AdapterRecord, BaseModelRecord, EndpointRecord

__all__ = [
    "ClusterServerSettings",
    "PROTOCOLS",
    "cluster_api_client",
    "cluster_api_error",
    "probe_api_client",
    "check_pinned_image",
    "LORA_RANKS",
    "POD_ENV",
    "MANAGED_BY",
    "ADAPTER_ANNOTATION",
    "VERSIONS_ANNOTATION",
    "SERVER_MODULE",
    "ServerSettings",
    "server_args",
    "version_name",
    "is_full_model",
    "base_model_of",
    "endpoint_digest",
    "endpoint_record",
    "first_completion",
    "managed_by_aiplane",
    "POD_READABLE",
    "cluster_sources",
    "verify_entry",
    "intact_versions",
    "served_versions",
]

PROTOCOLS = ("openai-completions", "openai-chat-completions")
"""What an endpoint on vLLM's OpenAI server answers."""
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (KServe's ``maxRank`` becomes that flag too)."""
POD_ENV: dict[str, str] = {
    # Caches in writable scratch space: OpenShift runs the image as an arbitrary UID whose home is not writable.
    "HF_HOME": "/tmp/hf_home",
    "HOME": "/tmp",
}
"""The vLLM server's environment in a cluster's pods (the ``kserve`` and ``kserve-llm`` targets)."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "aiplane"}
"""On every cluster object aiplane creates: stop deletes what carries it, and nothing else."""
ADAPTER_ANNOTATION = "aiplane.io/adapter"
"""On a cluster's serving object: the digest the endpoint name serves."""
VERSIONS_ANNOTATION = "aiplane.io/versions"
"""On a cluster's serving object: every version it serves, newest first, as JSON."""
POD_READABLE = ("s3://", "gs://", "hf://", "pvc://", "oci://", "https://")
"""The URI schemes KServe's storage initializer fetches from: what a cluster's serving pod can read."""
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""Started as ``python -m``: the ``vllm`` command of the CPU build looks up a distribution named ``vllm`` and fails."""


class ServerSettings(BaseModel):
    """The vLLM settings every serving target on vLLM takes: the same names mean the same flags everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_previous: int = Field(1, ge=0, le=8)
    """Earlier adapters of an endpoint kept served for rollback; older ones are unloaded."""
    max_lora_rank: int = 16
    """The largest adapter rank the server accepts (vLLM allows 1, 8, 16, 32, 64, ...)."""
    max_loras: int = Field(4, ge=1)
    """Adapters served in one batch."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length; default: the model's."""
    dtype: str | None = None
    """vLLM's ``--dtype``; default: what the model's config says."""
    extra_args: tuple[str, ...] = ()
    """More vLLM server flags, as written on its command line (``--enable-prefix-caching``)."""

    @field_validator("max_lora_rank")
    @classmethod
    def _a_vllm_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, LORA_RANKS))}")
        return value

    def flags(self, lora: bool = True) -> dict:
        """These settings as :func:`server_args`'s keyword arguments; without
        ``lora``, those of a server for one whole model (no adapters, so no LoRA flags)."""
        if not lora:
            return {"lora": False, "max_model_len": self.max_model_len, "dtype": self.dtype, "extra": list(self.extra_args)}
        return {
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            # Loaded, not only batched: per endpoint its name, its current version and those kept for rollback.
            "max_cpu_loras": self.max_loras * (2 + self.keep_previous),
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "extra": list(self.extra_args),
        }


def server_args(
    model: str,
    served_name: str,
    *,
    host: str | None = None,
    port: int | None = None,
    max_lora_rank: int = 16,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    extra: Sequence[str] = (),
    lora: bool = True,
) -> list[str]:
    """The vLLM OpenAI server's arguments: serve ``model`` as ``served_name``, adapters on, by name.

    ``max_loras`` adapters run in one batch; ``max_cpu_loras`` stay loaded
    (vLLM's default: as many as ``max_loras``), which is what the versions
    kept for rollback need. ``lora=False``: a server for one whole model,
    which takes no adapters (the LoRA arguments are left out).
    """
    if max_lora_rank not in LORA_RANKS:
        raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}, not {max_lora_rank}")
    args = [f"--model={model}", f"--served-model-name={served_name}"]
    if host is not None:
        args.append(f"--host={host}")
    if port is not None:
        args.append(f"--port={port}")
    if lora:
        args += ["--enable-lora", f"--max-lora-rank={max_lora_rank}", f"--max-loras={max_loras}"]
    if lora and max_cpu_loras is not None:
        args.append(f"--max-cpu-loras={max_cpu_loras}")
    if max_model_len is not None:
        args.append(f"--max-model-len={max_model_len}")
    if dtype is not None:
        args.append(f"--dtype={dtype}")
    return args + list(extra)


def version_name(endpoint: str, adapter_digest: str) -> str:
    """The model name one adapter version of ``endpoint`` is served under, beside the endpoint's own name
    (which routes to the current version): ``tickets@1a2b3c4d5e6f``."""
    return f"{endpoint}@{adapter_digest.split(':')[-1][:12]}"


def is_full_model(adapter: AdapterRecord) -> bool:
    """Whether the record is a whole model (``sft``, a full ``distill`` student), not an adapter on its base model."""
    return bool(adapter.config.get("full_model"))


def base_model_of(adapter: AdapterRecord) -> BaseModelRecord:
    """The base model an adapter applies to; for a whole model, the one it was trained from (its lineage)."""
    try:
        return adapter.source("base_model")
    except LookupError:
        if is_full_model(adapter):
            raise InputError(
                f"Model {adapter.uri!r} ({adapter.method}, full_model) records no base_model source, so its lineage "
                "is broken; re-train it so its record carries the base model it was trained from."
            ) from None
        raise InputError(
            f"Adapter {adapter.uri!r} records no base_model source, so there is nothing to apply it to; "
            "re-train it so its record carries the base model."
        ) from None


def endpoint_digest(adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str) -> str:
    """What the endpoint serves and where: a new adapter or model, or a new URL, is a new version downstream."""
    served = {"adapter": adapter.digest, "base_model": base.digest, "model_name": name, "url": url}
    if is_full_model(adapter):
        served["full_model"] = True  # the adapter is the model served; the base model is its lineage
    canonical = json.dumps(served, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def endpoint_record(
    adapter: AdapterRecord, base: BaseModelRecord, name: str, url: str, *, uri: str, serving: str, handle: dict[str, Any]
) -> EndpointRecord:
    """The record of endpoint ``name`` at ``url`` serving ``adapter`` through vLLM's OpenAI server (here or on a cluster)."""
    return EndpointRecord(
        uri=uri, url=url, digest=endpoint_digest(adapter, base, name, url), model_name=name, protocols=PROTOCOLS,
        serving=serving, handle=handle, sources=(adapter,),
    )  # fmt: skip


def first_completion(url: str, model: str, timeout: float) -> str:
    """The text ``model`` at ``url`` answers to one short greedy completion; WorkloadError, with the server's own
    words, when it answers with an error or not at all (a new version that cannot answer must not be promoted)."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, 120)) as response:
            return json.loads(response.read())["choices"][0]["text"]
    except urllib.error.HTTPError as exc:
        raise WorkloadError(f"the new version ({model!r}) answered its first completion with HTTP {exc.code}: "
                            f"{exc.read().decode(errors='replace')[:300]}") from None  # fmt: skip
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise WorkloadError(f"the new version ({model!r}) did not answer its first completion at {url}: {exc}") from None


def served_versions(obj: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The versions a cluster serving object aiplane rendered serves (its :data:`VERSIONS_ANNOTATION`), newest
    (current) first; each ``{"digest", "uri"}``, ``"full_model": True`` for a whole model."""
    raw = (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(VERSIONS_ANNOTATION)
    try:
        versions = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [v for v in versions if isinstance(v, dict) and {"digest", "uri"} <= set(v)]


def managed_by_aiplane(obj: Mapping[str, Any] | None) -> bool:
    """Whether aiplane created cluster object ``obj``: it changes and deletes nothing else."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in MANAGED_BY.items())


def cluster_sources(adapter: AdapterRecord, storage: Any, target: str) -> tuple[BaseModelRecord, bool]:
    """The base model of ``adapter`` and whether it is a whole model, once both are known to be readable by a
    KServe pod and the adapter to be the artifact its digest names: InputError for a local path or an altered
    adapter (:func:`verify_entry`), ConfigError for a base model and an adapter in different object stores
    (the pod's storage initializer fetches everything with one set of keys, its service account's).

    ``storage`` is the workload's :class:`~aiplane.core.storage.Storage`; ``target`` names the serving target
    in the messages. Raises before any request, so a refusal changes nothing.
    """
    base = base_model_of(adapter)
    full = is_full_model(adapter)
    stored = (("model", adapter.uri),) if full else (("base model", base.uri), ("adapter", adapter.uri))
    for what, uri in stored:
        if not uri.startswith(POD_READABLE):
            raise InputError(
                f"The {what} is at {uri!r}, which a KServe pod cannot read: the {target} target serves from object "
                "storage. Set the deployment's storage.root (and base_model.uri) to a bucket."
            )
    if len({storage.settings_for(uri) for _, uri in stored if uri.startswith("s3://")}) > 1:
        raise ConfigError(
            f"The base model ({base.uri}) and the adapter ({adapter.uri}) are in different object stores (the "
            "region's own, storage.regions.<region>.s3, and storage.s3), and a KServe pod fetches both with its "
            "service account's keys. Put the base model in the region's store, or serve this region with vllm."
        )
    verify_entry(adapter.uri, storage, "model" if full else "adapter")
    return base, full


def intact_versions(kept: Sequence[Mapping[str, Any]], storage: Any, log: Any) -> list[dict[str, Any]]:
    """The versions in ``kept`` (those an endpoint keeps serving for rollback) still the artifacts their digests
    name: a new pod fetches each again, so one altered (or gone) since it was first served is left out, and
    ``log`` says which and why, rather than served as ``<endpoint>@<digest>``."""
    intact = []
    for version in kept:
        try:
            verify_entry(version["uri"], storage)
        except InputError as exc:
            log(f"version {version['digest']} is no longer kept for rollback: {exc}")
            continue
        intact.append(dict(version))
    return intact


def verify_entry(uri: str, storage: Any, what: str = "adapter") -> None:
    """Refuse (InputError naming it and what to do) the artifact-store entry at ``uri`` unless its bytes are
    the ones its digest names.

    For a target whose server fetches the entry itself (KServe's storage initializer), so aiplane never
    reads those bytes otherwise: called before anything is sent to the cluster. Hashes the entry whole,
    streamed from object storage.
    """
    from .storage import ArtifactStore

    root = uri.rstrip("/").rsplit("/", 2)[0]  # an entry is <root>/<kind>/<sha256 hex>
    altered = ArtifactStore(root, storage=storage).verify(uri)
    if altered:
        raise InputError(
            f"The {what} {uri!r} is not the artifact its digest names: {', '.join(altered)} changed after it was "
            "published, so it is not served and nothing was sent to the cluster. Publish it again (aiplane up "
            "--force trains and publishes it anew), or roll back to another version (aiplane rollback --to)."
        )


class ClusterServerSettings(ServerSettings):
    """What a vLLM server on a Kubernetes cluster takes besides its flags: the pod's size and placement, and how
    the orchestrator reaches the cluster. Both KServe targets' settings build on it; each adds its own object's
    fields and its ``image`` (required, or the platform preset's when unset)."""

    namespace: str
    """Where the serving objects live (the data science project)."""
    cpu: str = "2"
    """The vLLM container's CPU request."""
    memory: str = "16Gi"
    """The vLLM container's memory, requested and its limit."""
    gpus: int = Field(1, ge=0)
    gpu_type: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    service_account: str | None = None
    """The ServiceAccount whose Secret gives the storage initializer the bucket's keys (KServe's S3 convention)."""
    smoke: bool = True
    """Send the new version one completion before it serves the endpoint (the orchestrator must reach the URL)."""
    readiness_timeout_s: float = Field(1800.0, gt=0)
    poll_s: float = Field(2.0, gt=0)
    kubeconfig: str | None = None
    """A kubeconfig file; unset: the service account of the pod this runs in."""
    context: str | None = None

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        return check_cpu(v, "cpu")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        return check_memory(v, "memory")

    @model_validator(mode="after")
    def _pinned_image(self):
        check_pinned_image(getattr(self, "image", None))
        return self


def check_pinned_image(image: str | None) -> str | None:
    """``image``, refused (``ValueError``, for a settings validator) unless pinned to a tag or digest other than latest."""
    if image is not None and (":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest")):
        raise ValueError(f"image {image!r} must be pinned to a tag or digest (not latest)")
    return image


def cluster_api_client(settings: Any, target: str) -> Any:
    """A ``kubernetes`` ApiClient from the ``target``'s kubeconfig, or the pod's service account in a cluster."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise PluginError(f"The {target} target needs the kubernetes client: pip install 'aiplane[serve]'") from None
    if settings.kubeconfig:
        return config.new_client_from_config(config_file=settings.kubeconfig, context=settings.context)
    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise ConfigError(
            f"The {target} target found no cluster: set its kubeconfig setting, or run it in a pod ({exc})."
        ) from None
    return client.ApiClient(configuration)


def cluster_api_error(exc: Any, doing: str, target: str) -> Exception:
    """The API server's own message (a Status body) for a failed call of the ``target``, as an aiplane error."""
    try:
        message = json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError):
        message = exc.reason
    cls = InputError if exc.status in (400, 409, 422) else WorkloadError
    hint = f" Check the {target} target's namespace and the RBAC of its service account." if exc.status in (401, 403) else ""
    return cls(f"Could not {doing}: the Kubernetes API answered {exc.status}: {message}.{hint}")


def probe_api_client(settings: Any, given: Any, target: str) -> tuple[Any, list[str]]:
    """The ApiClient a ``target``'s probe asks through (``given``, else one from its settings), or why there is none."""
    try:
        return given or cluster_api_client(settings, target), []
    except AiplaneError as exc:
        return None, [f"settings: {exc}"]
    except Exception as exc:  # noqa: BLE001 - the kubernetes client's own errors for an unreadable kubeconfig
        return None, [f"settings.kubeconfig {settings.kubeconfig!r} cannot be used: {exc}"]
