"""What runs the assets without anyone asking: the daily features refresh, the automation sensor that evaluates
the assets' conditions, and the sensor that tells lineage observers about steps whose process died."""

from collections.abc import Sequence

import dagster as dg

from aiplane.core.plugins import notify_error

from .catalog import PARTITIONED
from .resource import AiplaneResource
from .state import ORPHAN_NOTIFIED_TAG, step_region, unfinished_steps

__all__ = ["automation_sensor", "features_refresh_schedule", "orphaned_steps_sensor", "refresh_schedule"]

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


def refresh_schedule(regions: Sequence[str]) -> dg.ScheduleDefinition:
    """The daily features refresh: of every region's partition when there are regions, else of the one table."""
    return _regional_refresh(regions) if regions else features_refresh_schedule


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

