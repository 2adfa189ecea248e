"""The ``k8s-job`` engine: each workload runs as one Kubernetes Job, created and watched through dagster-k8s.

For work that needs neither a pipeline server nor Ray. The Job's pod runs
:mod:`aiplane.plugins.k8s.task` in the target's image; the workload and where its
result goes travel in the pod's environment (secrets only as ``secretKeyRef``),
the result comes back through ``results_dir`` (object storage, or a volume both
sides mount), as with the ``kfp`` engine's remote mode.

The Job goes through dagster-k8s's :class:`~dagster_k8s.client.DagsterKubernetesClient`
(creation with its retries, pod lookup), without a Dagster context: the engine
runs the same inside a Dagster run, a test, or a script. This process watches the
Job, follows the pod's log (each line an event for ``on_event``), reports the
pod's phase and Kubernetes events, and deletes the Job and its pods when the
workload ends, fails, is cancelled or this call is interrupted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiplane.core.config import Target
from aiplane.core.engines import EngineRun, PodEngine
from aiplane.core.kube import WorkloadWatcher, await_workload, container_status, follow_pod_log
from aiplane.core.kube import default_api_client as kube_api_client
from aiplane.core.workload import Event, Workload

from .manifest import CONTAINER, NAME_LIMITS, describe, job_manifest
from .settings import K8sJobSettings

if TYPE_CHECKING:
    import kubernetes.client
    from dagster_k8s.client import DagsterKubernetesClient

__all__ = ["K8sJobEngine", "default_api_client"]


def default_api_client(settings: K8sJobSettings) -> "kubernetes.client.ApiClient":
    """The real client: the settings' kubeconfig, else the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    return kube_api_client(settings, "k8s-job")


class K8sJobEngine(PodEngine[K8sJobSettings]):
    """Runs each workload as a Kubernetes Job (through dagster-k8s), in the target's namespace and image.

    ``api_client``: a ``kubernetes.client.ApiClient``; by default :func:`default_api_client`
    builds one from the settings when the first workload runs.
    """

    name = "k8s-job"
    Settings = K8sJobSettings
    kind, kubectl = "Kubernetes Job", "job"
    name_limits, describe = NAME_LIMITS, staticmethod(describe)

    def build(self, workload: Workload, target: Target, name: str, result_uri: str) -> dict[str, Any]:
        return job_manifest(workload, target, self.settings, name, result_uri)

    def create(self, manifest: dict[str, Any], run: EngineRun) -> "DagsterKubernetesClient":
        from dagster_k8s.client import DagsterKubernetesClient
        from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
        from kubernetes import client

        # Through dagster-k8s's model conversion: a misspelled field fails here, before anything is sent.
        body = k8s_model_from_dict(client.V1Job, k8s_snake_case_dict(client.V1Job, manifest))
        api_client = self.api_client()
        kube = DagsterKubernetesClient(
            batch_api=client.BatchV1Api(api_client),
            core_api=client.CoreV1Api(api_client),
            logger=lambda message: None,  # what matters goes to on_event
            sleeper=time.sleep,
            timer=time.time,
        )
        kube.create_namespaced_job_with_retries(body, self.settings.namespace, wait_time_between_attempts=1.0)
        return kube

    def wait(self, cluster: Any, name: str, run: EngineRun, stop: threading.Event) -> dict[str, Any]:
        kube, s = cluster, self.settings
        return await_workload(
            f"Kubernetes Job {s.namespace}/{name}",
            lambda emit: _JobWatcher(kube, s, name, emit).wait(stop),
            lambda emit: _follow_logs(kube, s.namespace, name, emit, stop),
            run.on_event, run.cancel, stop,
        )

    def delete(self, cluster: Any, name: str) -> None:
        from kubernetes.client.rest import ApiException

        kube, s = cluster, self.settings
        try:
            kube.batch_api.delete_namespaced_job(name, s.namespace, propagation_policy=s.propagation_policy)
        except ApiException as exc:
            if exc.status != 404:
                raise
        # The garbage collector deletes the pods in the background; do it now, so nothing outlives the call.
        for pod in kube.get_pod_names_in_job(name, s.namespace):
            with contextlib.suppress(ApiException):
                kube.core_api.delete_namespaced_pod(pod, s.namespace)

    def keep(self, outcome: dict[str, Any]) -> bool:
        return self.settings.keep_finished_jobs

    def facts(self, name: str, run: EngineRun) -> dict[str, Any]:
        return {"job": name}


class _JobWatcher(WorkloadWatcher):
    """Watches one Job to its end, reporting its pod's phase and the Kubernetes events about both."""

    what, kind, resource, container = "Kubernetes Job", "Job", "jobs", CONTAINER

    def __init__(self, kube: "DagsterKubernetesClient", settings: K8sJobSettings, name: str, emit: Callable[[Event], None]):
        super().__init__(kube.core_api, settings.namespace, name, settings.watch_timeout_s, emit)
        self.kube = kube

    def stream(self) -> tuple[Callable[..., Any], tuple]:
        return self.kube.batch_api.list_namespaced_job, (self.namespace,)

    def pods(self) -> list:
        return self.kube.get_pods_in_job(self.name, self.namespace)

    def finished(self, obj: Any) -> str | None:
        return _finished(obj)

    def failure(self, obj: Any, pods: list) -> str:
        return _failure(self.namespace, self.name, obj, pods)


def _finished(job) -> str | None:
    for condition in (job.status.conditions if job.status else None) or ():
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type
    return None


def _failure(namespace: str, name: str, job, pods: list) -> str:
    """What the cluster says went wrong: the container's termination message first, then the Job's condition."""
    parts = [f"Kubernetes Job {namespace}/{name} failed"]
    for condition in (job.status.conditions if job.status else None) or ():
        if condition.type == "Failed" and condition.status == "True":
            parts.append(f"{condition.reason or 'Failed'}: {condition.message or ''}".rstrip(": "))
    for pod in pods:
        status = container_status(pod, CONTAINER)
        terminated = status.state.terminated if status is not None and status.state is not None else None
        if terminated is not None:
            detail = f"pod {pod.metadata.name}: container exited {terminated.exit_code} ({terminated.reason})"
            parts.append(f"{detail}: {terminated.message.strip()}" if terminated.message else detail)
        elif pod.status is not None and (pod.status.reason or pod.status.message):
            parts.append(f"pod {pod.metadata.name}: {pod.status.reason}: {pod.status.message}")
    return "; ".join(parts)


def _follow_logs(
    kube: "DagsterKubernetesClient", namespace: str, name: str, emit: Callable[[Event], None], stop: threading.Event
) -> None:
    """Follow the Job's pod's log to its end, one event per line; quietly gives up when stopped."""

    def started_pod() -> str | None:
        pods = [
            p for p in kube.get_pods_in_job(name, namespace)
            if p.status is not None and p.status.phase in ("Running", "Succeeded", "Failed")
        ]
        return pods[0].metadata.name if pods else None

    follow_pod_log(kube.core_api, namespace, started_pod, CONTAINER, emit, stop)
