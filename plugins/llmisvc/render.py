"""The LLMInferenceService an endpoint is, as a plain dict (``serving.kserve.io/v1alpha2``).

A pure function of the target's settings and what is served, so the tests can
validate exactly what would be sent against the real CRD. Why ``v1alpha2``: it
is the CRD's storage version and the one with a schema (``v1alpha1`` is served
schemaless and converted), and it is the version OpenShift AI 3.4's
documentation writes; ``spec.model.lora`` with ``maxRank`` / ``maxAdapters``
is its shape.

The base model is ``spec.model.uri``, served as ``base``. Each adapter version
is an entry of ``spec.model.lora.adapters``, by URI: the newest under the
endpoint's name, and every version (the newest too) under its version name
``<endpoint>@<digest>``, so a rollback can address one. KServe's controller
downloads them and names them on vLLM's command line; none is loaded by
request. A whole model is ``spec.model.uri`` itself, served under the
endpoint's name, with no adapters.

The pod template names the ``main`` container (the one KServe's presets run
vLLM in) only for what aiplane decides: an image if pinned, resources, the
environment, and the service account whose Secret gives the storage
initializer the bucket's keys. vLLM flags beyond the adapters' go in
``VLLM_ADDITIONAL_ARGS``, which the presets append to ``vllm serve``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from aiplane.core.serving import ADAPTER_ANNOTATION, MANAGED_BY, POD_ENV, VERSIONS_ANNOTATION, version_name

__all__ = ["API_VERSION", "KIND", "PLURAL", "BASE_NAME", "llm_inference_service", "workload_name"]

API_VERSION = "serving.kserve.io/v1alpha2"
KIND = "LLMInferenceService"
PLURAL = "llminferenceservices"
BASE_NAME = "base"
"""What the base model answers to beside the adapters (the other vLLM targets' name for it too)."""


def llm_inference_service(
    name: str, namespace: str, settings: Any, base_uri: str, versions: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The LLMInferenceService serving ``versions`` (newest first, each ``{"digest", "uri"}``) of endpoint ``name``.

    The first version is what the endpoint name routes to. A whole model's version
    (``"full_model": True``) is the only one: ``base_uri`` is then its own URI.
    """
    if not versions:
        raise ValueError("an LLMInferenceService serves at least one version")
    full = bool(versions[0].get("full_model"))
    if full and (len(versions) != 1 or versions[0]["uri"] != base_uri):
        raise ValueError("an LLMInferenceService serving a whole model serves it alone, as its spec.model.uri")
    model: dict[str, Any] = {"uri": base_uri, "name": name if full else BASE_NAME}
    if not full:
        adapters = [{"name": name, "uri": versions[0]["uri"]}]
        adapters += [{"name": version_name(name, v["digest"]), "uri": v["uri"]} for v in versions]
        model["lora"] = {
            "adapters": adapters,
            "maxRank": settings.max_lora_rank,
            "maxAdapters": settings.max_loras,
            # Every configured name stays loaded: the endpoint's, and each version kept for rollback.
            "maxCpuAdapters": max(settings.max_loras, len(adapters)),
        }
    spec: dict[str, Any] = {
        "model": model,
        "replicas": settings.replicas,
        # The previous pods serve until the new ones are Ready; none is taken down first.
        "rolloutStrategy": {"maxUnavailable": 0, "maxSurge": 1},
        "template": _pod_template(settings),
        "router": {"route": {}, "gateway": {}, **({"scheduler": {}} if settings.scheduler else {})},
    }
    if settings.base_refs:
        spec["baseRefs"] = [{"name": ref} for ref in settings.base_refs]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**MANAGED_BY, "opendatahub.io/dashboard": "true"},
            "annotations": {
                "openshift.io/display-name": name,
                ADAPTER_ANNOTATION: versions[0]["digest"],
                VERSIONS_ANNOTATION: json.dumps([dict(v) for v in versions], separators=(",", ":")),
            },
        },
        "spec": spec,
    }


def _pod_template(settings: Any) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in sorted(POD_ENV.items())]
    flags = [*([f"--max-model-len={settings.max_model_len}"] if settings.max_model_len else []),
             *([f"--dtype={settings.dtype}"] if settings.dtype else []), *settings.extra_args]  # fmt: skip
    if flags:
        env.append({"name": "VLLM_ADDITIONAL_ARGS", "value": " ".join(flags)})
    resources: dict[str, Any] = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if settings.gpus:
        resources["requests"][settings.gpu_type] = str(settings.gpus)
        resources["limits"][settings.gpu_type] = str(settings.gpus)
    main: dict[str, Any] = {"name": "main", "env": env, "resources": resources}
    if settings.image:
        main["image"] = settings.image
    template: dict[str, Any] = {"containers": [main]}
    if settings.service_account:
        template["serviceAccountName"] = settings.service_account  # how the storage initializer gets its keys
    if settings.node_selector:
        template["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        template["tolerations"] = [t.manifest() for t in settings.tolerations]
    return template


def workload_name(name: str) -> str:
    """The Deployment KServe's controller runs an LLMInferenceService's vLLM pods in (single-node)."""
    return f"{name}-kserve"
