"""The TrainJob one workload becomes: a pure function of the workload, the target and the settings.

No client and no cluster here, so the manifest can be built, read and validated
before anything is sent (a :class:`ConfigError` means nothing was created).

What the TrainJob's ``trainer`` can override (image, command, nodes, processes,
resources per node, env) is set there; what it cannot (the pod's node selector,
tolerations, service account, pull secrets, volumes, labels, and the container's
security context and mounts) goes into one ``runtimePatches`` entry managed by
aiplane, on the runtime's ``node`` replicated job.
"""

from __future__ import annotations

import json
from typing import Any

from aiplane.core.config import Target
from aiplane.core.kube import pod_parts, pod_spec, restricted_security_context
from aiplane.core.workload import Workload

from .settings import TrainJobSettings

__all__ = ["trainjob_manifest", "describe", "NAME_LIMITS", "API_VERSION", "NODE", "MANAGER", "TASK"]

API_VERSION = "trainer.kubeflow.org/v1alpha1"
NODE = "node"
"""The trainer's replicated job and container in the Trainer's runtimes (what ``trainer`` overrides)."""
MANAGER = "aiplane.io/trainjob-engine"
"""Who owns aiplane's runtime patch (``runtimePatches[].manager``)."""
TASK = "aiplane.plugins.trainjob.task"
NAME_LIMITS = (46, 10)
"""A TrainJob's name (``aiplane-<workload>-<run id>-<attempt>``, a new one per attempt): at most 46 characters,
as the Trainer names the pods ``<trainjob>-node-<job index>-<pod index>-<suffix>``, DNS labels; up to 10 of
the run id."""


def trainjob_manifest(
    workload: Workload, target: Target, settings: TrainJobSettings, name: str, result_uri: str
) -> dict[str, Any]:
    """The TrainJob (as a dict) that runs ``workload`` on ``target`` and writes its result to ``result_uri``."""
    s = settings
    env, requests, limits, node_selector, labels, annotations = pod_parts(workload, target, s, "trainjob", result_uri)
    # One process needs no launcher; several get torchrun, which reads the PET_* variables the Trainer's
    # torch plugin sets on every node (nodes, processes per node, node rank, master address and port).
    launcher = ["-m", "torch.distributed.run"] if s.world_size > 1 else []
    trainer: dict[str, Any] = {
        "image": s.image,
        "command": [s.python, *launcher, "-m", TASK],
        "numNodes": s.num_nodes,
        "numProcPerNode": s.num_proc_per_node,
        "resourcesPerNode": {"requests": requests, **({"limits": limits} if limits else {})},
        "env": env,
    }
    container: dict[str, Any] = {"name": NODE, "securityContext": restricted_security_context(s)}
    pod = pod_spec(s, container, node_selector)
    node_job = {"name": NODE, "template": {"spec": {"template": {
        "metadata": {"labels": labels, "annotations": annotations}, "spec": pod,
    }}}}  # fmt: skip
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": s.runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}}}],
    }
    if s.timeout_s is not None:
        spec["activeDeadlineSeconds"] = max(1, int(s.timeout_s))
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    }


def describe(manifest: dict[str, Any]) -> str:
    """One line for the run log: where the TrainJob runs and with what (never the env values)."""
    spec, meta = manifest["spec"], manifest["metadata"]
    trainer = spec["trainer"]
    return (
        f"TrainJob {meta['namespace']}/{meta['name']} on ClusterTrainingRuntime {spec['runtimeRef']['name']}: "
        f"image {trainer['image']}, {trainer['numNodes']} node(s) x {trainer['numProcPerNode']} process(es), "
        f"per node {json.dumps(trainer['resourcesPerNode']['requests'], sort_keys=True)}"
    )
