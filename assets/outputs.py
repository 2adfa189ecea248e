"""What an asset hands Dagster: its record as an output versioned by the record's digest, with its lineage,
placement and key metrics as metadata; and what a record's lineage says (its adapter, its residency)."""

from typing import Any

import dagster as dg

from aiplane.core.config import Deployment
from aiplane.core.errors import InputError
from aiplane.core.records import AdapterRecord, FeaturesRecord, Record, lineage, record_to_json

__all__ = ["output", "made_by", "placed", "adapter_of", "residency_of"]


def _metadata(record: Record, **extra: Any) -> dict[str, Any]:
    chain = [f"{r.kind}: {r.digest}" for r in lineage(record)]
    meta: dict[str, Any] = {
        "uri": record.uri,
        "digest": record.digest,
        "lineage": dg.MetadataValue.json(chain),
        "record": dg.MetadataValue.json(record_to_json(record)),
    }
    placement = getattr(record, "placement", None)
    if placement is not None:
        meta["placement_target"] = placement.target
        meta["placement_reason"] = placement.reason
        meta["placement"] = dg.MetadataValue.json(placement.model_dump(mode="json"))
    execution = getattr(record, "execution", None)
    if execution:
        meta["execution"] = dg.MetadataValue.json(execution)
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def made_by(deployment: Deployment, decision, **component: str) -> dict[str, str]:
    """Top-level metadata naming the plugins that did the work: the component, and the engine of the target it ran on."""
    return {**component, "engine": deployment.target(decision.target).engine}


def output(record: Record, **extra: Any) -> dg.Output:
    return dg.Output(record, data_version=dg.DataVersion(record.digest), metadata=_metadata(record, **extra))


def placed(record, decision, execution: dict):
    """The record with where it was made and what the engine reported, for lineage and the factsheet."""
    return record.model_copy(update={"placement": decision, "execution": execution})


def adapter_of(record: Record) -> AdapterRecord:
    adapter = next((r for r in lineage(record) if isinstance(r, AdapterRecord)), None)
    if adapter is None:
        raise InputError(f"{record.kind} {record.uri!r} records no adapter in its lineage")
    return adapter


def residency_of(record: Record) -> tuple[str, ...]:
    """Residency travels with lineage: a model trained on EU rows is EU data too."""
    tags: set[str] = set()
    for r in lineage(record):
        if isinstance(r, FeaturesRecord):
            tags.update(r.residency)
    return tuple(sorted(tags))
