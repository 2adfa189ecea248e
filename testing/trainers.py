"""The trainer contract, statically (what the preflight and an engine rely on before anything trains) and, when asked,
by running its workload on a small model the caller gives."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiplane.core.components import Trainer
from aiplane.core.errors import AiplaneError
from aiplane.core.records import AdapterRecord, BaseModelRecord, FeaturesRecord
from aiplane.core.workload import Workload

from ._common import Broken, Writes, check_settings, run_workload
from .fixtures import sample_base_model, sample_deployment, sample_features

__all__ = ["check_trainer"]


def check_trainer(
    cls: type[Trainer[Any]],
    settings: Mapping[str, Any] | None,
    tmp_path: Path,
    model_config: Mapping[str, Any] | None = None,
    base_model: BaseModelRecord | None = None,
    features: FeaturesRecord | None = None,
    engine: Any = None,
    describe: bool = True,
) -> None:
    """Check trainer ``cls``'s contract; raise ConformanceError naming the broken promise.

    ``model_config`` (a ``config.json`` the settings fit) is handed to ``check_model``. With ``base_model`` and
    ``features`` (real ones, small) the training workload is run too and its ``adapter`` record checked.
    ``describe=False`` leaves ``workload()`` out: a trainer that checks the model there may build it, which costs
    seconds (torch, transformers) a quick suite may not have.
    """
    trainer = check_settings(cls, Trainer, "trainer", settings)
    broken = Broken("trainer", cls.name)
    module, _, attr = str(cls.entrypoint).partition(":")
    broken.require(module and attr, f"entrypoint {cls.entrypoint!r} is not 'package.module:function' (engines prestart it)")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise broken(f"entrypoint {cls.entrypoint!r} is not importable here: {exc}") from None
    broken.require(callable(function), f"entrypoint {cls.entrypoint!r} is not a function")
    metrics = trainer.produced_metrics()
    broken.require(metrics is None or (isinstance(metrics, frozenset) and all(isinstance(m, str) for m in metrics)),
                   f"produced_metrics() must be a frozenset of names or None, got {metrics!r}")  # fmt: skip
    rank = trainer.lora_rank()
    broken.require(rank is None or (isinstance(rank, int) and rank > 0), f"lora_rank() must be a positive int or None, got {rank!r}")
    base, given = base_model or sample_base_model(tmp_path), features or sample_features(tmp_path)
    writes = Writes([tmp_path])
    problems = trainer.check(sample_deployment(tmp_path, "trainer", cls.name, dict(settings or {})))
    broken.require(isinstance(problems, list) and all(isinstance(p, str) for p in problems), "check() must return a list of sentences")
    if model_config is not None:
        try:
            trainer.check_model(model_config, "conformance-model")
        except AiplaneError as exc:
            raise broken(f"check_model() refused the model config the test gave it: {exc}") from None
    broken.require(not writes.changed(), f"check() and check_model() must not write anything; they wrote {writes.changed()[:3]}")
    if not describe:
        return
    work = trainer.workload(base, given, str(tmp_path / "artifacts"))
    broken.require(isinstance(work, Workload), f"workload() must return a Workload, not {type(work).__name__}")
    broken.require(
        work.entrypoint == cls.entrypoint,
        f"workload().entrypoint {work.entrypoint!r} is not the declared entrypoint {cls.entrypoint!r}",
    )
    broken.require(not writes.changed(), f"workload() must only describe the work, not do it; it wrote {writes.changed()[:3]}")
    if base_model is None or features is None:
        return
    adapter = run_workload(work, engine).outputs.get("adapter")
    broken.require(isinstance(adapter, AdapterRecord), "workload() result has no 'adapter' key holding an AdapterRecord")
    assert isinstance(adapter, AdapterRecord)
    broken.require(any(s.digest == base.digest for s in adapter.sources), "the adapter's sources lack its base model")
    broken.require(any(s.digest == features.digest for s in adapter.sources), "the adapter's sources lack its features")
    if metrics is not None:
        missing = sorted(m for m in metrics if m not in adapter.metrics)
        broken.require(not missing, f"produced_metrics() promises {missing} but the adapter record lacks them")
