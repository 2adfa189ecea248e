"""Running the asset job in this process for an ``aiplane`` command, and saying why a run failed in one
message of aiplane's own (no traceback unless ``--debug`` or ``AIPLANE_DEBUG=1``)."""

import argparse
import errno
import os
import sys

__all__ = ["RunFailed", "console_logger", "debug_requested", "execute", "os_advice"]


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether tracebacks are wanted: ``--debug``, or ``AIPLANE_DEBUG`` set to anything but 0."""
    return bool(getattr(args, "debug", False)) or os.environ.get("AIPLANE_DEBUG", "") not in ("", "0")


def console_logger(debug: bool):
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


class RunFailed(Exception):
    """A Dagster run of ``up`` failed; the message is aiplane's, ready to print."""


def execute(job, instance, run_config: dict, selection: list[str], tags: dict, debug: bool, region: str | None = None) -> str:
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
        raise RunFailed(_failure_message(result, debug))
    return result.run_id


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
        message += ". " + os_advice(errno.ENOSPC)
    prefix = f"{error.cls_name}: "
    # SerializableErrorInfo writes "module.ClassName: message".
    head, sep, rest = message.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == error.cls_name:
        message = rest
    return message if error.cls_name in _AIPLANE_ERRORS else prefix + message


def os_advice(code: int | None) -> str:
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

