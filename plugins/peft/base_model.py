"""The built-in base model: a small random-init Granite with a BPE tokenizer trained here.

No model hub can be reached at run time, so ``builtin:tiny-granite`` is built
locally: a ``GraniteForCausalLM`` from a ``GraniteConfig`` (the architecture of
ibm-granite/granite-3.x) and a byte-level BPE tokenizer trained with
``tokenizers`` on the sample tickets. Both are saved with ``save_pretrained``, so
the rest of aiplane loads it like any Hugging Face model directory, and the same
code loads a real Granite from its local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiplane.core.artifacts import remembered_sha256, sha256_path
from aiplane.core.errors import InputError
from aiplane.core.publishing import staged_dir
from aiplane.core.records import BaseModelRecord

__all__ = ["build_tiny_granite", "resolve", "config", "read_config", "weights", "BUILTIN", "TINY_CONFIG"]

BUILTIN = "builtin:tiny-granite"
TINY_CONFIG: dict[str, Any] = dict(
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
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory  # before the imports: the orchestrator needs neither torch nor transformers otherwise
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    with staged_dir(directory, complete="config.json") as staging:  # a concurrent build of the same seed may win
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
    return directory


def _local_path(uri: str) -> Path:
    """The directory a ``file://`` or plain path URI names; InputError when it holds no model."""
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise InputError(
            f"Base model path {str(path)!r} does not exist. Point base_model.uri at a local directory "
            f"holding a Hugging Face model (config.json, weights, tokenizer), or use {BUILTIN!r}."
        )
    if not (path / "config.json").is_file():
        raise InputError(f"Base model path {str(path)!r} has no config.json; it is not a Hugging Face model directory.")
    return path


def read_config(path: Path) -> dict:
    """The ``config.json`` of the model directory ``path``; InputError naming it when it is not a JSON object."""
    return _parse_config(path / "config.json", (path / "config.json").read_bytes())


def _parse_config(where: object, text: bytes) -> dict:
    try:
        parsed = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(
            f"The model's config {where} is not valid JSON ({exc}): it was probably cut short while it was copied. "
            "Copy (or download) the model again, or point base_model.uri at a complete model directory."
        ) from None
    if not isinstance(parsed, dict):
        raise InputError(f"The model's config {where} holds a {type(parsed).__name__}, not a JSON object; it is not a model config.")
    return parsed


def _check_builtin(uri: str) -> None:
    if uri != BUILTIN:
        raise InputError(f"Unknown built-in base model {uri!r}; the built-in model is {BUILTIN!r}.")


def _ours(uri: str) -> bool:
    return uri.startswith(("builtin:", "file://", "s3://")) or "://" not in uri


def config(uri: str, home: str, s3=None) -> dict | None:
    """``config.json`` of the model at ``uri`` without building or downloading it; ``None`` for other schemes."""
    if not _ours(uri):
        return None
    if uri.startswith("s3://"):
        from aiplane.core.storage import Storage

        storage = Storage(s3)
        if not storage.exists(uri.rstrip("/") + "/config.json"):
            raise InputError(f"Base model {uri!r} has no config.json; point base_model.uri at a Hugging Face model directory.")
        return _parse_config(uri.rstrip("/") + "/config.json", storage.read_bytes(uri.rstrip("/") + "/config.json"))
    if uri.startswith("builtin:"):
        _check_builtin(uri)
        # What build_tiny_granite writes, less the special-token ids the tokenizer assigns.
        return {**TINY_CONFIG, "model_type": "granite", "architectures": ["GraniteForCausalLM"]}
    return read_config(_local_path(uri))


def weights(uri: str, home: str) -> dict[str, tuple[int, ...]] | None:
    """Shape by parameter name of the model at ``uri``, from its safetensors headers; ``None`` when not here.

    A model in object storage, a built-in model not built yet and a directory
    without safetensors files all give ``None``: the caller checks the config instead.
    A file whose header is cut short, or that is shorter than its header says
    (safetensors checks both when it opens a file), raises InputError naming it.
    """
    if not _ours(uri) or uri.startswith("s3://"):
        return None
    if uri.startswith("builtin:"):
        _check_builtin(uri)
        path = Path(home) / "models" / "tiny-granite"
    else:
        path = _local_path(uri)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import SafetensorError, safe_open  # reads the JSON header only; no torch

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as exc:
            raise InputError(
                f"Weights file {str(file)!r} cannot be read ({exc}): it was probably cut short while it was copied "
                f"({file.stat().st_size:,} bytes). Copy (or download) the model again, or point base_model.uri at a "
                "complete model directory."
            ) from None
    return shapes


def resolve(uri: str, home: str, s3=None) -> BaseModelRecord | None:
    """A record for ``uri``: the built-in tiny Granite, a local model directory or one in object storage.

    ``None`` for other schemes (``hf://``, ...: another plugin's to resolve). A
    model in object storage keeps its ``s3://`` URI, so a workload anywhere
    fetches it from there; its digest is of its files, downloaded once into
    ``<home>/cache`` and digested there.
    """
    if not _ours(uri):
        return None
    record_uri = digest = None
    if uri.startswith("s3://"):
        record_uri = uri.rstrip("/")
        path = _fetch(record_uri, Path(home) / "cache" / "models", s3)
        digest = "sha256:" + path.name  # digested when it was downloaded; a multi-GB model is not re-read
        name = record_uri.rsplit("/", 1)[-1]
    elif uri.startswith("builtin:"):
        _check_builtin(uri)
        path = build_tiny_granite(Path(home) / "models" / "tiny-granite")
        name = "tiny-granite (random init)"
    else:
        path = _local_path(uri)
        name = path.name
    model_config = read_config(path)
    arch = (model_config.get("architectures") or [model_config.get("model_type", "unknown")])[0]
    params = _parameter_count(model_config)
    return BaseModelRecord(
        uri=record_uri or str(path.resolve()),
        # Every run that names the model digests it, and so does the hint preparing its server meanwhile:
        # a multi-GB directory is read once while its files stay as they were.
        digest=digest or remembered_sha256(path, Path(home) / "cache" / "digests"),
        name=name,
        architecture=arch,
        parameters=params,
    )


def _fetch(uri: str, cache: Path, s3) -> Path:
    """The model at ``uri`` in ``cache``, downloaded once per content.

    Object stores list each file's size and modification time; while those are
    unchanged the cached copy is used without downloading or digesting again.
    """
    from aiplane.core.artifacts import atomic_write_text
    from aiplane.core.storage import Storage

    storage = Storage(s3)
    listing = storage.list_files(uri)
    if not listing:
        raise InputError(f"Base model {uri!r} is empty or does not exist in the bucket.")
    fingerprint = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()
    seen = cache / "listings" / fingerprint
    if seen.is_file() and (cache / seen.read_text().strip()).is_dir():
        return cache / seen.read_text().strip()
    staging = Path(tempfile.mkdtemp(dir=_mkdir(cache), prefix=".download."))
    try:
        storage.download_dir(uri, staging)
        digest = sha256_path(staging).removeprefix("sha256:")
        final = cache / digest
        if not final.is_dir():
            os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(seen, digest)
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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
