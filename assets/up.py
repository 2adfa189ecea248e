"""``aiplane up``, ``rollback`` and ``stop``: what each holds, runs and asks of the instance.

``up`` materializes, one partition per region (or the unpartitioned chain), the
sources, then only what Dagster calls stale downstream and what reads it, and an
endpoint whose server is gone; ``rollback`` serves an earlier adapter through the
same assets; ``stop`` stops the endpoint the instance last recorded.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from aiplane.core.config import Deployment, load_deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import Registry
from aiplane.core.records import EndpointRecord

from .instance import dagster_home, open_instance
from .report import report_chain, report_shared
from .runs import RunFailed, console_logger, debug_requested, execute

__all__ = ["check_region", "endpoint_down", "pins", "rollback", "stop", "up", "up_regions"]


def pins(args: argparse.Namespace) -> dict[str, str]:
    return {"trainer": args.train_target} if getattr(args, "train_target", "") else {}


def _recover(instance, deployment, registry: Registry) -> None:
    """End what a killed ``aiplane up`` left: runs stuck in STARTED, their open lineage, workload temp dirs."""
    from aiplane.core.plugins import notify_error
    from aiplane.core.processes import sweep_orphaned_workdirs

    from .catalog import PARTITIONED
    from .state import fail_orphaned_runs

    def on_step_orphaned(step: str, run_id: str, error: Exception, region: str | None) -> None:
        notify_error(registry.pm, step, run_id, error, deployment, region)

    for run_id in fail_orphaned_runs(instance, on_step_orphaned, PARTITIONED):
        print(f"Marked run {run_id} failed: the process running it died before it finished.", file=sys.stderr)
    for path in sweep_orphaned_workdirs():
        print(f"Removed {path}, left by a workload whose process died.", file=sys.stderr)


def up(args: argparse.Namespace) -> int:
    from aiplane.core.homelock import hold_home
    from aiplane.core.preflight import preflight, raise_for_problems

    deployment = load_deployment(args.deployment or None)
    registry = Registry()
    regions = up_regions(deployment, args)
    raise_for_problems(deployment, preflight(deployment, registry, pins(args)))
    # One run per home: a second `up` waits here, then decides what is stale from what the first one left.
    with hold_home(deployment.home, "aiplane up", wait=not args.no_wait, on_wait=_say):
        return _up_held(args, deployment, registry, regions)


def _say(message: str) -> None:
    print(f"aiplane: {message}", file=sys.stderr, flush=True)


@dataclass
class _Session:
    """What one ``aiplane up`` runs with: its instance, the asset job and its run config, and the chain's graph."""

    deployment: Deployment
    registry: Registry
    instance: Any
    defs: Any
    run_config: dict
    tags: dict[str, str]
    debug: bool
    force: bool

    @cached_property
    def job(self):
        return self.defs.resolve_implicit_global_asset_job_def()

    @cached_property
    def graph(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """Each asset in the order they are made, with the assets it reads and whether it is partitioned."""
        from .state import chain_of

        return chain_of(self.defs)

    def materialize(self, selection: list[str], region: str | None = None) -> str:
        """Run ``selection`` (of ``region``'s partition); the run id."""
        return execute(self.job, self.instance, self.run_config, selection, self.tags, self.debug, region)


def _open_session(args: argparse.Namespace, deployment: Deployment, registry: Registry, regions: list[str | None]) -> _Session:
    """Make ready what ``up`` needs, once the preflight passed: the environment, training's worker, the instance
    (cleared of what a killed run left), the code location with this run's configs."""
    from .definitions import build_definitions
    from .resource import AiplaneResource, prestart_serving, prestart_training
    from .state import PID_TAG, pid_tag
    from .steps import EndpointConfig, TargetConfig

    # The environment is final before anything starts with it (a prestarted worker must match the run's).
    dagster_home(deployment.home)
    # Training's process and imports get ready while the instance is opened and the sources refreshed; only once
    # the preflight passed, so a refused deployment starts nothing.
    prestart_training(deployment, registry, args.train_target, regions[0])
    # And the endpoint's server (vLLM's start takes longer than the tiny model's training): it starts on the base
    # model's weights now, and is ready, or nearly, when the adapter is.
    prestart_serving(deployment, registry, regions[0])
    instance = open_instance(deployment.home, deployment.dagster.postgres)
    _recover(instance, deployment, registry)
    configs = {
        "adapter_weights": TargetConfig(target=args.train_target).model_dump(),
        "served_endpoint": EndpointConfig().model_dump(),
        "factsheet": TargetConfig().model_dump(),
    }
    # The run configs shape the code versions too: a pinned target is a settings change.
    defs = build_definitions(
        AiplaneResource(deployment=args.deployment, home=str(deployment.home)),
        loggers={"console": console_logger(debug_requested(args))},
        configs=configs,
    )
    # INFO, not Dagster's DEBUG default: the run log then reads as progress (loss, tokens/s), not event plumbing.
    run_config: dict = {
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
        "ops": {name: {"config": config} for name, config in configs.items()},
    }
    return _Session(deployment, registry, instance, defs, run_config, {PID_TAG: pid_tag()}, debug_requested(args), args.force)


def _up_held(args: argparse.Namespace, deployment: Deployment, registry: Registry, regions: list[str | None]) -> int:
    session = _open_session(args, deployment, registry, regions)
    sources = [asset for asset, deps, _ in session.graph if not deps]
    if deployment.regions:
        sources = _shared_sources(session)
    failed: dict[str | None, str] = {}
    for region in regions:
        try:
            status, run_ids = _chain(session, region, sources)
        except RunFailed as exc:
            if region is None:
                raise
            # One region's failure (no target there, a failed check) stops that partition only.
            failed[region] = str(exc)
            continue
        report_chain(session.instance, deployment, status, run_ids, region)
    if failed:
        raise RunFailed(
            "\n".join(f"region {region}: {why}" for region, why in failed.items())
            + f"\n{len(failed)} of {len(regions)} regions failed; the others are up."
        )
    return 0


def _shared_sources(session: _Session) -> list[str]:
    """Resolve once, before the regions' runs, the sources that are one for every region (the base model);
    the sources each region's partition has of its own."""
    from .state import latest_record

    shared = [asset for asset, deps, partitioned in session.graph if not deps and not partitioned]
    before = {k: latest_record(session.instance, k) for k in shared}
    run_id = session.materialize(shared)
    for k in shared:
        earlier, after = before[k], latest_record(session.instance, k)
        report_shared(k, earlier is not None and after is not None and earlier.digest == after.digest, run_id)
    return [asset for asset, deps, partitioned in session.graph if not deps and partitioned]


def _chain(session: _Session, region: str | None, sources: list[str]) -> tuple[dict[str, str], list[str]]:
    """Materialize ``sources``, then what is missing or stale downstream, of one region's partition (or of the
    unpartitioned chain); each asset's status and the runs."""
    import dagster as dg

    from .state import latest_materialization

    def version(key: str) -> str | None:
        entry = latest_materialization(session.instance, dg.AssetKey(key), partition=region)
        return (entry.tags or {}).get("dagster/data_version") if entry else None

    downstream = [asset for asset, deps, _ in session.graph if deps]
    if session.force:
        return {a: "materialized (--force)" for a in (*sources, *downstream)}, [session.materialize([*sources, *downstream], region)]
    # The sources are cheap and idempotent: the base model is resolved, the features
    # published (identical rows make no new snapshot). Their data versions then say
    # what downstream must be redone.
    before = {k: version(k) for k in sources}
    run_ids = [session.materialize(sources, region)]
    status = {k: "up to date (data version unchanged)" if version(k) == before[k] else "new data version" for k in sources}
    redo = _redo(session, downstream, region)
    if redo:
        run_ids.append(session.materialize(list(redo), region))
    for asset in downstream:
        status[asset] = f"materialized ({redo[asset]})" if asset in redo else "up to date (inputs and settings unchanged)"
    return status, run_ids


def _redo(session: _Session, downstream: list[str], region: str | None) -> dict[str, str]:
    """What downstream must be redone, and why: Dagster says what is stale (missing, new code version, new
    upstream data version); what reads an asset that is redone is redone with it, as the automation requests
    it; an endpoint whose server is gone is served again."""
    from .state import stale

    reads = {asset: deps for asset, deps, _ in session.graph}
    dagster_says = stale(session.instance, session.defs, downstream, region)
    redo: dict[str, str] = {}
    for asset in downstream:
        upstream = next((d for d in reads[asset] if d in redo), None)
        why = dagster_says.get(asset) or (f"{upstream} is re-materialized" if upstream else None)
        if why is None and asset == "served_endpoint":
            why = endpoint_down(session.instance, session.deployment, session.registry, region)
        if why:
            redo[asset] = why
    return redo


def rollback(args: argparse.Namespace) -> int:
    """Serve an earlier adapter on the endpoint: a materialization of served_endpoint and factsheet like any other."""
    from aiplane.core.homelock import hold_home

    deployment = load_deployment(args.deployment or None)
    region = args.region or None
    if region is not None:
        check_region(deployment, region)
    elif deployment.regions:
        raise AiplaneError(
            f"{deployment.source} serves one endpoint per region: say which with --region "
            f"({', '.join(deployment.regions)})."
        )
    with hold_home(deployment.home, "aiplane rollback", wait=not args.no_wait, on_wait=_say):
        return _rollback_held(args, deployment, region)


def _rollback_held(args: argparse.Namespace, deployment, region: str | None) -> int:
    from .definitions import build_definitions
    from .outputs import adapter_of
    from .resource import AiplaneResource
    from .state import PID_TAG, latest_record, pid_tag, records
    from .steps import EndpointConfig, TargetConfig, configured_name

    dagster_home(deployment.home)
    instance = open_instance(deployment.home, deployment.dagster.postgres)
    current = latest_record(instance, "served_endpoint", region)
    if not isinstance(current, EndpointRecord):
        here = f" for region {region}" if region else ""
        raise AiplaneError(f"No endpoint has been materialized{here} on this instance, so there is nothing to roll back.")
    serving = adapter_of(current).digest
    wanted = args.to
    if not wanted:
        # The adapter the endpoint served before the current one.
        served = records(instance, "served_endpoint", partition=region)
        earlier = (adapter_of(r).digest for r in served if isinstance(r, EndpointRecord))
        wanted = next((d for d in earlier if d != serving), "")
        if not wanted:
            raise AiplaneError(f"{current.model_name} has served only adapter {serving}; there is nothing to roll back to.")
    defs = build_definitions(
        AiplaneResource(deployment=args.deployment, home=str(deployment.home)),
        loggers={"console": console_logger(debug_requested(args))},
    )
    endpoint_config = EndpointConfig(name=configured_name(current.model_name, region), rollback_to=wanted)
    run_config = {
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
        "ops": {
            "served_endpoint": {"config": endpoint_config.model_dump()},
            "factsheet": {"config": TargetConfig().model_dump()},
        },
    }
    job = defs.resolve_implicit_global_asset_job_def()
    run_id = execute(job, instance, run_config, ["served_endpoint", "factsheet"], {PID_TAG: pid_tag()}, debug_requested(args), region)
    endpoint, sheet = latest_record(instance, "served_endpoint", region), latest_record(instance, "factsheet", region)
    assert isinstance(endpoint, EndpointRecord) and sheet is not None  # the run that made them just succeeded
    print(f"Rolled back {endpoint.model_name} at {endpoint.url}: adapter {serving} -> {adapter_of(endpoint).digest}")
    print(f"Dagster run:  {run_id}")
    print(f"Factsheet:    {sheet.uri}")
    return 0


def _serving_target(deployment, registry: Registry, record: EndpointRecord, region: str | None):
    """The serving target that serves ``record``, with the settings the deployment (its region) gives it."""
    spec = deployment.spec("serving", region)
    settings = spec.settings if spec.name == record.serving else None
    return registry.create("serving target", record.serving, settings, home=deployment.home)


def endpoint_down(instance, deployment, registry: Registry, region: str | None = None) -> str | None:
    """Why the last endpoint (of ``region``) must be deployed again (its server is gone), or ``None``."""
    from .state import latest_record

    record = latest_record(instance, "served_endpoint", region)
    if not isinstance(record, EndpointRecord):
        return "never materialized"
    if record.serving not in registry.components("serving target"):
        # Served by a target this installation no longer has (kserve-local, retired): serve it anew.
        return f"it was served by {record.serving!r}, which is not installed"
    running = _serving_target(deployment, registry, record, region).running(record)
    return "its server is not running" if running is False else None


def stop(args: argparse.Namespace) -> int:
    from .state import latest_record

    deployment = load_deployment(args.deployment or None)
    instance = open_instance(deployment.home, deployment.dagster.postgres)
    registry = Registry()
    regions: list[str | None] = list(deployment.regions) or [None]
    if args.region:
        check_region(deployment, args.region)
        regions = [args.region]
    for region in regions:
        where = f"region {region}: " if region else ""
        record = latest_record(instance, "served_endpoint", region)
        if not isinstance(record, EndpointRecord):
            print(f"{where}No endpoint has been materialized on this instance.")
            continue
        # A target that predates stop()'s bool return answers None: it stopped, as far as it can tell.
        if _serving_target(deployment, registry, record, region).stop(record) is False:
            print(f"{where}{record.model_name} at {record.url} was not running; nothing to stop.")
        else:
            print(f"{where}Stopped {record.model_name} at {record.url}")
    return 0


def up_regions(deployment, args: argparse.Namespace) -> list[str | None]:
    """The partitions ``aiplane up`` runs: every region, or ``--region``'s, or the pinned target's; ``[None]`` unpartitioned.

    A training target is in one region, and a partition trains only in its own: a
    pin therefore names its region, and pinning every region to it would fail all
    the others at placement.
    """
    if args.region:
        check_region(deployment, args.region)
    if not deployment.regions:
        return [None]
    if not args.train_target:
        return [args.region] if args.region else list(deployment.regions)
    pinned = deployment.target(args.train_target).region
    if args.region and pinned != args.region:
        raise AiplaneError(
            f"--train-target {args.train_target} is in region {pinned!r}, and region {args.region!r}'s partition "
            f"trains only on targets in {args.region!r}: pin one of those, or leave out --region."
        )
    if pinned not in deployment.regions:
        raise AiplaneError(
            f"--train-target {args.train_target} is in region {pinned!r}, which is not one of the deployment's "
            f"regions ({', '.join(deployment.regions)}): pin a target in one of them."
        )
    if not args.region:
        print(f"--train-target {args.train_target} is in region {pinned}: only region {pinned}'s partition runs.")
    return [pinned]


def check_region(deployment, region: str) -> None:
    from aiplane.core.errors import unknown_name

    if region not in deployment.regions:
        if not deployment.regions:
            raise AiplaneError(f"--region {region}: {deployment.source} has no `regions:`, so its assets are not partitioned.")
        raise AiplaneError("--region: " + unknown_name("region", region, list(deployment.regions), known_as="the deployment's"))


