"""The built-in base model: a small random-init Granite with a BPE tokenizer trained here.

No model hub can be reached at run time, so ``builtin:tiny-granite`` is built
locally: a ``GraniteForCausalLM`` from a ``GraniteConfig`` (the architecture of
ibm-granite/granite-3.x) and a byte-level BPE tokenizer trained with
``tokenizers`` on the sample tickets. Both are saved with ``save_pretrained``, so
the rest of aiplane loads it like any Hugging Face model directory, and the same
code loads a real Granite from its local path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from aiplane.core.artifacts import sha256_path
from aiplane.core.errors import InputError
from aiplane.core.records import BaseModelRecord

__all__ = ["build_tiny_granite", "resolve", "BUILTIN", "TINY_CONFIG"]

BUILTIN = "builtin:tiny-granite"
TINY_CONFIG = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from aiplane.core.sample import generate_tickets, to_features

    rows = to_features(generate_tickets())
    texts = [r["prompt"] + r["completion"] for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )


def build_tiny_granite(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny Granite into ``directory`` (atomically) and return it. Deterministic for a seed."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        tokenizer = _train_tokenizer(TINY_CONFIG["vocab_size"])
        torch.manual_seed(seed)
        config = GraniteConfig(
            **TINY_CONFIG,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GraniteForCausalLM(config)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "aiplane.json").write_text(json.dumps({"builtin": BUILTIN, "seed": seed}))
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def resolve(uri: str, home: str) -> BaseModelRecord | None:
    """A record for ``uri``: the built-in tiny Granite, or a local model directory; ``None`` for other schemes."""
    if uri == BUILTIN:
        path = build_tiny_granite(Path(home) / "models" / "tiny-granite")
        name = "tiny-granite (random init)"
    elif uri.startswith("builtin:"):
        raise InputError(f"Unknown built-in base model {uri!r}; the built-in model is {BUILTIN!r}.")
    elif "://" in uri and not uri.startswith("file://"):
        return None  # hf://, s3://, ...: another plugin's to resolve
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise InputError(
                f"Base model path {str(path)!r} does not exist. Point base_model.uri at a local directory "
                f"holding a Hugging Face model (config.json, weights, tokenizer), or use {BUILTIN!r}."
            )
        if not (path / "config.json").is_file():
            raise InputError(f"Base model path {str(path)!r} has no config.json; it is not a Hugging Face model directory.")
        name = path.name
    config = json.loads((path / "config.json").read_text())
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    params = _parameter_count(config)
    return BaseModelRecord(
        uri=str(path.resolve()),
        digest=sha256_path(path),
        name=name,
        architecture=arch,
        parameters=params,
    )


def _parameter_count(config: dict) -> int:
    """Parameters as the config implies them (no weights are loaded to count)."""
    h, i, n = config.get("hidden_size", 0), config.get("intermediate_size", 0), config.get("num_hidden_layers", 0)
    v, heads = config.get("vocab_size", 0), config.get("num_attention_heads", 1) or 1
    kv = config.get("num_key_value_heads", heads)
    head_dim = h // heads if heads else 0
    attn = h * h * 2 + 2 * h * kv * head_dim
    per_layer = attn + 3 * h * i + 2 * h
    emb = v * h * (1 if config.get("tie_word_embeddings") else 2)
    return n * per_layer + emb + h
