"""Typed, immutable records: the values that flow between assets.

Every record points at something (``uri``), pins its content (``digest``: a
``sha256:`` of the bytes, or ``iceberg-snapshot:`` for a table) and carries the
records it was made from in ``sources``. Lineage is those references: walking
``sources`` from a factsheet reaches the Iceberg snapshot and the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "Record",
    "BaseModelRecord",
    "FeaturesRecord",
    "AdapterRecord",
    "EndpointRecord",
    "FactsheetRecord",
    "PlacementDecision",
    "AnyRecord",
    "record_from_json",
    "record_to_json",
    "lineage",
]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlacementDecision(_Frozen):
    """Where a workload was placed and why; kept on the record it produced."""

    workload: str
    target: str
    engine: str
    region: str
    reason: str
    gpus: int = 0
    """GPUs the workload asked for; the engine reserves them on the target."""
    rejected: dict[str, str] = Field(default_factory=dict)
    """Every target that was not chosen, with the reason it was not."""


class Record(_Frozen):
    """Fields every record has."""

    kind: str
    uri: str
    digest: str
    sources: tuple["AnyRecord", ...] = ()
    created_at: str = Field(default_factory=_now)

    def source(self, kind: str) -> "AnyRecord":
        """The direct source of the given kind; raises ``LookupError`` if there is none."""
        for src in self.sources:
            if src.kind == kind:
                return src
        raise LookupError(f"{self.kind} record {self.uri!r} has no {kind!r} source")


class BaseModelRecord(Record):
    """The pretrained model an adapter starts from."""

    kind: Literal["base_model"] = "base_model"
    name: str
    architecture: str
    parameters: int


class FeaturesRecord(Record):
    """A training table pinned to one Iceberg snapshot."""

    kind: Literal["features"] = "features"
    table: str
    snapshot_id: int
    row_count: int
    columns: tuple[str, ...]
    residency: tuple[str, ...]
    """The residency tags present in the rows (e.g. ``("eu", "us")``)."""
    store: dict[str, Any] = Field(default_factory=dict)
    """Plugin name and settings of the feature store, so a workload can read it anywhere."""


class AdapterRecord(Record):
    """Trained weights in the content-addressed artifact store: an adapter on the base model (``lora``), or,
    where ``config["full_model"]`` is true, a whole model (``sft``, a full ``distill`` student) whose base
    model stays in ``sources`` for lineage."""

    kind: Literal["adapter_weights"] = "adapter_weights"
    method: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    run_id: str
    placement: PlacementDecision | None = None
    execution: dict[str, Any] = Field(default_factory=dict)
    """What the engine reported about the run: engine, target, job or run ids, workers, resource use."""


class EndpointRecord(Record):
    """A running model server."""

    kind: Literal["served_endpoint"] = "served_endpoint"
    url: str
    model_name: str
    protocols: tuple[str, ...]
    serving: str
    handle: dict[str, Any] = Field(default_factory=dict)
    """What the serving target needs to find and stop this server later."""
    placement: PlacementDecision | None = None
    execution: dict[str, Any] = Field(default_factory=dict)


class FactsheetRecord(Record):
    """A published factsheet: machine-readable JSON plus a human-readable page."""

    kind: Literal["factsheet"] = "factsheet"
    publisher: str
    page_uri: str


AnyRecord = Annotated[
    Union[BaseModelRecord, FeaturesRecord, AdapterRecord, EndpointRecord, FactsheetRecord],
    Field(discriminator="kind"),
]

for _cls in (Record, BaseModelRecord, FeaturesRecord, AdapterRecord, EndpointRecord, FactsheetRecord):
    _cls.model_rebuild()

_ADAPTER: TypeAdapter = TypeAdapter(AnyRecord)


def record_to_json(record: Record) -> dict[str, Any]:
    """A JSON-ready dict of the record, sources included."""
    return record.model_dump(mode="json")


def record_from_json(data: dict[str, Any] | str) -> AnyRecord:
    """Rebuild a record (of the right class, chosen by ``kind``) from JSON."""
    if isinstance(data, str):
        return _ADAPTER.validate_json(data)
    return _ADAPTER.validate_python(data)


def lineage(record: Record) -> Iterator[Record]:
    """Every record this one was made from, itself first, depth first, each once."""
    seen: set[tuple[str, str]] = set()
    stack = [record]
    while stack:
        rec = stack.pop()
        key = (rec.kind, rec.digest)
        if key in seen:
            continue
        seen.add(key)
        yield rec
        stack.extend(reversed(rec.sources))
