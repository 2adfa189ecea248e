"""The ``iceberg`` plugin: feature stores on Apache Iceberg.

``iceberg``: tables in a SQL catalog (SQLite, PostgreSQL) or any Iceberg REST
catalog, table files on local disk or S3. ``watsonx-data``: the same on an IBM
watsonx.data instance, IBM-authenticated.

Importing this module does not import pyiceberg or pyarrow; the store imports them when used.
"""

from __future__ import annotations

from aiplane.core.hookspecs import hookimpl

from .store import IcebergFeatureStore
from .watsonx_data import WatsonxDataFeatureStore

__all__ = ["IcebergFeatureStore", "WatsonxDataFeatureStore", "aiplane_feature_stores"]


@hookimpl
def aiplane_feature_stores() -> list[type[IcebergFeatureStore]]:
    """Provide the ``iceberg`` and ``watsonx-data`` feature stores."""
    return [IcebergFeatureStore, WatsonxDataFeatureStore]
