"""Rolling an endpoint out on KServe, through the Kubernetes API, and taking it down.

A deploy (``run``, the ``deploy-endpoint`` workload):

1. Check the inputs (base model and adapter in object storage, the adapter's
   bytes the ones its digest names, since KServe's storage initializer fetches
   it unchecked; the rank within the runtime's), render both objects, and have the API server validate them
   with a dry run (the cluster's own CRD schemas) before anything is changed.
2. Create or update the ServingRuntime, then the InferenceService: the new
   adapter first in its list, the versions kept for rollback after it.
3. Wait, bounded, for the new generation to be Ready; surface the condition
   messages if it fails. In Serverless mode an update is a canary: the new
   revision gets ``canary_traffic_percent`` of the traffic and one completion;
   only then is it promoted to all of it.
4. A failure puts the previous spec back, so the previous revision keeps (or
   goes back to) serving everything and the desired state says so too.

Adapters reach vLLM through the storage initializer, which runs when a pod
starts: a new adapter is a new revision (a rolling update of the adapter
list), not a load into running pods.

A whole model (``config["full_model"]``: an ``sft`` model, a full ``distill``
student) is served as its own base model: the InferenceService's
``storageUri`` is the model, with no adapters, and vLLM answers to the endpoint
name. Switching between whole models, or between adapters and a whole model,
is the same rollout (a canary or an update, the previous spec put back on
failure), and the endpoint's URL stays. The adapters kept for rollback are not
carried over a switch to a whole model, and "one endpoint, one base model"
binds adapters only: from a whole model, an adapter of any base model rolls out.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.records import AdapterRecord, EndpointRecord
from aiplane.core.serving import (
    cluster_api_client, cluster_api_error, cluster_sources, endpoint_record, first_completion, intact_versions,
    managed_by_aiplane,
)
from aiplane.core.workload import WorkloadContext

from .render import (
    inference_service,
    runtime_object,
    served_versions,
    serves_full_model,
)

if TYPE_CHECKING:
    from .target import KServe

__all__ = ["run", "Cluster"]

_GROUP = "serving.kserve.io"


class Cluster:
    """The two kinds this target manages, in one namespace, through an injected ``kubernetes`` ApiClient."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        version = "v1alpha1" if plural == "servingruntimes" else "v1beta1"
        try:
            return self.api.get_namespaced_custom_object(_GROUP, version, self.namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read {plural}/{name}") from None

    def apply(self, obj: dict[str, Any], current: dict[str, Any] | None, dry_run: bool = False) -> dict[str, Any]:
        """Create ``obj``, or replace ``current`` with it (optimistically, on ``current``'s resourceVersion)."""
        from kubernetes.client.exceptions import ApiException

        group, version = obj["apiVersion"].split("/")
        plural = obj["kind"].lower() + "s"
        kwargs = {"dry_run": "All"} if dry_run else {}
        try:
            if current is None:
                return self.api.create_namespaced_custom_object(group, version, self.namespace, plural, obj, **kwargs)
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self.api.replace_namespaced_custom_object(
                group, version, self.namespace, plural, obj["metadata"]["name"], obj, **kwargs
            )
        except ApiException as exc:
            raise _api_error(exc, f"{'validate' if dry_run else 'apply'} {obj['kind']} {obj['metadata']['name']}") from None

    def delete(self, plural: str, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        version = "v1alpha1" if plural == "servingruntimes" else "v1beta1"
        try:
            self.api.delete_namespaced_custom_object(
                _GROUP, version, self.namespace, plural, name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise _api_error(exc, f"delete {plural}/{name}") from None
        return True

    def in_use(self, runtime: str, except_name: str) -> list[str]:
        """InferenceServices other than ``except_name`` that run on ``runtime``."""
        listed = self.api.list_namespaced_custom_object(_GROUP, "v1beta1", self.namespace, "inferenceservices")
        return [
            i["metadata"]["name"]
            for i in listed.get("items", [])
            if i["metadata"]["name"] != except_name
            and (i.get("spec", {}).get("predictor", {}).get("model") or {}).get("runtime") == runtime
        ]


def api_client(settings: "KServe.Settings") -> Any:
    """A ``kubernetes`` ApiClient from the target's kubeconfig, or the pod's service account in a cluster."""
    return cluster_api_client(settings, "kserve")


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Roll ``ctx.inputs["adapter"]`` out as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import KServe

    target = KServe(ctx.params.get("settings"))
    settings = target.settings
    name = ctx.params["endpoint_name"]
    adapter = ctx.inputs.get("adapter")
    if not isinstance(adapter, AdapterRecord):
        raise InputError("deploy-endpoint needs an adapter_weights record as its 'adapter' input")
    storage = ctx.storage
    base, full = cluster_sources(adapter, storage, "kserve")
    rank = 0 if full else int(adapter.config.get("r") or 0)
    if rank > settings.max_lora_rank:
        raise ConfigError(
            f"Adapter {adapter.digest} has LoRA rank {rank}, above the kserve target's max_lora_rank "
            f"{settings.max_lora_rank}; raise max_lora_rank or train with a smaller r."
        )

    cluster = Cluster(api_client(settings), settings.namespace)
    runtime_name = settings.runtime_name
    current = cluster.get("inferenceservices", name)
    if current is not None and not managed_by_aiplane(current):
        raise InputError(
            f"InferenceService {settings.namespace}/{name} exists and was not created by aiplane; "
            "aiplane will not change it. Serve under another endpoint name, or delete it yourself."
        )
    previous = served_versions(current)
    previous_full = serves_full_model(current)
    if previous and not previous_full and not full and current["spec"]["predictor"]["model"].get("storageUri") != base.uri:
        raise InputError(
            f"Endpoint {name!r} serves adapters of base model {current['spec']['predictor']['model'].get('storageUri')}, "
            f"and adapter {adapter.digest} was trained on {base.uri}: one endpoint, one base model."
        )
    if full:
        # Served as its own base model: the model is the storageUri, alone.
        versions = [{"digest": adapter.digest, "uri": adapter.uri, "full_model": True}]
        storage_uri = adapter.uri
    else:
        entry = {"digest": adapter.digest, "uri": adapter.uri}
        kept = [] if previous_full else [v for v in previous if v["digest"] != adapter.digest]
        versions = [entry, *intact_versions(kept[: settings.keep_previous], storage, ctx.log)]
        storage_uri = base.uri
    canary = settings.canary_traffic_percent if current is not None and settings.deployment_mode == "Serverless" else None
    runtime = runtime_object(runtime_name, settings.namespace, settings)
    isvc = inference_service(name, settings.namespace, settings, runtime_name, storage_uri, versions, canary)
    existing_runtime = cluster.get("servingruntimes", runtime_name)
    # The API server validates both against the cluster's CRDs (and admission webhooks) before anything changes.
    cluster.apply(runtime, existing_runtime, dry_run=True)
    cluster.apply(isvc, current, dry_run=True)

    if existing_runtime is None or existing_runtime.get("spec") != runtime["spec"]:
        if existing_runtime is not None and not managed_by_aiplane(existing_runtime):
            raise InputError(f"ServingRuntime {settings.namespace}/{runtime_name} was not created by aiplane; set runtime_name.")
        cluster.apply(runtime, existing_runtime)
        ctx.log(f"{'created' if existing_runtime is None else 'updated'} ServingRuntime {settings.namespace}/{runtime_name}")
    applied = cluster.apply(isvc, current)
    ctx.log(
        f"{'created' if current is None else 'updated'} InferenceService {settings.namespace}/{name} "
        f"({'model' if full else 'adapter'} {adapter.digest}{f', canary at {canary}%' if canary is not None else ''})"
    )
    try:
        status = _wait_ready(ctx, cluster, name, applied["metadata"]["generation"], settings, canary is not None)
        if settings.smoke:
            first_completion(_candidate_url(status), name, settings.readiness_timeout_s)
        if canary is not None:
            promoted = inference_service(name, settings.namespace, settings, runtime_name, storage_uri, versions, 100)
            applied = cluster.apply(promoted, cluster.get("inferenceservices", name))
            status = _wait_ready(ctx, cluster, name, applied["metadata"]["generation"], settings, False)
            ctx.log(f"promoted the new revision of {name!r} to all traffic")
    except BaseException as exc:
        # Failed or cancelled (Dagster's run termination too): what served before serves again.
        if current is None:
            cluster.delete("inferenceservices", name)
            undone = f"the new InferenceService {name!r} was deleted"
        else:
            restore = copy.deepcopy(current)
            restore["spec"]["predictor"].pop("canaryTrafficPercent", None)
            for key in ("uid", "creationTimestamp", "generation", "managedFields"):
                restore["metadata"].pop(key, None)
            restore.pop("status", None)
            cluster.apply(restore, cluster.get("inferenceservices", name))
            was = "model" if previous_full else "adapter"
            undone = f"the previous spec of {name!r} was put back, so {was} {previous[0]['digest']} keeps serving"
        if isinstance(exc, (WorkloadError, InputError)) and not isinstance(exc, WorkloadCancelled):
            raise WorkloadError(f"{exc}; {undone}.") from None
        raise
    url = status.get("url") or ""
    return {
        "endpoint": endpoint_record(
            adapter, base, name, url, uri=f"kserve://{settings.namespace}/{name}", serving="kserve",
            handle={
                "namespace": settings.namespace, "inference_service": name, "runtime": runtime_name,
                "adapter": adapter.digest, "full_model": full, "revision": _predictor(status).get("latestReadyRevision"),
                "deployment_mode": settings.deployment_mode,
            },  # fmt: skip
        )
    }


def _predictor(status: dict[str, Any]) -> dict[str, Any]:
    return (status.get("components") or {}).get("predictor") or {}


def _wait_ready(ctx, cluster: Cluster, name: str, generation: int, settings, canary: bool) -> dict[str, Any]:
    """The InferenceService's status once ``generation`` is Ready; WorkloadError with its messages on failure."""
    deadline = time.monotonic() + settings.readiness_timeout_s
    last = ""
    while True:
        ctx.check_cancelled()
        obj = cluster.get("inferenceservices", name) or {}
        status = obj.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {})
        seen = (status.get("observedGeneration") or 0) >= generation
        failed = _failure(status, conditions)
        if seen and failed:
            raise WorkloadError(f"InferenceService {name!r} failed to roll out: {failed}")
        predictor = _predictor(status)
        rolled = not canary or predictor.get("latestReadyRevision") == predictor.get("latestCreatedRevision")
        if seen and ready.get("status") == "True" and rolled:
            return status
        summary = "; ".join(f"{t}={c.get('status')}" + (f" ({c.get('message')})" if c.get("message") else "")
                            for t, c in conditions.items())  # fmt: skip
        if summary != last:
            ctx.log(f"InferenceService {name!r}: {summary or 'no conditions yet'}")
            last = summary
        if time.monotonic() > deadline:
            raise WorkloadError(
                f"InferenceService {name!r} was not Ready within readiness_timeout_s={settings.readiness_timeout_s:g} s"
                f" (last conditions: {summary or 'none'})"
            )
        time.sleep(settings.poll_s)


def _failure(status: dict[str, Any], conditions: dict[str, dict]) -> str | None:
    """What went wrong, when KServe says the rollout failed: a condition False with a reason, or a model that failed to load."""
    model = (status.get("modelStatus") or {})
    if (model.get("states") or {}).get("targetModelState") == "FailedToLoad":
        info = model.get("lastFailureInfo") or {}
        return f"the model failed to load: {info.get('message') or info.get('reason') or 'no message'}"
    messages = [
        f"{t}: {c.get('reason')}: {c.get('message')}" if c.get("message") else f"{t}: {c.get('reason')}"
        for t, c in conditions.items()
        if c.get("status") == "False" and c.get("reason")
    ]
    return "; ".join(messages) or None


def _candidate_url(status: dict[str, Any]) -> str:
    """Where the newest revision answers: its tagged URL during a canary, else the endpoint's."""
    for route in _predictor(status).get("traffic") or []:
        if route.get("latestRevision") and route.get("url"):
            return route["url"]
    return status.get("url") or ""


def stop(cluster: Cluster, name: str, runtime: str) -> bool:
    """Delete what aiplane created for endpoint ``name``: its InferenceService, and the runtime once unused."""
    current = cluster.get("inferenceservices", name)
    if not managed_by_aiplane(current):
        return False
    cluster.delete("inferenceservices", name)
    served = cluster.get("servingruntimes", runtime)
    if managed_by_aiplane(served):
        if not cluster.in_use(runtime, except_name=name):
            cluster.delete("servingruntimes", runtime)
    return True


def _api_error(exc: Any, doing: str) -> Exception:
    return cluster_api_error(exc, doing, "kserve")
