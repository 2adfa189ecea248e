"""The ``lora``, ``sft`` and ``distill`` trainers: validated settings and the training workload that uses them.

This module is imported when plugins are listed, so it stays light: torch and
transformers are imported only inside the model checks, and the training
itself lives in :mod:`aiplane.plugins.peft.train` (the one loop all three
share) and :mod:`aiplane.plugins.peft.methods` (what differs between them),
which run wherever the engine puts the workload.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from aiplane.core.components import Trainer
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.evaluation import evaluation_metrics, evaluation_settings
from aiplane.core.workload import Workload

if TYPE_CHECKING:
    from aiplane.core.records import BaseModelRecord, FeaturesRecord

__all__ = [
    "LoraSettings",
    "SftSettings",
    "DistillSettings",
    "LoraTrainer",
    "SftTrainer",
    "DistillTrainer",
    "ENTRYPOINT",
    "model_path",
]

ENTRYPOINT = "aiplane.plugins.peft.train:run"
"""The ``lora`` trainer's entry point; ``sft`` and ``distill`` have their own beside it in the same module."""

# The numeric metrics every adapter record of these trainers carries (see .train), evaluation's aside.
_LOOP_METRICS = frozenset({
    "train_loss_first", "train_loss_last", "tokens_per_s", "train_tokens", "dataset_tokens", "steps",
    "train_rows", "eval_rows", "trainable_parameters", "duration_s", "world_size",
})  # fmt: skip

# Module types PEFT's LoRA can wrap; only Linear suffixes are suggested in errors,
# because those are what one targets on a decoder-only language model.
_LORA_MODULE_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d")


def _must(cond: bool, message: str) -> None:
    # A custom error type keeps the message free of pydantic's "Value error, " prefix.
    if not cond:
        raise PydanticCustomError("invalid_setting", message)


def _positive(cls, v: float, info) -> float:
    """A field validator (``field_validator(name, ...)(_positive)``): the setting must be > 0. Each class binds it
    under its own attribute name, so a settings class inheriting two of them keeps both."""
    _must(v > 0, f"{info.field_name} must be > 0 (got {v})")
    return v


class LoraParams(BaseModel):
    """The LoRA adapter's shape: what ``lora`` trains, and a ``distill`` student with ``student: lora``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int
    """LoRA rank."""
    alpha: float
    """LoRA scaling numerator; the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    target_modules: list[str]
    """Module name suffixes to adapt, e.g. ``[q_proj, v_proj]``."""

    _positive_lora = field_validator("r", "alpha")(_positive)

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        _must(0 <= v < 1, f"dropout must be in [0, 1) (got {v})")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        _must(bool(v), "target_modules must name at least one module, e.g. [q_proj, v_proj]")
        _must(all(isinstance(t, str) and t.strip() for t in v), "target_modules entries must be non-empty names")
        return [t.strip() for t in v]


class LoopSettings(BaseModel):
    """Settings of the training loop every trainer here shares: steps, batches, packing, evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int
    batch_size: int
    seq_len: int
    """Tokens per packed training block."""
    learning_rate: float
    seed: int = 0
    eval_limit: int = 64
    """At most this many eval rows are scored (loss and generated label)."""
    log_every: int = 10
    max_new_tokens: int = 8
    """Tokens generated per eval prompt to read the predicted label."""
    precision: Literal["auto", "fp32"] = "auto"
    """How a LoRA adapter's training steps compute on a CPU. ``auto``: where the CPU has bfloat16 dot-product
    instructions (AVX512-BF16, AMX) and the model is Llama-family (Granite, Llama), through aiplane's fused
    training forward, the frozen base weights' products on bfloat16 operands with float32 accumulation and
    everything that trains in float32 (:mod:`aiplane.plugins.peft.fused`); elsewhere as ``fp32``. ``fp32``:
    through transformers' own forward in float32. On a GPU the model trains in bfloat16 either way; full-model
    training (``sft``, a ``full`` student) always takes transformers' forward."""
    evaluation: Any = None
    """More metrics on the eval split's generations, by evaluator name (the ``aiplane_evaluators`` hook), e.g.
    ``{watsonx_gov: {metrics: [answer_similarity], ...}}``; none: loss and exact-match accuracy only."""

    _positive_loop = field_validator("max_steps", "batch_size", "log_every", "max_new_tokens", "learning_rate")(_positive)

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, v: int) -> int:
        _must(v >= 16, f"seq_len must be >= 16 (got {v})")
        return v

    @field_validator("evaluation")
    @classmethod
    def _evaluation(cls, v: Any) -> Any:
        return evaluation_settings(v)  # against the installed evaluators' settings, so errors name their keys

    @field_validator("eval_limit")
    @classmethod
    def _eval_limit(cls, v: int) -> int:
        _must(v >= 0, f"eval_limit must be >= 0 (got {v}); 0 skips evaluation")
        return v


def _unfreeze_names(v: list[str] | None) -> list[str] | None:
    if v is not None:
        _must(bool(v), "unfreeze must name at least one layer, e.g. [model.layers.1, lm_head]; leave it out to train every weight")
        _must(all(isinstance(t, str) and t.strip() for t in v), "unfreeze entries must be non-empty names")
        v = [t.strip() for t in v]
    return v


class LoraSettings(LoopSettings, LoraParams):
    """Settings of the ``lora`` trainer (``trainer.settings`` in a deployment)."""


class SftSettings(LoopSettings):
    """Settings of the ``sft`` trainer: full fine-tuning of all weights, or of the named layers only."""

    unfreeze: list[str] | None = None
    """Parameter name parts to train, e.g. ``[model.layers.1, lm_head]`` or ``[mlp]``; the rest stays frozen.
    An entry matches a parameter whose dotted name starts with it or contains it between dots. None: every weight."""

    @field_validator("unfreeze")
    @classmethod
    def _unfreeze(cls, v: list[str] | None) -> list[str] | None:
        return _unfreeze_names(v)


class DistillSettings(LoopSettings):
    """Settings of the ``distill`` trainer: a student learns the teacher's token distributions on the completions."""

    teacher: str
    """The teacher model: a Hugging Face model directory (``file://`` or a path), or ``builtin:tiny-granite``.
    It must share the base model's tokenizer (same vocabulary)."""
    teacher_adapter: str | None = None
    """A LoRA adapter directory (one the ``lora`` trainer published) applied to the teacher; none: the teacher alone."""
    temperature: float = 2.0
    """Both distributions are softened by this temperature; the KL term is scaled by its square."""
    alpha: float = 0.5
    """Weight of the KL term; the label (cross-entropy) loss has ``1 - alpha``. 1: the teacher alone teaches."""
    student: Literal["lora", "full"] = "lora"
    """``lora``: the student is the base model plus a LoRA adapter (``lora`` settings); ``full``: all its weights train."""
    lora: LoraParams | None = None
    """The student's adapter (``r``, ``alpha``, ``dropout``, ``target_modules``); required with ``student: lora``."""
    unfreeze: list[str] | None = None
    """With ``student: full``, train only these parameters (as ``sft``'s ``unfreeze``); none: every weight."""

    @field_validator("unfreeze")
    @classmethod
    def _unfreeze(cls, v: list[str] | None) -> list[str] | None:
        return _unfreeze_names(v)

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        _must(bool(v.strip()), "teacher must name a model: a model directory or builtin:tiny-granite")
        return v.strip()

    _positive_distill = field_validator("temperature")(_positive)

    @field_validator("alpha")
    @classmethod
    def _weight(cls, v: float) -> float:
        _must(0 <= v <= 1, f"alpha (the KL term's weight) must be in [0, 1] (got {v})")
        return v

    @model_validator(mode="after")
    def _student(self) -> "DistillSettings":
        if self.student == "lora":
            _must(self.lora is not None, "student: lora needs lora: {r, alpha, target_modules}; or set student: full")
            _must(self.unfreeze is None, "unfreeze applies to student: full; a lora student trains its adapter only")
        else:
            _must(self.lora is None, "lora: applies to student: lora; remove it, or set student: lora")
        return self


def model_path(base_model: "BaseModelRecord") -> Path:
    """The local directory of ``base_model``; :class:`InputError` when it is not there."""
    path = Path(base_model.uri.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise InputError(
            f"Base model directory {str(path)!r} (base model {base_model.name!r}) does not exist on this machine. "
            "Re-resolve the base model, or make the directory available where the workload runs."
        )
    if not (path / "config.json").is_file():
        raise InputError(f"Base model directory {str(path)!r} has no config.json; it is not a Hugging Face model directory.")
    return path


@functools.lru_cache(maxsize=16)
def _module_names(config_text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(LoRA-wrappable module names, sorted Linear suffixes, parameter names) of the model a ``config.json`` describes.

    Keyed on the config's text, so an edited config is re-read. The model is built
    on the ``meta`` device: no weights are allocated, so a 2B model takes milliseconds,
    and nothing but the config is needed, so the preflight can run it before the
    model exists on this machine. Parameter names include tied ones (``lm_head.weight``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_text)
    try:
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
        config = AutoConfig.for_model(raw.get("model_type", ""), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown architecture, a broken config
        raise InputError(f"Cannot build the model its config.json describes: {type(exc).__name__}: {exc}") from exc
    wrappable, linear = [], set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in _LORA_MODULE_TYPES and name:
            wrappable.append(name)
            if kind == "Linear":
                linear.add(name.rsplit(".", 1)[-1])
    params = tuple(n for n, _ in model.named_parameters(remove_duplicate=False))
    return tuple(wrappable), tuple(sorted(linear)), params


def unfrozen(name: str, unfreeze: Sequence[str] | None) -> bool:
    """Whether parameter ``name`` trains under ``unfreeze`` (see :attr:`SftSettings.unfreeze`)."""
    return unfreeze is None or any(name.startswith(u + ".") or f".{u}." in f".{name}" for u in unfreeze)


def _arch(config: Mapping[str, Any]) -> str:
    return (config.get("architectures") or [config.get("model_type", "unknown")])[0]


def _check_lora(lora: LoraParams, config: Mapping[str, Any], model_name: str, key: str) -> None:
    wrappable, linear, _ = _module_names(json.dumps(dict(config), sort_keys=True))
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in wrappable)]
    if missing:
        raise ConfigError(
            f"trainer.settings.{key}: {', '.join(repr(m) for m in missing)} "
            f"{'does' if len(missing) == 1 else 'do'} not match any module of base model {model_name!r} "
            f"({_arch(config)}). Available Linear modules: {', '.join(linear) or '(none)'}."
        )


def _lora_in_weights(lora: LoraParams, weights: Mapping[str, Sequence[int]]) -> bool:
    modules = {name.removesuffix(".weight") for name, shape in weights.items() if name.endswith(".weight") and len(shape) == 2}
    return all(any(m == t or m.endswith("." + t) for m in modules) for t in lora.target_modules)


def _check_unfreeze(unfreeze: Sequence[str] | None, config: Mapping[str, Any], model_name: str) -> None:
    if unfreeze is None:
        return
    _, _, params = _module_names(json.dumps(dict(config), sort_keys=True))
    missing = [u for u in unfreeze if not any(unfrozen(p, [u]) for p in params)]
    if missing:
        # Whole decoder layers and the modules outside them: what one usually unfreezes.
        layers = sorted({".".join(p.split(".")[:3]) if ".layers." in p else p.rsplit(".", 1)[0] for p in params})
        raise ConfigError(
            f"trainer.settings.unfreeze: {', '.join(repr(m) for m in missing)} "
            f"{'matches' if len(missing) == 1 else 'match'} no parameter of base model {model_name!r} ({_arch(config)}). "
            f"Name a layer or module, e.g. one of: {', '.join(layers[:12])}{', ...' if len(layers) > 12 else ''}."
        )


def _unfreeze_in_weights(unfreeze: Sequence[str] | None, weights: Mapping[str, Sequence[int]]) -> bool:
    return unfreeze is None or all(any(unfrozen(p, [u]) for p in weights) for u in unfreeze)


L = TypeVar("L", bound=LoopSettings)


class _PeftTrainer(Trainer[L]):
    """What the three trainers share: the base-model checks' skeleton and the ``train-adapter`` workload."""

    # modeling_utils, not just `transformers`: the top-level package is lazy, and the seconds go in modeling_utils.
    preload: ClassVar[tuple[str, ...]] = ("torch", "transformers.modeling_utils", "peft")

    def validate(self, base_model: "BaseModelRecord") -> None:
        """Check that the base model is there and the settings fit it. No side effects.

        A model still in object storage is checked where it is fetched (the workload);
        the preflight has checked its ``config.json`` already.
        """
        if base_model.uri.startswith("s3://"):
            return
        from .base_model import read_config, weights

        path = model_path(base_model)
        config = read_config(path)  # before the weights: a cut config is named as such, not as a load error
        shapes = weights(str(path), "")
        if shapes and self.check_weights(shapes, base_model.name):
            return  # settled from the files' headers, without importing torch into the orchestrator
        self.check_model(config, base_model.name)

    def produced_metrics(self) -> frozenset[str]:
        """The loop's metrics; with evaluation on (``eval_limit`` > 0), ``eval_loss``, ``eval_accuracy`` and
        the ``evaluation`` settings' ``eval_*`` metrics."""
        s: LoopSettings = self.settings
        if s.eval_limit == 0:
            return _LOOP_METRICS  # no eval row is scored, so the eval metrics are None
        more = evaluation_metrics(s.evaluation)
        return _LOOP_METRICS | {"eval_loss", "eval_accuracy", *more}

    def _inputs(self, base_model: "BaseModelRecord", features: "FeaturesRecord") -> dict[str, Any]:
        return {"base_model": base_model, "features": features}

    def workload(self, base_model: "BaseModelRecord", features: "FeaturesRecord", artifact_root: str) -> Workload:
        """The ``train-adapter`` workload; its result's ``adapter`` output is an AdapterRecord."""
        self.validate(base_model)
        return Workload(
            name="train-adapter",
            entrypoint=self.entrypoint,
            inputs=self._inputs(base_model, features),
            params={"settings": self.settings.model_dump(mode="json"), "artifact_root": str(artifact_root)},
        )


class LoraTrainer(_PeftTrainer[LoraSettings]):
    """Trains a LoRA adapter on a causal language model with PEFT.

    Prompt and completion are packed into fixed-length blocks and the loss is
    taken on completion tokens only; the adapter is published to the
    content-addressed artifact store and evaluated on the ``eval`` split.
    """

    name: ClassVar[str] = "lora"
    Settings: ClassVar[type[BaseModel]] = LoraSettings
    entrypoint: ClassVar[str] = ENTRYPOINT

    def check_model(self, config: Mapping[str, Any], model_name: str) -> None:
        """Every ``target_modules`` entry must match a module of the model ``config`` describes."""
        _check_lora(self.settings, config, model_name, "target_modules")

    def check_weights(self, weights: Mapping[str, Sequence[int]], model_name: str) -> bool:
        """True when every target module owns a 2-D ``weight`` (a Linear, Conv1D or Embedding: what LoRA wraps).

        Only confirms: a target not found here (a tied ``lm_head`` has no weight
        of its own in the file) is left to :meth:`check_model`, which builds the model.
        """
        return _lora_in_weights(self.settings, weights)

    def lora_rank(self) -> int:
        """``r``: every adapter this trainer trains has it."""
        return self.settings.r


class SftTrainer(_PeftTrainer[SftSettings]):
    """Full supervised fine-tuning: every weight of the base model trains, or only the ``unfreeze`` ones.

    Same loop, packing, loss (completion tokens), checkpoints and evaluation as
    ``lora``. What it publishes is a complete model directory (``config.json``,
    ``model.safetensors``, ``generation_config.json``, tokenizer files), content
    addressed under ``<artifact_root>/adapters/<sha256>``, so a serving target
    serves it as its own base model.

    Its record is an :class:`~aiplane.core.records.AdapterRecord` with
    ``method="sft"`` and ``config["full_model"] = True``, not a new record kind:
    the ``adapter_weights`` asset, the factsheet and the governance gate take
    the trained model as an AdapterRecord whatever the method, and the flag is
    what tells a consumer the URI is a whole model, not an adapter for the base
    model (which stays the record's ``base_model`` source, for lineage).
    """

    name: ClassVar[str] = "sft"
    Settings: ClassVar[type[BaseModel]] = SftSettings
    entrypoint: ClassVar[str] = "aiplane.plugins.peft.train:run_sft"

    def check_model(self, config: Mapping[str, Any], model_name: str) -> None:
        """Every ``unfreeze`` entry must match a parameter of the model ``config`` describes."""
        _check_unfreeze(self.settings.unfreeze, config, model_name)

    def check_weights(self, weights: Mapping[str, Sequence[int]], model_name: str) -> bool:
        """True when every ``unfreeze`` entry matches a weight in the files (a tied one is left to :meth:`check_model`)."""
        return _unfreeze_in_weights(self.settings.unfreeze, weights)


class DistillTrainer(_PeftTrainer[DistillSettings]):
    """Knowledge distillation: a student (the base model, LoRA or full) learns from a teacher's token distributions.

    On the completion tokens, the loss is ``alpha * T² * KL(teacher_T || student_T)
    + (1 - alpha) * cross-entropy(labels)``, each distribution softened by the
    temperature ``T``. The teacher is a model directory (or the built-in model)
    plus, optionally, a LoRA adapter; it must share the base model's vocabulary.
    What is published is what the student is: a LoRA adapter, or with
    ``student: full`` a complete model directory as ``sft`` publishes, recorded
    the same way (``config["full_model"] = True``). The teacher is a source of
    the record, and its digest (with its adapter's) is in the record's config,
    so the training run's digest changes with it.
    """

    name: ClassVar[str] = "distill"
    Settings: ClassVar[type[BaseModel]] = DistillSettings
    entrypoint: ClassVar[str] = "aiplane.plugins.peft.train:run_distill"

    def check_model(self, config: Mapping[str, Any], model_name: str) -> None:
        """The student's settings must fit the model ``config`` describes (LoRA targets, or ``unfreeze``)."""
        s: DistillSettings = self.settings
        if s.lora is not None:
            _check_lora(s.lora, config, model_name, "lora.target_modules")
        _check_unfreeze(s.unfreeze, config, model_name)

    def check_weights(self, weights: Mapping[str, Sequence[int]], model_name: str) -> bool:
        """True when the files' weights show the student's settings fit (else :meth:`check_model` decides)."""
        s: DistillSettings = self.settings
        return (s.lora is None or _lora_in_weights(s.lora, weights)) and _unfreeze_in_weights(s.unfreeze, weights)

    def lora_rank(self) -> int | None:
        """The student adapter's ``r``; ``None`` for a whole-model student."""
        s: DistillSettings = self.settings
        return s.lora.r if s.lora is not None else None

    def check(self, deployment) -> list[str]:
        """The teacher and its adapter are where the settings say, for ``aiplane check`` (no side effects)."""
        from aiplane.core.storage import local_path

        from .base_model import BUILTIN

        s: DistillSettings = self.settings
        problems = []
        if s.teacher == BUILTIN and deployment.base_model.uri != BUILTIN:
            problems.append(
                f"settings.teacher {BUILTIN!r} is found beside the built-in base model, but base_model.uri is "
                f"{deployment.base_model.uri!r}; give the teacher's model directory instead."
            )
        elif not s.teacher.startswith("builtin:") and not (local_path(s.teacher) / "config.json").is_file():
            problems.append(f"settings.teacher {s.teacher!r} is not a model directory on this machine (no config.json).")
        if s.teacher_adapter is not None and not (local_path(s.teacher_adapter) / "adapter_config.json").is_file():
            problems.append(f"settings.teacher_adapter {s.teacher_adapter!r} holds no adapter_config.json.")
        return problems

    def validate(self, base_model: "BaseModelRecord") -> None:
        """The student's checks, and the teacher (and its adapter) exist and share the base model's vocabulary."""
        super().validate(base_model)
        self._teacher_paths(base_model)

    def teacher(self, base_model: "BaseModelRecord") -> "BaseModelRecord":
        """The teacher's record: its directory and digest (with its adapter's, if any). Checked as :meth:`validate` does.

        ``builtin:tiny-granite`` is the built-in model, found where the base
        model is when the base model is the built-in one (the orchestrator's
        home); any other teacher is a directory on this machine.
        """
        from aiplane.core.artifacts import sha256_path

        from .base_model import _parameter_count, read_config

        path, adapter = self._teacher_paths(base_model)
        if path == model_path(base_model):
            teacher = base_model  # digested already
        else:
            config = read_config(path)
            teacher = base_model.model_copy(
                update={"uri": str(path.resolve()), "digest": sha256_path(path), "name": path.name,
                        "architecture": _arch(config), "parameters": _parameter_count(config)}
            )  # fmt: skip
        name = f"teacher: {teacher.name}"
        if adapter is None:
            return teacher.model_copy(update={"name": name, "sources": ()})
        # The adapter is part of the teacher: a digest over both names exactly what teaches.
        return teacher.model_copy(
            update={"digest": f"{teacher.digest}+{sha256_path(adapter)}", "name": f"{name} + adapter", "sources": ()}
        )

    def _teacher_paths(self, base_model: "BaseModelRecord") -> tuple[Path, Path | None]:
        """The teacher's model directory and adapter directory, checked; nothing is read beyond configs."""
        from aiplane.core.storage import local_path

        from .base_model import BUILTIN, read_config

        s: DistillSettings = self.settings
        if s.teacher.startswith("builtin:"):
            if s.teacher != BUILTIN:
                raise ConfigError(f"trainer.settings.teacher: unknown built-in model {s.teacher!r}; the built-in model is {BUILTIN!r}.")
            marker = model_path(base_model) / "aiplane.json"
            if not (marker.is_file() and json.loads(marker.read_text()).get("builtin") == BUILTIN):
                raise ConfigError(
                    f"trainer.settings.teacher: {BUILTIN!r} is found beside the built-in base model, but the base model "
                    f"is {base_model.name!r}; give the teacher's model directory instead."
                )
            path = model_path(base_model)
        elif "://" in s.teacher and not s.teacher.startswith("file://"):
            raise ConfigError(
                f"trainer.settings.teacher: {s.teacher!r} is not a local model directory; copy the teacher to a "
                "directory the workload can read, or use builtin:tiny-granite."
            )
        else:
            path = local_path(s.teacher)
            if not (path / "config.json").is_file():
                raise InputError(
                    f"trainer.settings.teacher: {str(path)!r} is not a Hugging Face model directory (no config.json "
                    "there); point it at the teacher's model directory, e.g. one the sft trainer published."
                )
        vocab = read_config(path).get("vocab_size")
        base_vocab = read_config(model_path(base_model)).get("vocab_size")
        if vocab != base_vocab:
            raise ConfigError(
                f"trainer.settings.teacher: the teacher {str(path)!r} has a vocabulary of {vocab} tokens and the base "
                f"model {base_model.name!r} of {base_vocab}; distillation compares their distributions token by token, "
                "so they must share a tokenizer."
            )
        adapter = None
        if s.teacher_adapter is not None:
            adapter = local_path(s.teacher_adapter)
            if not (adapter / "adapter_config.json").is_file():
                raise InputError(
                    f"trainer.settings.teacher_adapter: {s.teacher_adapter!r} holds no adapter_config.json; "
                    "point it at an adapter directory the lora trainer published."
                )
        return path, adapter

    def _inputs(self, base_model: "BaseModelRecord", features: "FeaturesRecord") -> dict[str, Any]:
        return {**super()._inputs(base_model, features), "teacher": self.teacher(base_model)}
