"""Every hook a plugin can implement. This module is the plugin author's manual.

A plugin is a module (or object) with functions decorated ``@hookimpl``, made
known to aiplane by an entry point in the ``aiplane`` group::

    [project.entry-points.aiplane]
    mycloud = "aiplane_mycloud.plugin"

Component hooks return a list of classes (subclasses of the interfaces in
:mod:`aiplane.core.components`); results from all plugins are collected, and a
deployment file picks one by its ``name``::

    from aiplane.core import hookimpl

    @hookimpl
    def aiplane_serving_targets():
        return [MyCloudTarget]

What each class must do (what its methods return, which record with which
fields, what runs in the orchestrator and what in the workload, and the
promises: no-gap swap, rollback, cleanup) is in the docstrings of
:mod:`aiplane.core.components` and :mod:`aiplane.core.records`; the
``aiplane.testing`` kit checks a component against them. Lifecycle hooks
observe every materialization; their return values are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Deployment, S3Settings
    from .evaluation import Evaluator
    from .records import BaseModelRecord, Record

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "aiplane"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorate a plugin's hook functions with this."""


# ---------------------------------------------------------------- components


def _component_hook(hook: str, interface: str, key: str) -> Callable[[], list[type]]:
    """The hookspec ``hook``: a plugin's ``interface`` subclasses, one of which a deployment's ``key`` names."""

    def spec() -> list[type]:
        """Filled in below."""
        return []

    spec.__name__ = spec.__qualname__ = hook
    spec.__doc__ = (
        f"The {interface} subclasses this plugin provides (:class:`~aiplane.core.components.{interface}`); a deployment's "
        f"``{key}`` names one by its ``name``. Called whenever aiplane needs them; results from all plugins are collected."
    )
    marked: Callable[[], list[type]] = hookspec(spec)
    return marked


# Each returns a list of classes, e.g. ``@hookimpl def aiplane_engines(): return [MyCloudEngine]``.
aiplane_engines = _component_hook("aiplane_engines", "Engine", "targets[].engine")
aiplane_feature_stores = _component_hook("aiplane_feature_stores", "FeatureStore", "feature_store.name")
aiplane_trainers = _component_hook("aiplane_trainers", "Trainer", "trainer.name")
aiplane_serving_targets = _component_hook("aiplane_serving_targets", "ServingTarget", "serving.name")
aiplane_factsheet_publishers = _component_hook("aiplane_factsheet_publishers", "FactsheetPublisher", "factsheet.name")


@hookspec
def aiplane_evaluators() -> list[type[Evaluator]]:
    """Evaluations this plugin provides (``trainer.settings.evaluation.<name>``).

    Return a list of :class:`~aiplane.core.evaluation.Evaluator` subclasses: each
    has a ``name``, a pydantic ``Settings`` model, the ``eval_*`` metric names it
    adds (``metrics()``) and ``evaluate(rows, predictions, ctx)``. A trainer runs
    the ones a deployment turns on after its own evaluation, before it publishes,
    without naming who computes them. Results from all plugins are collected.

    Example::

        @hookimpl
        def aiplane_evaluators():
            return [MyJudgeEvaluator]
    """
    return []  # a spec: pluggy calls the plugins' implementations, never this body


@hookspec(firstresult=True)
def aiplane_resolve_base_model(uri: str, home: str, s3: S3Settings | None) -> BaseModelRecord | None:
    """Turn a base-model URI from the deployment into a record.

    ``uri`` is what ``base_model.uri`` says (``builtin:tiny-granite``, a local
    directory, ``s3://bucket/models/granite``); ``home`` is the deployment's
    state directory, where a plugin may build or cache a model; ``s3`` is the
    deployment's ``storage.s3`` (how to reach object storage), or ``None``. An
    implementation may take only the arguments it needs. Return ``None`` if this plugin does not handle
    ``uri``. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def aiplane_base_model_config(uri: str, home: str, s3: S3Settings | None) -> dict[str, Any] | None:
    """The ``config.json`` of the model at ``uri``, as a dict, without building or fetching the model.

    Called by the preflight (``aiplane check``) before anything runs, so a
    trainer can check its settings against the model
    (:meth:`~aiplane.core.components.Trainer.check_model`) and a missing model
    is reported before any row is written. Same ``uri`` and ``home`` as
    :func:`aiplane_resolve_base_model`. Return ``None`` if this plugin does not
    handle ``uri``; raise :class:`~aiplane.core.errors.InputError` when it does
    but the model is not there. Must have no side effects. Stops at the first
    non-None result.
    """


@hookspec(firstresult=True)
def aiplane_base_model_weights(uri: str, home: str, s3: S3Settings | None) -> dict[str, tuple[int, ...]] | None:
    """The shape of every weight of the model at ``uri``, by parameter name, if its weight files are here.

    Read from the files' headers (safetensors), nothing loaded, so the preflight
    can let a trainer check its settings against the model in milliseconds
    (:meth:`~aiplane.core.components.Trainer.check_weights`) instead of building
    it. Return ``None`` when this plugin does not handle ``uri`` or the weights
    are not on this machine yet (the preflight then checks the config). Must have
    no side effects. Stops at the first non-None result.
    """


# ---------------------------------------------------------------- lifecycle


@hookspec
def aiplane_before_materialize(
    asset: str, run_id: str, inputs: list[Record], deployment: Deployment, region: str | None
) -> None:
    """Called before an asset is computed.

    ``asset`` is the asset name (``adapter_weights``), ``run_id`` identifies
    this materialization (the Dagster run id under Dagster), ``inputs`` are the
    upstream records it reads and ``deployment`` the deployment in use
    (observers read their settings from ``deployment.observers[<plugin>]``).
    ``region`` is the partition materialized, for a deployment with ``regions``;
    ``None`` for an unpartitioned asset. An implementation may leave out any
    argument it does not use.
    """


@hookspec
def aiplane_after_materialize(
    asset: str, run_id: str, inputs: list[Record], output: Record, deployment: Deployment, region: str | None
) -> None:
    """Called after an asset was computed; ``output`` is the record it produced.

    Same arguments as :func:`aiplane_before_materialize`, plus ``output``.
    """


@hookspec
def aiplane_on_materialize_error(
    asset: str, run_id: str, inputs: list[Record], error: BaseException, deployment: Deployment, region: str | None
) -> None:
    """Called when computing an asset raised; ``error`` is the exception.

    Same arguments as :func:`aiplane_before_materialize`, plus ``error``. The
    error is re-raised after every observer has seen it.
    """
