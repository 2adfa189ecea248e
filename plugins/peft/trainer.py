"""The ``lora`` trainer: validated LoRA settings and the training workload that uses them.

This module is imported when plugins are listed, so it stays light: torch and
transformers are imported only inside :meth:`LoraTrainer.validate`, and the
training itself lives in :mod:`aiplane.plugins.peft.train`, which runs wherever
the engine puts the workload.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from aiplane.core.components import Trainer
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.workload import Workload

if TYPE_CHECKING:
    from aiplane.core.records import BaseModelRecord, FeaturesRecord

__all__ = ["LoraSettings", "LoraTrainer", "ENTRYPOINT", "model_path"]

ENTRYPOINT = "aiplane.plugins.peft.train:run"

# Module types PEFT's LoRA can wrap; only Linear suffixes are suggested in errors,
# because those are what one targets on a decoder-only language model.
_LORA_MODULE_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d")


def _must(cond: bool, message: str) -> None:
    # A custom error type keeps the message free of pydantic's "Value error, " prefix.
    if not cond:
        raise PydanticCustomError("invalid_setting", message)


class LoraSettings(BaseModel):
    """Settings of the ``lora`` trainer (``trainer.settings`` in a deployment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int
    """LoRA rank."""
    alpha: float
    """LoRA scaling numerator; the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    target_modules: list[str]
    """Module name suffixes to adapt, e.g. ``[q_proj, v_proj]``."""
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

    @field_validator("r", "max_steps", "batch_size", "log_every", "max_new_tokens")
    @classmethod
    def _positive_int(cls, v: int, info) -> int:
        _must(v > 0, f"{info.field_name} must be > 0 (got {v})")
        return v

    @field_validator("alpha", "learning_rate")
    @classmethod
    def _positive_float(cls, v: float, info) -> float:
        _must(v > 0, f"{info.field_name} must be > 0 (got {v})")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        _must(0 <= v < 1, f"dropout must be in [0, 1) (got {v})")
        return v

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, v: int) -> int:
        _must(v >= 16, f"seq_len must be >= 16 (got {v})")
        return v

    @field_validator("eval_limit")
    @classmethod
    def _eval_limit(cls, v: int) -> int:
        _must(v >= 0, f"eval_limit must be >= 0 (got {v}); 0 skips evaluation")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        _must(bool(v), "target_modules must name at least one module, e.g. [q_proj, v_proj]")
        _must(all(isinstance(t, str) and t.strip() for t in v), "target_modules entries must be non-empty names")
        return [t.strip() for t in v]


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
def _module_names(config_text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names of LoRA-wrappable modules, sorted Linear suffixes) of the model a ``config.json`` describes.

    Keyed on the config's text, so an edited config is re-read. The model is built
    on the ``meta`` device: no weights are allocated, so a 2B model takes milliseconds,
    and nothing but the config is needed, so the preflight can run it before the
    model exists on this machine.
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
    return tuple(wrappable), tuple(sorted(linear))


class LoraTrainer(Trainer):
    """Trains a LoRA adapter on a causal language model with PEFT.

    Prompt and completion are packed into fixed-length blocks and the loss is
    taken on completion tokens only; the adapter is published to the
    content-addressed artifact store and evaluated on the ``eval`` split.
    """

    name: ClassVar[str] = "lora"
    Settings: ClassVar[type[BaseModel]] = LoraSettings
    entrypoint: ClassVar[str] = ENTRYPOINT
    # modeling_utils, not just `transformers`: the top-level package is lazy, and the seconds go in modeling_utils.
    preload: ClassVar[tuple[str, ...]] = ("torch", "transformers.modeling_utils", "peft")

    def validate(self, base_model: "BaseModelRecord") -> None:
        """Check that the base model is there and every target module exists in it. No side effects.

        A model still in object storage is checked where it is fetched (the workload);
        the preflight has checked its ``config.json`` already.
        """
        if base_model.uri.startswith("s3://"):
            return
        from .base_model import weights

        path = model_path(base_model)
        shapes = weights(str(path), "")
        if shapes and self.check_weights(shapes, base_model.name):
            return  # settled from the files' headers, without importing torch into the orchestrator
        self.check_model(json.loads((path / "config.json").read_text()), base_model.name)

    def check_model(self, config: Mapping[str, Any], model_name: str) -> None:
        """Every ``target_modules`` entry must match a module of the model ``config`` describes."""
        wrappable, linear = _module_names(json.dumps(dict(config), sort_keys=True))
        missing = [
            t for t in self.settings.target_modules if not any(n == t or n.endswith("." + t) for n in wrappable)
        ]
        if missing:
            arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
            raise ConfigError(
                f"trainer.settings.target_modules: {', '.join(repr(m) for m in missing)} "
                f"{'does' if len(missing) == 1 else 'do'} not match any module of base model {model_name!r} "
                f"({arch}). Available Linear modules: {', '.join(linear) or '(none)'}."
            )

    def check_weights(self, weights: Mapping[str, Sequence[int]], model_name: str) -> bool:
        """True when every target module owns a 2-D ``weight`` (a Linear, Conv1D or Embedding: what LoRA wraps).

        Only confirms: a target not found here (a tied ``lm_head`` has no weight
        of its own in the file) is left to :meth:`check_model`, which builds the model.
        """
        modules = {name.removesuffix(".weight") for name, shape in weights.items() if name.endswith(".weight") and len(shape) == 2}
        return all(any(m == t or m.endswith("." + t) for m in modules) for t in self.settings.target_modules)

    def workload(self, base_model: "BaseModelRecord", features: "FeaturesRecord", artifact_root: str) -> Workload:
        """The ``train-adapter`` workload; its result's ``adapter`` output is an AdapterRecord."""
        self.validate(base_model)
        return Workload(
            name="train-adapter",
            entrypoint=ENTRYPOINT,
            inputs={"base_model": base_model, "features": features},
            params={"settings": self.settings.model_dump(mode="json"), "artifact_root": str(artifact_root)},
        )
