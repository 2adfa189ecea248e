"""The Dagster code location: five assets from base model to factsheet.

Each asset wraps its work in the aiplane lifecycle hooks, records its lineage
record, placement decision and key metrics as metadata, and sets its data
version from the record's digest, so downstream assets re-run only when what
they read really changed.

A deployment with ``regions`` gets the same assets partitioned by region (all
but ``base_model``): partition ``eu`` publishes only the rows whose residency
allows ``eu``, places every workload on a target in ``eu`` with the components
``eu`` sets, and serves ``<endpoint>-eu``. A region without a qualifying target
fails its own partition, before any side effect; the others go on.
"""


import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.config import Deployment
from aiplane.core.errors import AiplaneError, GovernanceError, InputError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.governance import judge
from aiplane.core.placement import allows_region, normalize_tag, unknown_tags
from aiplane.core.plugins import DEPLOYMENT_KINDS, Registry, materialization, notify_error
from aiplane.core.records import (
    AdapterRecord,
    BaseModelRecord,
    EndpointRecord,
    FactsheetRecord,
    FeaturesRecord,
    Record,
    lineage,
    record_to_json,
)

from .resource import AiplaneResource
from .resource import _placed as _component_placed
from .sources import load_tickets
from .state import ORPHAN_NOTIFIED_TAG, RecordIOManager, latest_record, records, step_region, unfinished_steps

__all__ = [
    "defs",
    "ASSETS",
    "PARTITIONED",
    "build_assets",
    "build_definitions",
    "code_version",
    "features_refresh_schedule",
    "on_change",
    "region_table",
]

GROUP = "aiplane"

MADE_BY = {"features": "feature_store", "adapter_weights": "trainer", "served_endpoint": "serving", "factsheet": "factsheet"}
"""The deployment key whose component makes each asset; ``base_model`` is resolved from ``base_model.uri``."""


def on_change() -> dg.AutomationCondition:
    """Run when this asset's settings changed (a new code version), an upstream *data version* changed,
    an upstream asset is requested in the same tick, or this asset went missing.

    ``eager()`` reacts to every upstream materialization; a features refresh that
    found no new data still materializes, with the same data version, and must
    not retrain. What is downstream of a requested asset is requested with it,
    so one tick asks for exactly what ``aiplane up`` redoes. Failed blocking
    checks upstream hold everything back.
    """
    changed_upstream = dg.AutomationCondition.data_version_changed() | dg.AutomationCondition.will_be_requested()
    return (
        (
            dg.AutomationCondition.newly_missing()
            | dg.AutomationCondition.code_version_changed()
            | dg.AutomationCondition.any_deps_match(changed_upstream)
        ).since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("settings or upstream data version changed")


def code_version(deployment: Deployment, asset: str, config: Mapping | None = None, regions: Sequence[str] = ()) -> str:
    """The asset's Dagster code version: what shapes it besides its inputs, digested.

    That is its component's spec (every region's, when partitioned: a code version
    is one per asset), aiplane's version, and the run config values that differ from
    the defaults (a pinned target). Dagster then calls an asset whose settings
    changed stale ("has a new code version"), and the automation requests it. The
    version reads ``<deployment key> <component> <digest>``, so the UI says which settings.
    """
    from aiplane.core import __version__

    key = MADE_BY.get(asset)
    if key is None:
        spec = {"base_model": deployment.base_model.model_dump(mode="json")}
        names = [deployment.base_model.uri]
    else:
        specs = {r or "": deployment.spec(key, r) for r in (None, *regions)}
        spec = {r: s.model_dump(mode="json") for r, s in specs.items()}
        if key == "factsheet" and deployment.also_publish:
            spec["also_publish"] = [s.model_dump(mode="json") for s in deployment.also_publish]
        names = sorted({s.name for s in specs.values()})
    # A rollback is not a settings change: the rolled-back adapter stays served until adapter_weights changes.
    defaults = _CONFIGS[asset]().model_dump() if asset in _CONFIGS else {}
    given = {k: v for k, v in (config or {}).items() if k != "rollback_to" and defaults.get(k) != v}
    canonical = json.dumps({"aiplane": __version__, "spec": spec, "config": given}, sort_keys=True, default=str)
    return f"{key or 'base_model'} {'+'.join(names)} {hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


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


def _made_by(deployment: Deployment, decision, **component: str) -> dict[str, str]:
    """Top-level metadata naming the plugins that did the work: the component, and the engine of the target it ran on."""
    return {**component, "engine": deployment.target(decision.target).engine}


def _output(record: Record, **extra: Any) -> dg.Output:
    return dg.Output(record, data_version=dg.DataVersion(record.digest), metadata=_metadata(record, **extra))


def base_model(context: dg.AssetExecutionContext, aiplane: AiplaneResource) -> dg.Output[BaseModelRecord]:
    d = aiplane.config
    with materialization(aiplane.registry.pm, "base_model", context.run.run_id, [], d) as m:
        record = aiplane.registry.resolve_base_model(d.base_model.uri, str(d.home), d.storage.s3)
        m["output"] = record
    context.log.info(f"base model {record.name} ({record.architecture}, {record.parameters:,} parameters) at {record.uri}")
    return _output(record, name=record.name, architecture=record.architecture, parameters=record.parameters)


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


def endpoint_name(name: str, region: str | None) -> str:
    """The endpoint a region's partition serves: one per region, so each serves its own adapter."""
    return name if region is None else f"{name}-{region}"


def configured_name(endpoint: str, region: str | None) -> str:
    """The ``EndpointConfig.name`` that :func:`endpoint_name` made ``endpoint`` of, in ``region``'s partition."""
    return endpoint if region is None else endpoint.removesuffix(f"-{region}")


_CHECKS = [
    dg.AssetCheckSpec("schema", asset="features", blocking=True, description=f"Columns are exactly {', '.join(FEATURE_COLUMNS)}."),
    dg.AssetCheckSpec("not_empty", asset="features", blocking=True, description="Both train and eval splits have rows."),
    dg.AssetCheckSpec("residency_tagged", asset="features", blocking=True, description="Every row carries a residency tag."),
    dg.AssetCheckSpec(
        "residency_known",
        asset="features",
        blocking=True,
        description="Every row's residency tag has a rule in the deployment's residency policy (fails closed).",
    ),
]


_REGION_CHECK = dg.AssetCheckSpec(
    "residency_allows_region",
    asset="features",
    blocking=True,
    description="Every row of the partition's table has a residency that allows the partition's region.",
)


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
        if every and not kept:
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
    yield _output(
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
    yield from _feature_checks(published, d.residency, pa.Table.from_pylist(every) if region else None)
    if region is not None:
        yield _residency_allows(published, d.residency, region)


def _none_allowed(rows: list[dict], policy, region: str | None) -> str:
    """Why a region's partition has no rows although the source has some: the policy, not the data."""
    tags = sorted({normalize_tag(r["residency"]) for r in rows})
    allowed = sorted(tag for tag in policy if allows_region(tag, policy, region))
    policy_says = f"allows region {region!r} only for the tags {', '.join(allowed)}" if allowed else f"allows no tag in region {region!r}"
    return (
        f"Region {region!r} may process none of the source's {len(rows)} rows: they are tagged {', '.join(tags)}, "
        f"and the residency policy {policy_says}. Tag rows for this region, or allow one of their tags in "
        f"{region!r} under `residency:` in the deployment (or drop the region)."
    )


_SHOWN_ROWS = 20


def _residency_allows(table, policy, region: str) -> dg.AssetCheckResult:
    """Read back, not assumed: a row in the region's table whose tag does not allow the region stops the partition."""
    ids, tags = table.column("id").to_pylist(), table.column("residency").to_pylist()
    outside = [i for i, tag in zip(ids, tags) if not allows_region(tag, policy, region)]
    return dg.AssetCheckResult(
        check_name="residency_allows_region",
        passed=not outside,
        description=f"{len(outside)} row(s) may not be processed in region {region!r}: {', '.join(outside[:_SHOWN_ROWS])}"
        if outside
        else None,
        metadata={"region": region, "rows_outside": len(outside), "tags": sorted(set(tags))},
    )


def _feature_checks(table, policy, source=None) -> list[dg.AssetCheckResult]:
    """The table's checks; ``residency_known`` judges ``source`` (every row read) when given, not only those kept."""
    columns = list(table.column_names)
    missing = [c for c in FEATURE_COLUMNS if c not in columns]
    extra = [c for c in columns if c not in FEATURE_COLUMNS]
    splits = table.column("split").to_pylist() if "split" in columns else []
    residency = table.column("residency").to_pylist() if "residency" in columns else []
    untagged = sum(1 for r in residency if not r)
    n_train, n_eval = splits.count("train"), splits.count("eval")
    return [
        dg.AssetCheckResult(
            check_name="schema", passed=not missing and not extra, metadata={"missing": missing, "extra": extra}
        ),
        dg.AssetCheckResult(
            check_name="not_empty", passed=n_train > 0 and n_eval > 0, metadata={"train_rows": n_train, "eval_rows": n_eval}
        ),
        dg.AssetCheckResult(
            check_name="residency_tagged",
            passed=bool(residency) and untagged == 0,
            metadata={"untagged_rows": untagged, "tags": sorted({r for r in residency if r})},
        ),
        _residency_known(table, residency, policy)
        if source is None
        else _residency_known(source, source.column("residency").to_pylist(), policy),
    ]


def _residency_known(table, residency: list, policy) -> dg.AssetCheckResult:
    """Fail (blocking) when a row's tag has no rule: nothing may be trained on the strength of a typo."""
    unknown = set(unknown_tags([r for r in residency if r], policy))
    ids = table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(residency))]
    rows = [i for i, tag in zip(ids, residency) if tag and normalize_tag(tag) in unknown]
    description = None
    if unknown:
        description = (
            f"{len(rows)} row(s) are tagged {', '.join(repr(t) for t in sorted(unknown))}, which the deployment's "
            f"residency policy does not know (known: {', '.join(sorted(policy)) or 'none'}); rows "
            f"{', '.join(map(str, rows[:_SHOWN_ROWS]))}{' ...' if len(rows) > _SHOWN_ROWS else ''}. "
            "Fix the tags in the source, or add them to `residency:` with their allowed regions (or `any`)."
        )
    return dg.AssetCheckResult(
        check_name="residency_known",
        passed=not unknown,
        description=description,
        metadata={"unknown_tags": sorted(unknown), "rows": len(rows), "row_ids": rows[:_SHOWN_ROWS]},
    )


class TargetConfig(dg.Config):
    target: str = ""
    """Pin the workload to this deployment target (placement still checks it); empty: let placement choose."""


def _placed(record, decision, execution: dict):
    """The record with where it was made and what the engine reported, for lineage and the factsheet."""
    return record.model_copy(update={"placement": decision, "execution": execution})


def _adapter_of(record: Record) -> AdapterRecord:
    adapter = next((r for r in lineage(record) if isinstance(r, AdapterRecord)), None)
    if adapter is None:
        raise InputError(f"{record.kind} {record.uri!r} records no adapter in its lineage")
    return adapter


def _rollback(
    instance: dg.DagsterInstance, wanted: str, region: str | None = None
) -> tuple[AdapterRecord, dict[str, str | None]]:
    """The earlier adapter ``wanted`` names (a digest or its first 12+ hex digits), and what it replaces;
    for a region's partition, one trained for that region."""
    prefix = wanted.removeprefix("sha256:").lower()
    if len(prefix) < 12:
        raise InputError(f"rollback_to {wanted!r} is too short to name one adapter: give 12 or more hex digits of its digest.")
    trained = records(instance, "adapter_weights", partition=region)
    found = {r.digest: r for r in trained if r.digest.removeprefix("sha256:").startswith(prefix)}
    if len(found) != 1:
        known = ", ".join(dict.fromkeys(r.digest[7:19] for r in trained)) or "none"
        how = "names more than one adapter" if found else "names no adapter this instance has trained"
        here = f" for region {region}" if region else ""
        raise InputError(f"rollback_to {wanted!r} {how}{here}; adapters trained here{here} (newest first): {known}.")
    (adapter,) = found.values()
    current = latest_record(instance, "served_endpoint", region)
    served = _adapter_of(current).digest if current is not None else None
    return adapter, {"to": adapter.digest, "from": served}


def _residency(record: Record) -> tuple[str, ...]:
    """Residency travels with lineage: a model trained on EU rows is EU data too."""
    tags: set[str] = set()
    for r in lineage(record):
        if isinstance(r, FeaturesRecord):
            tags.update(r.residency)
    return tuple(sorted(tags))


_ADAPTER_CHECKS = [
    dg.AssetCheckSpec("loss_decreased", asset="adapter_weights", description="Training loss at the end is below the start."),
    dg.AssetCheckSpec(
        "governance_gate",
        asset="adapter_weights",
        blocking=True,
        description="The adapter's draft factsheet meets the deployment's governance thresholds and required facts.",
    ),
]


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
        result = aiplane.run(context, trainer.workload(base_model, features, d.artifact_root(decision.region)), decision)
        record = m["output"] = _placed(result.outputs["adapter"], decision, result.engine)
    metrics = record.metrics
    first, last = metrics.get("train_loss_first"), metrics.get("train_loss_last")
    yield _output(
        record,
        **_made_by(d, decision, trainer=trainer.name),
        run_id=record.run_id,
        method=record.method,
        train_loss_first=first,
        train_loss_last=last,
        eval_loss=metrics.get("eval_loss"),
        eval_accuracy=metrics.get("eval_accuracy"),
        tokens_per_s=metrics.get("tokens_per_s"),
        steps=metrics.get("steps"),
    )
    # A warning, not a gate: an adapter that did not learn still serves, but someone should look.
    yield dg.AssetCheckResult(
        check_name="loss_decreased",
        passed=first is not None and last is not None and last < first,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={k: v for k, v in {"train_loss_first": first, "train_loss_last": last}.items() if v is not None},
    )
    # Blocking: an adapter that fails the gate is never promoted in this run (served_endpoint judges again).
    draft = build_factsheet(record)
    verdict = judge(d.governance, draft)
    yield dg.AssetCheckResult(
        check_name="governance_gate",
        passed=verdict.passed,
        description=verdict.summary()
        if verdict.passed
        else "; ".join(verdict.problems) + ". Not served: retrain, or change `governance:` in the deployment.",
        metadata={"rules": dg.MetadataValue.json(verdict.to_json()["rules"]), "draft_factsheet": dg.MetadataValue.json(draft)},
    )


class EndpointConfig(TargetConfig):
    name: str = "support-tickets"
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
        serving, decision = aiplane.placed("serving", "serve-endpoint", _residency(adapter), config.target, region)
        result = aiplane.run(context, serving.workload(adapter, endpoint_name(config.name, region), str(d.home)), decision)
        execution = {**result.engine, **({"rollback": rollback} if rollback else {})}
        record = m["output"] = _placed(result.outputs["endpoint"], decision, execution)
    context.log.info(
        f"endpoint {record.model_name} serving at {record.url}"
        + (f" (rolled back from adapter {rollback['from']} to {rollback['to']})" if rollback else "")
    )
    return _output(
        record,
        **_made_by(d, decision, **{"serving target": serving.name}),
        url=dg.MetadataValue.url(record.url),
        model_name=record.model_name,
    )


def factsheet(
    context: dg.AssetExecutionContext, config: TargetConfig, aiplane: AiplaneResource, served_endpoint: EndpointRecord
) -> dg.Output[FactsheetRecord]:
    d = aiplane.config
    region = _region(context)
    with materialization(aiplane.registry.pm, "factsheet", context.run.run_id, [served_endpoint], d, region) as m:
        # The factsheet describes a model trained on these rows: their residency holds for it too.
        publisher, decision = aiplane.placed("factsheet", "publish-factsheet", _residency(served_endpoint), config.target, region)
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
                    **judge(d.governance, build_factsheet(_adapter_of(served_endpoint))).to_json(),
                },
            },
        )
        # Every publisher is placed before the first publishes: one that cannot be fails before any side effect.
        beside = [
            _component_placed(d.model_copy(update={"factsheet": spec, "regions": {}}), aiplane.registry, "factsheet",
                              "publish-factsheet", _residency(served_endpoint), "", region)
            for spec in d.also_publish
        ]  # fmt: skip
        result = aiplane.run(context, publisher.workload(served_endpoint, document), decision)
        record = m["output"] = result.outputs["factsheet"]
        published = [record]
        for other, where in beside:
            # Each is told where those before it published (the model registry records the factsheet's location).
            told = {**document, "extra": {**document["extra"], "factsheets": [_location(r) for r in published]}}
            published.append(aiplane.run(context, other.workload(served_endpoint, told), where).outputs["factsheet"])
    for sheet in published:
        context.log.info(f"{sheet.publisher}: factsheet at {sheet.uri} (page {sheet.page_uri})")
    return _output(
        record,
        **_made_by(d, decision, publisher=publisher.name),
        path=dg.MetadataValue.path(record.uri),
        page=dg.MetadataValue.path(record.page_uri),
        also_published=dg.MetadataValue.json([_location(r) for r in published[1:]]) if beside else None,
    )


def _location(record: FactsheetRecord) -> dict[str, str]:
    return {"publisher": record.publisher, "uri": record.uri, "page_uri": record.page_uri, "digest": record.digest}


_CONFIGS: dict[str, type[dg.Config]] = {
    "features": FeaturesConfig,
    "adapter_weights": TargetConfig,
    "served_endpoint": EndpointConfig,
    "factsheet": TargetConfig,
}


def _kinds(deployment: Deployment | None, registry: Registry | None, asset: str, regions: Sequence[str]) -> set[str]:
    """What the UI shows on ``asset``: the kinds its component declares (``Component.kinds``), else its name,
    for every region's component; none known without a deployment."""
    key = MADE_BY.get(asset)
    if key is None:
        return {"huggingface"}
    if deployment is None or registry is None:
        return set()
    kinds: set[str] = set()
    for name in sorted({deployment.spec(key, r).name for r in (None, *regions)}):
        try:
            declared = registry.get(DEPLOYMENT_KINDS[key], name).kinds
        except AiplaneError:
            declared = ()  # not installed: the resource says so when a run starts
        kinds.update(declared or (name,))
    return kinds


def _described(text: str, deployment: Deployment | None, asset: str, regions: Sequence[str]) -> str:
    key = MADE_BY.get(asset)
    if deployment is None or key is None:
        return text
    names = sorted({deployment.spec(key, r).name for r in (None, *regions)})
    return f"{text} Made by the {DEPLOYMENT_KINDS[key]} {' / '.join(repr(n) for n in names)}."


def build_assets(
    regions: Sequence[str] = (),
    deployment: Deployment | None = None,
    registry: Registry | None = None,
    configs: Mapping[str, Mapping] | None = None,
) -> list[dg.AssetsDefinition]:
    """The five assets; with ``regions``, all but ``base_model`` partitioned by them (one partition per region).

    With ``deployment`` (and the ``registry`` of its plugins), each asset's code version
    is the digest of the settings that shape it (with ``configs``, the run config of
    each asset), and its kinds and description name the plugin that makes it.
    """
    parts = dg.StaticPartitionsDefinition(list(regions)) if regions else None
    checks = [*_CHECKS, _REGION_CHECK] if regions else _CHECKS
    automated = on_change()

    def asset(fn, description: str, **kwargs) -> dg.AssetsDefinition:
        name = fn.__name__
        version = code_version(deployment, name, (configs or {}).get(name), regions) if deployment is not None else None
        return dg.asset(
            group_name=GROUP,
            kinds=_kinds(deployment, registry, name, regions),
            code_version=version,
            description=_described(description, deployment, name, regions),
            **kwargs,
        )(fn)

    return [
        asset(base_model, "The pretrained model adapters start from."),
        asset(
            features,
            "Training features in the feature store, pinned to a snapshot"
            + (": per region, the rows its residency allows." if regions else "."),
            partitions_def=parts,
            check_specs=checks,
        ),
        asset(
            adapter_weights,
            "The trained weights (a LoRA adapter, or a whole model for sft), in the content-addressed store.",
            partitions_def=parts,
            automation_condition=automated,
            check_specs=_ADAPTER_CHECKS,
        ),
        asset(
            served_endpoint,
            "A running model server for the base model plus adapter.",
            partitions_def=parts,
            automation_condition=automated,
        ),
        asset(
            factsheet,
            "The factsheet: lineage, training, evaluation and placement of the served model.",
            partitions_def=parts,
            automation_condition=automated,
        ),
    ]


ASSETS = build_assets()
"""The unpartitioned assets (a deployment without ``regions``)."""
PARTITIONED = frozenset(a.key.to_user_string() for a in build_assets(("region",)) if a.partitions_def)
"""The assets a deployment with ``regions`` partitions by region, as :func:`build_assets` declares them."""

refresh_features_job = dg.define_asset_job("refresh_features", selection=["features"])
features_refresh_schedule = dg.ScheduleDefinition(
    name="refresh_features_daily",
    job=refresh_features_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


def _regional_refresh(regions: Sequence[str]) -> dg.ScheduleDefinition:
    """The daily refresh of every region's features: one run per partition, so each region fails alone."""

    @dg.schedule(
        name="refresh_features_daily",
        job=dg.define_asset_job("refresh_features", selection=["features"]),
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def refresh_features_daily(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.isoformat()
        return [dg.RunRequest(partition_key=region, run_key=f"{region}@{tick}") for region in regions]

    return refresh_features_daily


# Declarative automation needs a running sensor to evaluate the conditions.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "aiplane_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
)


@dg.run_failure_sensor(
    name="aiplane_orphaned_steps",
    monitor_all_code_locations=False,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When a run fails with steps that never ended (its process died), tell the lineage observers.",
)
def orphaned_steps_sensor(context: dg.RunFailureSensorContext, aiplane: AiplaneResource):
    # Run monitoring marks a run whose worker died as failed; its unfinished steps never
    # reached their on-error hooks, so lineage would keep a START with no end.
    if context.dagster_run.tags.get(ORPHAN_NOTIFIED_TAG):
        return  # `aiplane up` found it orphaned and told the observers already
    for step in unfinished_steps(context.instance, context.dagster_run.run_id):
        error = RuntimeError(f"step {step} of run {context.dagster_run.run_id} never finished: {context.failure_event.message}")
        region = step_region(context.dagster_run, step, PARTITIONED)
        notify_error(aiplane.registry.pm, step, context.dagster_run.run_id, error, aiplane.config, region)


def _deployment_of(resource: AiplaneResource) -> Deployment | None:
    """The resource's deployment, or ``None`` when it does not load (a run then reports why, when it starts)."""
    from aiplane.core.config import load_deployment

    try:
        return load_deployment(resource.deployment or None, home=resource.home or None)
    except AiplaneError:
        return None


def build_definitions(
    resource: AiplaneResource | None = None, loggers: dict | None = None, configs: Mapping[str, Mapping] | None = None
) -> dg.Definitions:
    """The code location; ``aiplane up`` passes its own resource, console logger and run ``configs`` (per asset).

    Partitioned by region when the deployment names ``regions``; code versions, kinds and
    descriptions come from the deployment and the plugins it names."""
    from .resource import default_resource

    resource = resource or default_resource()
    deployment = _deployment_of(resource)
    regions = tuple(deployment.regions) if deployment is not None else ()
    try:
        assets = build_assets(regions, deployment, Registry() if deployment is not None else None, configs)
    except AiplaneError:
        assets = build_assets(regions)  # a region's settings that do not merge: the preflight says so at run time
    return dg.Definitions(
        assets=assets,
        schedules=[_regional_refresh(regions) if regions else features_refresh_schedule],
        sensors=[automation_sensor, orphaned_steps_sensor],
        resources={"aiplane": resource, "io_manager": RecordIOManager()},
        loggers=loggers,
        # One process per run, as `aiplane up` runs: the steps form a chain (each waits for the one
        # before) and each hands its work to an engine, so the multiprocess default would buy no
        # parallelism and cost a Python process importing Dagster and this code location per step.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
