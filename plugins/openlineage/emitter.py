"""Build OpenLineage run events from aiplane records and send them with ``openlineage-python``.

Imported only when a lifecycle hook fires, so the OpenLineage client (and
``requests``) load only where lineage is emitted.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import DatasetFacet, RunFacet, dataset_version_dataset, error_message_run, job_type_job
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import HttpConfig, HttpTransport
from openlineage.client.transport.transport import Transport
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiplane.core.config import Deployment, SecretRef
from aiplane.core.errors import ConfigError, validation_problems
from aiplane.core.records import Record

from .naming import dataset_name, job_name, run_uuid

__all__ = ["emit_safely", "build_event", "ObserverSettings", "HttpSettings", "PRODUCER"]

log = logging.getLogger("aiplane.plugins.openlineage")

PRODUCER = "https://github.com/aiplane/aiplane/tree/main/plugins/openlineage"
"""The ``producer`` of every event and facet aiplane emits."""
_SCHEMA = "https://github.com/aiplane/aiplane/blob/main/plugins/openlineage/facets.json#/$defs/"


class HttpSettings(BaseModel):
    """Send events to a lineage server (Marquez, watsonx.data, ...) over HTTP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    endpoint: str = "api/v1/lineage"
    api_key: SecretRef | None = None
    """Sent as ``Authorization: Bearer <key>``; a reference (``{env: NAME}``), never the key itself."""
    timeout_s: float = Field(default=5.0, gt=0)
    retries: int = Field(default=2, ge=0)
    verify: bool = True


class ObserverSettings(BaseModel):
    """``deployment.observers["openlineage"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "aiplane"
    path: str | None = None
    """The JSON-lines file events are appended to; default ``<home>/lineage/events.jsonl``."""
    http: HttpSettings | None = None
    """When set, events go to this server instead of the file."""


@attr.define
class AiplaneRecordDatasetFacet(DatasetFacet):
    """Which aiplane record a dataset stands for."""

    kind: str
    uri: str

    @staticmethod
    def _get_schema() -> str:
        return _SCHEMA + "AiplaneRecordDatasetFacet"


@attr.define
class AiplaneRunFacet(RunFacet):
    """The aiplane run behind an OpenLineage run (the Dagster run id under Dagster)."""

    runId: str  # noqa: N815 (OpenLineage facets are camelCase)
    asset: str
    deployment: str
    region: str | None = None
    """The region partition materialized; absent for an unpartitioned asset."""

    _additional_skip_redact: ClassVar[list[str]] = ["runId", "asset", "deployment", "region"]

    @staticmethod
    def _get_schema() -> str:
        return _SCHEMA + "AiplaneRunFacet"


def emit_safely(
    state: str,
    *,
    asset: str,
    run_id: str,
    inputs: Sequence[Record],
    deployment: Deployment,
    region: str | None = None,
    output: Record | None = None,
    error: BaseException | None = None,
) -> None:
    """Emit one run event; log a warning instead of raising, so lineage never fails a materialization."""
    try:
        settings = _settings(deployment)
        event = build_event(
            state, asset=asset, run_id=run_id, inputs=inputs, namespace=settings.namespace,
            deployment=deployment.name, region=region, output=output, error=error,
        )
        transport = _transport(settings, deployment)
        try:
            OpenLineageClient(transport=transport).emit(event)
        finally:
            transport.close()
    except Exception as exc:  # an observer must not break what it observes
        log.warning(
            "OpenLineage %s event for asset %r (run %s) was not emitted: %s: %s",
            state, asset, run_id, type(exc).__name__, exc,
        )


def build_event(
    state: str,
    *,
    asset: str,
    run_id: str,
    inputs: Sequence[Record],
    namespace: str,
    deployment: str,
    region: str | None = None,
    output: Record | None = None,
    error: BaseException | None = None,
) -> RunEvent:
    """The OpenLineage ``RunEvent`` of one materialization state change (START, COMPLETE or FAIL)."""
    run_facets: dict[str, RunFacet] = {
        "aiplane_run": AiplaneRunFacet(
            runId=run_id, asset=asset, deployment=deployment, region=region, producer=PRODUCER
        )
    }
    if error is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=f"{type(error).__name__}: {error}",
            programmingLanguage="python",
            stackTrace="".join(traceback.format_exception(error)),
            producer=PRODUCER,
        )
    return RunEvent(
        eventType=RunState[state],
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=run_uuid(run_id, job_name(asset, region)), facets=run_facets),
        job=Job(
            namespace=namespace,
            name=job_name(asset, region),
            facets={
                "jobType": job_type_job.JobTypeJobFacet(
                    processingType="BATCH", integration="AIPLANE", jobType="ASSET", producer=PRODUCER
                )
            },
        ),
        inputs=[InputDataset(*dataset_name(r), facets=_dataset_facets(r)) for r in inputs],
        outputs=[OutputDataset(*dataset_name(output), facets=_dataset_facets(output))] if output is not None else [],
        producer=PRODUCER,
    )


def _dataset_facets(record: Record) -> dict[str, DatasetFacet]:
    return {
        "version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=record.digest, producer=PRODUCER),
        "aiplane_record": AiplaneRecordDatasetFacet(kind=record.kind, uri=record.uri, producer=PRODUCER),
    }


def _settings(deployment: Deployment) -> ObserverSettings:
    raw: Any = deployment.observers.get("openlineage", {})
    try:
        return ObserverSettings.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(validation_problems(exc, ObserverSettings, key_word="setting"))
        raise ConfigError(
            f"observers.openlineage in {deployment.source or deployment.name}: {problems}"
        ) from None


def _transport(settings: ObserverSettings, deployment: Deployment) -> Transport:
    if settings.http is not None:
        http = settings.http
        config: dict[str, Any] = {
            "url": http.url,
            "endpoint": http.endpoint,
            "timeout": http.timeout_s,
            "verify": http.verify,
            "retry": {"total": http.retries, "connect": http.retries, "read": http.retries},
        }
        if http.api_key is not None:
            # Resolved now, at use; it lives only in the transport's token provider, which never logs it.
            config["auth"] = {"type": "api_key", "apiKey": http.api_key.resolve()}
        return HttpTransport(HttpConfig.from_dict(config))
    path = settings.path or str(deployment.home / "lineage" / "events.jsonl")
    if "://" not in path:  # a remote URL (s3://...) goes through fsspec, which makes its own folders
        path = str(Path(path).expanduser())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # append=True: one JSON document per line, opened, written and closed (flushed) per event.
    return FileTransport(FileConfig(log_file_path=path, append=True))
