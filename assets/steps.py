"""The five assets' bodies, from base model to factsheet, and their run configs.

Each wraps its work in the aiplane lifecycle hooks and returns its lineage record
(see :mod:`.outputs`). In a region's partition each publishes only the rows that
region may process, places every workload on a target in the region with the
components the region sets, and serves ``<endpoint>-<region>``.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import dagster as dg

from aiplane.core.components import DEFAULT_ENDPOINT, FEATURE_COLUMNS, FactsheetPublisher, endpoint_name
from aiplane.core.errors import AiplaneError, GovernanceError, InputError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.governance import judge
from aiplane.core.placement import allows_region, normalize_tag
from aiplane.core.plugins import materialization
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, FactsheetRecord, FeaturesRecord
from aiplane.core.workload import cleanup_on_failure

from .checks import adapter_checks, feature_checks, residency_allows
from .outputs import adapter_of, made_by, output, placed, residency_of
from .resource import AiplaneResource
from .resource import _placed as _component_placed
from .sources import load_tickets
from .state import latest_record, records

__all__ = [
    "CONFIGS",
    "EndpointConfig",
    "FeaturesConfig",
    "TargetConfig",
    "adapter_weights",
    "base_model",
    "configured_name",
    "endpoint_name",
    "factsheet",
    "features",
    "region_table",
    "served_endpoint",
]

def base_model(context: dg.AssetExecutionContext, aiplane: AiplaneResource) -> dg.Output[BaseModelRecord]:
    d = aiplane.config
    with materialization(aiplane.registry.pm, "base_model", context.run.run_id, [], d) as m:
        record = aiplane.registry.resolve_base_model(d.base_model.uri, str(d.home), d.storage.s3)
        m["output"] = record
    context.log.info(f"base model {record.name} ({record.architecture}, {record.parameters:,} parameters) at {record.uri}")
    return output(record, name=record.name, architecture=record.architecture, parameters=record.parameters)


class FeaturesConfig(dg.Config):
    source: str = ""
    """JSON-lines file of tickets; empty means ``<home>/sources/tickets.jsonl`` (seeded with sample data if absent)."""
    table: str = "support_ticket_features"
    eval_fraction: float = 0.1


def _region(context: dg.AssetExecutionContext) -> str | None:
    """The region of a per-region partition's run; ``None`` unpartitioned."""
    return context.partition_key if context.has_partition_key else None


def region_table(table: str, region: str | None) -> str:
    """The feature table of ``region``'s partition: each region's rows in a table of their own."""
    return table if region is None else f"{table}_{region.replace('-', '_')}"


def configured_name(endpoint: str, region: str | None) -> str:
    """The ``EndpointConfig.name`` that :func:`endpoint_name` made ``endpoint`` of, in ``region``'s partition."""
    return endpoint if region is None else endpoint.removesuffix(f"-{region}")



def features(context: dg.AssetExecutionContext, config: FeaturesConfig, aiplane: AiplaneResource):
    import pyarrow as pa

    from aiplane.core.sample import to_features

    d = aiplane.config
    region = _region(context)
    store = aiplane.component("feature_store", region)
    table = region_table(config.table, region)
    source = Path(config.source) if config.source else d.home / "sources" / "tickets.jsonl"
    with materialization(aiplane.registry.pm, "features", context.run.run_id, [], d, region) as m:
        tickets = load_tickets(source, seed_if_missing=not config.source, log=context.log.info)
        every = to_features(tickets, config.eval_fraction)
        # A region's table holds only the rows it may process; a tag the policy lacks goes nowhere
        # (and fails residency_known below, which judges every row of the source).
        kept = every if region is None else [r for r in every if allows_region(r["residency"], d.residency, region)]
        if region is not None and every and not kept:
            raise InputError(_none_allowed(every, d.residency, region))
        columns = {c: pa.array([row[c] for row in kept], pa.string()) for c in FEATURE_COLUMNS}
        before = store.current(table)
        record: FeaturesRecord = store.publish(pa.table(columns), table)
        m["output"] = record
    changed = before is None or before.snapshot_id != record.snapshot_id
    context.log.info(
        f"features {record.table}: snapshot {record.snapshot_id} ({record.row_count} rows"
        + (f" of {len(every)}, those allowed in region {region}) " if region else ") ")
        + ("new snapshot" if changed else "unchanged: no new data, no new snapshot")
    )
    yield output(
        record,
        table=record.table,
        snapshot_id=record.snapshot_id,
        row_count=record.row_count,
        residency=", ".join(record.residency),
        new_snapshot=changed,
        source=str(source),
        region=region,
        **{"feature store": store.name},
    )
    published = store.read(record)
    yield from feature_checks(published, d.residency, pa.Table.from_pylist(every) if region else None)
    if region is not None:
        yield residency_allows(published, d.residency, region)


def _none_allowed(rows: list[dict], policy, region: str) -> str:
    """Why a region's partition has no rows although the source has some: the policy, not the data."""
    tags = sorted({normalize_tag(r["residency"]) for r in rows})
    allowed = sorted(tag for tag in policy if allows_region(tag, policy, region))
    policy_says = f"allows region {region!r} only for the tags {', '.join(allowed)}" if allowed else f"allows no tag in region {region!r}"
    return (
        f"Region {region!r} may process none of the source's {len(rows)} rows: they are tagged {', '.join(tags)}, "
        f"and the residency policy {policy_says}. Tag rows for this region, or allow one of their tags in "
        f"{region!r} under `residency:` in the deployment (or drop the region)."
    )


class TargetConfig(dg.Config):
    target: str = ""
    """Pin the workload to this deployment target (placement still checks it); empty: let placement choose."""


def _rollback(
    instance: dg.DagsterInstance, wanted: str, region: str | None = None
) -> tuple[AdapterRecord, dict[str, str | None]]:
    """The earlier adapter ``wanted`` names (a digest or its first 12+ hex digits), and what it replaces;
    for a region's partition, one trained for that region."""
    prefix = wanted.removeprefix("sha256:").lower()
    if len(prefix) < 12:
        raise InputError(f"rollback_to {wanted!r} is too short to name one adapter: give 12 or more hex digits of its digest.")
    trained = records(instance, "adapter_weights", partition=region)
    found = {r.digest: r for r in trained if isinstance(r, AdapterRecord) and r.digest.removeprefix("sha256:").startswith(prefix)}
    if len(found) != 1:
        known = ", ".join(dict.fromkeys(r.digest[7:19] for r in trained)) or "none"
        how = "names more than one adapter" if found else "names no adapter this instance has trained"
        here = f" for region {region}" if region else ""
        raise InputError(f"rollback_to {wanted!r} {how}{here}; adapters trained here{here} (newest first): {known}.")
    (adapter,) = found.values()
    current = latest_record(instance, "served_endpoint", region)
    served = adapter_of(current).digest if current is not None else None
    return adapter, {"to": adapter.digest, "from": served}


def adapter_weights(
    context: dg.AssetExecutionContext,
    config: TargetConfig,
    aiplane: AiplaneResource,
    base_model: BaseModelRecord,
    features: FeaturesRecord,
):
    d = aiplane.config
    region = _region(context)
    inputs = [base_model, features]
    with materialization(aiplane.registry.pm, "adapter_weights", context.run.run_id, inputs, d, region) as m:
        trainer, decision = aiplane.placed("trainer", "train-adapter", features.residency, config.target, region)
        trainer.validate(base_model)
        _prepare_serving(context, aiplane, base_model, features, region)
        result = aiplane.run(context, trainer.workload(base_model, features, d.artifact_root(decision.region)), decision)
        record = m["output"] = placed(result.outputs["adapter"], decision, result.engine)
    metrics = record.metrics
    first, last = metrics.get("train_loss_first"), metrics.get("train_loss_last")
    yield output(
        record,
        **made_by(d, decision, trainer=trainer.name),
        run_id=record.run_id,
        method=record.method,
        train_loss_first=first,
        train_loss_last=last,
        eval_loss=metrics.get("eval_loss"),
        eval_accuracy=metrics.get("eval_accuracy"),
        tokens_per_s=metrics.get("tokens_per_s"),
        steps=metrics.get("steps"),
    )
    yield from adapter_checks(record, d.governance)


def _prepare_serving(
    context: dg.AssetExecutionContext, aiplane: AiplaneResource, base_model: BaseModelRecord, features: FeaturesRecord,
    region: str | None,
) -> None:
    """Serve while training: when this run deploys what it trains, the serving target is told now, so it can start
    what the deploy needs meanwhile (:meth:`ServingTarget.prepare`). A hint: a problem is the deploy's to report."""
    run = context.run
    if run.step_keys_to_execute is not None and "served_endpoint" not in run.step_keys_to_execute:
        return
    if run.asset_selection is not None and dg.AssetKey("served_endpoint") not in run.asset_selection:
        return
    ops: Any = (run.run_config or {}).get("ops") or {}  # run config: plain JSON the run was launched with
    config = EndpointConfig(**((ops.get("served_endpoint") or {}).get("config") or {}))
    try:
        serving, _ = aiplane.placed("serving", "serve-endpoint", features.residency, config.target, region)
        serving.prepare(base_model, endpoint_name(config.name, region))
    except AiplaneError as exc:
        context.log.info(f"the serving target was not prepared while the adapter trains: {exc}")


class EndpointConfig(TargetConfig):
    name: str = DEFAULT_ENDPOINT
    """Endpoint name; the URL and the name clients use stay the same when the adapter behind it changes."""
    rollback_to: str = ""
    """Serve an earlier adapter instead of the latest: its digest, or 12 or more of its first hex digits
    (``aiplane rollback`` sets this). It stays served until adapter_weights changes."""


def served_endpoint(
    context: dg.AssetExecutionContext, config: EndpointConfig, aiplane: AiplaneResource, adapter_weights: AdapterRecord
) -> dg.Output[EndpointRecord]:
    d = aiplane.config
    region = _region(context)
    adapter, rollback = adapter_weights, None
    if config.rollback_to:
        adapter, rollback = _rollback(context.instance, config.rollback_to, region)
    with materialization(aiplane.registry.pm, "served_endpoint", context.run.run_id, [adapter], d, region) as m:
        # Judged again here, whatever launched this step: a run of this asset alone, from the UI or
        # a later `aiplane up`, must not promote an adapter the blocking check failed.
        verdict = judge(d.governance, build_factsheet(adapter))
        if not verdict.passed:
            raise GovernanceError(
                f"Adapter {adapter.digest} is not served: {verdict.summary()}. Whatever the endpoint "
                f"served before still serves. Retrain, or change `governance:` in {d.source or 'the deployment'}."
            )
        serving, decision = aiplane.placed("serving", "serve-endpoint", residency_of(adapter), config.target, region)
        name = endpoint_name(config.name, region)
        work = serving.workload(adapter, name)
        # aiplane's promise (ServingTarget.cleanup): what a failed or cancelled deploy started does not outlive it.
        with cleanup_on_failure(lambda: serving.cleanup(name), context.log.warning):
            result = aiplane.run(context, work, decision)
        execution = {**result.engine, **({"rollback": rollback} if rollback else {})}
        record = m["output"] = placed(result.outputs["endpoint"], decision, execution)
    context.log.info(
        f"endpoint {record.model_name} serving at {record.url}"
        + (f" (rolled back from adapter {rollback['from']} to {rollback['to']})" if rollback else "")
    )
    return output(
        record,
        **made_by(d, decision, **{"serving target": serving.name}),
        url=dg.MetadataValue.url(record.url),
        model_name=record.model_name,
    )


def _publish(
    context: dg.AssetExecutionContext, aiplane: AiplaneResource, publisher: FactsheetPublisher, decision: Any,
    endpoint: EndpointRecord, document: Mapping[str, Any],
) -> FactsheetRecord:
    """One publisher's publish; when it fails or is cancelled, the publisher's cleanup runs before the error goes on."""
    with cleanup_on_failure(lambda: publisher.cleanup(endpoint), context.log.warning):
        result = aiplane.run(context, publisher.workload(endpoint, document), decision)
    return cast(FactsheetRecord, result.outputs["factsheet"])


def factsheet(
    context: dg.AssetExecutionContext, config: TargetConfig, aiplane: AiplaneResource, served_endpoint: EndpointRecord
) -> dg.Output[FactsheetRecord]:
    d = aiplane.config
    region = _region(context)
    with materialization(aiplane.registry.pm, "factsheet", context.run.run_id, [served_endpoint], d, region) as m:
        # The factsheet describes a model trained on these rows: their residency holds for it too.
        publisher, decision = aiplane.placed("factsheet", "publish-factsheet", residency_of(served_endpoint), config.target, region)
        document = build_factsheet(
            served_endpoint,
            extra={
                "deployment": d.name,
                **({"region": region} if region else {}),
                "dagster_run_id": context.run.run_id,
                "publish_placement": decision.model_dump(mode="json"),
                # The gate the served adapter passed, with the values it was judged on.
                "governance": {
                    "policy": d.governance.model_dump(mode="json"),
                    **judge(d.governance, build_factsheet(adapter_of(served_endpoint))).to_json(),
                },
            },
        )
        # Every publisher is placed before the first publishes: one that cannot be fails before any side effect.
        beside = [
            _component_placed(d.model_copy(update={"factsheet": spec, "regions": {}}), aiplane.registry, "factsheet",
                              "publish-factsheet", residency_of(served_endpoint), "", region)
            for spec in d.also_publish
        ]  # fmt: skip
        record = m["output"] = _publish(context, aiplane, publisher, decision, served_endpoint, document)
        published = [record]
        for other, where in beside:
            # Each is told where those before it published (the model registry records the factsheet's location).
            told = {**document, "extra": {**document["extra"], "factsheets": [_location(r) for r in published]}}
            published.append(_publish(context, aiplane, other, where, served_endpoint, told))
    for sheet in published:
        context.log.info(f"{sheet.publisher}: factsheet at {sheet.uri} (page {sheet.page_uri})")
    return output(
        record,
        **made_by(d, decision, publisher=publisher.name),
        path=dg.MetadataValue.path(record.uri),
        page=dg.MetadataValue.path(record.page_uri),
        also_published=dg.MetadataValue.json([_location(r) for r in published[1:]]) if beside else None,
    )


def _location(record: FactsheetRecord) -> dict[str, str]:
    return {"publisher": record.publisher, "uri": record.uri, "page_uri": record.page_uri, "digest": record.digest}


CONFIGS: dict[str, type[dg.Config]] = {
    "features": FeaturesConfig,
    "adapter_weights": TargetConfig,
    "served_endpoint": EndpointConfig,
    "factsheet": TargetConfig,
}
