"""The ``kserve`` plugin: serves an adapter with a KServe model server.

``kserve-local`` starts the server as a detached process on this machine and
re-deploys blue/green. The server speaks the KServe v2 protocol and an
OpenAI-style ``/v1/completions`` (what vLLM on OpenShift AI serves), so
:func:`complete` works against either.

Importing this module is cheap: kserve, torch and transformers load only in the
server process.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .client import complete
from .target import KServeLocal

__all__ = ["KServeLocal", "complete", "aiplane_serving_targets"]


@hookimpl
def aiplane_serving_targets() -> list[type[KServeLocal]]:
    """This plugin's serving targets."""
    return [KServeLocal]
