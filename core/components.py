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
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, PluginError, validation_problems

if TYPE_CHECKING:
    import pyarrow

    from .config import Deployment, Target
    from .records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord
    from .workload import Event, Workload, WorkloadResult

__all__ = [
    "Component",
    "S",
    "NoSettings",
    "Engine",
    "FeatureStore",
    "Trainer",
    "ServingTarget",
    "FactsheetPublisher",
    "FEATURE_COLUMNS",
    "DEFAULT_ENDPOINT",
    "endpoint_name",
]

FEATURE_COLUMNS: tuple[str, ...] = ("id", "prompt", "completion", "residency", "split")
"""The columns every training feature table has; ``split`` is ``train`` or ``eval``."""


DEFAULT_ENDPOINT = "support-tickets"
"""The endpoint name aiplane deploys when the run's asset config names none."""


def endpoint_name(name: str, region: str | None) -> str:
    """The endpoint a region's partition serves (``support-tickets-eu``): one per region, so each serves its own
    adapter; ``name`` itself unpartitioned. What :meth:`ServingTarget.workload` and ``check`` are given."""
    return name if region is None else f"{name}-{region}"


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=BaseModel)
"""A component's settings model: ``class MyTarget(ServingTarget[MySettings])`` types ``self.settings``."""


class Component(ABC, Generic[S]):
    """Base of every pluggable component: a name and validated settings.

    Generic over its settings model, which it also names as ``Settings``::

        class MySettings(BaseModel):
            bucket: str

        class MyTarget(ServingTarget[MySettings]):
            name = "my-cloud"
            Settings = MySettings   # self.settings is a MySettings

    Each kind's methods marked abstract must be defined: a class missing one is refused
    with a :class:`~aiplane.core.errors.PluginError` naming it when aiplane makes one.
    """

    name: ClassVar[str]
    settings: S
    """The validated settings, an instance of :attr:`Settings`."""
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

    def __new__(cls, *args: Any, **kwargs: Any) -> "Component[S]":
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            # Said here rather than by object.__new__'s TypeError, which names neither the component nor what to do.
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__} ({getattr(cls, 'name', '?')!r}) does not define "
                f"{', '.join(missing)}, which aiplane calls; define {'them' if len(missing) > 1 else 'it'} "
                "(see aiplane.core.components)"
            )
        return super().__new__(cls)

    def __init__(self, settings: Mapping[str, Any] | BaseModel | None = None):
        if isinstance(settings, BaseModel):
            settings = settings.model_dump()
        try:
            # extra="forbid" here, not only in the plugin's model: a model that ignores unknown keys
            # (pydantic's default), or one of its sub-models, would run a typo (`qeue:`) with the default.
            raw = dict(settings or {})
            self.settings = cast(S, self.Settings.model_validate(raw, extra="forbid"))
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
        return [p for i, (r, v) in enumerate(zip(raw, value, strict=True)) for p in _loose_numbers(r, v, f"{where}[{i}]")]
    return [p for key, r, v in pairs for p in _loose_numbers(r, v, f"{where}.{key}" if where else key)]


class Engine(Component[S]):
    """Runs workloads somewhere: a subprocess, a Ray cluster, a KFP pipeline.

    Everything here runs in the orchestrator (``aiplane up``, the Dagster step); the workload's entry point
    runs where the engine puts it, through :func:`aiplane.core.workload.execute`.
    """

    @abstractmethod
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
        termination raises in the calling thread): nothing may keep running,
        and a local process's whole process group ends with it.
        Raise :class:`~aiplane.core.errors.WorkloadError` (or the aiplane error
        the workload raised) on failure.
        """

    def prestart(self, entrypoint: str, preload: Sequence[str] = (), wait_s: float = 0.0) -> bool:
        """Get ready, now, to run the next workload with ``entrypoint`` sooner (start its process, import ``preload``).

        A hint, never required: the orchestrator calls it when it knows a workload
        is coming and has other things to do first. The workload must run exactly
        as without it. Return whether the engine is ready within ``wait_s`` seconds;
        engines that cannot prepare ahead return ``False`` (the default).
        """
        return False


class FeatureStore(Component[S]):
    """Versioned tables of training features.

    :meth:`publish` and :meth:`current` run in the orchestrator; :meth:`read` runs in the training
    workload, wherever its engine put it, from the record's ``store`` (name and settings) alone.
    """

    @abstractmethod
    def publish(self, rows: "pyarrow.Table", table: str) -> "FeaturesRecord":
        """Make ``rows`` (columns :data:`FEATURE_COLUMNS`) the content of ``table``; the record pinned to the snapshot.

        The record's ``digest`` and ``snapshot_id`` name the snapshot, ``residency``
        the distinct ``residency`` values of the rows, ``store`` this store's name and settings
        (``{"name": ..., "settings": ...}``) so a workload can read it anywhere.
        If the table already holds exactly these rows, create no new snapshot and
        return the record of the current one, so nothing downstream re-runs.
        """

    @abstractmethod
    def current(self, table: str) -> "FeaturesRecord | None":
        """The record of ``table``'s current snapshot, or ``None`` if the table does not exist yet."""

    @abstractmethod
    def read(self, features: "FeaturesRecord") -> "pyarrow.Table":
        """The rows of ``features``, read at its pinned snapshot, never the latest.

        Raise :class:`~aiplane.core.errors.InputError` when the table or the
        snapshot is missing or its columns are not :data:`FEATURE_COLUMNS`.
        """


class Trainer(Component[S]):
    """A training method (``lora``, ``sft``, ``distill``, or a plugin's).

    Its workload's ``adapter`` output is an :class:`~aiplane.core.records.AdapterRecord`
    whatever it trains; ``config["full_model"]`` says when the published directory is a
    whole model rather than an adapter on the base model. The ``check_*``/``validate`` methods
    and :meth:`workload` run in the orchestrator; the workload's entry point where the engine puts it.
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

    @abstractmethod
    def workload(self, base_model: "BaseModelRecord", features: "FeaturesRecord", artifact_root: str) -> "Workload":
        """The training workload; its result has one output, ``adapter``, an AdapterRecord.

        The record's ``uri`` is the published directory under ``artifact_root`` (content-addressed: ``digest``
        is the ``sha256:`` of its files), ``sources`` holds ``base_model`` and ``features``, ``method`` this
        trainer's ``name``, ``metrics`` what the governance gate reads.
        """


class ServingTarget(Component[S]):
    """Somewhere a model is served from.

    **Where things run.** :meth:`workload` builds the deploy in the orchestrator; the workload's entry point
    runs where the engine puts it and returns ``{"endpoint": EndpointRecord}`` (see
    :class:`~aiplane.core.records.EndpointRecord` for the fields a target sets; ``serving`` must be
    this target's ``name``). :meth:`running`, :meth:`stop` and :meth:`cleanup` run in the orchestrator, on a
    target made afresh from the deployment's settings, and get back only the record (its ``handle``), or the
    endpoint's name: keep in ``handle`` what they need, never a secret (Dagster shows it).

    **Promises.** Re-deploying an endpoint name changes what it serves without a gap and keeps its URL:
    the new adapter answers before the endpoint routes to it, and a deploy that fails leaves the endpoint
    serving what it served (rollback). A server that must outlive the deploy workload leaves the engine's
    process group (its own session), since the engine ends that group with the workload; aiplane calls
    :meth:`cleanup` when a deploy fails or is cancelled. Put ``"openai-completions"``
    (:data:`~aiplane.core.records.OPENAI_COMPLETIONS`) in ``protocols`` only if ``url`` answers it:
    ``aiplane up`` then asks for one sample completion.

    **State on this machine.** A target whose servers run on the orchestrator's machine (``vllm``) keeps
    their state under :attr:`home`, the deployment's home directory, which aiplane passes when it makes
    the target (``MyTarget(settings, home=...)``); a remote target ignores it.
    """

    home: Path | None
    """The deployment's home directory on the orchestrator's machine, or ``None`` when made without one."""

    def __init__(self, settings: Mapping[str, Any] | BaseModel | None = None, *, home: str | os.PathLike[str] | None = None):
        super().__init__(settings)
        self.home = Path(home).expanduser().absolute() if home is not None else None

    @abstractmethod
    def workload(self, adapter: "AdapterRecord", endpoint_name: str) -> "Workload":
        """The deploy workload of ``adapter`` as endpoint ``endpoint_name``; its result has one output,
        ``endpoint``, an EndpointRecord whose ``model_name`` is ``endpoint_name``.

        Re-deploying an endpoint name changes what it serves without a gap and
        keeps its URL: the new adapter must answer before the endpoint routes to
        it, and one that fails leaves the endpoint serving what it served.
        Deploying an adapter the endpoint served before is a rollback.
        Raise :class:`~aiplane.core.errors.ConfigError` here, before anything runs,
        for an endpoint name or adapter this target cannot serve.
        """

    def check(self, deployment: "Deployment", endpoint_name: str = "") -> list[str]:
        """As :meth:`Component.check`; the preflight also passes the name each endpoint will be deployed under
        (one per region with per-region storage), so a name this target refuses fails before anything runs."""
        return []

    def max_lora_rank(self) -> int | None:
        """The largest LoRA rank this target serves (vLLM's ``--max-lora-rank``); ``None``: no limit known.

        Compared by the preflight with the trainer's :meth:`Trainer.lora_rank`.
        """
        return None

    def prepare(self, base_model: "BaseModelRecord", endpoint_name: str) -> None:
        """A hint, given as training starts: an adapter of ``base_model`` will be deployed as ``endpoint_name``.

        A target may start now what the deploy will need (the ``vllm`` target starts the server, on the base
        model's weights, while the adapter trains) and must return at once; it must not change what any endpoint
        serves, and must stop what it started and no endpoint uses if the run ends without a deploy. The default
        does nothing. Runs in the orchestrator; a failure here is the target's to swallow (the deploy still runs).
        """
        return None

    def running(self, endpoint: "EndpointRecord") -> bool | None:
        """Whether the server behind ``endpoint`` is up and still the endpoint's current one.

        ``None`` means this target cannot tell; ``aiplane up`` then treats the
        endpoint as running. No side effects.
        """
        return None

    @abstractmethod
    def stop(self, endpoint: "EndpointRecord") -> bool:
        """Stop the server behind ``endpoint``; ``True`` if it stopped a running one, ``False`` if none was running.

        Stopping a stopped endpoint is not an error: it returns ``False``. Nothing of it may keep running.
        """

    def cleanup(self, endpoint_name: str) -> None:
        """Called by aiplane after a deploy of ``endpoint_name`` failed or was cancelled, wherever it stopped.

        Stop whatever that deploy started that the endpoint's current state does not name (a server
        started for it, a half-made cloud resource); leave what the endpoint served before serving.
        Idempotent; no error when nothing is there. Runs in the orchestrator, on a target made afresh
        (with :attr:`home`). The default does nothing: right only for a target whose deploy starts
        nothing that outlives its workload and undoes its own changes when it fails.
        """


class FactsheetPublisher(Component[S]):
    """Publishes a factsheet document (see :func:`aiplane.core.factsheet.build_factsheet`).

    :meth:`workload` runs in the orchestrator; the workload's entry point where the engine puts it.
    """

    @abstractmethod
    def workload(self, endpoint: "EndpointRecord", document: Mapping[str, Any]) -> "Workload":
        """The publish workload; its result has one output, ``factsheet``, a
        :class:`~aiplane.core.records.FactsheetRecord` whose ``uri`` holds ``document`` as given (with its
        ``"lineage"`` list), ``publisher`` this publisher's name and ``sources`` the endpoint.

        Publishing is all or nothing: a reader of ``uri`` never sees a partial document, and a failed or
        cancelled publish leaves what was published before (aiplane then calls :meth:`cleanup`). Publishing the
        same document twice is not an error.
        """

    def cleanup(self, endpoint: "EndpointRecord") -> None:
        """Called by aiplane after a publish of ``endpoint``'s factsheet failed or was cancelled, wherever it stopped.

        Remove whatever that publish made that no finished publish names (a staged folder, a half-made catalog
        entry); leave what was published before. Idempotent; no error when nothing is there. Runs in the
        orchestrator, on a publisher made afresh. The default does nothing: right only for a publisher whose
        publish makes nothing until one final step that either happens whole or not at all.
        """
