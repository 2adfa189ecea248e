"""``aiplane``: check a deployment, run the whole chain, list plugins, stop the endpoint.

``aiplane up`` runs the preflight, then materializes through Dagster, on the
instance in ``$DAGSTER_HOME`` (default ``<home>/dagster``, the same one
``dagster dev`` uses when started with that ``DAGSTER_HOME``), only the assets
that are missing or stale, and prints the endpoint, a sample completion, the
factsheet and the lineage chain. A failure prints aiplane's message once, last,
without a traceback (``--debug`` or ``AIPLANE_DEBUG=1`` shows them).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import os
import signal
import sys
import threading
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from aiplane.core.config import load_deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import Registry
from aiplane.core.records import EndpointRecord, FactsheetRecord
from aiplane.core.worker import exit_now

__all__ = ["main", "console"]

SAMPLE_PROMPT = "Ticket: VPN keeps disconnecting. Hello, the VPN client times out; blocking my work today.\nLabel:"

# Written when aiplane creates the instance: nothing leaves the machine, and a run whose
# process died is marked failed by the daemon under `dagster dev`.
_INSTANCE_YAML = """\
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def _debug(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("AIPLANE_DEBUG", "") not in ("", "0")


def _dagster_home(home: Path) -> Path:
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(home / "dagster")
    return Path(os.environ["DAGSTER_HOME"])


# Heads the storage block aiplane writes from the deployment's `dagster.postgres`.
_PG_MARK = "# storage: from the deployment's dagster.postgres; aiplane rewrites this file while this line is here\n"


def _instance_yaml(postgres=None) -> str:
    """``dagster.yaml`` as aiplane writes it; with ``postgres`` (a ``DagsterPostgres``), runs, events and
    schedules on PostgreSQL, the password read from the environment variable its reference names."""
    if postgres is None:
        return _INSTANCE_YAML
    import yaml

    db = {
        "username": postgres.username,
        "password": {"env": postgres.password.env_var},
        "hostname": postgres.hostname,
        "db_name": postgres.db_name,
        "port": postgres.port,
        # psycopg2, the driver the `postgres` extra installs: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
        "scheme": "postgresql+psycopg2",
    }
    if postgres.params:
        db["params"] = dict(postgres.params)
    return _INSTANCE_YAML + _PG_MARK + yaml.safe_dump({"storage": {"postgres": {"postgres_db": db}}}, sort_keys=False)


def _instance(home: Path, postgres=None):
    from dagster import DagsterInstance

    dagster_home = _dagster_home(home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    text = config.read_text() if config.exists() else ""
    wanted = _instance_yaml(postgres)
    # The default instance (SQLite under DAGSTER_HOME), or PostgreSQL when the deployment says so, with
    # telemetry off. aiplane's own file follows the deployment; a user's own file is kept.
    if text != wanted and (not text.strip() or text == _INSTANCE_YAML or _PG_MARK in text):
        if postgres is not None and importlib.util.find_spec("dagster_postgres") is None:
            raise AiplaneError("dagster.postgres needs dagster-postgres: pip install 'aiplane[postgres]'")
        config.write_text(wanted)
    return DagsterInstance.get()


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, timeout: float = 60) -> str:
    """One completion from an OpenAI-style ``/v1/completions`` route (KServe here, vLLM on OpenShift AI)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def _console_logger(debug: bool):
    """Dagster's console log, one line per record: progress reads as progress, and a failure's
    error and stack trace are left to the one final message (``--debug`` keeps them)."""
    import logging

    import dagster as dg

    class OneLine(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            return text if debug else text.split("\n", 1)[0]

    @dg.logger(
        dg.Field({"log_level": dg.Field(str, is_required=False, default_value="INFO")}, is_required=False),
        description="aiplane's console log for `aiplane up`.",
    )
    def console(init_context) -> logging.Logger:
        log = logging.Logger("aiplane.up", level=init_context.logger_config["log_level"])
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLine("%(asctime)s - %(levelname)s - %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        return log

    return console


class _RunFailed(Exception):
    """A Dagster run of ``up`` failed; the message is aiplane's, ready to print."""


def _check(args: argparse.Namespace) -> int:
    from aiplane.core.preflight import preflight, region_plan

    deployment = load_deployment(args.deployment or None)
    registry = Registry()
    problems = preflight(deployment, registry, _pins(args), offline=args.offline)
    if args.offline:
        print("offline: not checked: the home, the S3 stores' keys and endpoints, remote services, a base model in a bucket.", file=sys.stderr)
    if problems:
        print(f"{deployment.source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"{deployment.source}: ok: {len(deployment.targets)} target(s) "
        f"({', '.join(t.name for t in deployment.targets)}); feature store {deployment.feature_store.name}, "
        f"trainer {deployment.trainer.name}, serving {deployment.serving.name}, factsheet {deployment.factsheet.name}"
    )
    # Per region, where its partition would run each workload: a region without a target fails alone at run
    # time, so `up` is not refused for it, but the check says so and fails.
    unplaceable = 0
    for region, placed in region_plan(deployment, registry).items():
        regional = deployment.in_region(region)
        stored = deployment.storage.regions.get(region)
        print(f"region {region}: feature store {regional.feature_store.name}; " + "; ".join(
            f"{key} {regional.spec(key).name} on {where}" for key, where in placed.items() if not where.startswith("no target:")
        ) + ("" if stored is None else f"; storage {stored.root}" + (
            f" (a store of its own: {stored.s3.endpoint or 'AWS S3'})" if stored.s3 else ""
        )))  # fmt: skip
        for key, where in placed.items():
            if where.startswith("no target:"):
                unplaceable += 1
                print(f"  - {key}: {where}", file=sys.stderr)
    if unplaceable:
        print(f"{unplaceable} workload(s) of some regions have no target: `aiplane up` fails those regions' partitions.", file=sys.stderr)
        return 1
    return 0


def _pins(args: argparse.Namespace) -> dict[str, str]:
    return {"trainer": args.train_target} if getattr(args, "train_target", "") else {}


def _recover(instance, deployment, registry: Registry) -> None:
    """End what a killed ``aiplane up`` left: runs stuck in STARTED, their open lineage, workload temp dirs."""
    from aiplane.core.plugins import notify_error
    from aiplane.core.processes import sweep_orphaned_workdirs

    from .definitions import PARTITIONED
    from .state import fail_orphaned_runs

    def on_step_orphaned(step: str, run_id: str, error: Exception, region: str | None) -> None:
        notify_error(registry.pm, step, run_id, error, deployment, region)

    for run_id in fail_orphaned_runs(instance, on_step_orphaned, PARTITIONED):
        print(f"Marked run {run_id} failed: the process running it died before it finished.", file=sys.stderr)
    for path in sweep_orphaned_workdirs():
        print(f"Removed {path}, left by a workload whose process died.", file=sys.stderr)


def _up(args: argparse.Namespace) -> int:
    from aiplane.core.homelock import hold_home
    from aiplane.core.preflight import preflight, raise_for_problems

    deployment = load_deployment(args.deployment or None)
    registry = Registry()
    regions = _up_regions(deployment, args)
    raise_for_problems(deployment, preflight(deployment, registry, _pins(args)))
    # One run per home: a second `up` waits here, then decides what is stale from what the first one left.
    with hold_home(deployment.home, "aiplane up", wait=not args.no_wait, on_wait=_say):
        return _up_held(args, deployment, registry, regions)


def _say(message: str) -> None:
    print(f"aiplane: {message}", file=sys.stderr, flush=True)


def _up_held(args: argparse.Namespace, deployment, registry: Registry, regions: list[str | None]) -> int:
    import dagster as dg

    from .definitions import EndpointConfig, TargetConfig, build_definitions
    from .resource import AiplaneResource, prestart_training
    from .state import PID_TAG, chain_of, latest_materialization, latest_record, pid_tag, stale

    # The environment is final before anything starts with it (a prestarted worker must match the run's).
    _dagster_home(deployment.home)
    # Training's process and imports get ready while the instance is opened and the sources refreshed; only once
    # the preflight passed, so a refused deployment starts nothing.
    prestart_training(deployment, registry, args.train_target, regions[0])
    instance = _instance(deployment.home, deployment.dagster.postgres)
    _recover(instance, deployment, registry)

    configs = {
        "adapter_weights": TargetConfig(target=args.train_target).model_dump(),
        "served_endpoint": EndpointConfig().model_dump(),
        "factsheet": TargetConfig().model_dump(),
    }
    # The run configs shape the code versions too: a pinned target is a settings change.
    defs = build_definitions(
        AiplaneResource(deployment=args.deployment, home=str(deployment.home)),
        loggers={"console": _console_logger(_debug(args))},
        configs=configs,
    )
    job = defs.resolve_implicit_global_asset_job_def()
    graph = chain_of(defs)
    reads = {asset: deps for asset, deps, _ in graph}
    # INFO, not Dagster's DEBUG default: the run log then reads as progress (loss, tokens/s), not event plumbing.
    run_config: dict = {
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
        "ops": {name: {"config": config} for name, config in configs.items()},
    }
    tags = {PID_TAG: pid_tag()}

    def chain(region: str | None, sources: list[str]) -> tuple[dict[str, str], list[str]]:
        """Materialize ``sources``, then what is missing or stale downstream, of one region's partition
        (or of the unpartitioned chain)."""

        def execute(selection: list[str]) -> str:
            return _execute(job, instance, run_config, selection, tags, _debug(args), region)

        def version(key: str) -> str | None:
            entry = latest_materialization(instance, dg.AssetKey(key), partition=region)
            return (entry.tags or {}).get("dagster/data_version") if entry else None

        downstream = [asset for asset, deps, _ in graph if deps]
        if args.force:
            return {a: "materialized (--force)" for a in (*sources, *downstream)}, [execute([*sources, *downstream])]
        # The sources are cheap and idempotent: the base model is resolved, the features
        # published (identical rows make no new snapshot). Their data versions then say
        # what downstream must be redone.
        before = {k: version(k) for k in sources}
        run_ids = [execute(sources)]
        status = {k: "up to date (data version unchanged)" if version(k) == before[k] else "new data version" for k in sources}
        # Dagster says what is stale (missing, new code version, new upstream data version); what
        # reads an asset that is redone is redone with it, as the automation requests it.
        dagster_says = stale(instance, defs, downstream, region)
        redo: dict[str, str] = {}
        for asset in downstream:
            upstream = next((d for d in reads[asset] if d in redo), None)
            why = dagster_says.get(asset) or (f"{upstream} is re-materialized" if upstream else None)
            if why is None and asset == "served_endpoint":
                why = _endpoint_down(instance, deployment, registry, region)
            if why:
                redo[asset] = why
        if redo:
            run_ids.append(execute(list(redo)))
        for asset in downstream:
            status[asset] = f"materialized ({redo[asset]})" if asset in redo else "up to date (inputs and settings unchanged)"
        return status, run_ids

    sources = [asset for asset, deps, _ in graph if not deps]
    if deployment.regions:
        # What is one for every region (the base model) is resolved once, before the regions' runs.
        shared = [asset for asset, deps, partitioned in graph if not deps and not partitioned]
        before = {k: latest_record(instance, k) for k in shared}
        base_run = _execute(job, instance, run_config, shared, tags, _debug(args))
        for k in shared:
            after = latest_record(instance, k)
            same = before[k] is not None and after is not None and before[k].digest == after.digest
            print(f"{k:16} {'up to date (data version unchanged)' if same else 'new data version'} (run {base_run}, one for every region)")
        sources = [asset for asset, deps, partitioned in graph if not deps and partitioned]
    failed: dict[str | None, str] = {}
    for region in regions:
        try:
            status, run_ids = chain(region, sources)
        except _RunFailed as exc:
            if region is None:
                raise
            # One region's failure (no target there, a failed check) stops that partition only.
            failed[region] = str(exc)
            continue
        _report(instance, deployment, status, run_ids, region)
    if failed:
        raise _RunFailed(
            "\n".join(f"region {region}: {why}" for region, why in failed.items())
            + f"\n{len(failed)} of {len(regions)} regions failed; the others are up."
        )
    return 0


def _report(instance, deployment, status: dict[str, str], run_ids: list[str], region: str | None) -> None:
    """What ``aiplane up`` made of one chain: each asset's status, the endpoint, a sample completion, the factsheet, the lineage."""
    from aiplane.core.storage import Storage

    from .state import latest_record

    endpoint = latest_record(instance, "served_endpoint", region)
    sheet = latest_record(instance, "factsheet", region)
    assert isinstance(endpoint, EndpointRecord) and isinstance(sheet, FactsheetRecord)
    if region is not None:
        print(f"Region {region}")
    for key, what in status.items():
        print(f"{key:16} {what}")
    print(f"Dagster run:  {', '.join(run_ids)} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    print(f"Endpoint:     {endpoint.url}  (model {endpoint.model_name}; stop it with `aiplane stop`)")
    if "openai-completions" in endpoint.protocols:
        try:
            print(f"Completion:   {SAMPLE_PROMPT!r} ->{complete(endpoint.url, endpoint.model_name, SAMPLE_PROMPT)!r}")
        except OSError as exc:  # the chain succeeded; say what the endpoint did rather than dump a traceback
            print(f"Completion:   the endpoint did not answer: {exc}", file=sys.stderr)
    print(f"Factsheet:    {sheet.uri}")
    print(f"              {sheet.page_uri}")
    print("Lineage:")
    # The factsheet may be in object storage; its JSON says the chain.
    storage = Storage(deployment.storage.s3, deployment.storage.routes())
    for step in json.loads(storage.read_bytes(sheet.uri))["lineage"]:
        print(f"  {step['kind']:16} {step['digest']:80} {step['uri']}")
    print(f"  {'factsheet':16} {sheet.digest:80} {sheet.uri}")


def _execute(job, instance, run_config: dict, selection: list[str], tags: dict, debug: bool, region: str | None = None) -> str:
    """Run ``selection`` of the asset job in this process (each asset's config from ``run_config``), of region
    ``region``'s partition when given; its run id."""
    import dagster as dg

    wanted = set(selection)
    ops = {k: v for k, v in run_config["ops"].items() if k in wanted}
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={**run_config, "ops": ops},
        asset_selection=[dg.AssetKey(k) for k in selection],
        tags=tags,
        partition_key=region,
    )
    if not result.success:
        if _interrupted(result):
            raise KeyboardInterrupt  # Ctrl-C reached Dagster first; the run is already stopped
        raise _RunFailed(_failure_message(result, debug))
    return result.run_id


def _rollback(args: argparse.Namespace) -> int:
    """Serve an earlier adapter on the endpoint: a materialization of served_endpoint and factsheet like any other."""
    from aiplane.core.homelock import hold_home

    deployment = load_deployment(args.deployment or None)
    region = args.region or None
    if region is not None:
        _check_region(deployment, region)
    elif deployment.regions:
        raise AiplaneError(
            f"{deployment.source} serves one endpoint per region: say which with --region "
            f"({', '.join(deployment.regions)})."
        )
    with hold_home(deployment.home, "aiplane rollback", wait=not args.no_wait, on_wait=_say):
        return _rollback_held(args, deployment, region)


def _rollback_held(args: argparse.Namespace, deployment, region: str | None) -> int:
    from .definitions import EndpointConfig, TargetConfig, _adapter_of, build_definitions, configured_name
    from .resource import AiplaneResource
    from .state import PID_TAG, latest_record, pid_tag, records

    _dagster_home(deployment.home)
    instance = _instance(deployment.home, deployment.dagster.postgres)
    current = latest_record(instance, "served_endpoint", region)
    if not isinstance(current, EndpointRecord):
        here = f" for region {region}" if region else ""
        raise AiplaneError(f"No endpoint has been materialized{here} on this instance, so there is nothing to roll back.")
    serving = _adapter_of(current).digest
    wanted = args.to
    if not wanted:
        # The adapter the endpoint served before the current one.
        served = records(instance, "served_endpoint", partition=region)
        earlier = (_adapter_of(r).digest for r in served if isinstance(r, EndpointRecord))
        wanted = next((d for d in earlier if d != serving), "")
        if not wanted:
            raise AiplaneError(f"{current.model_name} has served only adapter {serving}; there is nothing to roll back to.")
    defs = build_definitions(
        AiplaneResource(deployment=args.deployment, home=str(deployment.home)),
        loggers={"console": _console_logger(_debug(args))},
    )
    run_config = {
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
        "ops": {
            "served_endpoint": {"config": EndpointConfig(name=configured_name(current.model_name, region), rollback_to=wanted).model_dump()},
            "factsheet": {"config": TargetConfig().model_dump()},
        },
    }
    job = defs.resolve_implicit_global_asset_job_def()
    run_id = _execute(job, instance, run_config, ["served_endpoint", "factsheet"], {PID_TAG: pid_tag()}, _debug(args), region)
    endpoint, sheet = latest_record(instance, "served_endpoint", region), latest_record(instance, "factsheet", region)
    print(f"Rolled back {endpoint.model_name} at {endpoint.url}: adapter {serving} -> {_adapter_of(endpoint).digest}")
    print(f"Dagster run:  {run_id}")
    print(f"Factsheet:    {sheet.uri}")
    return 0


def _serving_target(deployment, registry: Registry, record: EndpointRecord, region: str | None):
    """The serving target that serves ``record``, with the settings the deployment (its region) gives it."""
    spec = deployment.spec("serving", region)
    return registry.create("serving target", record.serving, spec.settings if spec.name == record.serving else None)


def _endpoint_down(instance, deployment, registry: Registry, region: str | None = None) -> str | None:
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


def _failure_message(result, debug: bool) -> str:
    """aiplane's own message for a failed run: each failed step and failed blocking check, once."""
    from dagster import DagsterEventType

    lines: list[str] = []
    failed_checks = set()
    for event in result.all_events:
        data = event.event_specific_data
        if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION and not data.passed and data.blocking:
            failed_checks.add(data.asset_key.to_user_string())
            reason = data.description or ", ".join(f"{k}={v.value}" for k, v in data.metadata.items())
            lines.append(f"{data.asset_key.to_user_string()}: check {data.check_name} failed: {reason}")
        elif event.event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RESOURCE_INIT_FAILURE):
            error = getattr(data, "error", None)
            if error is None or event.step_key in failed_checks:
                continue  # a failed check above says why
            lines.append(f"{event.step_key or 'resources'}: {_error_text(error, debug)}")
    if not lines:
        # No step said why (the run failed around them): the run's own error, if it has one.
        run_failure = next((e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE), None)
        error = getattr(getattr(run_failure, "event_specific_data", None), "error", None)
        if error is not None:
            lines.append(f"run: {_error_text(error, debug)}")
    return "\n".join(dict.fromkeys(lines)) or "the Dagster run failed; see its log above"


def _interrupted(result) -> bool:
    """Whether the run ended because this process was interrupted (Ctrl-C), not because a step failed."""
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            if error.cls_name == "DagsterExecutionInterruptedError":
                return True
            error = error.cause
    return False


def _error_text(error, debug: bool) -> str:
    """The innermost error's message: aiplane's, not the wrapping Dagster error's."""
    if debug:
        return error.to_string()
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    if "No space left on device" in message:  # a full disk during a step: say what to do, as for one outside the run
        message += ". " + _os_advice(errno.ENOSPC)
    prefix = f"{error.cls_name}: "
    # SerializableErrorInfo writes "module.ClassName: message".
    head, sep, rest = message.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == error.cls_name:
        message = rest
    return message if error.cls_name in _AIPLANE_ERRORS else prefix + message


def _os_advice(code: int | None) -> str:
    """What to do about an operating-system error that stopped a command."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            "Free space there (or point AIPLANE_HOME at a larger disk) and run the command again: what was published "
            "before is intact (artifacts count only once whole), and what this run had not published is redone."
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Give this user write access there, or point AIPLANE_HOME at a directory it may write."
    return "Check that path, then run the command again (--debug shows where it happened)."


_AIPLANE_ERRORS = {
    "AiplaneError", "ConfigError", "PluginError", "PlacementError", "InputError", "WorkloadError", "WorkloadCancelled",
}  # fmt: skip


def _plugins(args: argparse.Namespace) -> int:
    registry = Registry()
    for p in registry.plugins():
        state = ""
        if p.disabled_by == "AIPLANE_DISABLE_PLUGINS":
            state = "  DISABLED: AIPLANE_DISABLE_PLUGINS names it"
        elif p.disabled_by:
            state = f"  DISABLED: {p.disabled_by} does not name it"
        print(f"{p.name:14} {p.distribution or '-'}-{p.version or '-'}  {', '.join(p.hooks)}{state}")
        if p.components:
            print(f"{'':14} provides {', '.join(f'{kind} {name!r}' for kind, name in p.components)}")
    for b in registry.broken:
        print(f"{b.name:14} {b.distribution or '-'}-{b.version or '-'}  BROKEN: {b.error}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from .state import latest_record

    deployment = load_deployment(args.deployment or None)
    instance = _instance(deployment.home, deployment.dagster.postgres)
    registry = Registry()
    regions: list[str | None] = list(deployment.regions) or [None]
    if args.region:
        _check_region(deployment, args.region)
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


def _ui(args: argparse.Namespace) -> int:
    """The Dagster UI on the instance ``aiplane up`` records to, with the same deployment, until Ctrl-C."""
    from .ui import check_port, serve_ui

    deployment = load_deployment(args.deployment or None)
    check_port(args.host, args.port)  # before the instance is written: a refused command changes nothing
    _dagster_home(deployment.home)
    _instance(deployment.home, deployment.dagster.postgres)  # dagster.yaml as `up` writes it (telemetry off)
    env = {**os.environ, "AIPLANE_HOME": str(deployment.home)}
    if args.deployment:
        # The code server resolves it again: a path, made absolute, means the same file wherever it runs.
        env["AIPLANE_DEPLOYMENT"] = str(Path(args.deployment).resolve()) if Path(args.deployment).exists() else args.deployment
    return serve_ui(env, args.host, args.port, say=lambda line: print(line, flush=True))


def _up_regions(deployment, args: argparse.Namespace) -> list[str | None]:
    """The partitions ``aiplane up`` runs: every region, or ``--region``'s, or the pinned target's; ``[None]`` unpartitioned.

    A training target is in one region, and a partition trains only in its own: a
    pin therefore names its region, and pinning every region to it would fail all
    the others at placement.
    """
    if args.region:
        _check_region(deployment, args.region)
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


def _check_region(deployment, region: str) -> None:
    from aiplane.core.errors import unknown_name

    if region not in deployment.regions:
        if not deployment.regions:
            raise AiplaneError(f"--region {region}: {deployment.source} has no `regions:`, so its assets are not partitioned.")
        raise AiplaneError("--region: " + unknown_name("region", region, list(deployment.regions), known_as="the deployment's"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiplane", description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default=os.environ.get("AIPLANE_DEPLOYMENT", ""), help="deployment name or path (default: local)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also AIPLANE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check the deployment, pins, ports and model before anything runs")
    check.add_argument("--train-target", default="", help="check training pinned to this deployment target")
    check.add_argument("--offline", action="store_true", help="reach nothing outside this machine and ask nothing of its environment (no probes, keys or home)")
    check.set_defaults(fn=_check)
    up = sub.add_parser("up", help="materialize what is missing or stale and show the result")
    up.add_argument("--train-target", default="", help="pin training to this deployment target (placement still checks it)")
    up.add_argument("--force", action="store_true", help="materialize every asset, even those up to date")
    up.add_argument("--region", default="", help="only this region's partition (deployments with regions)")
    up.add_argument("--no-wait", action="store_true", help="fail at once if another aiplane run holds the home, instead of waiting")
    up.set_defaults(fn=_up)
    sub.add_parser("plugins", help="list installed plugins and the components they provide").set_defaults(fn=_plugins)
    ui = sub.add_parser("ui", help="open the Dagster UI on the instance `up` records to (Ctrl-C stops it)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ui.add_argument("--port", type=int, default=3000, help="port to serve on (default: 3000)")
    ui.set_defaults(fn=_ui)
    stop = sub.add_parser("stop", help="stop the served endpoint (every region's, unless --region)")
    stop.add_argument("--region", default="", help="stop only this region's endpoint")
    stop.set_defaults(fn=_stop)
    rollback = sub.add_parser("rollback", help="serve an earlier adapter on the endpoint (default: the one before)")
    rollback.add_argument("--to", default="", help="the adapter's digest, or 12 or more of its first hex digits")
    rollback.add_argument("--region", default="", help="the region whose endpoint to roll back (deployments with regions)")
    rollback.add_argument("--no-wait", action="store_true", help="fail at once if another aiplane run holds the home")
    rollback.set_defaults(fn=_rollback)
    args = parser.parse_args(argv)
    # Output(data_version=...) is how the assets version their data; Dagster's beta label is noise here.
    warnings.filterwarnings("ignore", message=".*data_version.*beta", category=Warning)
    with _signals() as received:
        try:
            return args.fn(args)
        except (AiplaneError, _RunFailed) as exc:
            if _debug(args):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the machine's, not the input's: a full disk, a path this user may not write
            if _debug(args):
                raise
            print(f"error: {exc.strerror or exc}: {exc.filename or ''}. {_os_advice(exc.errno)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            how = "terminated (SIGTERM)" if signal.SIGTERM in received() else "cancelled (Ctrl-C)"
            print(f"aiplane: {how}; the run in progress was stopped, its workloads with it.", file=sys.stderr)
            return 128 + (signal.SIGTERM if signal.SIGTERM in received() else signal.SIGINT)


@contextlib.contextmanager
def _signals() -> Iterator[Callable[[], set[int]]]:
    """SIGTERM stops a command as Ctrl-C does (cleanly: the run is stopped, its workloads with it), and says so.

    During a run Dagster maps SIGTERM onto its SIGINT handler, so the handler that
    ran cannot say which signal came; the interpreter's wakeup fd can: it gets the
    number of every signal a Python handler catches, whoever installed the handler.
    Yields a function that reads the signals received so far.
    """
    if threading.current_thread() is not threading.main_thread():
        yield set
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    seen: set[int] = set()

    def received() -> set[int]:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read, 64):
                seen.update(chunk)
        return seen

    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)


def console() -> NoReturn:
    """The ``aiplane`` command: :func:`main`, then out without the interpreter's teardown.

    After a chain, freeing every object of Dagster, pyarrow and SQLAlchemy one by one
    takes most of a second, spent after the answer is printed; ``exit_now`` still
    joins threads, runs ``atexit`` handlers and flushes the streams first.
    """
    exit_now(main())


if __name__ == "__main__":
    console()
