"""Evaluations beside a trainer's own: what a plugin computes on the eval split's generations.

A trainer asks for metrics without naming who computes them. A plugin provides
:class:`Evaluator` classes through the ``aiplane_evaluators`` hook; a deployment
turns one on under the trainer's settings by the evaluator's ``name``, with that
evaluator's own settings::

    trainer:
      settings:
        evaluation:
          watsonx_gov: {metrics: [answer_similarity], ...}

:func:`evaluation_settings` validates that block against the installed
evaluators' settings models (a pydantic model with one optional field per
evaluator, so an error names ``evaluation.<name>.<key>``), and the trainer
calls :func:`evaluation_metrics`, :func:`check_evaluation` and :func:`evaluate`
on the result. Pure Python: the evaluators import what they need when they run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, create_model

from .errors import PluginError, unknown_name

if TYPE_CHECKING:
    import pluggy

    from .workload import WorkloadContext

__all__ = ["Evaluator", "evaluators", "evaluation_settings", "evaluation_metrics", "check_evaluation", "evaluate"]


class Evaluator:
    """One evaluation of a trained model's generations (``trainer.settings.evaluation.<name>``).

    Subclasses set :attr:`name` and :attr:`Settings` and implement :meth:`metrics`
    and :meth:`evaluate`; :meth:`check` is optional.
    """

    name: ClassVar[str]
    """The key under ``evaluation:`` that turns this evaluator on."""
    Settings: ClassVar[type[BaseModel]]
    """Its settings, validated with the trainer's (before anything is trained)."""

    def __init__(self, settings: BaseModel):
        self.settings = settings

    def metrics(self) -> list[str]:
        """The ``eval_*`` metric names :meth:`evaluate` adds to the model's record: known before training, so a
        governance threshold on one is checked by the preflight."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`~aiplane.core.errors.ConfigError` for what would fail only after training (a secret
        that is not set). Called before training starts."""

    def evaluate(self, rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], ctx: WorkloadContext) -> dict[str, float]:
        """The metrics of ``predictions`` (one per eval row, generated for its ``prompt``; its reference is the
        row's ``completion``), exactly those :meth:`metrics` names. Raise
        :class:`~aiplane.core.errors.WorkloadError` saying what failed: the model is then not published."""
        raise NotImplementedError


def evaluators(pm: pluggy.PluginManager | None = None) -> dict[str, type[Evaluator]]:
    """The installed evaluators by name, from every plugin's ``aiplane_evaluators`` hook."""
    if pm is None:
        from .plugins import get_plugin_manager

        pm = get_plugin_manager()
    found: dict[str, type[Evaluator]] = {}
    for provided in pm.hook.aiplane_evaluators():
        for cls in provided or ():
            if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
                raise PluginError(f"aiplane_evaluators returned {cls!r}, which is not an Evaluator subclass")
            if found.get(cls.name, cls) is not cls:
                raise PluginError(
                    f"Two plugins provide the evaluator {cls.name!r} ({found[cls.name].__module__} and "
                    f"{cls.__module__}); uninstall one, or disable one with AIPLANE_DISABLE_PLUGINS."
                )
            found[cls.name] = cls
    return found


def evaluation_settings(value: Any, pm: pluggy.PluginManager | None = None) -> BaseModel | None:
    """``trainer.settings.evaluation`` validated: a model with one attribute per installed evaluator (``None``
    where not turned on). A ``ValueError`` names an evaluator no plugin provides; pydantic's error, an
    evaluator's setting (at ``<name>.<key>``)."""
    if value is None or (isinstance(value, BaseModel) and hasattr(value, "_evaluators")):
        return value
    installed = evaluators(pm)
    given = value.model_dump() if isinstance(value, BaseModel) else value
    if not isinstance(given, Mapping):
        raise ValueError(f"must map evaluator names to their settings, e.g. {{watsonx_gov: {{...}}}}; got {given!r}")
    for name in given:
        if name not in installed:
            raise ValueError(unknown_name("evaluator", str(name), installed))
    fields: dict[str, Any] = {name: (cls.Settings | None, None) for name, cls in installed.items()}
    model = create_model("EvaluationSettings", __config__=ConfigDict(extra="forbid", frozen=True), **fields)
    model._evaluators = installed  # type: ignore[attr-defined]  # the classes its fields came from, for the calls below
    return model.model_validate(dict(given))


def _chosen(settings: BaseModel) -> list[Evaluator]:
    classes: dict[str, type[Evaluator]] = type(settings)._evaluators  # type: ignore[attr-defined]  # set by evaluation_settings
    return [cls(getattr(settings, name)) for name, cls in classes.items() if getattr(settings, name) is not None]


def evaluation_metrics(settings: BaseModel | None) -> list[str]:
    """The ``eval_*`` metric names the evaluations turned on in ``settings`` add."""
    return [name for e in _chosen(settings) for name in e.metrics()] if settings is not None else []


def check_evaluation(settings: BaseModel | None) -> None:
    """Each evaluation's :meth:`Evaluator.check`: before training, not after."""
    for e in _chosen(settings) if settings is not None else ():
        e.check()


def evaluate(
    settings: BaseModel | None, rows: Sequence[Mapping[str, Any]], predictions: Sequence[str], ctx: WorkloadContext
) -> dict[str, float]:
    """The metrics of every evaluation turned on in ``settings``, one after another."""
    metrics: dict[str, float] = {}
    for e in _chosen(settings) if settings is not None else ():
        metrics.update(e.evaluate(rows, predictions, ctx))
    return metrics
