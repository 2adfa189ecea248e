"""The ``llmisvc`` plugin: serving on OpenShift AI 3 as a KServe LLMInferenceService (the llm-d path), with
static LoRA adapters by URI.

Beside the ``kserve`` plugin (an InferenceService on a vLLM ServingRuntime), not
a mode of it: the two objects share no field, no rollout (a Knative canary
against a Deployment rolled by KServe's LLM controller) and no status. What
every serving target on vLLM shares comes from :mod:`aiplane.core.serving`;
this plugin imports no other. Importing it is cheap: the ``kubernetes`` client
loads only when a deploy, a status check or a stop talks to a cluster.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .target import KServeLLM

__all__ = ["KServeLLM", "aiplane_serving_targets"]


@hookimpl
def aiplane_serving_targets() -> list[type[KServeLLM]]:
    """This plugin's serving targets."""
    return [KServeLLM]
