"""The ``vllm`` plugin: serving on vLLM, on this machine (the ``vllm`` target).

The server's flags and environment live in :mod:`.runtime`, where the
``kserve`` target takes them from too, so an adapter is served the same way
locally and on OpenShift AI. Importing this module is cheap: vLLM runs in its
own environment (:func:`.runtime.ensure_vllm`), never in aiplane's.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .client import complete
from .target import VllmLocal

__all__ = ["VllmLocal", "aiplane_serving_targets", "complete"]


@hookimpl
def aiplane_serving_targets() -> list[type[VllmLocal]]:
    """This plugin's serving targets."""
    return [VllmLocal]
