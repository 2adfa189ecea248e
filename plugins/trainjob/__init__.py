"""The ``trainjob`` plugin: the ``trainjob`` engine, each workload a Kubeflow Trainer v2 TrainJob.

Importing this module imports neither kubernetes nor kubeflow_trainer_api; the engine imports them when it runs.
"""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_engines"]


@hookimpl
def aiplane_engines():
    from .engine import TrainJobEngine

    return [TrainJobEngine]
