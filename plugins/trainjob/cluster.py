"""How the ``trainjob`` engine follows a TrainJob it created: watch, node 0's log, the nodes' states, delete.

Through the ``kubernetes`` client's ``CustomObjectsApi`` (the TrainJob) and
``CoreV1Api`` (its pods, their log, the events), both on the client the engine was given.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiplane.core.kube import WorkloadWatcher, await_workload, container_status, follow_pod_log
from aiplane.core.workload import Event

from .manifest import NODE
from .settings import TrainJobSettings

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["Apis", "GROUP", "VERSION", "delete", "wait"]

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
# The labels JobSet puts on every pod of a TrainJob (the TrainJob's JobSet has its name).
_JOBSET = "jobset.sigs.k8s.io/jobset-name"
_INDEX = "batch.kubernetes.io/job-completion-index"


class Apis:
    """The two APIs a TrainJob is driven through, on one client."""

    def __init__(self, api_client: "kubernetes.client.ApiClient"):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def pods(self, namespace: str, name: str, index: int | None = None) -> list:
        selector = f"{_JOBSET}={name}" + (f",{_INDEX}={index}" if index is not None else "")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: (int((p.metadata.labels or {}).get(_INDEX, 0)), p.metadata.name))


def wait(
    apis: Apis,
    s: TrainJobSettings,
    name: str,
    on_event: Callable[[Event], None],
    cancel: threading.Event,
    stop: threading.Event,
) -> dict[str, Any]:
    """Watch the TrainJob and follow node 0's log (:func:`~aiplane.core.kube.await_workload`); the outcome."""

    def primary_pod() -> str | None:
        pods = [p for p in apis.pods(s.namespace, name, index=0)
                if p.status is not None and p.status.phase in ("Running", "Succeeded", "Failed")]
        return pods[0].metadata.name if pods else None

    return await_workload(
        f"TrainJob {s.namespace}/{name}",
        lambda emit: _TrainJobWatcher(apis, s, name, emit).wait(stop),
        lambda emit: follow_pod_log(apis.core, s.namespace, primary_pod, NODE, emit, stop),
        on_event, cancel, stop,
    )


class _TrainJobWatcher(WorkloadWatcher):
    """Watches one TrainJob to its end, reporting its nodes' phases and the Kubernetes events about them."""

    what = kind = "TrainJob"
    resource = "trainjobs (trainer.kubeflow.org)"
    container = NODE

    def __init__(self, apis: Apis, settings: TrainJobSettings, name: str, emit: Callable[[Event], None]):
        super().__init__(apis.core, settings.namespace, name, settings.watch_timeout_s, emit)
        self.apis = apis

    def stream(self) -> tuple[Callable[..., Any], tuple]:
        return self.apis.custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, "trainjobs")

    def pods(self) -> list:
        return self.apis.pods(self.namespace, self.name)

    def finished(self, obj: dict) -> str | None:
        return _finished(obj)

    def failure(self, obj: dict, pods: list) -> str:
        return _failure(self.namespace, self.name, obj, pods)


def _finished(job: dict) -> str | None:
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def _failure(namespace: str, name: str, job: dict, pods: list) -> str:
    """What the cluster says went wrong: the TrainJob's Failed condition, then each failed node's termination message."""
    parts = [f"TrainJob {namespace}/{name} failed"]
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            parts.append(f"{condition.get('reason') or 'Failed'}: {condition.get('message') or ''}".rstrip(": "))
    for pod in pods:
        status = container_status(pod, NODE)
        terminated = status.state.terminated if status is not None and status.state is not None else None
        if terminated is not None and terminated.exit_code != 0:
            detail = f"pod {pod.metadata.name}: container exited {terminated.exit_code} ({terminated.reason})"
            parts.append(f"{detail}: {terminated.message.strip()}" if terminated.message else detail)
    return "; ".join(parts)


def delete(apis: Apis, s: TrainJobSettings, name: str) -> None:
    """Delete the TrainJob with its pods now (a 404 is not an error)."""
    from kubernetes.client.rest import ApiException

    try:
        apis.custom.delete_namespaced_custom_object(
            GROUP, VERSION, s.namespace, "trainjobs", name, propagation_policy=s.propagation_policy
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
    # The garbage collector deletes the JobSet's pods in the background; do it now, so nothing outlives the call.
    for pod in apis.pods(s.namespace, name):
        with contextlib.suppress(ApiException):
            apis.core.delete_namespaced_pod(pod.metadata.name, s.namespace)
