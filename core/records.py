"""Typed, immutable records: the values that flow between assets.

Every record points at something (``uri``), pins its content (``digest``: a
``sha256:`` of the bytes, or ``iceberg-snapshot:`` for a table) and carries the
records it was made from in ``sources``. Lineage is those references: walking
``sources`` from a factsheet reaches the Iceberg snapshot and the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias


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
    "Handle",
    "OPENAI_COMPLETIONS",
    "OPENAI_CHAT_COMPLETIONS",
    "record_from_json",
    "record_to_json",
    "lineage",
]


OPENAI_COMPLETIONS = "openai-completions"
"""In :attr:`EndpointRecord.protocols`: the URL answers OpenAI's ``POST /v1/completions`` for ``model_name``.
``aiplane up`` asks such an endpoint for one sample completion, and only such an endpoint."""
OPENAI_CHAT_COMPLETIONS = "openai-chat-completions"
"""In :attr:`EndpointRecord.protocols`: the URL answers OpenAI's ``POST /v1/chat/completions`` for ``model_name``."""

_Scalar: TypeAlias = str | bool | int | float | None
Handle: TypeAlias = dict[str, _Scalar | list[_Scalar]]
"""An endpoint's :attr:`EndpointRecord.handle`: JSON scalars (or lists of them) by name. Dagster shows it in
the asset's metadata and it is stored with every materialization, so it must never hold a secret's value;
name a secret (an environment variable, a Kubernetes Secret) instead."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


class _Executed(Record):
    """Where the workload that made a record ran: :class:`AdapterRecord`'s and :class:`EndpointRecord`'s."""

    placement: PlacementDecision | None = None
    """Set by aiplane from the placement decision; a plugin leaves it out."""
    execution: dict[str, Any] = Field(default_factory=dict)
    """What the engine reported about the run: engine, target, job or run ids, workers, resource use."""


class AdapterRecord(_Executed):
    """Trained weights in the content-addressed artifact store: an adapter on the base model (``lora``), or,
    where ``config["full_model"]`` is true, a whole model (``sft``, a full ``distill`` student) whose base
    model stays in ``sources`` for lineage."""

    kind: Literal["adapter_weights"] = "adapter_weights"
    method: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    run_id: str


class EndpointRecord(_Executed):
    """A served model, as a serving target's deploy workload returns it under the ``endpoint`` output.

    The target sets every field but ``placement``/``execution``/``created_at``: ``uri`` (where the endpoint
    is, e.g. ``kserve://ns/name``), ``digest`` (changes whenever what is served or where does, so
    downstream assets re-run), ``sources`` (the served :class:`AdapterRecord`, for lineage).
    """

    kind: Literal["served_endpoint"] = "served_endpoint"
    url: str
    """The base URL clients call (``http://host:port``); kept across re-deploys of one endpoint name."""
    model_name: str
    """The model name clients send; the endpoint name aiplane deployed."""
    protocols: tuple[str, ...]
    """What ``url`` answers: :data:`OPENAI_COMPLETIONS`, :data:`OPENAI_CHAT_COMPLETIONS`, or a target's own names."""
    serving: str
    """The serving target's ``name``: ``aiplane stop`` and ``up`` make the target again from it and the deployment."""
    handle: Handle = Field(default_factory=dict)
    """All the target's ``running()``/``stop()`` get back, in the orchestrator, to find this server (see :data:`Handle`)."""


class FactsheetRecord(Record):
    """A published factsheet, as a publisher's workload returns it under the ``factsheet`` output.

    ``uri`` holds the factsheet document as given (JSON, with its ``"lineage"`` list); ``digest`` pins its bytes.
    """

    kind: Literal["factsheet"] = "factsheet"
    publisher: str
    """The publisher's ``name``."""
    page_uri: str
    """A human-readable page of the same factsheet (HTML), or ``uri`` again if the publisher makes none."""


AnyRecord = Annotated[
    BaseModelRecord | FeaturesRecord | AdapterRecord | EndpointRecord | FactsheetRecord,
    Field(discriminator="kind"),
]

for _cls in (Record, _Executed, BaseModelRecord, FeaturesRecord, AdapterRecord, EndpointRecord, FactsheetRecord):
    _cls.model_rebuild()

_ADAPTER: TypeAdapter[AnyRecord] = TypeAdapter(AnyRecord)


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
