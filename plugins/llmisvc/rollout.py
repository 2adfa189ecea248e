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

from typing import Any

from aiplane.core import serving_rollout as steps
from aiplane.core.errors import WorkloadError
from aiplane.core.records import EndpointRecord
from aiplane.core.serving import endpoint_record, first_completion, version_name
from aiplane.core.serving_cluster import ClusterObjects
from aiplane.core.workload import WorkloadContext

from .render import API_VERSION, KIND, PLURAL, llm_inference_service, workload_name

__all__ = ["Cluster", "run"]

_PROGRESSING = {"MinimumReplicasUnavailable", "Progressing", "ReplicaSetUpdated", "NewReplicaSetCreated",
                "FoundNewReplicaSet", "Deploying", "Pending"}  # fmt: skip
"""Reasons KServe copies from a Deployment that is still rolling out: not a failure yet."""


class Cluster(ClusterObjects):
    """The LLMInferenceServices of one namespace, and the Deployments KServe runs them in, through an injected
    ``kubernetes`` ApiClient."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        super().__init__(api_client, namespace, "kserve-llm")
        self.apps = client.AppsV1Api(api_client)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.read(API_VERSION, PLURAL, name)

    def remove(self, name: str) -> bool:
        return self.delete(API_VERSION, PLURAL, name)

    def workload(self, name: str) -> dict[str, Any] | None:
        """The Deployment of ``name``'s vLLM pods, as a dict; None while (or where) there is none."""
        read = self.apps.read_namespaced_deployment
        deployment = self.call(f"read Deployment {workload_name(name)}", lambda: read(workload_name(name), self.namespace))
        return None if deployment is None else self.apps.api_client.sanitize_for_serialization(deployment)


def run(ctx: WorkloadContext) -> dict[str, EndpointRecord]:
    """Roll ``ctx.inputs["adapter"]`` out as endpoint ``ctx.params["endpoint_name"]``; see the module docstring."""
    from .target import KServeLLM

    target = KServeLLM(ctx.params.get("settings"))
    settings, name, ns = target.settings, ctx.params["endpoint_name"], target.settings.namespace
    adapter, base, full = steps.deploy_inputs(ctx, settings, "kserve-llm", " (the LLMInferenceService's maxRank)")
    cluster = Cluster(target.client(), ns)
    current = cluster.get(name)
    steps.refuse_foreign(current, f"{KIND} {ns}/{name}")
    served_base = ((current or {}).get("spec") or {}).get("model", {}).get("uri")
    previous = steps.served_versions(current)
    versions = steps.next_versions(name, adapter, base, previous, served_base, settings.keep_previous, ctx.storage, ctx.log)
    desired = llm_inference_service(name, ns, settings, adapter.uri if full else base.uri, versions)
    # The API server validates it against the cluster's CRD (and KServe's admission webhook) before anything changes.
    cluster.apply(desired, current, dry_run=True)

    def put_back() -> str:
        return steps.undo(name, KIND, current, lambda: cluster.remove(name), lambda spec: cluster.apply(spec, cluster.get(name)))

    with steps.put_back_on_failure(put_back):
        applied = steps.first_change(lambda: cluster.apply(desired, current))
        ctx.log(f"{'created' if current is None else 'updated'} {KIND} {ns}/{name} "
                f"({'model' if full else 'adapter'} {adapter.digest})")  # fmt: skip
        status = _wait_rolled_out(ctx, cluster, name, applied["metadata"]["generation"], settings)
        url = _url(status)
        if settings.smoke:
            first_completion(url, name if full else version_name(name, adapter.digest), settings.readiness_timeout_s)
    handle = {"namespace": ns, "llm_inference_service": name, "adapter": adapter.digest, "full_model": full,
              "generation": applied["metadata"]["generation"], "versions": [v["digest"] for v in versions]}  # fmt: skip
    record = endpoint_record(adapter, base, name, url, uri=f"llmisvc://{ns}/{name}", serving="kserve-llm", handle=handle)
    return {"endpoint": record}


def _wait_rolled_out(ctx: WorkloadContext, cluster: Cluster, name: str, generation: int, settings: Any) -> dict[str, Any]:
    """The service's status once ``generation`` is Ready and rolled out; WorkloadError with KServe's words if not."""

    def look() -> tuple[dict[str, Any] | None, str]:
        status = (cluster.get(name) or {}).get("status") or {}
        conditions = steps.conditions_of(status)
        seen = (status.get("observedGeneration") or 0) >= generation
        workload = cluster.workload(name) if seen else None
        failed = _failure(conditions, workload) if seen else None
        if failed:
            raise WorkloadError(f"{KIND} {name!r} failed to roll out: {failed}")
        waiting = _rollout_waits_for(workload) if workload is not None else None
        done = seen and conditions.get("Ready", {}).get("status") == "True" and not waiting and _url(status)
        return (status if done else None), steps.condition_summary(conditions, "reason") + (f"; {waiting}" if waiting else "")

    return steps.wait_for(ctx, settings, f"{KIND} {name!r}", "rolled out", look)


def _failure(conditions: dict[str, dict], workload: dict[str, Any] | None) -> str | None:
    """What went wrong, when KServe or its Deployment says the rollout failed."""
    deployment = workload or {}
    for c in (deployment.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "False" and c.get("reason") == "ProgressDeadlineExceeded":
            return f"its Deployment {deployment['metadata']['name']}: {c.get('reason')}: {c.get('message')}"
    return steps.failed_conditions(
        conditions, passing=lambda c: c.get("reason") in _PROGRESSING or c.get("severity") in ("Info", "Warning")
    )


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

