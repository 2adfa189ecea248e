"""The ``local`` engine: each workload runs in its own subprocess on this machine.

A subprocess, not the Dagster process: the workload gets a clean interpreter
(the same one Ray workers and KFP containers would start), can be killed as a
whole process group on cancellation, and cannot leak state into the orchestrator.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aiplane.core.components import Engine
from aiplane.core.config import Target
from aiplane.core.errors import WorkloadCancelled, WorkloadError
from aiplane.core.workload import Event, Workload, WorkloadResult, parse_event, read_result

__all__ = ["LocalEngine"]

_GRACE_S = 5.0
_DRAIN_S = 1.0
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
        cancel = cancel or threading.Event()
        with tempfile.TemporaryDirectory(prefix=f"aiplane-{workload.name}-") as tmp:
            spec, result = Path(tmp, "workload.json"), Path(tmp, "result.json")
            spec.write_text(workload.model_dump_json())
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            started = time.monotonic()
            proc = subprocess.Popen(
                [self.settings.python or sys.executable, "-m", "aiplane.core.worker", str(spec), str(result)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                # A stray non-UTF-8 byte in a library's output must not kill the log reader.
                encoding="utf-8",
                errors="replace",
                env=env,
                # Own process group: cancellation kills the workload and its children, nothing else.
                start_new_session=True,
            )
            tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
            try:
                self._pump(proc, on_event, cancel, tail)
            except BaseException:
                # Cancelled, or the caller was interrupted (Dagster run termination): nothing may keep running.
                _kill_group(proc)
                raise
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

    @staticmethod
    def _pump(proc: subprocess.Popen, on_event, cancel: threading.Event, tail) -> None:
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    lines.put(line)
            finally:
                lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        exited_at: float | None = None
        while True:
            if cancel.is_set():
                _kill_group(proc)
                raise WorkloadCancelled(f"workload (pid {proc.pid}) was cancelled")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                # The workload is done when its process is, even if a child it left
                # behind still holds stdout open: drain briefly, then stop reading.
                if proc.poll() is not None:
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > _DRAIN_S:
                        break
                continue
            if line is None:
                break
            event = parse_event(line)
            if event.type == "log":
                tail.append(event.message)
            on_event(event)
        proc.wait()
        # Whatever the workload started in its process group goes with it.
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the workload's process group: SIGTERM (the worker cleans up), then SIGKILL for anything left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while children it started in the group live on.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_GRACE_S)
