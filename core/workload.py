"""Workloads: the seam between orchestration and execution.

A :class:`Workload` is a small, JSON-serializable description of work: an
importable entry point (``"aiplane.plugins.peft.train:run"``), the input records
it reads, plain parameters and the resources it needs. Trainers, serving targets
and publishers build workloads; engines run them (in a subprocess, a Ray worker,
a KFP container) with the same code, by calling :func:`execute`.

The entry point is called as ``fn(ctx: WorkloadContext) -> dict[str, Record]``.
It reports progress through ``ctx.log`` and ``ctx.metric``; out of process
(``python -m aiplane.core.worker``) these become event lines on stdout that the
engine parses with :func:`parse_event`.

An engine that spreads a workload over several processes, or can restart it,
attaches a :class:`Runtime`: the workload reads its ``ctx.rank`` and
``ctx.world_size``, hands checkpoints to ``ctx.report`` and resumes from
``ctx.latest_checkpoint()``. Without one it is a single process that keeps no
checkpoints, so the same entry point runs unchanged on every engine.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from . import errors as _errors
from .errors import WorkloadCancelled, WorkloadError
from .config import S3Settings, SecretRef
from .records import AnyRecord, Record

if TYPE_CHECKING:
    from .storage import ArtifactStore, Storage

__all__ = [
    "Resources",
    "Runtime",
    "Workload",
    "WorkloadResult",
    "WorkloadContext",
    "Event",
    "execute",
    "parse_event",
    "format_event",
    "EVENT_PREFIX",
    "read_result",
    "parse_result",
    "cleanup_on_failure",
]

EVENT_PREFIX = "@@aiplane-event "


class Resources(BaseModel):
    """What a workload needs from the machine it runs on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpus: float = 1.0
    memory_gb: float | None = None
    gpus: int = 0
    gpu_type: str | None = None


class Workload(BaseModel):
    """A unit of work any engine can run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    entrypoint: str
    """``"package.module:function"``; the function takes a :class:`WorkloadContext`."""
    inputs: dict[str, AnyRecord] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    s3: S3Settings | None = None
    """How the workload reaches object storage (secrets by reference); the orchestrator sets it from the deployment."""
    s3_routes: dict[str, S3Settings] = Field(default_factory=dict)
    """Roots reached with other settings than :attr:`s3`: the store of the region the workload is placed in,
    when that region has its own (``storage.regions.<region>.s3``)."""
    cache_dir: str | None = None
    """Where the workload keeps objects fetched from storage; default ``$TMPDIR/aiplane-cache``."""

    @model_serializer(mode="wrap")
    def _without_empty_routes(self, handler: Any) -> dict[str, Any]:
        # Left out when empty, so a worker on an image of an earlier aiplane (which forbids unknown
        # fields) still reads the spec of every workload that does not use a region's own store.
        data: dict[str, Any] = handler(self)
        if not data.get("s3_routes"):
            data.pop("s3_routes", None)
        return data

    def storage(self) -> "Storage":
        """The workload's way to storage by URI, each ``s3://`` root reached with its own settings."""
        from .storage import Storage

        return Storage(self.s3, self.s3_routes)

    def secret_refs(self) -> list[SecretRef]:
        """Every credential reference its storage settings name: what must reach wherever it runs.

        Each arrives as the environment variable it names (:attr:`SecretRef.env_var`); two different
        references naming one variable would hand one store the other's key, so that is refused.
        """
        stores = [s for s in (self.s3, *self.s3_routes.values()) if s is not None]
        refs = list(dict.fromkeys(r for s in stores for r in (s.access_key_id, s.secret_access_key) if r))
        by_var: dict[str, SecretRef] = {}
        for ref in refs:
            other = by_var.setdefault(ref.env_var, ref)
            if other != ref:
                raise _errors.ConfigError(
                    f"storage: {other!r} and {ref!r} both arrive as the environment variable {ref.env_var}; "
                    "rename a Secret or a key so each credential has a variable of its own"
                )
        return refs


class WorkloadResult(BaseModel):
    """What a workload returns: its output records and final metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outputs: dict[str, AnyRecord]
    metrics: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)
    """Engine-specific facts about the run (process id, Ray job id, KFP run URL)."""


class Event(BaseModel):
    """A progress event: a log line or a metric value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str  # "log" | "metric"
    message: str = ""
    name: str = ""
    value: float = 0.0
    step: int | None = None

    def __str__(self) -> str:
        if self.type == "metric":
            at = f" (step {self.step})" if self.step is not None else ""
            return f"{self.name}={self.value:g}{at}"
        return self.message


def format_event(event: Event) -> str:
    """The single stdout line that carries ``event`` out of a workload process."""
    return EVENT_PREFIX + event.model_dump_json(exclude_defaults=True)


def parse_event(line: str) -> Event:
    """Turn a line of workload output into an event; plain lines become log events."""
    line = line.rstrip("\n")
    if line.startswith(EVENT_PREFIX):
        try:
            return Event.model_validate_json(line[len(EVENT_PREFIX) :])
        except ValueError:
            pass
    return Event(type="log", message=line)


class Runtime:
    """What the engine provides around a workload process: its place among workers, its checkpoints.

    This default is one process that keeps no checkpoints: ``report`` drops
    them and ``latest_checkpoint`` has none. Distributed engines subclass it
    (the Ray engine backs it with Ray Train).
    """

    rank: int = 0
    """This process's rank among the workload's workers; rank 0 is the primary."""
    world_size: int = 1
    """How many processes run this workload together."""
    checkpoint_every: int = 0
    """Steps between the checkpoints this engine keeps; 0: it keeps none, so do not write them."""

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Record progress and, if given, a checkpoint directory.

        The engine copies the directory before returning; the caller may delete
        it afterwards. In a distributed runtime this is a barrier: every rank
        calls it at the same points, and one rank (rank 0) passing a directory
        is enough.
        """

    def latest_checkpoint(self) -> Path | None:
        """A local directory holding the newest checkpoint the engine kept for this run, or ``None``."""
        return None


class WorkloadContext:
    """What an entry point gets: its inputs and parameters, and ways to report."""

    def __init__(
        self,
        workload: Workload,
        emit: Callable[[Event], None],
        cancel: threading.Event | None = None,
        runtime: Runtime | None = None,
    ):
        self.workload = workload
        self.inputs: Mapping[str, Record] = workload.inputs
        self.params: Mapping[str, Any] = workload.params
        self.run_id = workload.run_id
        self._emit = emit
        self._cancel = cancel or threading.Event()
        self.runtime = runtime or Runtime()
        self._storage: Storage | None = None
        self.metrics: dict[str, Any] = {}
        """Final metrics; the entry point may fill this and they land on the result."""

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    @property
    def is_primary(self) -> bool:
        """True on the one process (rank 0) that logs progress, evaluates and publishes."""
        return self.runtime.rank == 0

    @property
    def checkpoint_every(self) -> int:
        return self.runtime.checkpoint_every

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Hand progress and a checkpoint to the engine; see :meth:`Runtime.report`."""
        self.runtime.report(metrics, checkpoint_dir)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, if the engine restarted this workload; see :meth:`Runtime.latest_checkpoint`."""
        return self.runtime.latest_checkpoint()

    def log(self, message: str) -> None:
        self._emit(Event(type="log", message=message))

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self._emit(Event(type="metric", name=name, value=float(value), step=step))

    @property
    def storage(self) -> "Storage":
        """The workload's way to storage by URI (``file://``, ``s3://``), opened on first use."""
        if self._storage is None:
            self._storage = self.workload.storage()
        return self._storage

    def artifacts(self, root: str) -> "ArtifactStore":
        """The content-addressed artifact store at ``root``, over :attr:`storage`."""
        from .storage import ArtifactStore

        return ArtifactStore(root, storage=self.storage)

    def local(self, uri: str, digest: str | None = None) -> Path:
        """A local directory holding what ``uri`` names: itself if local, else a copy cached by digest.

        Without ``digest``, ``uri`` is an artifact of an :class:`ArtifactStore` (its digest is in
        its name, and only a complete one is fetched); with it, any directory in storage (a base model).
        An artifact is checked against its digest before it is handed out, a local one too.
        """
        from .storage import is_artifact, is_local, local_path

        if is_local(uri) and not (digest is None and is_artifact(uri)):
            return local_path(uri)
        cache = Path(self.workload.cache_dir or Path(tempfile.gettempdir()) / "aiplane-cache")
        if digest is not None:
            return self.storage.fetch_tree(uri, digest, cache / "trees")
        return self.artifacts(uri.rsplit("/", 2)[0]).fetch(uri, cache)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the workload is cancelled: for blocking helpers that take one (``stream_process``)."""
        return self._cancel

    def check_cancelled(self) -> None:
        """Long loops call this between steps so in-process cancellation is prompt."""
        if self._cancel.is_set():
            raise WorkloadCancelled(f"workload {self.workload.name} ({self.run_id}) was cancelled")


def _load_entrypoint(spec: str) -> Callable[[WorkloadContext], Mapping[str, Record]]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise WorkloadError(f"Entry point {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkloadError(
            f"Cannot import {module_name!r} for entry point {spec!r}: {exc}. "
            "Install the plugin (and its extra) where the workload runs."
        ) from exc
    try:
        function: Callable[[WorkloadContext], Mapping[str, Record]] = getattr(module, attr)
        return function
    except AttributeError:
        raise WorkloadError(f"Entry point {spec!r}: module {module_name!r} has no {attr!r}") from None


def execute(
    workload: Workload,
    emit: Callable[[Event], None] = lambda event: None,
    cancel: threading.Event | None = None,
    runtime: Runtime | None = None,
    on_return: Callable[[], None] | None = None,
) -> WorkloadResult:
    """Run a workload in this process. Engines call this wherever the workload lands.

    A distributed engine calls it once per worker with that worker's ``runtime``;
    workers other than the primary may return no outputs. ``on_return`` is called
    the moment the entry point returned: from then on what it did is done (a
    deploy's server runs and is recorded), and only delivering the result is left.
    """
    fn = _load_entrypoint(workload.entrypoint)
    ctx = WorkloadContext(workload, emit, cancel, runtime)
    outputs = fn(ctx)
    if on_return is not None:
        on_return()
    if not isinstance(outputs, Mapping) or not all(isinstance(v, Record) for v in outputs.values()):
        raise WorkloadError(
            f"Entry point {workload.entrypoint!r} must return a dict of records, got {type(outputs).__name__}"
        )
    return WorkloadResult(outputs=dict(outputs), metrics=ctx.metrics)


def read_result(path: Path, workload: Workload) -> WorkloadResult:
    """Read what :func:`main` wrote; an error there is raised again as the same aiplane error class."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise WorkloadError(f"Workload {workload.name} ({workload.run_id}) ended without a result: {exc}") from None
    return parse_result(text, workload)


def parse_result(text: str, workload: Workload) -> WorkloadResult:
    """The result a worker wrote (as text, from wherever it was stored); its error raised as its own class."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkloadError(f"Workload {workload.name} ({workload.run_id}) ended without a result: {exc}") from None
    if "error" in data:
        cls = getattr(_errors, data.get("error_type", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, _errors.AiplaneError)):
            cls = WorkloadError
        raise cls(f"Workload {workload.name} ({workload.run_id}) failed: {data['error']}")
    return WorkloadResult.model_validate(data)


@contextlib.contextmanager
def cleanup_on_failure(cleanup: Callable[[], None], log: Callable[[str], None]) -> Iterator[None]:
    """Run the block (a deploy); when it raises, a cancel or an interrupt included, call ``cleanup`` and raise again.

    What a failed cleanup raises goes to ``log``, never in place of the block's error: that error is
    what the run failed of, and the cleanup's is news about what may still run.
    """
    try:
        yield
    except BaseException:  # cancelled or interrupted too: cleanup runs, then the failure is re-raised
        try:
            cleanup()
        except Exception as exc:  # reported, not raised: see the docstring
            log(f"cleanup after the failure below failed too, so something it started may still run: {exc!r}")
        raise
