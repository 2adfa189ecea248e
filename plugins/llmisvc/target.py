"""The ``kserve-llm`` serving target: a KServe LLMInferenceService (OpenShift AI 3's llm-d serving), serving
adapters on their base model by URI, or a whole model as its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from aiplane.core.serving_cluster import ClusterServerSettings, ClusterServingTarget
from pydantic import Field

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import EndpointRecord

__all__ = ["KServeLLM"]


class _Settings(ClusterServerSettings):
    image: str | None = None
    """The vLLM image for the ``main`` container, pinned (a tag or digest); unset: the platform preset's."""
    base_refs: tuple[str, ...] = ()
    """LLMInferenceServiceConfigs to build on (``spec.baseRefs``), e.g. an accelerator's preset."""
    replicas: int = Field(1, ge=1)
    scheduler: bool = True
    """Route through llm-d's scheduler (the endpoint picker, ``router.scheduler``), not only the gateway."""


class KServeLLM(ClusterServingTarget[_Settings]):
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
    object_kind: ClassVar[str] = "LLMInferenceService"
    entrypoint: ClassVar[str] = "aiplane.plugins.llmisvc.rollout:run"
    Settings = _Settings

    def probe(self, deployment: Deployment) -> list[str]:
        """The cluster serves LLMInferenceServices: one discovery request, with a short timeout."""

        def resources(client: Any) -> None:
            from kubernetes.client import CustomObjectsApi

            CustomObjectsApi(client).get_api_resources("serving.kserve.io", "v1alpha2", _request_timeout=5)

        return self.ask_cluster(resources, absent="serves no serving.kserve.io/v1alpha2: install KServe's "
                                "LLMInferenceService (OpenShift AI 3.4 or later), or serve with the kserve target.")  # fmt: skip

    def served(self, endpoint: EndpointRecord) -> dict[str, Any] | None:
        return self._cluster(endpoint).get(endpoint.model_name)

    def delete(self, endpoint: EndpointRecord) -> bool:
        return self._cluster(endpoint).remove(endpoint.model_name)

    def _cluster(self, endpoint: EndpointRecord) -> Any:
        from .rollout import Cluster

        return Cluster(self.client(), self.namespace_of(endpoint))
