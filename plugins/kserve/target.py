"""The ``kserve`` serving target: an InferenceService on a vLLM ServingRuntime (OpenShift AI's model serving),
serving adapters on their base model or a whole model as its own."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from aiplane.core.components import ServingTarget
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.serving import ClusterServerSettings, probe_api_client
from aiplane.core.workload import Workload

if TYPE_CHECKING:
    from aiplane.core.config import Deployment
    from aiplane.core.records import AdapterRecord, EndpointRecord

__all__ = ["KServe"]

_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,43}[a-z0-9])?")
"""An InferenceService name: KServe derives longer names (``<name>-predictor-...``) from it, hence 45 characters."""


class KServe(ServingTarget["KServe.Settings"]):
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
    engines = ("local",)

    class Settings(ClusterServerSettings):
        image: str
        """The vLLM serving image, pinned (a tag or digest), e.g. OpenShift AI's vLLM image for your accelerator."""
        deployment_mode: Literal["Serverless", "RawDeployment"] = "Serverless"
        canary_traffic_percent: int = Field(10, ge=1, le=99)
        """Serverless only: the share of traffic a new adapter's revision gets until its first completion succeeds."""
        runtime_name: str = "aiplane-vllm"
        min_replicas: int = Field(1, ge=0)
        max_replicas: int = Field(1, ge=1)

    def __init__(self, settings: Mapping[str, Any] | BaseModel | None = None, api_client: Any = None):
        super().__init__(settings)
        self._api_client = api_client

    def workload(self, adapter: "AdapterRecord", endpoint_name: str) -> Workload:
        """The ``deploy-endpoint`` workload; its result's ``endpoint`` output is the new EndpointRecord."""
        from aiplane.core.serving import base_model_of

        _check_name(endpoint_name)
        base_model_of(adapter)
        return Workload(
            name="deploy-endpoint",
            entrypoint="aiplane.plugins.kserve.rollout:run",
            inputs={"adapter": adapter},
            params={"endpoint_name": endpoint_name, "settings": self.settings.model_dump(mode="json")},
        )

    def max_lora_rank(self) -> int:
        """The ServingRuntime's ``--max-lora-rank``: a larger adapter is refused before it is rolled out."""
        return self.settings.max_lora_rank

    def check(self, deployment: "Deployment", endpoint_name: str = "support-tickets") -> list[str]:
        """The endpoint name, and that what is trained is stored where a KServe pod can read it. No side effects."""
        try:
            _check_name(endpoint_name)
        except ConfigError as exc:
            return [str(exc)]
        from aiplane.core.storage import within

        storage, base = deployment.storage, deployment.base_model.uri
        roots = [(f"storage.regions.{r}", where.root) for r, where in storage.regions.items()] or [
            ("storage.root", storage.root or str(deployment.home / "artifacts"))
        ]
        problems = [
            f"{key} is {root!r}, which a KServe pod cannot read: adapters are published there and served from "
            "there, so put it in object storage (s3://bucket/prefix), or serve with vllm."
            for key, root in roots
            if not root.startswith(_POD_READABLE)
        ]
        # The pod fetches the base model and an adapter with one service account's keys (see .rollout).
        for region, where in storage.regions.items():
            served_here = region not in deployment.regions or deployment.spec("serving", region).name == self.name
            if where.s3 is not None and served_here and base.startswith("s3://") and not within(base, where.root):
                problems.append(
                    f"storage.regions.{region} is a store of its own, and base_model.uri {base} is not in it: a KServe "
                    "pod fetches the base model and the adapter with one service account's keys. Put the base model "
                    f"in the region's store, or serve region {region} with vllm."
                )
        return problems

    def probe(self, deployment: "Deployment") -> list[str]:
        """The cluster's API server answers ``/version``: one request, a few seconds at most."""
        from aiplane.core.preflight import PROBE_TIMEOUT_S

        client, problems = probe_api_client(self.settings, self._api_client, "kserve")
        if client is None:
            return problems
        from kubernetes.client import ApiException, VersionApi
        from urllib3.exceptions import HTTPError

        host = client.configuration.host
        try:
            # Unparsed: that it answers is the question, not what its version says.
            VersionApi(client).get_code(_request_timeout=PROBE_TIMEOUT_S, _preload_content=False).release_conn()
        except ApiException as exc:
            return [
                f"the cluster's API server at {host} answered HTTP {exc.status} ({exc.reason}) to /version: "
                "check the kubeconfig's credentials (or the pod's service account)."
            ]
        except (HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            return [
                f"the cluster's API server at {host} is unreachable ({type(reason).__name__}); nothing answered "
                f"within {PROBE_TIMEOUT_S:g} s: check the kubeconfig (or run where the cluster can be reached)."
            ]
        return []

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether the InferenceService is Ready and still serves ``endpoint``'s adapter (or whole model); None if
        it cannot tell."""
        from .render import ADAPTER_ANNOTATION

        if endpoint.serving != self.name:
            return None
        try:
            current = self._cluster(endpoint).get("inferenceservices", endpoint.model_name)
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
        """Delete the endpoint's InferenceService (and the ServingRuntime once no InferenceService uses it)."""
        from .rollout import stop

        if endpoint.serving != self.name:
            raise InputError(f"Endpoint {endpoint.uri!r} was served by {endpoint.serving!r}, not by {self.name!r}.")
        return stop(self._cluster(endpoint), endpoint.model_name, endpoint.handle.get("runtime", self.settings.runtime_name))

    def _cluster(self, endpoint: "EndpointRecord"):
        from .rollout import Cluster, api_client

        client = self._api_client or api_client(self.settings)
        return Cluster(client, endpoint.handle.get("namespace", self.settings.namespace))


# What KServe's storage initializer fetches from, as the rollout accepts them.
_POD_READABLE = ("s3://", "gs://", "hf://", "pvc://", "oci://", "https://")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _DNS_1123.fullmatch(name):
        raise ConfigError(
            f"Endpoint name {name!r} cannot name an InferenceService: use 1-45 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit (e.g. 'support-tickets')."
        )
    return name
