"""Settings of the ``k8s-job`` engine (``targets[].settings`` of a target with ``engine: k8s-job``).

Imports only pydantic and :mod:`aiplane.core`, so validating a deployment never imports kubernetes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aiplane.core.kube import PodSettings, SecretKey, Toleration

__all__ = ["K8sJobSettings", "SecretKey", "Toleration"]


class K8sJobSettings(PodSettings):
    """How and where the ``k8s-job`` engine runs each workload as a Kubernetes Job.

    The Job's one container runs ``python -m aiplane.plugins.k8s.task`` in ``image``
    (which must hold the installed aiplane and what the workload imports) and writes
    the result to ``results_dir``, where this process reads it back. The pod's
    settings are :class:`~aiplane.core.kube.PodSettings`; these are the Job's own.
    """

    ttl_seconds_after_finished: int | None = Field(default=3600, ge=0)
    """The cluster deletes a finished Job after this long, should this process not (it crashed)."""
    propagation_policy: Literal["Background", "Foreground"] = "Background"
    """How the Job's pods go when the engine deletes the Job (finished, failed or cancelled)."""
    keep_finished_jobs: bool = False
    """Leave finished Jobs (and pods) for inspection, until ``ttl_seconds_after_finished``."""
