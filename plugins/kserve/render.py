"""The KServe objects an endpoint is: a ServingRuntime (vLLM) and an InferenceService, as plain dicts.

Pure functions of the target's settings and what is served, so the tests can
validate exactly what would be sent against the real CRDs. The runtime's flags
and environment come from :mod:`aiplane.core.serving`, the same place the
local ``vllm`` target takes them from.

The base model is the InferenceService's ``storageUri`` (mounted at
``/mnt/models``); each adapter version is one of ``storageUris``, mounted at
``/mnt/adapters/<digest>``, and named on vLLM's command line: the endpoint name
for the current one, ``<endpoint>@<digest>`` for those kept for rollback.

A whole model (an ``sft`` model, a full ``distill`` student) is served as its
own base model: it is the ``storageUri``, there are no ``storageUris`` and no
LoRA modules, and vLLM answers to the endpoint name (``--served-model-name``,
which overrides the runtime's ``base``). Its version entry says
``"full_model": true``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from aiplane.core.serving import POD_ENV, SERVER_MODULE, server_args
from aiplane.core.serving_cluster import MANAGED_BY
from aiplane.core.serving_rollout import (
    lora_names,
    object_metadata,
    pod_placement,
    pod_resources,
)

__all__ = ["ADAPTERS_DIR", "MODEL_DIR", "inference_service", "runtime_object"]

MODEL_DIR = "/mnt/models"
ADAPTERS_DIR = "/mnt/adapters"
_PORT = 8080


def runtime_object(name: str, namespace: str, settings: Any) -> dict[str, Any]:
    """The vLLM ServingRuntime: the image, vLLM's server with adapters on, the port KServe routes to."""
    args = server_args(MODEL_DIR, "base", port=_PORT, **settings.flags())
    # Not RUNTIME_LORA_ENV: the pods' adapters are the ones KServe mounted, and none can be loaded by request.
    env = [{"name": k, "value": v} for k, v in sorted(POD_ENV.items())]
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "opendatahub.io/dashboard": "true"},
            "annotations": {
                "openshift.io/display-name": "vLLM (aiplane)",
                "opendatahub.io/recommended-accelerators": json.dumps([settings.gpu_type]),
            },
        },
        "spec": {
            "supportedModelFormats": [{"name": "vLLM", "autoSelect": True}],
            "multiModel": False,
            "annotations": {"prometheus.io/port": str(_PORT), "prometheus.io/path": "/metrics"},
            "containers": [
                {
                    "name": "kserve-container",
                    "image": settings.image,
                    "command": ["python", "-m", SERVER_MODULE],
                    "args": args,
                    "env": env,
                    "ports": [{"containerPort": _PORT, "protocol": "TCP"}],
                }
            ],
        },
    }


def inference_service(
    name: str,
    namespace: str,
    settings: Any,
    runtime: str,
    base_uri: str,
    versions: Sequence[Mapping[str, Any]],
    canary_percent: int | None = None,
) -> dict[str, Any]:
    """The InferenceService serving ``versions`` (newest first, each ``{"digest", "uri"}``) of endpoint ``name``.

    The first version is what the endpoint name routes to. A whole model's version
    (``"full_model": True``) is the only one: ``base_uri`` is then its own URI.
    """
    metadata = object_metadata(name, namespace, "InferenceService", base_uri, versions,
                               **{"serving.kserve.io/deploymentMode": settings.deployment_mode})  # fmt: skip
    served = lora_names(name, versions)
    model: dict[str, Any] = {
        "modelFormat": {"name": "vLLM"},
        "runtime": runtime,
        "storageUri": base_uri,
        # A whole model answers to the endpoint's name (overriding the runtime's "base"), adapters to theirs.
        "args": ["--lora-modules", *(f"{n}={_mount(v['digest'])}" for n, v in served)] if served
        else ["--served-model-name", name],
        "resources": pod_resources(settings),
    }  # fmt: skip
    predictor: dict[str, Any] = {
        "minReplicas": settings.min_replicas,
        "maxReplicas": max(settings.min_replicas, settings.max_replicas),
        "model": model,
        **pod_placement(settings),
    }
    if served:
        predictor["storageUris"] = [{"uri": v["uri"], "mountPath": _mount(v["digest"])} for v in versions]
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}  # fmt: skip


def _mount(digest: str) -> str:
    return f"{ADAPTERS_DIR}/{digest.split(':')[-1][:12]}"
