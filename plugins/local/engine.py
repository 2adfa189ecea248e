"""The ``local`` engine: each workload runs in its own subprocess on this machine.

A subprocess, not the Dagster process: the workload gets a clean interpreter
(the same one Ray workers and KFP containers would start), can be killed as a
whole process group on cancellation, and cannot leak state into the orchestrator.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core.components import Engine
from aiplane.core.config import Target
from aiplane.core.errors import WorkloadError
from aiplane.core.processes import stream_process
from aiplane.core.workload import Event, Workload, WorkloadResult, parse_event, read_result

__all__ = ["LocalEngine"]

_TAIL = 30


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    python: str | None = None
    """Interpreter to run workloads with; defaults to the one running aiplane."""


class LocalEngine(Engine):
    """Runs a workload with ``python -m aiplane.core.worker`` in a subprocess."""

    name = "local"
    Settings = _Settings

    def run(
        self,
        workload: Workload,
        target: Target,
        on_event: Callable[[Event], None],
        cancel: threading.Event | None = None,
    ) -> WorkloadResult:
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL)

        def on_line(line: str) -> None:
            event = parse_event(line)
            if event.type == "log":
                tail.append(event.message)
            on_event(event)

        with tempfile.TemporaryDirectory(prefix=f"aiplane-{workload.name}-") as tmp:
            spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
            spec.write_text(workload.model_dump_json())
            started = time.monotonic()
            proc = stream_process(
                [self.settings.python or sys.executable, "-m", "aiplane.core.worker", str(spec), str(result)],
                on_line,
                cancel,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                what=f"workload {workload.name} ({workload.run_id})",
            )
            duration = time.monotonic() - started
            if proc.returncode != 0 and not result.exists():
                raise WorkloadError(
                    f"Workload {workload.name} ({workload.run_id}) exited with code {proc.returncode} "
                    "and no result. Last output:\n" + "\n".join(tail)
                )
            outcome = read_result(result, workload)
        return outcome.model_copy(
            update={"engine": {"engine": self.name, "target": target.name, "pid": proc.pid, "duration_s": round(duration, 3)}}
        )
