"""The ``k8s`` plugin: the ``k8s-job`` engine, each workload a Kubernetes Job created through dagster-k8s.

Importing this module imports neither kubernetes nor dagster-k8s; the engine imports them when it runs.
"""

from aiplane.core.hookspecs import hookimpl

__all__ = ["aiplane_engines"]


@hookimpl
def aiplane_engines():
    from .engine import K8sJobEngine

    return [K8sJobEngine]
