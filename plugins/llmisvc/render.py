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

from collections.abc import Mapping, Sequence
from typing import Any

from aiplane.core.serving import POD_ENV
from aiplane.core.serving_rollout import (
    lora_names,
    object_metadata,
    pod_placement,
    pod_resources,
)

__all__ = ["API_VERSION", "BASE_NAME", "KIND", "PLURAL", "llm_inference_service", "workload_name"]

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
    metadata = object_metadata(name, namespace, KIND, base_uri, versions)
    served = lora_names(name, versions)
    model: dict[str, Any] = {"uri": base_uri, "name": BASE_NAME if served else name}
    if served:
        model["lora"] = {
            "adapters": [{"name": n, "uri": v["uri"]} for n, v in served],
            "maxRank": settings.max_lora_rank,
            "maxAdapters": settings.max_loras,
            # Every configured name stays loaded: the endpoint's, and each version kept for rollback.
            "maxCpuAdapters": max(settings.max_loras, len(served)),
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
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def _pod_template(settings: Any) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in sorted(POD_ENV.items())]
    flags = [*([f"--max-model-len={settings.max_model_len}"] if settings.max_model_len else []),
             *([f"--dtype={settings.dtype}"] if settings.dtype else []), *settings.extra_args]  # fmt: skip
    if flags:
        env.append({"name": "VLLM_ADDITIONAL_ARGS", "value": " ".join(flags)})
    main: dict[str, Any] = {"name": "main", "env": env, "resources": pod_resources(settings)}
    if settings.image:
        main["image"] = settings.image
    return {"containers": [main], **pod_placement(settings)}


def workload_name(name: str) -> str:
    """The Deployment KServe's controller runs an LLMInferenceService's vLLM pods in (single-node)."""
    return f"{name}-kserve"
