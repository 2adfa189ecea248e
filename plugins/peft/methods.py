"""What makes ``lora``, ``sft`` and ``distill`` different on the one training loop of :mod:`.train`.

A :class:`Method` is the four things that differ: how the loaded base model is
prepared (wrapped in a LoRA adapter, or some or all weights unfrozen), hence
what trains; the loss on a packed batch (completion-token cross-entropy, or
that mixed with a teacher's distributions); what is saved (an adapter, or a
complete model directory); and what the record's ``config`` says beyond the
settings. Packing, the optimizer, checkpoints, cancellation, metrics,
evaluation and publishing are the loop's, the same for all.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiplane.core.records import BaseModelRecord

from .attention import Segments
from .packing import IGNORE
from .trainer import DistillSettings, LoraParams, LoopSettings, LoraSettings, SftSettings, unfrozen

if TYPE_CHECKING:
    import torch

__all__ = ["Method", "method_for", "label_loss", "logits", "scored_logits"]

# Files PEFT writes besides the adapter itself (a generated model card); left out so
# the published directory, and so its digest, is exactly config + weights.
_NOT_PUBLISHED = ("README.md",)


def logits(net: Any, input_ids: "torch.Tensor", position_ids: "torch.Tensor | None" = None, attention_mask=None):
    """Next-token logits (float32, the last position dropped) of a packed or padded batch.

    ``use_cache=False`` matters: with a cache, transformers does not derive the
    per-example mask from ``position_ids`` and packed examples would attend to
    each other again.
    """
    out = net(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, :-1].float()


def scored_logits(
    net: Any, input_ids, labels, position_ids=None, attention_mask=None, layout: Segments | None = None
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Next-token logits (float32) of only the positions whose next token is labelled, ``(n, vocab)``, and those n labels.

    The head (hidden state to vocabulary, the largest matrix of a small model)
    runs only where a loss is taken: in a packed block of prompts and short
    completions that is about one position in eight. transformers applies it
    to the positions a boolean ``logits_to_keep`` marks, in row-major order,
    the order in which the labels are taken here. ``layout``: the packed
    batch's :func:`~.attention.segments`, for a model inside
    :func:`~.attention.packed_attention`.
    """
    import torch.nn.functional as F

    # Position t predicts token t + 1; the last position of a row predicts nothing in it.
    scored = F.pad(labels[:, 1:] != IGNORE, (0, 1))
    more = {} if layout is None else {"packed_segments": layout}
    out = net(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
        logits_to_keep=scored, **more,
    )  # fmt: skip
    return out.logits.float(), labels[:, 1:][scored[:, :-1]]


def label_loss(
    net: Any, input_ids, labels, position_ids=None, attention_mask=None, layout: Segments | None = None
) -> tuple["torch.Tensor", int]:
    """(summed cross-entropy over labelled next tokens, number of labelled tokens)."""
    import torch.nn.functional as F

    scores, target = scored_logits(net, input_ids, labels, position_ids, attention_mask, layout)
    return F.cross_entropy(scores, target, reduction="sum"), int(target.numel())


@dataclass
class Method:
    """One trainer's part of the loop; built by :func:`method_for`."""

    name: str
    lora: LoraParams | None = None
    """The adapter to train; ``None``: the model's own weights train (those ``unfreeze`` names, or all)."""
    unfreeze: list[str] | None = None
    teacher: Any = None
    """The teacher model (eval mode, no gradients) of ``distill``; ``None``: the label loss alone."""
    temperature: float = 1.0
    alpha: float = 0.0
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def full_model(self) -> bool:
        """Whether what is published is a complete model directory rather than an adapter."""
        return self.lora is None

    def prepare(self, model: Any) -> Any:
        """The model to train: wrapped in a LoRA adapter, or with only the trainable weights requiring gradients."""
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                task_type="CAUSAL_LM",
                r=self.lora.r,
                lora_alpha=self.lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works; its hint says int
                lora_dropout=self.lora.dropout,
                target_modules=list(self.lora.target_modules),
            )
            with warnings.catch_warnings():
                # peft 0.21 probes an attribute transformers 5 deprecated; the warning is noise for users.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, config)
        # remove_duplicate=False: a tied lm_head named in unfreeze trains the embedding it shares.
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(unfrozen(name, self.unfreeze))
        return model

    def describe(self, trainable: int) -> str:
        """What trains, for the run's first log line."""
        if self.lora is not None:
            what = f"lora r={self.lora.r} alpha={self.lora.alpha:g} on {', '.join(self.lora.target_modules)}"
        else:
            what = "full model" if self.unfreeze is None else f"layers {', '.join(self.unfreeze)}"
        if self.teacher is not None:
            what = f"{self.name}: student {what}, T={self.temperature:g} alpha={self.alpha:g}"
        elif self.name != "lora":
            what = f"{self.name}: {what}"
        return f"{what}: {trainable:,} trainable parameters"

    def loss(self, net: Any, input_ids, labels, position_ids, layout: Segments | None = None) -> tuple["torch.Tensor", int]:
        """(summed loss over the labelled tokens of the batch, their number): the loop normalises by the count.

        ``layout``: the batch's :func:`~.attention.segments`, when ``net`` (and the teacher) run inside
        :func:`~.attention.packed_attention`, as the loop runs them."""
        if self.teacher is None:
            return label_loss(net, input_ids, labels, position_ids, layout=layout)
        import torch
        import torch.nn.functional as F

        s, target = scored_logits(net, input_ids, labels, position_ids, layout=layout)
        with torch.no_grad():
            teacher, _ = scored_logits(self.teacher, input_ids, labels, position_ids, layout=layout)
        t = self.temperature
        # KL(teacher || student) at temperature t, summed over the completion tokens; t² keeps its
        # gradients on the scale of the label loss's whatever the temperature (Hinton et al., 2015).
        kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum")
        ce = F.cross_entropy(s, target, reduction="sum")
        return self.alpha * t * t * kl + (1 - self.alpha) * ce, int(target.numel())

    def save(self, model: Any, tokenizer: Any, directory: Path, base_model: BaseModelRecord) -> None:
        """Write what is published into ``directory``: the adapter, or the whole model with its tokenizer."""
        model.save_pretrained(directory)
        if self.lora is not None:
            for name in _NOT_PUBLISHED:
                (directory / name).unlink(missing_ok=True)
            _stable_adapter_config(directory / "adapter_config.json", base_model)
            return
        tokenizer.save_pretrained(directory)
        for name in ("config.json", "tokenizer_config.json"):
            _without_paths(directory / name)

    def record_config(self, settings: LoopSettings) -> dict[str, Any]:
        """The record's ``config``: the settings, and for a whole model ``full_model: true`` (what consumers test)."""
        config = settings.model_dump(mode="json")
        if self.full_model:
            config["full_model"] = True
        return {**config, **self.extra_config}


def method_for(name: str, settings: LoopSettings) -> Method:
    """The :class:`Method` of trainer ``name`` with ``settings``; a distillation's teacher is attached by the loop."""
    if isinstance(settings, LoraSettings):
        return Method(name, lora=LoraParams(**{k: getattr(settings, k) for k in LoraParams.model_fields}))
    if isinstance(settings, SftSettings):
        return Method(name, unfreeze=settings.unfreeze)
    if isinstance(settings, DistillSettings):
        return Method(name, lora=settings.lora, unfreeze=settings.unfreeze, temperature=settings.temperature, alpha=settings.alpha)
    raise TypeError(f"no training method for settings of type {type(settings).__name__}")


def _stable_adapter_config(path: Path, base_model: BaseModelRecord) -> None:
    """Make the adapter config depend only on the training, never on the process or machine that ran it.

    PEFT keeps ``target_modules`` in a set, whose order changes with every
    interpreter's string hash seed: they are sorted. It writes the directory the
    base model was loaded from as ``base_model_name_or_path``: that becomes the
    base model's digest, which names exactly the weights the adapter applies to
    wherever they sit. Whoever loads the adapter passes the base model itself
    (``PeftModel.from_pretrained(model, adapter)``), as the serving target does.
    """
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model.digest
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _without_paths(path: Path) -> None:
    """Drop the directory a model or tokenizer was loaded from, so a model's digest is the same wherever it trained."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for key in ("_name_or_path", "name_or_path"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
