"""The ``iceberg`` plugin: the ``iceberg`` feature store (Apache Iceberg tables in a SQL catalog).

Importing this module does not import pyiceberg or pyarrow; the store imports them when used.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .store import IcebergFeatureStore

__all__ = ["IcebergFeatureStore", "aiplane_feature_stores"]


@hookimpl
def aiplane_feature_stores() -> list[type[IcebergFeatureStore]]:
    """Provide the ``iceberg`` feature store."""
    return [IcebergFeatureStore]
