"""How aiplane names OpenLineage runs and datasets. Pure functions: no OpenLineage import.

Dataset names follow the OpenLineage naming conventions where one applies: a
file is namespace ``file`` and its absolute path, an object in a bucket is
``s3://bucket`` and its key, a served model is ``scheme://host:port`` and the
model name. Iceberg tables are ``iceberg://<catalog>`` and ``<namespace>.<table>``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

from aiplane.core.records import EndpointRecord, FeaturesRecord, Record

__all__ = ["run_uuid", "job_name", "dataset_name"]

_RUN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/aiplane/aiplane/openlineage/run")
_DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 80, "grpcs": 443}


def job_name(asset: str, region: str | None = None) -> str:
    """The OpenLineage job of materializing ``asset``; a region's partition is a job of its own (``features.eu``).

    Jobs, not only a run facet, because lineage servers draw their graphs by job:
    one job for all regions would join every region's datasets into one graph.
    """
    return asset if region is None else f"{asset}.{region}"


def run_uuid(run_id: str, job: str) -> str:
    """The OpenLineage run id (a UUID, as the spec requires) of job ``job`` (see :func:`job_name`) in run ``run_id``.

    Deterministic, so the START and the COMPLETE/FAIL events of one
    materialization carry the same id even when emitted by different processes.
    """
    return str(uuid.uuid5(_RUN_NAMESPACE, json.dumps([run_id, job])))


def dataset_name(record: Record) -> tuple[str, str]:
    """``(namespace, name)`` of the OpenLineage dataset a record stands for."""
    if isinstance(record, FeaturesRecord):
        return _iceberg_name(record)
    if isinstance(record, EndpointRecord):
        parts = urlsplit(record.url)
        if parts.scheme and parts.hostname:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"{parts.scheme}://{host}" + (f":{port}" if port else ""), record.model_name
    return _uri_name(record.uri)


def _iceberg_name(record: FeaturesRecord) -> tuple[str, str]:
    store: dict[str, Any] = record.store or {}
    given = store.get("settings")
    settings: dict[str, Any] = given if isinstance(given, dict) else {}
    parts = urlsplit(record.uri)
    if parts.scheme == "iceberg" and parts.netloc:
        catalog = parts.netloc
    else:
        catalog = store.get("catalog") or settings.get("catalog_name") or settings.get("catalog") or "default"
    table = record.table
    namespace = settings.get("namespace")
    if "." not in table and isinstance(namespace, str) and namespace:
        table = f"{namespace}.{table}"
    return f"iceberg://{catalog}", table


def _uri_name(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        # A plain path (or a Windows drive letter, which urlsplit takes for a scheme).
        return "file", parts.path if parts.scheme == "file" else uri
    if parts.netloc:
        return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"
    return parts.scheme, uri[len(parts.scheme) + 1 :]
