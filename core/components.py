"""The interfaces plugins implement: engines, feature stores, trainers, serving targets, publishers.

Plugins hand these classes to aiplane through the hooks in :mod:`aiplane.core.hookspecs`.
Each class has a ``name`` (what a deployment file writes) and an optional
pydantic ``Settings`` model; aiplane validates a deployment's settings against it
before anything runs, so a typo fails at load time with the key named.

Heavy libraries (torch, pyiceberg, ray, kfp, kserve) are imported inside methods,
never at module import, so listing plugins stays cheap everywhere.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, validation_problems

if TYPE_CHECKING:
    import pyarrow

    from .config import Deployment, Target
    from .records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord
    from .workload import Event, Workload, WorkloadResult

__all__ = [
    "Component",
    "NoSettings",
    "Engine",
    "FeatureStore",
    "Trainer",
    "ServingTarget",
    "FactsheetPublisher",
    "FEATURE_COLUMNS",
]

FEATURE_COLUMNS: tuple[str, ...] = ("id", "prompt", "completion", "residency", "split")
"""The columns every training feature table has; ``split`` is ``train`` or ``eval``."""


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Component:
    """Base of every pluggable component: a name and validated settings."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]] = NoSettings
    """Unknown keys are rejected at every level, whatever the model's own ``extra`` says; so are a boolean
    given for a number (``r: true``) and a number that is not finite (``.inf``, ``.nan``)."""
    engines: ClassVar[tuple[str, ...] | None] = None
    """Engines this component's workloads can run on; ``None`` means any."""
    kinds: ClassVar[tuple[str, ...]] = ()
    """What the Dagster UI shows on the asset this component makes (``("kserve",)``); empty means its ``name``.

    Letters, digits, ``-``, ``_`` and ``.`` only (Dagster's tag rules); Dagster draws an icon for the kinds it knows.
    """
    preload: ClassVar[tuple[str, ...]] = ()
    """Modules this component's workloads import before they work (``torch``, a table reader).

    An engine that can start a workload's process ahead of time (:meth:`Engine.prestart`)
    imports them while the orchestrator is busy with something else.
    """

    def __init__(self, settings: Mapping[str, Any] | BaseModel | None = None):
        if isinstance(settings, BaseModel):
            settings = settings.model_dump()
        try:
            # extra="forbid" here, not only in the plugin's model: a model that ignores unknown keys
            # (pydantic's default), or one of its sub-models, would run a typo (`qeue:`) with the default.
            raw = dict(settings or {})
            self.settings = self.Settings.model_validate(raw, extra="forbid")
        except ValidationError as exc:
            problems = "; ".join(validation_problems(exc, self.Settings, key_word="setting"))
            raise ConfigError(f"Invalid settings for {type(self).__name__} {self.name!r}: {problems}") from None
        loose = _loose_numbers(raw, self.settings)
        if loose:
            raise ConfigError(f"Invalid settings for {type(self).__name__} {self.name!r}: {'; '.join(loose)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    def locations(self) -> dict[str, str]:
        """Where this component writes on its own, by setting name (``{"results_dir": "s3://..."}``).

        With per-region storage (``storage.regions``), each must lie under the
        storage location of the region the component's work is placed in: the
        preflight and placement refuse it otherwise, so what is derived from data
        placed in a region is never written outside it. An empty value says the
        component writes somewhere its settings do not name (a server's default
        bucket), which per-region storage refuses. Default: none.
        """
        return {}

    def check(self, deployment: "Deployment") -> list[str]:
        """Problems this component can see before anything runs: a port in use, a path that is missing.

        Called by the preflight (``aiplane check``, and ``aiplane up`` and the
        Dagster resource before anything else) with the validated deployment.
        Must have no side effects. Return one sentence per problem, saying what
        is wrong and what to do; an empty list means nothing found.
        """
        return []

    def probe(self, deployment: "Deployment") -> list[str]:
        """Problems only a remote service this component talks to can show: it does not answer.

        Called by the preflight after :meth:`check`, unless it runs offline
        (``aiplane check --offline``, for a deployment checked away from where it
        runs). Cheap: one request with a timeout of a few seconds, reading
        nothing and changing nothing. Name an unreachable service "unreachable",
        with its address. Default: nothing to probe.
        """
        return []


def _loose_numbers(raw: Any, value: Any, where: str = "") -> list[str]:
    """Where validation took a boolean for a number (``r: true`` as 1) or let a non-finite number through.

    pydantic's lax mode does both for every ``int`` and ``float`` field, and no
    setting means either: one pass over what was given, for every component's
    settings, instead of a strict type on each numeric field of each plugin.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where}: {raw!r} is not a finite number; give a finite one"]
    if isinstance(raw, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [f"{where}: {str(raw).lower()} is a boolean, not a number; write the number itself"]
    pairs: list[tuple[str, Any, Any]] = []
    if isinstance(value, BaseModel) and isinstance(raw, Mapping):
        names = {(f.alias or n): n for n, f in type(value).model_fields.items()}
        pairs = [(str(k), v, getattr(value, names[k])) for k, v in raw.items() if k in names]
    elif isinstance(value, Mapping) and isinstance(raw, Mapping):
        pairs = [(str(k), v, value[k]) for k, v in raw.items() if k in value]
    elif isinstance(value, (list, tuple)) and isinstance(raw, (list, tuple)) and len(raw) == len(value):
        return [p for i, (r, v) in enumerate(zip(raw, value)) for p in _loose_numbers(r, v, f"{where}[{i}]")]
    return [p for key, r, v in pairs for p in _loose_numbers(r, v, f"{where}.{key}" if where else key)]


class Engine(Component):
    """Runs workloads somewhere: a subprocess, a Ray cluster, a KFP pipeline."""

    def run(
        self,
        workload: "Workload",
        target: "Target",
        on_event: Callable[["Event"], None],
        cancel: threading.Event | None = None,
    ) -> "WorkloadResult":
        """Run ``workload`` on ``target`` to completion and return its result.

        Forward every progress event to ``on_event`` as it happens. Stop the
        workload and raise :class:`~aiplane.core.errors.WorkloadCancelled` when
        ``cancel`` is set, and also when this call is interrupted (Dagster run
        termination raises in the calling thread): nothing may keep running.
        Raise :class:`~aiplane.core.errors.WorkloadError` (or the aiplane error
        the workload raised) on failure.
        """
        raise NotImplementedError

    def prestart(self, entrypoint: str, preload: Sequence[str] = (), wait_s: float = 0.0) -> bool:
        """Get ready, now, to run the next workload with ``entrypoint`` sooner (start its process, import ``preload``).

        A hint, never required: the orchestrator calls it when it knows a workload
        is coming and has other things to do first. The workload must run exactly
        as without it. Return whether the engine is ready within ``wait_s`` seconds;
        engines that cannot prepare ahead return ``False`` (the default).
        """
        return False


class FeatureStore(Component):
    """Versioned tables of training features."""

    def publish(self, rows: "pyarrow.Table", table: str) -> "FeaturesRecord":
        """Make ``rows`` the content of ``table`` and return a record pinned to the snapshot.

        If the table already holds exactly these rows, create no new snapshot and
        return the record of the current one, so nothing downstream re-runs.
        """
        raise NotImplementedError

    def current(self, table: str) -> "FeaturesRecord | None":
        """The record of ``table``'s current snapshot, or ``None`` if the table does not exist yet."""
        raise NotImplementedError

    def read(self, features: "FeaturesRecord") -> "pyarrow.Table":
        """The rows of ``features``, read at its pinned snapshot, never the latest.

        Raise :class:`~aiplane.core.errors.InputError` when the table or the
        snapshot is missing or its columns are not :data:`FEATURE_COLUMNS`.
        """
        raise NotImplementedError


class Trainer(Component):
    """A training method (``lora``, ``sft``, ``distill``, or a plugin's).

    Its workload's ``adapter`` output is an :class:`~aiplane.core.records.AdapterRecord`
    whatever it trains; ``config["full_model"]`` says when the published directory is a
    whole model rather than an adapter on the base model.
    """

    entrypoint: ClassVar[str] = ""
    """The training workload's entry point (``module:function``), known before the workload is built,
    so an engine can prestart it."""

    def validate(self, base_model: "BaseModelRecord") -> None:
        """Check the settings against the model (e.g. LoRA target modules); raise ConfigError. No side effects."""

    def check_model(self, config: Mapping[str, Any], model_name: str) -> None:
        """Check the settings against a model's ``config.json`` (as a dict) before the model exists here.

        The preflight calls this with what :func:`~aiplane.core.hookspecs.aiplane_base_model_config`
        returned, so a trainer setting the model cannot honour fails before any
        model is built or row is written. Raise ConfigError; no side effects.
        """

    def check_weights(self, weights: Mapping[str, Sequence[int]], model_name: str) -> bool:
        """Whether the model's weights (shape by parameter name) alone show the settings fit it.

        A fast path for the preflight when the weights are on this machine
        (:func:`~aiplane.core.hookspecs.aiplane_base_model_weights`): ``True`` means
        nothing more to check; ``False`` (the default, and the answer whenever
        in doubt) makes the preflight call :meth:`check_model`, which decides and
        says what is wrong. No side effects.
        """
        return False

    def lora_rank(self) -> int | None:
        """The rank of the LoRA adapters this trainer trains, as its settings say; ``None`` when it trains
        none (a whole model) or cannot say.

        The preflight holds it to the serving target's :meth:`ServingTarget.max_lora_rank`,
        so an adapter no server would load is refused before it is trained.
        """
        return None

    def produced_metrics(self) -> frozenset[str] | None:
        """The numeric metrics this trainer's adapter records carry (``eval_accuracy``), as its settings make them.

        The preflight refuses a governance threshold on a metric not among them,
        before training: the gate would fail every adapter. ``None`` (the default):
        not known, so thresholds are not checked before training.
        """
        return None

    def workload(self, base_model: "BaseModelRecord", features: "FeaturesRecord", artifact_root: str) -> "Workload":
        """The training workload; its result has one output, ``adapter``, an AdapterRecord."""
        raise NotImplementedError


class ServingTarget(Component):
    """Somewhere a model is served from."""

    def workload(self, adapter: "AdapterRecord", endpoint_name: str, home: str) -> "Workload":
        """The deploy workload; its result has one output, ``endpoint``, an EndpointRecord.

        Re-deploying an endpoint name changes what it serves without a gap and
        keeps its URL: the new adapter must answer before the endpoint routes to
        it, and one that fails leaves the endpoint serving what it served.
        Deploying an adapter the endpoint served before is a rollback.
        """
        raise NotImplementedError

    def max_lora_rank(self) -> int | None:
        """The largest LoRA rank this target serves (vLLM's ``--max-lora-rank``); ``None``: no limit known.

        Compared by the preflight with the trainer's :meth:`Trainer.lora_rank`.
        """
        return None

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether the server behind ``endpoint`` is up and still the endpoint's current one.

        ``None`` means this target cannot tell; ``aiplane up`` then treats the
        endpoint as running. No side effects.
        """
        return None

    def stop(self, endpoint: "EndpointRecord") -> bool:
        """Stop the server behind ``endpoint``; ``True`` if it stopped a running one, ``False`` if none was running.

        Stopping a stopped endpoint is not an error: it returns ``False``.
        """
        raise NotImplementedError


class FactsheetPublisher(Component):
    """Publishes a factsheet document (see :func:`aiplane.core.factsheet.build_factsheet`)."""

    def workload(self, endpoint: "EndpointRecord", document: Mapping[str, Any]) -> "Workload":
        """The publish workload; its result has one output, ``factsheet``, a FactsheetRecord."""
        raise NotImplementedError
