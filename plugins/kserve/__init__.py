"""The ``kserve`` plugin: serving on OpenShift AI, as a KServe InferenceService on a vLLM ServingRuntime.

The runtime's flags and environment are the local ``vllm`` target's
(:mod:`aiplane.plugins.vllm.runtime`), so what is served on a laptop is served
the same way on the cluster. Importing this module is cheap: the ``kubernetes``
client loads only when a deploy, a status check or a stop talks to a cluster.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .target import KServe

__all__ = ["KServe", "aiplane_serving_targets"]


@hookimpl
def aiplane_serving_targets() -> list[type[KServe]]:
    """This plugin's serving targets."""
    return [KServe]
