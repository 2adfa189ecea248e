"""What runs inside each Ray Train worker, and the actor that carries its events to the driver.

Every worker runs the workload through :func:`aiplane.core.workload.execute`
with a :class:`RayRuntime`: rank and world size from Ray Train, checkpoints
through ``ray.train.report`` and ``ray.train.get_checkpoint``. Ray Train has
already set up ``torch.distributed`` (gloo on CPU, NCCL on GPU), so the workload
itself never imports ray.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.errors import AiplaneError
from aiplane.core.worker import preload
from aiplane.core.workload import Event, Runtime, Workload, execute

from .monitor import ResourceMonitor

__all__ = ["RayRuntime", "EventSink", "Mailbox", "train_loop"]


class RayRuntime(Runtime):
    """The workload runtime of one Ray Train worker."""

    def __init__(self, checkpoint_every: int):
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.checkpoint_every = checkpoint_every
        self.reports = 0
        self.report_s = 0.0
        """Calls to ``report`` and the seconds they blocked (barrier, upload, controller hand-off)."""
        self._downloaded: str | None = None

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        started = time.perf_counter()
        # A barrier across workers; Ray Train copies the directory to storage before it returns.
        ray.train.report(dict(metrics), checkpoint=checkpoint)
        self.reports += 1
        self.report_s += time.perf_counter() - started

    def latest_checkpoint(self) -> Path | None:
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(checkpoint.path)
        # Remote storage (s3://, gs://): download once; removed by close().
        if self._downloaded is None:
            self._downloaded = checkpoint.to_directory(tempfile.mkdtemp(prefix="aiplane-resume-"))
        return Path(self._downloaded)

    def close(self) -> None:
        if self._downloaded:
            shutil.rmtree(self._downloaded, ignore_errors=True)


class EventSink:
    """A small actor the driver owns: workers push events and resource summaries, the driver drains them.

    Calls from one worker reach the actor in the order they were made, so each
    worker's events keep their order.
    """

    def __init__(self) -> None:
        self._events: list[str] = []
        self._started: list[dict[str, Any]] = []
        self._stats: dict[str, dict[str, Any]] = {}

    def put(self, event_json: str) -> None:
        self._events.append(event_json)

    def started(self, info: dict[str, Any]) -> None:
        self._started.append(info)

    def stats(self, key: str, summary: dict[str, Any]) -> None:
        self._stats[key] = summary

    def drain(self) -> tuple[list[str], list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """New events and worker starts since the last drain, and the latest summary of every worker."""
        events, started = self._events, self._started
        self._events, self._started = [], []
        return events, started, dict(self._stats)


class Mailbox:
    """An actor holding the workload of a run whose workers started before it was known (a standby's).

    Each worker waits in :meth:`take`; :meth:`put` gives every waiting worker, and any
    that asks later (a worker group restarted after a failure), the workload as JSON,
    or ``None``: there is nothing to run and the workers return.
    """

    def __init__(self) -> None:
        self._value: str | None = None
        self._given: Any = None
        self._waiting: set[int] = set()

    def _event(self) -> Any:
        import asyncio

        # Made on first use, in the actor's own event loop.
        if self._given is None:
            self._given = asyncio.Event()
        return self._given

    async def take(self, rank: int) -> str | None:
        self._waiting.add(rank)
        await self._event().wait()
        return self._value

    async def put(self, workload_json: str | None) -> None:
        self._value = workload_json
        self._event().set()

    async def waiting(self) -> int:
        """How many ranks wait, or waited, for the workload."""
        return len(self._waiting)


def train_loop(config: dict[str, Any]) -> str | None:
    """Ray Train's per-worker function: run the workload; rank 0 returns the result as JSON.

    An aiplane error (bad input, bad settings, a diverging loss) happens the same
    way on every try, so it is returned as the result rather than raised: raised,
    Ray Train would retry it up to ``max_failures`` times for nothing. Anything
    else (a crash, a lost peer) is raised so Ray Train replaces the workers and
    resumes from the last checkpoint.
    """
    raw = config.get("workload")
    if raw is None:
        # Started ahead of the workload: import what it will run while it is not known yet, then wait for it.
        preload(config["preload"])
        import ray
        import ray.train

        raw = ray.get(config["mailbox"].take.remote(ray.train.get_context().get_world_rank()))
        if raw is None:
            return None
    workload = Workload.model_validate_json(raw)
    sink = config["sink"]
    runtime = RayRuntime(int(config["checkpoint_every"]))
    rank, pid = runtime.rank, os.getpid()
    key = f"rank{rank}-pid{pid}"

    def emit(event: Event) -> None:
        if rank != 0:
            # The primary reports progress; other ranks only say something when it matters (a warning, an error).
            if event.type != "log":
                return
            event = event.model_copy(update={"message": f"[rank {rank}] {event.message}"})
        sink.put.remote(event.model_dump_json(exclude_defaults=True))

    monitor = ResourceMonitor(
        float(config["monitor_interval_s"]),
        gpus=int(config["gpus_per_worker"]),
        on_summary=lambda summary: sink.stats.remote(key, summary),
    ).start()
    sink.started.remote({"rank": rank, "pid": pid, "host": socket.gethostname(), "time": time.time()})
    try:
        result = execute(workload, emit, runtime=runtime)
    except AiplaneError as exc:
        return _dumps({"error_type": type(exc).__name__, "error": str(exc)})
    finally:
        sink.stats.remote(key, {**monitor.stop(), "reports": runtime.reports, "report_s": round(runtime.report_s, 3)})
        runtime.close()
    return result.model_dump_json() if rank == 0 else None


def _dumps(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data)
