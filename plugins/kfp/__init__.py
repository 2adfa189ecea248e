"""The ``kfp`` plugin: the Kubeflow Pipelines v2 engine (remote DSP server, or offline ``kfp.local``).

Importing this module does not import kfp; the engine imports it when it compiles or runs.
"""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_engines"]


@hookimpl
def aiplane_engines():
    from .engine import KfpEngine

    return [KfpEngine]
