"""What the Dagster instance knows about aiplane's assets: their records, whether they are stale, orphaned runs.

Every materialization carries its record as metadata (``record``), so the event
log is where an asset's value lives: :class:`RecordIOManager` hands a step the
record of its upstream asset from there, whether the upstream ran in the same
run or a week ago, and pickles nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg

from aiplane.core.errors import InputError, WorkloadError
from aiplane.core.records import Record, record_from_json

__all__ = [
    "RecordIOManager",
    "latest_record",
    "records",
    "latest_materialization",
    "spec_digest",
    "ASSET_COMPONENTS",
    "staleness",
    "fail_orphaned_runs",
    "unfinished_steps",
    "step_region",
    "PID_TAG",
    "ORPHAN_NOTIFIED_TAG",
    "pid_tag",
    "SPEC_DIGEST_KEY",
    "PARTITIONED",
]

PID_TAG = "aiplane/pid"
"""Run tag: ``<pid>:<start time>`` of the process executing the run in process (``aiplane up``)."""
ORPHAN_NOTIFIED_TAG = "aiplane/orphan_notified"
"""Run tag: the observers were told of this orphaned run's unfinished steps."""
PARTITIONED = frozenset({"features", "adapter_weights", "served_endpoint", "factsheet"})
"""The assets a deployment with ``regions`` partitions by region; ``base_model`` is one for all."""
SPEC_DIGEST_KEY = "spec_digest"
"""Metadata key: digest of the deployment settings an asset was made with (see :func:`spec_digest`)."""


def _record_of(entry: dg.EventLogEntry | None) -> Record | None:
    materialization = entry.asset_materialization if entry is not None else None
    if materialization is None or "record" not in materialization.metadata:
        return None
    return record_from_json(materialization.metadata["record"].value)


def _key(key: dg.AssetKey | str) -> dg.AssetKey:
    return dg.AssetKey(key) if isinstance(key, str) else key


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> dg.EventLogEntry | None:
    """The newest materialization of ``key``, of its partition ``partition`` when it is partitioned."""
    if partition is None or key.to_user_string() not in PARTITIONED:
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
    if partition is not None and key.to_user_string() in PARTITIONED:
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


ASSET_COMPONENTS = {"adapter_weights": "trainer", "served_endpoint": "serving", "factsheet": "factsheet"}
"""The deployment key whose component makes each asset."""


def spec_digest(deployment, asset: str, config: Mapping[str, Any]) -> str:
    """A digest of what ``asset`` is made with besides its inputs: its component's spec and its run config.

    Changing a trainer setting, or pinning another target, makes the asset stale.
    """
    from aiplane.core import __version__

    spec = getattr(deployment, ASSET_COMPONENTS[asset]).model_dump(mode="json")
    # A rollback is not a settings change: the rolled-back adapter stays served until adapter_weights changes.
    config = {k: v for k, v in config.items() if k != "rollback_to"}
    canonical = json.dumps(
        {"aiplane": __version__, "spec": spec, "config": config}, sort_keys=True, separators=(",", ":"), default=str
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def staleness(
    instance: dg.DagsterInstance, key: str, deps: Iterable[str], spec: str | None = None, partition: str | None = None
) -> str | None:
    """Why ``key`` (its region ``partition``) must be materialized again, or ``None`` when it is up to date.

    Up to date means: materialized before, from the same data versions of its
    upstream assets as they have now, and with the same settings (``spec``).
    The same rule Dagster's automation applies, plus settings.
    """
    entry = _latest(instance, dg.AssetKey(key), partition)
    if entry is None or entry.asset_materialization is None:
        return "never materialized"
    provenance = dg.DataProvenance.from_tags(entry.tags or {})
    for dep in deps:
        dep_entry = _latest(instance, dg.AssetKey(dep), partition)
        now = (dep_entry.tags or {}).get("dagster/data_version") if dep_entry else None
        if now is not None and partition is not None and dep in PARTITIONED:
            # Dagster records a partitioned input's version as the sha256 of its partitions' versions, joined.
            now = hashlib.sha256(now.encode()).hexdigest()
        used = provenance.input_data_versions.get(dg.AssetKey(dep)) if provenance else None
        if now is None or used is None or used.value != now:
            return f"{dep} has a new data version"
    if spec is not None:
        recorded = entry.asset_materialization.metadata.get(SPEC_DIGEST_KEY)
        if recorded is None or recorded.value != spec:
            return "its deployment settings changed"
    return None


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


def fail_orphaned_runs(instance: dg.DagsterInstance, on_step_orphaned) -> list[str]:
    """Mark failed the runs ``aiplane up`` started whose process is gone, and report their unfinished steps.

    A run executed in process dies with its process (``kill -9``, a power cut)
    and stays STARTED forever; nothing else will ever end it. For each step that
    started and neither succeeded nor failed, ``on_step_orphaned(step_key, run_id,
    error, region)`` is called, so lineage observers can emit the FAIL that was never sent.
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
            on_step_orphaned(step, run.run_id, error, step_region(run, step))
        instance.add_run_tags(run.run_id, {ORPHAN_NOTIFIED_TAG: "true"})
        instance.report_run_failed(run, message=str(error))
        failed.append(run.run_id)
    return failed


def step_region(run: dg.DagsterRun, step: str) -> str | None:
    """The region a step of ``run`` materialized: the run's partition for a partitioned asset, else ``None``."""
    return run.tags.get("dagster/partition") if step in PARTITIONED else None


def unfinished_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Steps of ``run_id`` that started and neither succeeded nor failed."""
    types = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    started: list[str] = []
    ended: set[str] = set()
    for record in instance.get_records_for_run(run_id, of_type=types).records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started.append(event.step_key)
        else:
            ended.add(event.step_key)
    return [s for s in started if s not in ended]
