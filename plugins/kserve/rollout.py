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

from typing import TYPE_CHECKING, Any

from aiplane.core import serving_rollout as steps
from aiplane.core.errors import InputError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.serving import endpoint_record, first_completion
from aiplane.core.serving_cluster import ClusterObjects, managed_by_aiplane
from aiplane.core.workload import WorkloadContext

from .render import inference_service, runtime_object

if TYPE_CHECKING:
    from .target import KServe

__all__ = ["Cluster", "run", "stop"]

_ISVC, _RUNTIME = "serving.kserve.io/v1beta1", "serving.kserve.io/v1alpha1"


class Cluster(ClusterObjects):
    """The two kinds this target manages, in one namespace, through an injected ``kubernetes`` ApiClient."""

    def __init__(self, api_client: Any, namespace: str):
        super().__init__(api_client, namespace, "kserve")

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.read(_RUNTIME if plural == "servingruntimes" else _ISVC, plural, name)

    def remove(self, plural: str, name: str) -> bool:
        return self.delete(_RUNTIME if plural == "servingruntimes" else _ISVC, plural, name)

    def in_use(self, runtime: str, except_name: str) -> list[str]:
        """InferenceServices other than ``except_name`` that run on ``runtime``."""
        group, version = _ISVC.split("/")
        listed = self.call("list inferenceservices", lambda: self.api.list_namespaced_custom_object(
            group, version, self.namespace, "inferenceservices"))  # fmt: skip
        return [
            i["metadata"]["name"]
            for i in (listed or {}).get("items", [])
            if i["metadata"]["name"] != except_name
            and (i.get("spec", {}).get("predictor", {}).get("model") or {}).get("runtime") == runtime
        ]


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Roll ``ctx.inputs["adapter"]`` out as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import KServe

    target = KServe(ctx.params.get("settings"))
    settings, name = target.settings, ctx.params["endpoint_name"]
    adapter, base, full = steps.deploy_inputs(ctx, settings, "kserve")
    cluster = Cluster(target.client(), settings.namespace)
    current = cluster.get("inferenceservices", name)
    steps.refuse_foreign(current, f"InferenceService {settings.namespace}/{name}")
    served_base = (((current or {}).get("spec") or {}).get("predictor") or {}).get("model", {}).get("storageUri")
    previous = steps.served_versions(current)
    versions = steps.next_versions(name, adapter, base, previous, served_base, settings.keep_previous, ctx.storage, ctx.log)
    model_uri = adapter.uri if full else base.uri
    canary = settings.canary_traffic_percent if current is not None and settings.deployment_mode == "Serverless" else None
    isvc = _validate(ctx, cluster, target, name, current, model_uri, versions, canary)

    def put_back() -> str:
        return steps.undo(name, "InferenceService", current, lambda: cluster.remove("inferenceservices", name),
                          lambda spec: _reapply(cluster, spec))  # fmt: skip

    with steps.put_back_on_failure(put_back):
        applied = steps.first_change(lambda: cluster.apply(isvc, current))
        ctx.log(
            f"{'created' if current is None else 'updated'} InferenceService {settings.namespace}/{name} "
            f"({'model' if full else 'adapter'} {adapter.digest}{f', canary at {canary}%' if canary is not None else ''})"
        )
        status = _wait_ready(ctx, cluster, name, applied["metadata"]["generation"], settings, canary is not None)
        if settings.smoke:
            first_completion(_candidate_url(status), name, settings.readiness_timeout_s)
        if canary is not None:
            promoted = inference_service(name, settings.namespace, settings, settings.runtime_name, model_uri, versions, 100)
            applied = cluster.apply(promoted, cluster.get("inferenceservices", name))
            status = _wait_ready(ctx, cluster, name, applied["metadata"]["generation"], settings, False)
            ctx.log(f"promoted the new revision of {name!r} to all traffic")
    return {"endpoint": _record(adapter, base, full, name, status, settings)}


def _validate(ctx: WorkloadContext, cluster: Cluster, target: KServe, name: str, current: dict[str, Any] | None,
              model_uri: str, versions: list[dict[str, Any]], canary: int | None) -> dict[str, Any]:  # fmt: skip
    """Validate both objects with the API server (dry runs), apply the runtime if it changed; the service to apply."""
    settings = target.settings
    runtime = runtime_object(settings.runtime_name, settings.namespace, settings)
    isvc = inference_service(name, settings.namespace, settings, settings.runtime_name, model_uri, versions, canary)
    existing_runtime = cluster.get("servingruntimes", settings.runtime_name)
    # The API server validates both against the cluster's CRDs (and admission webhooks) before anything changes.
    cluster.apply(runtime, existing_runtime, dry_run=True)
    cluster.apply(isvc, current, dry_run=True)
    if existing_runtime is None or existing_runtime.get("spec") != runtime["spec"]:
        if existing_runtime is not None and not managed_by_aiplane(existing_runtime):
            raise InputError(
                f"ServingRuntime {settings.namespace}/{settings.runtime_name} was not created by aiplane; set runtime_name."
            )
        cluster.apply(runtime, existing_runtime)
        ctx.log(f"{'created' if existing_runtime is None else 'updated'} ServingRuntime "
                f"{settings.namespace}/{settings.runtime_name}")  # fmt: skip
    return isvc


def _reapply(cluster: Cluster, spec: dict[str, Any]) -> None:
    """The previous InferenceService again, serving all traffic: a canary it was in the middle of is dropped."""
    spec["spec"]["predictor"].pop("canaryTrafficPercent", None)
    cluster.apply(spec, cluster.get("inferenceservices", spec["metadata"]["name"]))


def _record(adapter: AdapterRecord, base: BaseModelRecord, full: bool, name: str, status: dict[str, Any],
            settings: Any) -> EndpointRecord:  # fmt: skip
    return endpoint_record(
        adapter, base, name, status.get("url") or "", uri=f"kserve://{settings.namespace}/{name}", serving="kserve",
        handle={
            "namespace": settings.namespace, "inference_service": name, "runtime": settings.runtime_name,
            "adapter": adapter.digest, "full_model": full, "revision": _predictor(status).get("latestReadyRevision"),
            "deployment_mode": settings.deployment_mode,
        },
    )  # fmt: skip


def _predictor(status: dict[str, Any]) -> dict[str, Any]:
    return (status.get("components") or {}).get("predictor") or {}


def _wait_ready(ctx: WorkloadContext, cluster: Cluster, name: str, generation: int, settings: Any, canary: bool) -> dict[str, Any]:
    """The InferenceService's status once ``generation`` is Ready; WorkloadError with its messages on failure."""

    def look() -> tuple[dict[str, Any] | None, str]:
        status = (cluster.get("inferenceservices", name) or {}).get("status") or {}
        conditions = steps.conditions_of(status)
        seen = (status.get("observedGeneration") or 0) >= generation
        failed = _failure(status, conditions)
        if seen and failed:
            raise WorkloadError(f"InferenceService {name!r} failed to roll out: {failed}")
        predictor = _predictor(status)
        rolled = not canary or predictor.get("latestReadyRevision") == predictor.get("latestCreatedRevision")
        ready = seen and conditions.get("Ready", {}).get("status") == "True" and rolled
        return (status if ready else None), steps.condition_summary(conditions, "message")

    return steps.wait_for(ctx, settings, f"InferenceService {name!r}", "Ready", look)


def _failure(status: dict[str, Any], conditions: dict[str, dict]) -> str | None:
    """What went wrong, when KServe says the rollout failed: a condition False with a reason, or a model that failed to load."""
    model = (status.get("modelStatus") or {})
    if (model.get("states") or {}).get("targetModelState") == "FailedToLoad":
        info = model.get("lastFailureInfo") or {}
        return f"the model failed to load: {info.get('message') or info.get('reason') or 'no message'}"
    return steps.failed_conditions(conditions, passing=lambda condition: False)


def _candidate_url(status: dict[str, Any]) -> str:
    """Where the newest revision answers: its tagged URL during a canary, else the endpoint's."""
    for route in _predictor(status).get("traffic") or []:
        if route.get("latestRevision") and route.get("url"):
            return route["url"]
    return status.get("url") or ""


def stop(cluster: Cluster, name: str, runtime: str) -> bool:
    """Delete endpoint ``name``'s InferenceService, and its runtime once no other uses it, if aiplane created them."""
    if not managed_by_aiplane(cluster.get("inferenceservices", name)):
        return False
    deleted = cluster.remove("inferenceservices", name)
    if managed_by_aiplane(cluster.get("servingruntimes", runtime)) and not cluster.in_use(runtime, except_name=name):
        cluster.remove("servingruntimes", runtime)
    return deleted
