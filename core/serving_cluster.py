"""What the serving targets on a Kubernetes cluster (``kserve``, ``kserve-llm``) share for talking to it: their
settings, the ApiClient, the API server's answers as aiplane errors, their objects, and the target's methods.

A target built on :class:`ClusterServingTarget` names its object (``object_kind``), its deploy workload's
entry point and how it reads and deletes one endpoint's object; the name rule, the storage check, the
probe, ``running`` and ``stop`` are the same for every such target, so no serving plugin imports another.
The ``kubernetes`` client is imported when a method talks to the cluster, never with this module.
"""

from __future__ import annotations

import copy
import json
import os
import re
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

from .components import DEFAULT_ENDPOINT, ServingTarget
from .errors import AiplaneError, ConfigError, InputError, PluginError, WorkloadError
from .kube import Toleration, check_cpu, check_memory
from .serving import ServerSettings, base_model_of
from .workload import Workload

if TYPE_CHECKING:
    from .config import Deployment
    from .records import AdapterRecord, EndpointRecord

__all__ = [
    "MANAGED_BY",
    "POD_READABLE",
    "ClusterObjects",
    "ClusterServerSettings",
    "ClusterServingTarget",
    "check_pinned_image",
    "cluster_api_client",
    "cluster_api_error",
    "managed_by_aiplane",
    "probe_api_client",
]

MANAGED_BY = {"app.kubernetes.io/managed-by": "aiplane"}
"""On every cluster object aiplane creates: stop deletes what carries it, and nothing else."""
POD_READABLE = ("s3://", "gs://", "hf://", "pvc://", "oci://", "https://")
"""The URI schemes KServe's storage initializer fetches from: what a cluster's serving pod can read."""
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,43}[a-z0-9])?")
"""An endpoint's object name: KServe derives longer names (``<name>-predictor-...``) from it, hence 45 characters."""


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
        return check_cpu(v, "cpu") or v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        return check_memory(v, "memory") or v

    @model_validator(mode="after")
    def _pinned_image(self) -> ClusterServerSettings:
        check_pinned_image(getattr(self, "image", None))
        return self


def check_pinned_image(image: str | None) -> str | None:
    """``image``, refused (``ValueError``, for a settings validator) unless pinned to a tag or digest other than latest."""
    if image is not None and (":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest")):
        raise ValueError(f"image {image!r} must be pinned to a tag or digest (not latest)")
    return image


def managed_by_aiplane(obj: Mapping[str, Any] | None) -> bool:
    """Whether aiplane created cluster object ``obj``: it changes and deletes nothing else."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in MANAGED_BY.items())


def cluster_api_client(settings: Any, target: str) -> Any:
    """A ``kubernetes`` ApiClient from the ``target``'s kubeconfig, or the pod's service account in a cluster."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise PluginError(f"The {target} target needs the kubernetes client: pip install 'aiplane[serve]'") from None
    if settings.kubeconfig:
        try:
            return config.new_client_from_config(config_file=settings.kubeconfig, context=settings.context)
        except Exception as exc:  # the client raises its own, OSError and yaml's errors alike for a bad file
            raise ConfigError(f"The {target} target's kubeconfig {settings.kubeconfig!r} cannot be used: {exc}") from None
    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise ConfigError(
            f"The {target} target found no cluster: set its kubeconfig setting, or run it in a pod ({exc})."
        ) from None
    return client.ApiClient(configuration)


def cluster_api_error(exc: Any, doing: str, target: str) -> AiplaneError:
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


class ClusterObjects:
    """The objects of one namespace a target reads, applies and deletes through an injected ``kubernetes``
    ApiClient; every refusal of the API server an aiplane error (:func:`cluster_api_error`), "not found"
    ``None`` (or ``False`` for a delete), a cluster nobody answers for a :class:`WorkloadError` saying so."""

    def __init__(self, api_client: Any, namespace: str, target: str):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace, self.target = namespace, target

    def call(self, doing: str, request: Callable[[], Any], *, missing: Any = None) -> Any:
        """``request()``'s answer; ``missing`` when the API server answers 404."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return request()
        except ApiException as exc:
            if exc.status == 404:
                return missing
            raise cluster_api_error(exc, doing, self.target) from None
        except (HTTPError, OSError) as exc:
            host = self.api.api_client.configuration.host
            raise WorkloadError(
                f"Could not {doing}: nothing answered at {host} ({type(exc).__name__}). Check the {self.target} "
                "target's kubeconfig (or run where the cluster can be reached)."
            ) from None

    def read(self, api_version: str, plural: str, name: str) -> dict[str, Any] | None:
        group, version = api_version.split("/")
        get = self.api.get_namespaced_custom_object
        found: dict[str, Any] | None = self.call(f"read {plural}/{name}", lambda: get(group, version, self.namespace, plural, name))
        return found

    def apply(self, obj: dict[str, Any], current: dict[str, Any] | None, dry_run: bool = False) -> dict[str, Any]:
        """Create ``obj``, or replace ``current`` with it (optimistically, on ``current``'s resourceVersion)."""
        group, version = obj["apiVersion"].split("/")
        plural, name = obj["kind"].lower() + "s", obj["metadata"]["name"]
        kwargs = {"dry_run": "All"} if dry_run else {}
        doing = f"{'validate' if dry_run else 'apply'} {obj['kind']} {name}"
        if current is None:
            create = self.api.create_namespaced_custom_object
            created: dict[str, Any] = self.call(doing, lambda: create(group, version, self.namespace, plural, obj, **kwargs))
            return created
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        replace = self.api.replace_namespaced_custom_object
        replaced: dict[str, Any] = self.call(doing, lambda: replace(group, version, self.namespace, plural, name, obj, **kwargs))
        return replaced

    def delete(self, api_version: str, plural: str, name: str) -> bool:
        """Delete the object (its dependents first); ``False`` when there was none."""
        group, version = api_version.split("/")
        remove = self.api.delete_namespaced_custom_object

        def request() -> bool:
            remove(group, version, self.namespace, plural, name, propagation_policy="Foreground")
            return True

        return bool(self.call(f"delete {plural}/{name}", request, missing=False))


SC = TypeVar("SC", bound=ClusterServerSettings)
"""A cluster target's settings model: :class:`ClusterServerSettings` and what its object adds."""


class ClusterServingTarget(ServingTarget[SC]):
    """A serving target whose endpoint is one object in a cluster's namespace, reached with the ``kubernetes``
    client (built from ``kubeconfig`` or the pod's service account; pass ``api_client`` to use another).

    A subclass sets ``name``, ``object_kind`` and ``entrypoint`` (what its ``deploy-endpoint`` workload runs), a
    ``Settings`` built on :class:`ClusterServerSettings`, and defines :meth:`served` and :meth:`delete`.
    """

    engines: ClassVar[tuple[str, ...] | None] = ("local",)
    object_kind: ClassVar[str]
    """What the endpoint is in the cluster (``InferenceService``): in messages, and what its name must suit."""
    entrypoint: ClassVar[str]

    def __init__(
        self, settings: Mapping[str, Any] | BaseModel | None = None, api_client: Any = None, *,
        home: str | os.PathLike[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(settings, home=home)
        self._api_client = api_client

    @abstractmethod
    def served(self, endpoint: EndpointRecord) -> dict[str, Any] | None:
        """The endpoint's object as the cluster holds it; ``None`` when there is none."""

    @abstractmethod
    def delete(self, endpoint: EndpointRecord) -> bool:
        """Delete what aiplane created for the endpoint (the caller checked it is aiplane's); whether it was there."""

    def workload(self, adapter: AdapterRecord, endpoint_name: str) -> Workload:
        """The ``deploy-endpoint`` workload running :attr:`entrypoint`; its result's ``endpoint`` output is the new
        EndpointRecord. ConfigError for a name the object cannot have, InputError for an adapter with no base model."""
        self.check_name(endpoint_name)
        base_model_of(adapter)
        return Workload(
            name="deploy-endpoint",
            entrypoint=self.entrypoint,
            inputs={"adapter": adapter},
            params={"endpoint_name": endpoint_name, "settings": self.settings.model_dump(mode="json")},
        )

    def check_name(self, name: str) -> str:
        """``name``, or ConfigError when it cannot name this target's object."""
        if not isinstance(name, str) or not _DNS_1123.fullmatch(name):
            raise ConfigError(
                f"Endpoint name {name!r} cannot name an {self.object_kind}: use 1-45 lowercase letters, digits or "
                "'-', starting and ending with a letter or digit (e.g. 'support-tickets')."
            )
        return name

    def max_lora_rank(self) -> int:
        """vLLM's ``--max-lora-rank`` in the cluster: a larger adapter is refused before it is rolled out."""
        return self.settings.max_lora_rank

    def check(self, deployment: Deployment, endpoint_name: str = DEFAULT_ENDPOINT) -> list[str]:
        """The endpoint name, and that what is trained is stored where a KServe pod can read it. No side effects."""
        try:
            self.check_name(endpoint_name or DEFAULT_ENDPOINT)
        except ConfigError as exc:
            return [str(exc)]
        storage = deployment.storage
        roots = [(f"storage.regions.{r}", where.root) for r, where in storage.regions.items()] or [
            ("storage.root", storage.root or str(deployment.home / "artifacts"))
        ]
        return [
            f"{key} is {root!r}, which a KServe pod cannot read: adapters are published there and served from "
            "there, so put it in object storage (s3://bucket/prefix), or serve with vllm."
            for key, root in roots
            if not root.startswith(POD_READABLE)
        ]

    def ask_cluster(self, request: Callable[[Any], Any], absent: str = "") -> list[str]:
        """What a probe found wrong when ``request(api_client)`` asks the API server one question: ``absent``
        for a 404 (what the cluster lacks), else the refusal or that nothing answered."""
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        client, problems = probe_api_client(self.settings, self._api_client, self.name)
        if client is None:
            return problems
        host = client.configuration.host
        try:
            request(client)
        except ApiException as exc:
            if exc.status == 404 and absent:
                return [f"the cluster at {host} {absent}"]
            refused = f"answered HTTP {exc.status} ({exc.reason}): check the kubeconfig's credentials"
            return [f"the cluster's API server at {host} {refused} (or the pod's service account)."]
        except (HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            away = f"is unreachable ({type(reason).__name__}): check the kubeconfig"
            return [f"the cluster's API server at {host} {away} (or run where the cluster can be reached)."]
        return []

    def running(self, endpoint: EndpointRecord) -> bool | None:
        """Whether the endpoint's object is Ready and still serves ``endpoint``'s adapter (or whole model); ``None``
        for an endpoint another target served. Only "not found" is "not running": a refusal or a cluster that
        does not answer raises, saying what to check, since neither says whether the endpoint serves."""
        if endpoint.serving != self.name:
            return None
        current = self.served(endpoint)
        if current is None:
            return False
        from .serving_rollout import ADAPTER_ANNOTATION

        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (current.get("status") or {}).get("conditions") or []
        )
        annotations = (current.get("metadata") or {}).get("annotations") or {}
        return ready and annotations.get(ADAPTER_ANNOTATION) == endpoint.handle.get("adapter")

    def stop(self, endpoint: EndpointRecord) -> bool:
        """Delete the endpoint's object if aiplane created it; ``False`` when there is none of aiplane's (an object
        of that name someone else made is not the endpoint's server, and aiplane deletes nothing it did not create)."""
        if endpoint.serving != self.name:
            raise InputError(f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not by {self.name!r}.")
        return managed_by_aiplane(self.served(endpoint)) and self.delete(endpoint)

    def client(self) -> Any:
        """The ApiClient this target talks through: the one given, else one from its settings."""
        return self._api_client or cluster_api_client(self.settings, self.name)

    def namespace_of(self, endpoint: EndpointRecord) -> str:
        return str(endpoint.handle.get("namespace", self.settings.namespace))
