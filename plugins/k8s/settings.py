"""Settings of the ``k8s-job`` engine (``targets[].settings`` of a target with ``engine: k8s-job``).

Imports only pydantic and :mod:`aiplane.core`, so validating a deployment never imports kubernetes.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiplane.core.kube import Toleration, check_cpu, check_memory

__all__ = ["K8sJobSettings", "SecretKey", "Toleration"]

# The API server's quantity and name grammars, checked here so a typo fails when the deployment loads.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretKey(_Strict):
    """One key of a Kubernetes Secret in the Job's namespace."""

    secret: str
    key: str


class K8sJobSettings(_Strict):
    """How and where the ``k8s-job`` engine runs each workload as a Kubernetes Job.

    The Job's one container runs ``python -m aiplane.plugins.k8s.task`` in ``image``
    (which must hold the installed aiplane and what the workload imports) and writes
    the result to ``results_dir``, where this process reads it back.
    """

    image: str
    """The container image: it must hold the installed ``aiplane`` (with the workload's extras)."""
    namespace: str = "default"
    results_dir: str
    """Where the pod writes each result and this process reads it: object storage (``s3://bucket/prefix``,
    reached with the deployment's storage settings), or a volume mounted at the same path here and in
    the pod (``pvc_mounts``)."""
    service_account: str | None = None
    """The service account the pod runs as (its Role decides what the workload may touch)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: tuple[str, ...] = ()
    python: str = "python"
    """The interpreter in ``image``."""
    cpu_request: str | None = None
    """Defaults to the workload's ``resources.cpus``."""
    cpu_limit: str | None = None
    memory_request: str | None = None
    """Defaults to the workload's ``resources.memory_gb``."""
    memory_limit: str | None = None
    """Defaults to ``memory_request``: a pod that outgrows its request is killed, not the node."""
    accelerator_type: str = "nvidia.com/gpu"
    """Kubernetes resource name of the GPUs; the count comes from the workload or the target."""
    gpu_type_label: str = "nvidia.com/gpu.product"
    """Node label that must equal the workload's (or the target's) ``gpu_type``, when one is given."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on the Job and its pod."""
    env: dict[str, str] = Field(default_factory=dict)
    """Plain environment variables for the pod; never secrets (see ``secret_env``)."""
    secret_env: dict[str, SecretKey] = Field(default_factory=dict)
    """Environment variables the pod reads from Secrets (``secretKeyRef``), by name:
    ``{HF_TOKEN: {secret: hf, key: token}}``. Storage credentials given as Secret references
    are added on their own."""
    pvc_mounts: dict[str, str] = Field(default_factory=dict)
    """PersistentVolumeClaims to mount, claim name -> mount path (the volume of the artifact store
    and of a path ``results_dir``, mounted at the same path as in this process)."""
    timeout_s: float | None = Field(default=None, gt=0)
    """The Job's ``activeDeadlineSeconds``: the cluster stops it after this long."""
    ttl_seconds_after_finished: int | None = Field(default=3600, ge=0)
    """The cluster deletes a finished Job after this long, should this process not (it crashed)."""
    run_as_non_root: bool = True
    """Refuse to start the container as root, as OpenShift's restricted SCC does; set false for an image
    that needs root (the other restricted settings stay)."""
    propagation_policy: Literal["Background", "Foreground"] = "Background"
    """How the Job's pods go when the engine deletes the Job (finished, failed or cancelled)."""
    keep_finished_jobs: bool = False
    """Leave finished Jobs (and pods) for inspection, until ``ttl_seconds_after_finished``."""
    watch_timeout_s: int = Field(default=2, ge=1)
    """How long one watch request waits for a change; also how soon a cancel is noticed."""
    kubeconfig: str | None = None
    """A kubeconfig file; default: the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    context: str | None = None
    """The kubeconfig context to use."""

    @field_validator("cpu_request", "cpu_limit")
    @classmethod
    def _cpu(cls, v: str | None, info) -> str | None:
        return check_cpu(v, info.field_name)

    @field_validator("memory_request", "memory_limit")
    @classmethod
    def _memory(cls, v: str | None, info) -> str | None:
        return check_memory(v, info.field_name)

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns_label(cls, v: str | None, info) -> str | None:
        if v is not None and (len(v) > 63 or not _DNS_LABEL.match(v)):
            raise ValueError(
                f"{info.field_name} {v!r} is not a Kubernetes name: lower-case letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return v

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, v: dict, info) -> dict:
        bad = [name for name in v if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"{info.field_name}: {', '.join(map(repr, bad))} are not environment variable names")
        return v

    @field_validator("results_dir")
    @classmethod
    def _results_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("results_dir is empty; give object storage (s3://bucket/prefix) or a shared volume path")
        return v

    @model_validator(mode="after")
    def _no_secret_in_env(self) -> "K8sJobSettings":
        clash = sorted(set(self.env) & set(self.secret_env))
        if clash:
            raise ValueError(f"{', '.join(clash)} given in both env and secret_env; keep it in secret_env only")
        return self
