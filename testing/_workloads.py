"""Entry points of the workloads the kit hands an engine (they import nothing but ``aiplane.core``)."""

from __future__ import annotations

import time
from pathlib import Path

from aiplane.core.errors import InputError
from aiplane.core.records import BaseModelRecord
from aiplane.core.workload import WorkloadContext

__all__ = ["echo", "fail", "heartbeat"]


def echo(ctx: WorkloadContext) -> dict[str, BaseModelRecord]:
    """Log a line, report a metric, return the ``record`` input unchanged."""
    ctx.log(str(ctx.params.get("line", "")))
    ctx.metric("conformance", 1.0, step=1)
    ctx.metrics["final"] = 1
    record = ctx.inputs["record"]
    assert isinstance(record, BaseModelRecord)
    return {"record": record}


def fail(ctx: WorkloadContext) -> dict[str, BaseModelRecord]:
    raise InputError(str(ctx.params.get("message", "the conformance kit's workload failed on purpose")))


def heartbeat(ctx: WorkloadContext) -> dict[str, BaseModelRecord]:
    """Touch ``params["file"]`` until cancelled, so the kit sees whether anything keeps running."""
    beat = Path(ctx.params["file"])
    ctx.log("beating")
    deadline = time.monotonic() + float(ctx.params.get("seconds", 120))
    while time.monotonic() < deadline:
        beat.write_text(str(time.monotonic()))
        ctx.check_cancelled()
        time.sleep(0.05)
    raise InputError("heartbeat was never cancelled")
