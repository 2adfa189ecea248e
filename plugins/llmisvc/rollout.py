"""Rolling an endpoint out as a KServe LLMInferenceService, through the Kubernetes API, and taking it down.

A deploy (``run``, the ``deploy-endpoint`` workload):

1. Check the inputs (base model and adapter readable by a pod, the adapter's
   bytes the ones its digest names, the rank within
   ``max_lora_rank``, one base model per endpoint), render the object, and have
   the API server validate it with a dry run before anything changes.
2. Create or replace the LLMInferenceService: the new adapter first, under the
   endpoint's name and its version name, the versions kept for rollback after
   it. KServe's controller rolls its Deployment out: the previous pods keep
   serving until new ones are Ready (``maxUnavailable: 0``).
3. Wait, bounded, until the controller has seen the new generation, the
   service is Ready and its Deployment's rollout is complete (``kubectl rollout
   status``'s test: every replica updated and available). A rollout that
   cannot finish (``ProgressDeadlineExceeded``) or a condition KServe sets
   False with a reason it does not set while progressing is a failure, with
   its message.
4. Send the new version one completion, by its version name, which only the
   new pods serve. Only then is the rollout done.
5. A failure, or a cancel, puts the previous spec back (or deletes what a
   first deploy created), so the previous adapter serves again.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.records import AdapterRecord, EndpointRecord
from aiplane.core.serving import (
    cluster_api_client,
    cluster_api_error,
    cluster_sources,
    endpoint_record,
    first_completion,
    intact_versions,
    managed_by_aiplane,
    served_versions,
    version_name,
)
from aiplane.core.workload import WorkloadContext

from .render import API_VERSION, KIND, PLURAL, llm_inference_service, workload_name

if TYPE_CHECKING:
    from .target import KServeLLM

__all__ = ["run", "stop", "Cluster", "api_client"]

_GROUP, _VERSION = API_VERSION.split("/")
_PROGRESSING = {"MinimumReplicasUnavailable", "Progressing", "ReplicaSetUpdated", "NewReplicaSetCreated",
                "FoundNewReplicaSet", "Deploying", "Pending"}  # fmt: skip
"""Reasons KServe copies from a Deployment that is still rolling out: not a failure yet."""


class Cluster:
    """The LLMInferenceServices of one namespace, and the Deployments KServe runs them in, through an injected
    ``kubernetes`` ApiClient."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.namespace = namespace

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(_GROUP, _VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read {KIND} {name}") from None

    def workload(self, name: str) -> dict[str, Any] | None:
        """The Deployment of ``name``'s vLLM pods, as a dict; None while (or where) there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            deployment = self.apps.read_namespaced_deployment(workload_name(name), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read Deployment {workload_name(name)}") from None
        return self.apps.api_client.sanitize_for_serialization(deployment)

    def apply(self, obj: dict[str, Any], current: dict[str, Any] | None, dry_run: bool = False) -> dict[str, Any]:
        """Create ``obj``, or replace ``current`` with it (optimistically, on ``current``'s resourceVersion)."""
        from kubernetes.client.exceptions import ApiException

        kwargs = {"dry_run": "All"} if dry_run else {}
        try:
            if current is None:
                return self.api.create_namespaced_custom_object(_GROUP, _VERSION, self.namespace, PLURAL, obj, **kwargs)
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self.api.replace_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, PLURAL, obj["metadata"]["name"], obj, **kwargs
            )
        except ApiException as exc:
            raise _api_error(exc, f"{'validate' if dry_run else 'apply'} {KIND} {obj['metadata']['name']}") from None

    def delete(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise _api_error(exc, f"delete {KIND} {name}") from None
        return True


def api_client(settings: "KServeLLM.Settings") -> Any:
    """A ``kubernetes`` ApiClient from the target's kubeconfig, or the pod's service account in a cluster."""
    return cluster_api_client(settings, "kserve-llm")


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Roll ``ctx.inputs["adapter"]`` out as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import KServeLLM

    settings = KServeLLM(ctx.params.get("settings")).settings
    name, ns = ctx.params["endpoint_name"], settings.namespace
    adapter = ctx.inputs.get("adapter")
    if not isinstance(adapter, AdapterRecord):
        raise InputError("deploy-endpoint needs an adapter_weights record as its 'adapter' input")
    storage = ctx.storage
    base, full = cluster_sources(adapter, storage, "kserve-llm")
    rank = 0 if full else int(adapter.config.get("r") or 0)
    if rank > settings.max_lora_rank:
        raise ConfigError(
            f"Adapter {adapter.digest} has LoRA rank {rank}, above the kserve-llm target's max_lora_rank "
            f"{settings.max_lora_rank} (the LLMInferenceService's maxRank); raise max_lora_rank or train with a smaller r."
        )

    cluster = Cluster(api_client(settings), ns)
    current = cluster.get(name)
    if current is not None and not managed_by_aiplane(current):
        raise InputError(
            f"{KIND} {ns}/{name} exists and was not created by aiplane; aiplane will not change it. "
            "Serve under another endpoint name, or delete it yourself."
        )
    previous = served_versions(current)
    previous_full = bool(previous and previous[0].get("full_model"))
    served_base = ((current or {}).get("spec") or {}).get("model", {}).get("uri")
    if previous and not previous_full and not full and served_base != base.uri:
        raise InputError(
            f"Endpoint {name!r} serves adapters of base model {served_base}, and adapter {adapter.digest} was "
            f"trained on {base.uri}: one endpoint, one base model."
        )
    if full:
        versions = [{"digest": adapter.digest, "uri": adapter.uri, "full_model": True}]
    else:
        kept = [] if previous_full else [v for v in previous if v["digest"] != adapter.digest]
        kept = intact_versions(kept[: settings.keep_previous], storage, ctx.log)
        versions = [{"digest": adapter.digest, "uri": adapter.uri}, *kept]
    desired = llm_inference_service(name, ns, settings, adapter.uri if full else base.uri, versions)
    # The API server validates it against the cluster's CRD (and KServe's admission webhook) before anything changes.
    cluster.apply(desired, current, dry_run=True)
    applied = cluster.apply(desired, current)
    ctx.log(f"{'created' if current is None else 'updated'} {KIND} {ns}/{name} "
            f"({'model' if full else 'adapter'} {adapter.digest})")  # fmt: skip
    try:
        status = _wait_rolled_out(ctx, cluster, name, applied["metadata"]["generation"], settings)
        url = _url(status)
        if settings.smoke:
            first_completion(url, name if full else version_name(name, adapter.digest), settings.readiness_timeout_s)
    except BaseException as exc:
        # Failed or cancelled (Dagster's run termination too): what served before serves again.
        undone = _put_back(cluster, name, current, previous, previous_full)
        if isinstance(exc, (WorkloadError, InputError)) and not isinstance(exc, WorkloadCancelled):
            raise WorkloadError(f"{exc}; {undone}.") from None
        raise
    return {
        "endpoint": endpoint_record(
            adapter, base, name, url, uri=f"llmisvc://{ns}/{name}", serving="kserve-llm",
            handle={"namespace": ns, "llm_inference_service": name, "adapter": adapter.digest, "full_model": full,
                    "generation": applied["metadata"]["generation"], "versions": [v["digest"] for v in versions]},
        )  # fmt: skip
    }


def _put_back(cluster: Cluster, name: str, current: dict | None, previous: list[dict], previous_full: bool) -> str:
    """Restore what served before this deploy; what was done, for the error message."""
    if current is None:
        cluster.delete(name)
        return f"the new {KIND} {name!r} was deleted"
    restore = copy.deepcopy(current)
    for key in ("uid", "creationTimestamp", "generation", "managedFields"):
        restore["metadata"].pop(key, None)
    restore.pop("status", None)
    cluster.apply(restore, cluster.get(name))
    was = "model" if previous_full else "adapter"
    return f"the previous spec of {name!r} was put back, so {was} {previous[0]['digest'] if previous else '?'} serves again"


def _wait_rolled_out(ctx, cluster: Cluster, name: str, generation: int, settings) -> dict[str, Any]:
    """The service's status once ``generation`` is Ready and rolled out; WorkloadError with KServe's words if not."""
    deadline = time.monotonic() + settings.readiness_timeout_s
    last = ""
    while True:
        ctx.check_cancelled()
        status = (cluster.get(name) or {}).get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        seen = (status.get("observedGeneration") or 0) >= generation
        workload = cluster.workload(name) if seen else None
        failed = _failure(conditions, workload) if seen else None
        if failed:
            raise WorkloadError(f"{KIND} {name!r} failed to roll out: {failed}")
        summary = "; ".join(f"{t}={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else "")
                            for t, c in conditions.items())  # fmt: skip
        waiting = _rollout_waits_for(workload) if workload is not None else None
        if seen and conditions.get("Ready", {}).get("status") == "True" and not waiting and _url(status):
            return status
        if summary != last:
            ctx.log(f"{KIND} {name!r}: {summary or 'no conditions yet'}" + (f"; {waiting}" if waiting else ""))
            last = summary
        if time.monotonic() > deadline:
            raise WorkloadError(
                f"{KIND} {name!r} was not rolled out within readiness_timeout_s={settings.readiness_timeout_s:g} s"
                f" (last conditions: {summary or 'none'}{f'; {waiting}' if waiting else ''})"
            )
        time.sleep(settings.poll_s)


def _failure(conditions: dict[str, dict], workload: dict[str, Any] | None) -> str | None:
    """What went wrong, when KServe or its Deployment says the rollout failed."""
    for c in ((workload or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "False" and c.get("reason") == "ProgressDeadlineExceeded":
            return f"its Deployment {workload['metadata']['name']}: {c.get('reason')}: {c.get('message')}"
    messages = [
        f"{t}: {c.get('reason')}: {c.get('message')}" if c.get("message") else f"{t}: {c.get('reason')}"
        for t, c in conditions.items()
        if c.get("status") == "False" and c.get("reason") and c.get("reason") not in _PROGRESSING
        and c.get("severity") not in ("Info", "Warning")
    ]
    return "; ".join(messages) or None


def _rollout_waits_for(workload: dict[str, Any]) -> str | None:
    """Why the Deployment's rollout is not complete yet (``kubectl rollout status``'s test); None once it is."""
    spec, status = workload.get("spec") or {}, workload.get("status") or {}
    want = spec.get("replicas", 1)
    if (status.get("observedGeneration") or 0) < workload["metadata"].get("generation", 0):
        return "waiting for the Deployment's new spec to be observed"
    updated, total = status.get("updatedReplicas") or 0, status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    if updated < want:
        return f"{updated} of {want} new replicas updated"
    if total > updated:
        return f"{total - updated} old replicas pending termination"
    if available < updated:
        return f"{available} of {updated} updated replicas available"
    return None


def _url(status: dict[str, Any]) -> str:
    return status.get("url") or next((a.get("url") for a in status.get("addresses") or [] if a.get("url")), "")


def stop(cluster: Cluster, name: str) -> bool:
    """Delete endpoint ``name``'s LLMInferenceService if aiplane created it (KServe deletes what it made for it)."""
    if not managed_by_aiplane(cluster.get(name)):
        return False
    return cluster.delete(name)


def _api_error(exc: Any, doing: str) -> Exception:
    return cluster_api_error(exc, doing, "kserve-llm")
