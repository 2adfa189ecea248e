"""What the Dagster instance knows about aiplane's assets: their records, whether they are stale, orphaned runs.

Every materialization carries its record as metadata (``record``), so the event
log is where an asset's value lives: :class:`RecordIOManager` hands a step the
record of its upstream asset from there, whether the upstream ran in the same
run or a week ago, and pickles nothing.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from typing import Any

import dagster as dg

from aiplane.core.errors import InputError, WorkloadError
from aiplane.core.records import Record, record_from_json

__all__ = [
    "RecordIOManager",
    "latest_record",
    "records",
    "latest_materialization",
    "chain_of",
    "stale",
    "fail_orphaned_runs",
    "unfinished_steps",
    "step_region",
    "PID_TAG",
    "ORPHAN_NOTIFIED_TAG",
    "pid_tag",
]

PID_TAG = "aiplane/pid"
"""Run tag: ``<pid>:<start time>`` of the process executing the run in process (``aiplane up``)."""
ORPHAN_NOTIFIED_TAG = "aiplane/orphan_notified"
"""Run tag: the observers were told of this orphaned run's unfinished steps."""


def _record_of(entry: dg.EventLogEntry | None) -> Record | None:
    materialization = entry.asset_materialization if entry is not None else None
    if materialization is None or "record" not in materialization.metadata:
        return None
    value = materialization.metadata["record"].value
    return record_from_json(value) if isinstance(value, dict | str) else None  # else: not a record aiplane wrote


def _key(key: dg.AssetKey | str) -> dg.AssetKey:
    return dg.AssetKey(key) if isinstance(key, str) else key


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> dg.EventLogEntry | None:
    """The newest materialization of ``key``, of its partition ``partition`` when given (``None`` for an
    unpartitioned asset)."""
    if partition is None:
        return instance.get_latest_materialization_event(key)
    found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1)
    return found.records[0].event_log_entry if found.records else None


def latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str | None = None, partition: str | None = None
) -> dg.EventLogEntry | None:
    """The newest materialization of ``key`` (of ``partition``, for a partitioned asset): of run
    ``run_id`` when it made one, else of any run."""
    if run_id is not None:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        mine = [r.event_log_entry for r in records if r.event_log_entry.asset_materialization
                and r.event_log_entry.asset_materialization.asset_key == key
                and (partition is None or r.event_log_entry.asset_materialization.partition in (None, partition))]
        if mine:
            return mine[-1]
    return _latest(instance, key, partition)


def latest_record(instance: dg.DagsterInstance, key: dg.AssetKey | str, partition: str | None = None) -> Record | None:
    """The record of the newest materialization of an asset (of its region ``partition``), or ``None``."""
    return _record_of(_latest(instance, _key(key), partition))


def records(instance: dg.DagsterInstance, key: dg.AssetKey | str, limit: int = 1000, partition: str | None = None) -> list[Record]:
    """The records of an asset's materializations (of its region ``partition``), newest first (at most ``limit``)."""
    key = _key(key)
    if partition is not None:
        entries = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=limit).records
    else:
        entries = instance.fetch_materializations(key, limit=limit).records
    return [r for r in (_record_of(e.event_log_entry) for e in entries) if r is not None]


class RecordIOManager(dg.ConfigurableIOManager):
    """Stores nothing: an asset's record is already in its materialization's metadata, which this reads back."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not isinstance(obj, Record):
            raise TypeError(f"aiplane assets produce records; {context.asset_key.to_user_string()} produced {type(obj).__name__}")

    def load_input(self, context: dg.InputContext) -> Record:
        key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        entry = latest_materialization(context.instance, key, context.step_context.run_id, partition)
        record = _record_of(entry)
        if record is None:
            what = key.to_user_string() + (f" (region {partition})" if partition else "")
            raise InputError(
                f"{what} has never been materialized on this Dagster instance; "
                "materialize it first (or materialize everything: `aiplane up`)."
            )
        return record


def chain_of(defs: dg.Definitions) -> list[tuple[str, tuple[str, ...], bool]]:
    """The assets of ``defs`` in the order they are made: each with the assets it reads, and whether it is partitioned.

    Read from the asset definitions, the one place the graph is declared.
    """
    import graphlib

    assets = {a.key.to_user_string(): a for a in defs.assets or () if isinstance(a, dg.AssetsDefinition)}
    reads = {name: tuple(sorted(k.to_user_string() for k in a.dependency_keys)) for name, a in assets.items()}
    order = graphlib.TopologicalSorter(reads).static_order()
    return [(name, reads[name], assets[name].partitions_def is not None) for name in order]


def stale(
    instance: dg.DagsterInstance, defs: dg.Definitions, keys: Iterable[str], partition: str | None = None
) -> dict[str, str]:
    """Why each of ``keys`` (of region ``partition``, where partitioned) must be materialized again, as
    Dagster itself sees it; the assets it finds up to date are left out.

    Stale means: never materialized, a new code version (the digest of the settings
    that shape the asset: they changed), or an upstream data version it was not
    made from. This is the resolver behind the UI's staleness view and behind
    ``RunRequest(stale_assets_only=True)``; Dagster exports no public door to it, so
    this function is the one place aiplane reaches past ``dagster``'s top level.
    """
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, view)
    found: dict[str, str] = {}
    for name in keys:
        key = dg.AssetKey(name)
        part = partition if graph.get(key).is_partitioned else None
        status = resolver.get_status(key, part)
        if status == StaleStatus.MISSING:
            found[name] = "never materialized"
        elif status == StaleStatus.STALE:
            found[name] = "; ".join(dict.fromkeys(_cause(c) for c in resolver.get_stale_causes(key, part)))
    return found


def _cause(cause) -> str:
    """One of Dagster's stale causes in aiplane's words."""
    from dagster._core.definitions.data_version import StaleCauseCategory

    if cause.category == StaleCauseCategory.CODE:
        return "its deployment settings changed (a new code version)"
    if cause.category == StaleCauseCategory.DATA and cause.dependency is not None:
        return f"{cause.dependency_asset_key.to_user_string()} has a new data version"
    return cause.reason


def pid_tag() -> str:
    """This process as :data:`PID_TAG` records it: pid and start time, so a reused pid is not mistaken for it."""
    from aiplane.core.processes import process_token

    return f"{os.getpid()}:{process_token()}"


def _alive(tag: str) -> bool:
    from aiplane.core.processes import process_gone

    pid, _, token = tag.partition(":")
    if not pid.isdigit():
        return True  # not ours to judge
    return not process_gone(int(pid), token)


def fail_orphaned_runs(instance: dg.DagsterInstance, on_step_orphaned, partitioned: Collection[str] = ()) -> list[str]:
    """Mark failed the runs ``aiplane up`` started whose process is gone, and report their unfinished steps.

    A run executed in process dies with its process (``kill -9``, a power cut)
    and stays STARTED forever; nothing else will ever end it. For each step that
    started and neither succeeded nor failed, ``on_step_orphaned(step_key, run_id,
    error, region)`` is called, so lineage observers can emit the FAIL that was never sent
    (``region``: the run's partition, for the ``partitioned`` assets).
    Returns the ids of the runs marked failed. Runs launched by ``dagster dev`` are
    left to the daemon's run monitoring.
    """
    failed = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]))
    for run in runs:
        tag = run.tags.get(PID_TAG)
        if tag is None or _alive(tag):
            continue
        error = WorkloadError(
            f"run {run.run_id} was orphaned: the process executing it (pid {tag.partition(':')[0]}) died before it finished"
        )
        for step in unfinished_steps(instance, run.run_id):
            on_step_orphaned(step, run.run_id, error, step_region(run, step, partitioned))
        instance.add_run_tags(run.run_id, {ORPHAN_NOTIFIED_TAG: "true"})
        instance.report_run_failed(run, message=str(error))
        failed.append(run.run_id)
    return failed


def step_region(run: dg.DagsterRun, step: str, partitioned: Collection[str]) -> str | None:
    """The region a step of ``run`` materialized: the run's partition for a ``partitioned`` asset, else ``None``."""
    return run.tags.get("dagster/partition") if step in partitioned else None


def unfinished_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Steps of ``run_id`` that started and neither succeeded nor failed."""
    types = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    started: list[str] = []
    ended: set[str] = set()
    for record in instance.get_records_for_run(run_id, of_type=types).records:
        event = record.event_log_entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started.append(event.step_key)
        else:
            ended.add(event.step_key)
    return [s for s in started if s not in ended]
