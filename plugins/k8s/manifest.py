"""The Kubernetes Job one workload becomes: a pure function of the workload, the target and the settings.

No client and no cluster here, so the manifest can be built, read and validated
before anything is sent (a :class:`ConfigError` means nothing was created).
"""

from __future__ import annotations

import json
from typing import Any

from aiplane.core.config import Target
from aiplane.core.kube import pod_parts, pod_spec, restricted_security_context
from aiplane.core.workload import Workload

from .settings import K8sJobSettings

__all__ = ["job_manifest", "describe", "CONTAINER", "MANAGED_BY", "NAME_LIMITS"]

CONTAINER = "workload"
MANAGED_BY = "aiplane"
NAME_LIMITS = (63, 12)
"""A Job's name (``aiplane-<workload>-<run id>-<attempt>``, a new one per attempt): at most 63 characters, as it is
also its pods' ``job-name`` label value, with up to 12 of the run id."""


def job_manifest(
    workload: Workload, target: Target, settings: K8sJobSettings, name: str, result_uri: str
) -> dict[str, Any]:
    """The ``batch/v1`` Job (as a dict) that runs ``workload`` on ``target`` and writes its result to ``result_uri``."""
    s = settings
    env, requests, limits, node_selector, labels, annotations = pod_parts(workload, target, s, "k8s-job", result_uri)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.image,
        "command": [s.python, "-m", "aiplane.plugins.k8s.task"],
        "env": env,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        # The last log lines stand in for a termination message the task could not write.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_security_context(s),
    }
    if s.image_pull_policy:
        container["imagePullPolicy"] = s.image_pull_policy
    pod = {"restartPolicy": "Never", **pod_spec(s, container, node_selector)}
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # retries are the orchestrator's (a Dagster retry policy), never a silent second pod
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
    }
    if s.timeout_s is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(s.timeout_s))
    if s.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = s.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels, "annotations": annotations},
        "spec": job_spec,
    }


def describe(manifest: dict[str, Any]) -> str:
    """One line for the run log: where the Job runs and with what (never the env values)."""
    pod = manifest["spec"]["template"]["spec"]
    c = pod["containers"][0]
    extras = [f"{k}={v}" for k, v in c["resources"].get("limits", {}).items() if "gpu" in k]
    return (
        f"Kubernetes Job {manifest['metadata']['namespace']}/{manifest['metadata']['name']}: image {c['image']}"
        f", requests {json.dumps(c['resources']['requests'], sort_keys=True)}"
        + (f", {', '.join(extras)}" if extras else "")
        + (f", node selector {json.dumps(pod['nodeSelector'], sort_keys=True)}" if pod.get("nodeSelector") else "")
    )
