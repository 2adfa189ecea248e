"""The Kubernetes Job one workload becomes: a pure function of the workload, the target and the settings.

No client and no cluster here, so the manifest can be built, read and validated
before anything is sent (a :class:`ConfigError` means nothing was created).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from aiplane.core.config import Target
from aiplane.core.errors import ConfigError
from aiplane.core.kube import cpu_quantity, memory_quantity, pod_gpus
from aiplane.core.workload import Workload

from .settings import K8sJobSettings
from .task import RESULT_ENV, WORKLOAD_ENV

__all__ = ["job_manifest", "job_name", "describe", "CONTAINER", "MANAGED_BY"]

CONTAINER = "workload"
MANAGED_BY = "aiplane"
_MAX_NAME = 63  # a Job's name is also its pods' `job-name` label value


def job_name(workload: Workload) -> str:
    """``aiplane-<workload>-<run id>-<attempt>``: a DNS label, unique per attempt (a retried step gets a new Job)."""
    suffix = f"-{re.sub(r'[^a-z0-9]', '', workload.run_id.lower())[:12]}-{uuid.uuid4().hex[:6]}"
    slug = re.sub(r"[^a-z0-9]+", "-", workload.name.lower()).strip("-") or "workload"
    return f"aiplane-{slug[: _MAX_NAME - len('aiplane-') - len(suffix)].rstrip('-')}{suffix}"


def _storage_secret_env(workload: Workload) -> list[dict[str, Any]]:
    """Storage credentials as ``secretKeyRef`` env vars, each named as its SecretRef resolves it.

    A reference to this process's environment (``{env: VAR}``) would be unset in the
    pod, and copying its value into the manifest would put a secret in the Job: refused.
    """
    refs = workload.secret_refs()
    local = [repr(r) for r in refs if r.env]
    if local:
        raise ConfigError(
            f"storage: {', '.join(local)} name this process's environment, which a Kubernetes Job's pod does not "
            "see; reference a Kubernetes Secret in the Job's namespace instead: {secret: NAME, key: KEY}"
        )
    return [
        {"name": r.env_var, "valueFrom": {"secretKeyRef": {"name": r.secret, "key": r.key}}}
        for r in refs
    ]


def job_manifest(
    workload: Workload, target: Target, settings: K8sJobSettings, name: str, result_uri: str
) -> dict[str, Any]:
    """The ``batch/v1`` Job (as a dict) that runs ``workload`` on ``target`` and writes its result to ``result_uri``."""
    s = settings
    gpus = pod_gpus(workload, target)
    gpu_type = workload.resources.gpu_type or target.gpu_type
    if workload.resources.gpu_type and target.gpu_type and workload.resources.gpu_type != target.gpu_type:
        raise ConfigError(
            f"Workload {workload.name} needs {workload.resources.gpu_type} GPUs but target {target.name!r} "
            f"has {target.gpu_type}; place it on a target with that gpu_type."
        )
    # The pod has its own cache: the orchestrator's path means nothing there.
    spec = workload.model_copy(update={"cache_dir": None}).model_dump_json()
    env: list[dict[str, Any]] = [
        {"name": WORKLOAD_ENV, "value": spec},
        {"name": RESULT_ENV, "value": result_uri},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # events reach the log as they happen
        *({"name": k, "value": v} for k, v in sorted(s.env.items())),
        *_storage_secret_env(workload),
        *(
            {"name": k, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for k, ref in sorted(s.secret_env.items())
        ),
    ]
    names = [e["name"] for e in env]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"k8s-job: environment variable(s) {', '.join(twice)} set twice; aiplane sets {WORKLOAD_ENV}, "
                          f"{RESULT_ENV} and the storage credentials itself")

    requests: dict[str, str] = {"cpu": s.cpu_request or cpu_quantity(workload.resources.cpus)}
    memory = s.memory_request or (memory_quantity(workload.resources.memory_gb) if workload.resources.memory_gb else None)
    if memory:
        requests["memory"] = memory
    limits: dict[str, str] = {}
    if s.cpu_limit:
        limits["cpu"] = s.cpu_limit
    if s.memory_limit or memory:
        limits["memory"] = s.memory_limit or memory  # type: ignore[assignment]
    node_selector = dict(s.node_selector)
    if gpus:
        requests[s.accelerator_type] = limits[s.accelerator_type] = str(gpus)
        if gpu_type:
            node_selector[s.gpu_type_label] = gpu_type

    labels = {
        **s.labels,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": "workload",
        "aiplane.io/run-id": re.sub(r"[^A-Za-z0-9_.-]", "-", workload.run_id)[:63].strip("-_.") or "run",
    }
    annotations = {"aiplane.io/workload": workload.name, "aiplane.io/entrypoint": workload.entrypoint}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": s.image,
        "command": [s.python, "-m", "aiplane.plugins.k8s.task"],
        "env": env,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        # The last log lines stand in for a termination message the task could not write.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # What the restricted Pod Security Standard and OpenShift's restricted SCC ask for.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": s.run_as_non_root,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if s.image_pull_policy:
        container["imagePullPolicy"] = s.image_pull_policy
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if s.pvc_mounts:
        volumes = [(f"pvc-{i}", claim, path) for i, (claim, path) in enumerate(sorted(s.pvc_mounts.items()))]
        pod["volumes"] = [{"name": v, "persistentVolumeClaim": {"claimName": claim}} for v, claim, _ in volumes]
        container["volumeMounts"] = [{"name": v, "mountPath": path} for v, _, path in volumes]
    if s.service_account:
        pod["serviceAccountName"] = s.service_account
    if s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    if node_selector:
        pod["nodeSelector"] = dict(sorted(node_selector.items()))
    if s.tolerations:
        pod["tolerations"] = [t.manifest() for t in s.tolerations]
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
