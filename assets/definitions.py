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

The assets' bodies are in :mod:`.steps`, their checks in :mod:`.checks`, how Dagster
declares them in :mod:`.catalog`, and the schedule and sensors in :mod:`.automation`.
"""

from collections.abc import Mapping

import dagster as dg

from aiplane.core.config import Deployment
from aiplane.core.errors import AiplaneError
from aiplane.core.plugins import Registry

from .automation import automation_sensor, orphaned_steps_sensor, refresh_schedule
from .catalog import ASSETS, PARTITIONED, build_assets
from .resource import AiplaneResource
from .state import RecordIOManager
from .steps import configured_name, endpoint_name, region_table

__all__ = [
    "defs",
    "ASSETS",
    "PARTITIONED",
    "build_assets",
    "build_definitions",
    "configured_name",
    "endpoint_name",
    "region_table",
]


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
        schedules=[refresh_schedule(regions)],
        sensors=[automation_sensor, orphaned_steps_sensor],
        resources={"aiplane": resource, "io_manager": RecordIOManager()},
        loggers=loggers,
        # One process per run, as `aiplane up` runs: the steps form a chain (each waits for the one
        # before) and each hands its work to an engine, so the multiprocess default would buy no
        # parallelism and cost a Python process importing Dagster and this code location per step.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
