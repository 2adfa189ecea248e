"""A LoRA adapter merged into its base model's weights: what a ``merged`` endpoint serves.

The merge is the LoRA update itself, applied to the base model's safetensors
shard by shard: ``W + scale * B @ A`` for every adapted module, in float32 and
cast back to the base weight's dtype, where ``scale`` is ``alpha / r`` (``alpha /
sqrt(r)`` with rsLoRA), per module when the adapter's ``rank_pattern`` or
``alpha_pattern`` says so. Nothing else of the base model changes, so the
directory is a Hugging Face model vLLM loads (and reloads in place) like the
base model. What a plain merge cannot express (DoRA, trained embeddings or
``modules_to_save``, trained biases) is refused before anything is written.

The result is content-addressed (the adapter's digest names its directory) and
written atomically, so a deploy that finds it reuses it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from aiplane.core.errors import InputError
from aiplane.core.publishing import staged_dir

__all__ = ["merge_adapter", "mergeable"]

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def mergeable(adapter_dir: Path) -> None:
    """InputError, before anything is written, unless the adapter in ``adapter_dir`` is a plain LoRA a merge
    reproduces exactly."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    refused = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        refused.append(f"peft_type {config.get('peft_type')!r}")
    if config.get("use_dora"):
        refused.append("DoRA (use_dora)")
    if config.get("modules_to_save"):
        refused.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        refused.append(f"bias {config['bias']!r}")
    if refused:
        raise InputError(
            f"Adapter {adapter_dir} cannot be merged into its base model ({', '.join(refused)}); "
            "serve it with the vllm target's `adapters: lora`."
        )


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The base model in ``base_dir`` with the adapter in ``adapter_dir`` merged in, written to ``out_dir``
    (reused when it is there already); see the module docstring."""
    if (out_dir / "config.json").is_file():
        return out_dir
    mergeable(adapter_dir)
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise InputError(
            f"Base model {base_dir} has no *.safetensors weights, so an adapter cannot be merged into it; "
            "serve it with the vllm target's `adapters: lora`."
        )
    deltas = _updates(adapter_dir)
    # A concurrent deploy of the same adapter that renamed its copy first wins: both merged the same bytes.
    with staged_dir(out_dir, complete="config.json") as staging:
        for item in base_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
        left = _merge_shards(shards, deltas, staging)
        if left:
            raise InputError(
                f"Adapter {adapter_dir} adapts modules its base model {base_dir} does not have "
                f"({', '.join(sorted(left)[:5])}): it was trained on another base model."
            )
    return out_dir


def _merge_shards(shards: list[Path], deltas: dict[str, tuple[Any, Any, float, bool]], staging: Path) -> set[str]:
    """Write every base shard into ``staging`` with its adapted weights updated; the weights not found."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    left = set(deltas)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
        for key in left & tensors.keys():
            a, b, scale, transposed = deltas[key]
            delta = scale * (b.float() @ a.float())
            weight = tensors[key]
            tensors[key] = (weight.float() + (delta.T if transposed else delta)).to(weight.dtype).contiguous()
            if not torch.isfinite(tensors[key]).all():
                raise InputError(f"Merging the adapter into {key} gives non-finite weights: the adapter is corrupt.")
            left.discard(key)
        save_file(tensors, str(staging / shard.name), metadata=metadata)
    return left


def _updates(adapter_dir: Path) -> dict[str, tuple[Any, Any, float, bool]]:
    """Base weight name -> (A, B, scale, fan_in_fan_out) for every module the adapter adapts."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(f"Adapter {adapter_dir} has no adapter_model.safetensors; re-train or re-materialize it.")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a corrupt file
        raise InputError(f"Adapter weights {path} are unreadable ({exc}); re-train or re-materialize it.") from None
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise InputError(
                f"Adapter {adapter_dir} holds {key!r}, which is not a LoRA A or B matrix, so a merge cannot "
                "reproduce it; serve it with the vllm target's `adapters: lora`."
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    updates = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"Adapter {adapter_dir} has only lora_{''.join(ab)} for {module}: it is incomplete.")
        name = module.removeprefix(_PREFIX)
        updates[f"{name}.weight"] = (ab["A"], ab["B"], _scale(config, name), bool(config.get("fan_in_fan_out")))
    return updates


def _scale(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling for ``module``: its rank and alpha (patterns first, matched as PEFT matches them)."""
    r = _pattern(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> float:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return float(default)
