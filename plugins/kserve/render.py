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

from aiplane.core.serving import (
    ADAPTER_ANNOTATION, MANAGED_BY, POD_ENV, SERVER_MODULE, VERSIONS_ANNOTATION, server_args, served_versions, version_name,
)  # fmt: skip

__all__ = [
    "MANAGED_BY",
    "ADAPTER_ANNOTATION",
    "VERSIONS_ANNOTATION",
    "MODEL_DIR",
    "ADAPTERS_DIR",
    "runtime_object",
    "inference_service",
    "served_versions",
    "serves_full_model",
]

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
    if not versions:
        raise ValueError("an InferenceService serves at least one adapter version")
    full = bool(versions[0].get("full_model"))
    if full and (len(versions) != 1 or versions[0]["uri"] != base_uri):
        raise ValueError("an InferenceService serving a whole model serves it alone, from its own storageUri")
    if full:
        args = ["--served-model-name", name]
        storage_uris: list[dict[str, str]] = []
    else:
        lora_modules = [f"{name}={_mount(versions[0]['digest'])}"]
        lora_modules += [f"{version_name(name, v['digest'])}={_mount(v['digest'])}" for v in versions]
        args = ["--lora-modules", *lora_modules]
        storage_uris = [{"uri": v["uri"], "mountPath": _mount(v["digest"])} for v in versions]
    resources: dict[str, Any] = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if settings.gpus:
        resources["requests"][settings.gpu_type] = str(settings.gpus)
        resources["limits"][settings.gpu_type] = str(settings.gpus)
    predictor: dict[str, Any] = {
        "minReplicas": settings.min_replicas,
        "maxReplicas": max(settings.min_replicas, settings.max_replicas),
        "model": {
            "modelFormat": {"name": "vLLM"},
            "runtime": runtime,
            "storageUri": base_uri,
            "args": args,
            "resources": resources,
        },
    }
    if storage_uris:
        predictor["storageUris"] = storage_uris
    if settings.service_account:
        predictor["serviceAccountName"] = settings.service_account  # how the storage initializer gets its keys
    if settings.node_selector:
        predictor["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        predictor["tolerations"] = [t.manifest() for t in settings.tolerations]
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "opendatahub.io/dashboard": "true"},
            "annotations": {
                "serving.kserve.io/deploymentMode": settings.deployment_mode,
                "openshift.io/display-name": name,
                ADAPTER_ANNOTATION: versions[0]["digest"],
                VERSIONS_ANNOTATION: json.dumps([dict(v) for v in versions], separators=(",", ":")),
            },
        },
        "spec": {"predictor": predictor},
    }


def serves_full_model(isvc: Mapping[str, Any] | None) -> bool:
    """Whether an InferenceService aiplane rendered serves a whole model (not adapters on a base model)."""
    versions = served_versions(isvc)
    return bool(versions and versions[0].get("full_model"))


def _mount(digest: str) -> str:
    return f"{ADAPTERS_DIR}/{digest.split(':')[-1][:12]}"
