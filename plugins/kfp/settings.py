"""Settings of the ``kfp`` engine (``targets[].settings`` of a target with ``engine: kfp``).

Imports only pydantic and :mod:`aiplane.core`, so validating a deployment never imports kfp.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from aiplane.core.config import SecretRef
from aiplane.core.kube import PodResources, Toleration

__all__ = ["KfpSettings", "Toleration"]

# The patterns kfp's PipelineTask applies; checked here so a typo fails when the deployment loads.
_RUN_URL_FIELDS = {"host", "namespace", "experiment_id", "run_id"}


class KfpSettings(PodResources):
    """How and where the ``kfp`` engine runs workloads as Kubeflow Pipelines v2 runs.

    ``mode: local`` runs the compiled pipeline with ``kfp.local`` on this machine
    (no cluster); ``mode: remote`` uploads it to a KFP / OpenShift AI Data Science
    Pipelines API server and runs it there. The pipeline task's service account,
    size, placement and volumes are :class:`~aiplane.core.kube.PodResources`.
    """

    mode: Literal["local", "remote"] = "local"
    host: str | None = None
    """Remote: the DSP / KFP API endpoint, e.g. ``https://ds-pipeline-dspa-aiplane.apps.example.com``."""
    namespace: str | None = None
    """Remote: the project (namespace) of the pipeline server; ``None`` for single-user KFP."""
    experiment: str = "aiplane"
    base_image: str | None = None
    """The image the pipeline task runs in: it must hold the installed ``aiplane`` (with ``kfp``).
    Required for remote; local mode runs this interpreter and only records it in the spec."""
    token: SecretRef | None = None
    """Bearer token by reference, ``{env: NAME}`` or ``{secret: NAME, key: KEY}``; read at call
    time, never stored, logged, returned or compiled into a spec."""
    token_path: str | None = None
    """Or a file holding the token, read at call time: a mounted service-account token."""
    verify_ssl: bool = True
    ca_cert: str | None = None
    """Path of a CA bundle for the API server's TLS certificate."""
    pipeline_root: str | None = None
    """Where task outputs go: remote, an object-store URI (default: the DSPA's bucket);
    local, a directory (default: ``<tmp>/aiplane-kfp``)."""
    results_dir: str | None = None
    """Remote: a directory shared by this process and the pipeline pods (a volume mounted at
    the same path in both, like the artifact store); the task writes the result records there."""
    run_params: tuple[str, ...] = ("document",)
    """Workload params that change every run (e.g. a factsheet ``document``): passed as run
    arguments instead of pipeline-parameter defaults, so they do not create pipeline versions."""
    run_url: str = "{host}/#/runs/details/{run_id}"
    """Link to a run; placeholders ``{host}``, ``{namespace}``, ``{experiment_id}``, ``{run_id}``."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    poll_interval_s: float = Field(default=2.0, gt=0)
    poll_max_interval_s: float = Field(default=30.0, gt=0)
    poll_backoff: float = Field(default=1.5, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    """Give up (and terminate the run) after this long; ``None`` waits as long as it takes."""
    python: str | None = None
    """Local: the interpreter that runs ``kfp.local``; defaults to the one running aiplane."""

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"host {v!r} must start with https:// (or http://)")
        return v.rstrip("/") if v else v

    @field_validator("run_url")
    @classmethod
    def _run_url(cls, v: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        unknown = fields - _RUN_URL_FIELDS
        if unknown:
            raise ValueError(
                f"run_url uses unknown placeholder(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(_RUN_URL_FIELDS))}"
            )
        return v

    @model_validator(mode="after")
    def _remote_needs(self) -> "KfpSettings":
        if self.token is not None and self.token_path is not None:
            raise ValueError("give the token one way: `token` (a secret reference) or `token_path` (a file), not both")
        if self.mode == "remote":
            missing = [k for k in ("host", "base_image", "results_dir") if not getattr(self, k)]
            if missing:
                raise ValueError(f"mode 'remote' needs {', '.join(missing)}")
        return self
