"""The ``kserve`` serving target: an InferenceService on a vLLM ServingRuntime (OpenShift AI's model serving),
serving adapters on their base model or a whole model as its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aiplane.core.components import DEFAULT_ENDPOINT
from aiplane.core.serving_cluster import ClusterServerSettings, ClusterServingTarget
from pydantic import Field

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import EndpointRecord

__all__ = ["KServe"]


class _Settings(ClusterServerSettings):
    image: str
    """The vLLM serving image, pinned (a tag or digest), e.g. OpenShift AI's vLLM image for your accelerator."""
    deployment_mode: Literal["Serverless", "RawDeployment"] = "Serverless"
    canary_traffic_percent: int = Field(10, ge=1, le=99)
    """Serverless only: the share of traffic a new adapter's revision gets until its first completion succeeds."""
    runtime_name: str = "aiplane-vllm"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)


class KServe(ClusterServingTarget[_Settings]):
    """Serves adapters from a KServe InferenceService on a vLLM ServingRuntime, through the Kubernetes API.

    The base model comes from object storage (``storageUri``), each adapter
    version too (``storageUris``); the endpoint name routes to the newest, the
    ``keep_previous`` before it stay served for rollback. ``Serverless`` mode
    rolls a new adapter out as a canary and promotes it after a completion;
    ``RawDeployment`` mode rolls it out as a Deployment update. A failed rollout
    puts the previous spec back. A whole model (an ``sft`` model, a full
    ``distill`` student) is served as its own base model: it is the
    ``storageUri``, with no adapters, and vLLM answers to the endpoint name; it
    rolls out (and back) the same way. The Kubernetes client is built from
    ``kubeconfig`` (or the pod's service account); pass ``api_client`` to use
    another.
    """

    name = "kserve"
    object_kind: ClassVar[str] = "InferenceService"
    entrypoint: ClassVar[str] = "aiplane.plugins.kserve.rollout:run"
    Settings = _Settings

    def check(self, deployment: Deployment, endpoint_name: str = DEFAULT_ENDPOINT) -> list[str]:
        """The endpoint name, that what is trained is stored where a KServe pod can read it, and that the base
        model is in each region's own store (a pod fetches both with one service account's keys). No side effects."""
        from aiplane.core.storage import within

        problems = super().check(deployment, endpoint_name)
        base = deployment.base_model.uri
        for region, where in deployment.storage.regions.items():
            served_here = region not in deployment.regions or deployment.spec("serving", region).name == self.name
            if where.s3 is not None and served_here and base.startswith("s3://") and not within(base, where.root):
                problems.append(
                    f"storage.regions.{region} is a store of its own, and base_model.uri {base} is not in it: a KServe "
                    "pod fetches the base model and the adapter with one service account's keys. Put the base model "
                    f"in the region's store, or serve region {region} with vllm."
                )
        return problems

    def probe(self, deployment: Deployment) -> list[str]:
        """The cluster's API server answers ``/version``: one request, a few seconds at most."""
        from aiplane.core.preflight import PROBE_TIMEOUT_S

        def version(client: Any) -> None:
            from kubernetes.client import VersionApi

            # Unparsed: that it answers is the question, not what its version says.
            VersionApi(client).get_code(_request_timeout=PROBE_TIMEOUT_S, _preload_content=False).release_conn()

        return self.ask_cluster(version)

    def served(self, endpoint: EndpointRecord) -> dict[str, Any] | None:
        return self._cluster(endpoint).get("inferenceservices", endpoint.model_name)

    def delete(self, endpoint: EndpointRecord) -> bool:
        """The InferenceService, and the ServingRuntime once no InferenceService uses it."""
        from .rollout import stop

        runtime = endpoint.handle.get("runtime") or self.settings.runtime_name
        return stop(self._cluster(endpoint), endpoint.model_name, str(runtime))

    def _cluster(self, endpoint: EndpointRecord) -> Any:
        from .rollout import Cluster

        return Cluster(self.client(), self.namespace_of(endpoint))
