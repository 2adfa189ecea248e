"""The factsheet publisher contract: a workload whose ``factsheet`` record names a document with the lineage, the same
document published twice gives the same digest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.components import FactsheetPublisher
from aiplane.core.errors import AiplaneError
from aiplane.core.records import FactsheetRecord
from aiplane.core.storage import Storage
from aiplane.core.workload import Workload

from ._common import Broken, check_check, check_settings, run_workload
from .fixtures import sample_document, sample_endpoint

__all__ = ["check_factsheet_publisher"]


def check_factsheet_publisher(
    cls: type[FactsheetPublisher[Any]], settings: Mapping[str, Any] | None, tmp_path: Path, engine: Any = None
) -> None:
    """Drive publisher ``cls`` through the contract; raise ConformanceError naming the broken promise.

    Its workloads run in a ``python -m aiplane.core.worker`` process, or on ``engine`` (an Engine instance) if given.
    Where it publishes must be readable here (a local path or ``file://``) for the document to be checked.
    """
    publisher = check_settings(cls, FactsheetPublisher, "factsheet publisher", settings)
    broken = Broken("factsheet publisher", cls.name)
    check_check(publisher, broken, tmp_path, "factsheet", settings)
    endpoint = sample_endpoint(tmp_path)
    document = sample_document(endpoint)
    try:
        publisher.workload(endpoint, "not a document")  # type: ignore[arg-type]  # the wrong type is the point
    except AiplaneError:
        pass
    else:
        raise broken("workload() took a document that is not a mapping (call aiplane.core.factsheet.publishable)")
    first = _publish(publisher, broken, endpoint, document, engine)
    again = _publish(publisher, broken, endpoint, document, engine)
    broken.require(
        (again.uri, again.digest) == (first.uri, first.digest),
        f"publish of the same document twice must give the same digest and uri; got {first.digest} then {again.digest}",
    )
    stored = json.loads(Storage(None).read_bytes(first.uri))
    broken.require(isinstance(stored, dict) and isinstance(stored.get("lineage"), list),
                   f"the document at record.uri ({first.uri}) has no 'lineage' list; `aiplane up` prints it from there")  # fmt: skip
    broken.require(stored.get("lineage") == document["lineage"], "the published document's lineage is not the one given")


def _publish(publisher: Any, broken: Broken, endpoint: Any, document: Mapping[str, Any], engine: Any) -> FactsheetRecord:
    work = publisher.workload(endpoint, document)
    broken.require(isinstance(work, Workload), f"workload() must return a Workload, not {type(work).__name__}")
    result = run_workload(work, engine)
    record = result.outputs.get("factsheet")
    broken.require(isinstance(record, FactsheetRecord), f"workload() result has no 'factsheet' FactsheetRecord: {sorted(result.outputs)}")
    assert isinstance(record, FactsheetRecord)
    broken.require(
        record.publisher == publisher.name,
        f"record.publisher is {record.publisher!r}, not the component's name {publisher.name!r}",
    )
    broken.require(any(s.digest == endpoint.digest for s in record.sources), "record.sources lacks the endpoint it was published for")
    broken.require(record.page_uri, "record.page_uri is empty: name the human-readable page")
    return record
