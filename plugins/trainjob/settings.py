"""Settings of the ``trainjob`` engine (``targets[].settings`` of a target with ``engine: trainjob``).

Imports only pydantic and :mod:`aiplane.core`, so validating a deployment never imports kubernetes.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from aiplane.core.kube import PodSettings

__all__ = ["TrainJobSettings"]

# A ClusterTrainingRuntime is cluster-scoped: its name is a DNS subdomain.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class TrainJobSettings(PodSettings):
    """How and where the ``trainjob`` engine runs each workload as a TrainJob (trainer.kubeflow.org/v1alpha1).

    The TrainJob names a ClusterTrainingRuntime (``runtime``) and overrides its
    trainer's image, command, number of nodes and resources per node; what the
    TrainJob API cannot override (the pod's node selector, tolerations, service
    account, volumes, the container's security context) goes in as a runtime patch.
    Each node's container runs ``python -m aiplane.plugins.trainjob.task`` (under
    ``torchrun`` when there is more than one process) and the primary writes the
    result to ``results_dir``, where this process reads it back. The pod's settings
    are :class:`~aiplane.core.kube.PodSettings`; these are the TrainJob's own.
    """

    runtime: str = "torch-distributed"
    """The ClusterTrainingRuntime the TrainJob runs on (``kubectl get clustertrainingruntimes``)."""
    num_nodes: int = Field(default=1, ge=1)
    """Training nodes (pods), each with the workload's resources; more than one makes the workload distributed."""
    num_proc_per_node: int = Field(default=1, ge=1)
    """Processes per node (one per GPU, usually); with ``num_nodes`` the workload's world size."""
    propagation_policy: Literal["Background", "Foreground"] = "Background"
    """How the TrainJob's JobSet, Jobs and pods go when the engine deletes it (finished, failed or cancelled)."""
    keep_finished: bool = False
    """Leave finished TrainJobs (and their pods) for inspection; a failed or cancelled one is deleted all the same."""

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        if len(v) > 253 or not _DNS_SUBDOMAIN.match(v):
            raise ValueError(
                f"runtime {v!r} is not a ClusterTrainingRuntime name: lower-case letters, digits, '-' and '.', "
                "e.g. 'torch-distributed' (kubectl get clustertrainingruntimes lists the cluster's)"
            )
        return v

    @model_validator(mode="after")
    def _not_on_a_trainjob(self) -> "TrainJobSettings":
        if self.image_pull_policy is not None:
            raise ValueError(
                "image_pull_policy cannot be set on a TrainJob (neither its trainer nor a runtime patch takes it); "
                "set imagePullPolicy in the ClusterTrainingRuntime's trainer container"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_proc_per_node
