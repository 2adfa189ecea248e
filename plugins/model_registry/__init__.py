"""The ``model_registry`` plugin: the ``model-registry`` publisher, into the Kubeflow Model Registry.

Every served adapter (and whole model) becomes a model version of a registered
model named after its endpoint: the artifact's ``s3://`` URI and format, and its
lineage as custom properties, which OpenShift AI's dashboard shows and deploys
from. It publishes beside the factsheet publishers (``also_publish:`` in a
deployment). Importing this module imports neither the registry's client nor
anything heavy; the workload does, when it runs.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .publisher import ModelRegistryPublisher

__all__ = ["ModelRegistryPublisher", "aiplane_factsheet_publishers"]


@hookimpl
def aiplane_factsheet_publishers() -> list[type[ModelRegistryPublisher]]:
    """Provide the ``model-registry`` publisher."""
    return [ModelRegistryPublisher]
