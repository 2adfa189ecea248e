"""The ``kserve-llm`` serving target: a KServe LLMInferenceService (OpenShift AI 3's llm-d serving), serving
adapters on their base model by URI, or a whole model as its own."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from aiplane.core.components import ServingTarget
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.serving import ADAPTER_ANNOTATION, POD_READABLE, ClusterServerSettings, base_model_of, probe_api_client
from aiplane.core.workload import Workload

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import AdapterRecord, EndpointRecord

__all__ = ["KServeLLM"]

_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,43}[a-z0-9])?")
"""An LLMInferenceService name: KServe derives longer names (``<name>-kserve-workload-svc``, ...) from it."""


class KServeLLM(ServingTarget["KServeLLM.Settings"]):
    """Serves adapters from a KServe LLMInferenceService (``serving.kserve.io/v1alpha2``), through the Kubernetes API.

    The base model is ``spec.model.uri``; each live adapter version is one of
    ``spec.model.lora.adapters``, by URI: the endpoint name serves the newest,
    ``<name>@<digest>`` each version, the ``keep_previous`` before it kept for
    rollback. KServe loads no adapter by request, so a new version is a spec
    change its controller rolls out; the previous pods serve until the new ones
    are Ready, the new version must answer a completion, and a failed or
    cancelled rollout puts the previous spec back. A whole model is served as
    its own ``spec.model.uri`` under the endpoint's name. The Kubernetes client
    is built from ``kubeconfig`` (or the pod's service account); pass
    ``api_client`` to use another.
    """

    name = "kserve-llm"
    engines = ("local",)

    class Settings(ClusterServerSettings):
        image: str | None = None
        """The vLLM image for the ``main`` container, pinned (a tag or digest); unset: the platform preset's."""
        base_refs: tuple[str, ...] = ()
        """LLMInferenceServiceConfigs to build on (``spec.baseRefs``), e.g. an accelerator's preset."""
        replicas: int = Field(1, ge=1)
        scheduler: bool = True
        """Route through llm-d's scheduler (the endpoint picker, ``router.scheduler``), not only the gateway."""

    def __init__(self, settings: Mapping[str, Any] | BaseModel | None = None, api_client: Any = None):
        super().__init__(settings)
        self._api_client = api_client

    def workload(self, adapter: "AdapterRecord", endpoint_name: str) -> Workload:
        """The ``deploy-endpoint`` workload; its result's ``endpoint`` output is the new EndpointRecord."""
        _check_name(endpoint_name)
        base_model_of(adapter)
        return Workload(
            name="deploy-endpoint",
            entrypoint="aiplane.plugins.llmisvc.rollout:run",
            inputs={"adapter": adapter},
            params={"endpoint_name": endpoint_name, "settings": self.settings.model_dump(mode="json")},
        )

    def max_lora_rank(self) -> int:
        """The LLMInferenceService's ``maxRank`` (vLLM's ``--max-lora-rank``): a larger adapter is refused before it
        is rolled out."""
        return self.settings.max_lora_rank

    def check(self, deployment: "Deployment", endpoint_name: str = "support-tickets") -> list[str]:
        """The endpoint name, and that what is trained is stored where a KServe pod can read it. No side effects."""
        try:
            _check_name(endpoint_name)
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

    def probe(self, deployment: "Deployment") -> list[str]:
        """The cluster serves LLMInferenceServices: one discovery request, with a short timeout."""
        client, problems = probe_api_client(self.settings, self._api_client, "kserve-llm")
        if client is None:
            return problems
        from kubernetes.client import ApiException, CustomObjectsApi

        host = client.configuration.host
        try:
            CustomObjectsApi(client).get_api_resources("serving.kserve.io", "v1alpha2", _request_timeout=5)
        except ApiException as exc:
            if exc.status == 404:
                return [f"the cluster at {host} serves no serving.kserve.io/v1alpha2: install KServe's LLMInferenceService "
                        "(OpenShift AI 3.4 or later), or serve with the kserve target."]  # fmt: skip
            return [f"the cluster's API server at {host} answered HTTP {exc.status} ({exc.reason}): check the "
                    "kubeconfig's credentials (or the pod's service account)."]  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - urllib3's connection errors: whatever they are, nothing answered
            return [f"the cluster's API server at {host} is unreachable ({type(exc).__name__}): check the kubeconfig."]
        return []

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether the LLMInferenceService is Ready and still serves ``endpoint``'s adapter (or whole model); None
        if it cannot tell."""
        if endpoint.serving != self.name:
            return None
        try:
            current = self._cluster(endpoint).get(endpoint.model_name)
        except Exception:  # noqa: BLE001 - no cluster reachable from here: it cannot tell
            return None
        if current is None:
            return False
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (current.get("status") or {}).get("conditions") or []
        )
        return ready and current["metadata"].get("annotations", {}).get(ADAPTER_ANNOTATION) == endpoint.handle.get("adapter")

    def stop(self, endpoint: "EndpointRecord") -> bool:
        """Delete the endpoint's LLMInferenceService, if aiplane created it."""
        from .rollout import stop

        if endpoint.serving != self.name:
            raise InputError(f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not by {self.name!r}.")
        return stop(self._cluster(endpoint), endpoint.model_name)

    def _cluster(self, endpoint: "EndpointRecord"):
        from .rollout import Cluster, api_client

        client = self._api_client or api_client(self.settings)
        return Cluster(client, endpoint.handle.get("namespace", self.settings.namespace))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _DNS_1123.fullmatch(name):
        raise ConfigError(
            f"Endpoint name {name!r} cannot name an LLMInferenceService: use 1-45 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit (e.g. 'support-tickets')."
        )
    return name
