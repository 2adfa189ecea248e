"""The ``train-adapter`` workload: LoRA fine-tuning with PEFT and a plain PyTorch loop.

:func:`run` is the workload entry point (``aiplane.plugins.peft.train:run``); it
reads the feature rows through the feature store named in the features record and
calls :func:`train`, which tests and other callers can use directly with rows in
hand. The same code trains the built-in tiny Granite on a CPU and a real Granite
directory on a GPU.

Distributed and recoverable without knowing the engine: when the engine has set
up ``torch.distributed`` (Ray Train does), the model is wrapped in
DistributedDataParallel and every global batch of ``batch_size`` packed blocks
is split across the ranks, with the loss normalised over the whole batch, so
one worker and N workers take the same optimisation steps. Every
``ctx.checkpoint_every`` steps the trainable weights, optimizer, schedule and
step go to ``ctx.report``; a restarted run resumes from
``ctx.latest_checkpoint()`` and, the batch order being a function of the step,
ends with the same adapter. Only rank 0 logs progress, evaluates and publishes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiplane.core import __version__ as _AIPLANE_VERSION
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, FeaturesRecord
from aiplane.core.workload import WorkloadContext

from .trainer import LoraSettings, LoraTrainer, model_path

if TYPE_CHECKING:
    import torch

__all__ = ["run", "train"]

_IGNORE = -100
_REQUIRED = ("prompt", "completion", "split")
# Files PEFT writes besides the adapter itself (a generated model card); left out so
# the published directory, and so its digest, is exactly config + weights.
_NOT_PUBLISHED = ("README.md",)
_CHECKPOINT_FILE = "train_state.pt"


def run(ctx: WorkloadContext) -> dict[str, AdapterRecord]:
    """Workload entry point: read the features through their store, train, return ``{"adapter": ...}``.

    Ranks other than the primary return no outputs: the primary publishes the one adapter.
    """
    from aiplane.core.plugins import Registry

    base_model, features = ctx.inputs.get("base_model"), ctx.inputs.get("features")
    if not isinstance(base_model, BaseModelRecord) or not isinstance(features, FeaturesRecord):
        raise InputError("The train-adapter workload needs a 'base_model' and a 'features' input record.")
    settings = LoraTrainer(ctx.params.get("settings")).settings
    store = features.store or {}
    if not store.get("name"):
        raise InputError(
            f"Features record for table {features.table!r} names no feature store (its 'store' is empty), "
            "so the rows cannot be read. Publish the features through a feature store plugin."
        )
    artifact_root = ctx.params.get("artifact_root")
    if not artifact_root:
        raise InputError("The train-adapter workload has no 'artifact_root' parameter; build it with LoraTrainer.workload().")
    table = Registry().create("feature store", store["name"], store.get("settings")).read(features)
    if ctx.is_primary:
        ctx.log(f"read {table.num_rows} rows of {features.table} at snapshot {features.snapshot_id}")
    adapter = train(base_model, features, table.to_pylist(), settings, artifact_root, ctx)
    return {"adapter": adapter} if adapter is not None else {}


def train(
    base_model: BaseModelRecord,
    features: FeaturesRecord,
    rows: Sequence[Mapping[str, Any]],
    settings: LoraSettings | Mapping[str, Any],
    artifact_root: str,
    ctx: WorkloadContext,
) -> AdapterRecord | None:
    """Train a LoRA adapter on the ``train`` rows, evaluate on the ``eval`` rows, publish it.

    ``rows`` are feature rows (prompt, completion, split, ...). Progress goes to
    ``ctx`` (``train_loss`` and ``tokens_per_s`` metrics, log lines) and
    ``ctx.check_cancelled()`` is called every step. Every input is checked
    before anything is written; the adapter is published atomically under
    ``<artifact_root>/adapters/<sha256>`` only after training and evaluation
    succeeded, so a failed or cancelled run leaves nothing behind. On several
    workers every rank trains its share; the primary returns the record, the
    others ``None``.
    """
    started = time.perf_counter()
    trainer = LoraTrainer(settings)
    s: LoraSettings = trainer.settings  # type: ignore[assignment]
    train_rows, eval_rows = _split_rows(rows, features)
    # A base model in object storage is fetched once per digest; the rest reads it from disk.
    base_model = base_model.model_copy(update={"uri": str(ctx.local(base_model.uri, base_model.digest))})
    trainer.validate(base_model)
    eval_rows = eval_rows[: s.eval_limit]
    rank, world = _world(ctx)
    if s.batch_size < world:
        raise ConfigError(
            f"trainer.settings.batch_size ({s.batch_size}) is the global batch, split across the {world} workers; "
            f"it must be at least the number of workers. Raise batch_size or use fewer workers."
        )

    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(s.seed)
    model, tokenizer, device = _load(str(model_path(base_model)))
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=list(s.target_modules),
    )
    with warnings.catch_warnings():
        # peft 0.21 probes an attribute transformers 5 deprecated; the warning is noise for users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs, labels, dataset_tokens = _pack(tokenizer, train_rows, s.seq_len)
    if ctx.is_primary:
        ctx.log(
            f"lora r={s.r} alpha={s.alpha:g} on {', '.join(s.target_modules)}: {trainable:,} trainable parameters; "
            f"{len(train_rows)} train rows -> {dataset_tokens:,} tokens in {inputs.shape[0]} blocks of {s.seq_len}; "
            f"{s.max_steps} steps of batch {s.batch_size} on {device}"
            + (f" split across {world} workers" if world > 1 else "")
        )

    curve, train_s, resumed_from = _optimize(model, inputs, labels, s, device, ctx, rank, world)
    train_tokens = s.max_steps * s.batch_size * s.seq_len
    if not ctx.is_primary:
        return None
    eval_loss, eval_accuracy = _evaluate(model, tokenizer, eval_rows, s, device, ctx)

    store = ctx.artifacts(artifact_root)
    with store.staging() as staged:
        model.save_pretrained(staged)
        for name in _NOT_PUBLISHED:
            (staged / name).unlink(missing_ok=True)
        _stable_config(staged / "adapter_config.json", base_model)
        uri, digest = store.publish(staged, "adapters")

    k = max(1, min(10, len(curve) // 5))
    metrics: dict[str, Any] = {
        "loss_curve": [[step, loss] for step, loss in curve],
        "train_loss_first": sum(loss for _, loss in curve[:k]) / k,
        "train_loss_last": sum(loss for _, loss in curve[-k:]) / k,
        "tokens_per_s": train_tokens / train_s if train_s > 0 else 0.0,
        "train_tokens": train_tokens,
        "dataset_tokens": dataset_tokens,
        "steps": s.max_steps,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "eval_loss": eval_loss,
        "eval_accuracy": eval_accuracy,
        "trainable_parameters": trainable,
        "duration_s": time.perf_counter() - started,
        "device": _device_name(device),
        "world_size": world,
        # The code that trained, so the training run's digest (see aiplane.core.factsheet) covers it too.
        "aiplane_version": _AIPLANE_VERSION,
    }
    if resumed_from is not None:
        metrics["resumed_from_step"] = resumed_from
    ctx.metrics = {name: v for name, v in metrics.items() if not isinstance(v, list)}
    ctx.log(
        f"published adapter {digest} to {uri}: train loss {metrics['train_loss_first']:.3f} -> "
        f"{metrics['train_loss_last']:.3f}, eval loss {_fmt(eval_loss)}, eval accuracy {_fmt(eval_accuracy)}"
    )
    return AdapterRecord(
        uri=uri,
        digest=digest,
        method=LoraTrainer.name,
        config=s.model_dump(mode="json"),
        metrics=metrics,
        run_id=ctx.run_id,
        sources=(base_model, features),
    )


def _stable_config(path: Path, base_model: BaseModelRecord) -> None:
    """Make the adapter config depend only on the training, never on the process or machine that ran it.

    PEFT keeps ``target_modules`` in a set, whose order changes with every
    interpreter's string hash seed: they are sorted. It writes the directory the
    base model was loaded from as ``base_model_name_or_path``: that becomes the
    base model's digest, which names exactly the weights the adapter applies to
    wherever they sit. Whoever loads the adapter passes the base model itself
    (``PeftModel.from_pretrained(model, adapter)``), as the serving target does.
    """
    import json

    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model.digest
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _split_rows(
    rows: Sequence[Mapping[str, Any]], features: FeaturesRecord
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Train and eval rows, each sorted by id so the result does not depend on the store's read order."""
    for i, row in enumerate(rows):
        missing = [c for c in _REQUIRED if not isinstance(row.get(c), str)]
        if missing:
            raise InputError(
                f"Feature row {i} (id {row.get('id')!r}) of table {features.table!r} lacks text column(s) "
                f"{', '.join(missing)}; training rows need prompt, completion and split."
            )
    ordered = sorted(rows, key=lambda r: str(r.get("id", "")))
    train_rows = [r for r in ordered if r["split"] == "train"]
    eval_rows = [r for r in ordered if r["split"] == "eval"]
    if not train_rows:
        splits = sorted({r["split"] for r in rows})
        raise InputError(
            f"empty training set: features {features.table!r} (snapshot {features.snapshot_id}) have no rows with "
            f"split == 'train' ({len(rows)} rows; splits present: {', '.join(splits) or 'none'}). "
            "Publish features that include training rows."
        )
    return train_rows, eval_rows


def _world(ctx: WorkloadContext) -> tuple[int, int]:
    """(rank, world size) of this process; the engine's runtime and torch.distributed must agree."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        where = f"torch.distributed says rank {rank} of {world}"
    else:
        rank, world = 0, 1
        where = "torch.distributed is not initialized"
    if (rank, world) != (ctx.rank, ctx.world_size):
        raise WorkloadError(
            f"the engine runs this workload as rank {ctx.rank} of {ctx.world_size} but {where}; "
            "a distributed engine must set up the process group before the workload starts."
        )
    return rank, world


def _load(path: str) -> tuple[Any, Any, "torch.device"]:
    """Tokenizer and model from a Hugging Face directory: bfloat16 on CUDA, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The current CUDA device: a distributed engine selects one per local rank before the workload starts.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, device


def _device_name(device: "torch.device") -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _example(tokenizer: Any, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + eos and labels that score only the completion and eos."""
    # Prompt and completion are tokenized apart, as generation sees them: the
    # model continues the prompt's own tokens.
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, [_IGNORE] * len(prompt) + completion


def _pack(tokenizer: Any, rows: Sequence[Mapping[str, Any]], seq_len: int) -> tuple["torch.Tensor", "torch.Tensor", int]:
    """All examples concatenated and cut into ``seq_len`` blocks; no padding anywhere.

    The last partial block is completed with tokens from the start of the
    stream (training cycles over the data anyway), so every block is full.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        x, y = _example(tokenizer, row)
        ids += x
        labels += y
    total = len(ids)
    n_blocks = max(1, math.ceil(total / seq_len))
    reps = math.ceil(n_blocks * seq_len / total)
    ids, labels = (ids * reps)[: n_blocks * seq_len], (labels * reps)[: n_blocks * seq_len]
    return (
        torch.tensor(ids, dtype=torch.long).view(n_blocks, seq_len),
        torch.tensor(labels, dtype=torch.long).view(n_blocks, seq_len),
        total,
    )


def _batches(n_blocks: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of block indices: shuffled epochs, one after another."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(n_blocks, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def _completion_loss(model: Any, input_ids: "torch.Tensor", labels: "torch.Tensor", attention_mask=None):
    """(summed cross-entropy over labelled next tokens, number of labelled tokens)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=_IGNORE, reduction="sum")
    return total, int((target != _IGNORE).sum())


def _optimize(
    model: Any,
    inputs: "torch.Tensor",
    labels: "torch.Tensor",
    s: LoraSettings,
    device: "torch.device",
    ctx: WorkloadContext,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[tuple[int, float]], float, int | None]:
    """The AdamW loop; returns the loss at every step, the seconds spent in it and the step it resumed from.

    With ``world > 1`` rank ``r`` takes blocks ``r, r + world, ...`` of every
    global batch; the loss of each rank is its summed token loss over the
    labelled tokens of the whole batch (times ``world``, which DDP's gradient
    mean divides out), so the update equals the single-process one.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    # A short linear warm-up keeps the first updates of a high LoRA learning rate from overshooting.
    warmup = max(1, s.max_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    curve: list[tuple[int, float]] = []
    done_s, start = 0.0, 0
    checkpoint = ctx.latest_checkpoint()
    if checkpoint is not None:
        start, curve, done_s = _restore(checkpoint, model, optimizer, scheduler, s)
        if ctx.is_primary:
            ctx.log(f"resumed from checkpoint at step {start}/{s.max_steps}")
    net = model
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are identical on every rank; broadcasting them each step is waste.
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    model.train()
    batches = _batches(inputs.shape[0], s.batch_size, s.seed)
    for _ in range(start):
        # The batch order is a function of the step, so a resumed run sees what the first attempt would have.
        next(batches)
    tokens_per_step = s.batch_size * s.seq_len
    every = ctx.checkpoint_every
    started = window_start = time.perf_counter()
    for step in range(start + 1, s.max_steps + 1):
        ctx.check_cancelled()
        idx = next(batches)[rank::world]
        x, y = inputs[idx].to(device), labels[idx].to(device)
        total, count = _completion_loss(net, x, y)
        if world > 1:
            sums = torch.tensor([float(total.detach()), float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            batch_total, batch_count = float(sums[0]), float(sums[1])
            loss = total * world / max(batch_count, 1.0)
            value = batch_total / max(batch_count, 1.0)
        else:
            loss = total / max(count, 1)
            value = float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if not math.isfinite(value):
            raise WorkloadError(
                f"training loss became {value} at step {step}; lower trainer.settings.learning_rate "
                f"(now {s.learning_rate:g})"
            )
        curve.append((step, value))
        if ctx.is_primary and (step % s.log_every == 0 or step == s.max_steps):
            now = time.perf_counter()
            done = min(step - start, step % s.log_every or s.log_every)
            rate = done * tokens_per_step / max(now - window_start, 1e-9)
            window_start = now
            ctx.metric("train_loss", value, step)
            ctx.metric("tokens_per_s", rate, step)
            ctx.log(f"step {step}/{s.max_steps} loss {value:.4f} ({rate:,.0f} tokens/s)")
        if every and step % every == 0 and step < s.max_steps:
            _checkpoint(ctx, model, optimizer, scheduler, s, step, curve, done_s + time.perf_counter() - started)
    return curve, done_s + time.perf_counter() - started, (start if checkpoint is not None else None)


def _checkpoint(ctx: WorkloadContext, model: Any, optimizer: Any, scheduler: Any, s: LoraSettings,
                step: int, curve: list[tuple[int, float]], train_s: float) -> None:
    """Hand the training state at ``step`` to the engine; every rank calls this, the primary writes it."""
    import torch

    directory: Path | None = None
    try:
        if ctx.is_primary:
            directory = Path(tempfile.mkdtemp(prefix="aiplane-checkpoint-"))
            state = {
                "step": step,
                "settings": s.model_dump(mode="json"),
                "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "curve": curve,
                "train_s": train_s,
            }
            torch.save(state, directory / _CHECKPOINT_FILE)
        ctx.report({"step": step, "train_loss": curve[-1][1]}, directory)
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    if ctx.is_primary:
        ctx.log(f"checkpoint at step {step}/{s.max_steps}")


def _restore(directory: Path, model: Any, optimizer: Any, scheduler: Any, s: LoraSettings) -> tuple[int, list[tuple[int, float]], float]:
    """Load a checkpoint written by :func:`_checkpoint` into the model and optimizer; (step, curve, seconds)."""
    import torch

    path = Path(directory) / _CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WorkloadError(f"cannot read the checkpoint to resume from ({path}): {exc}") from None
    if state.get("settings") != s.model_dump(mode="json"):
        raise WorkloadError(f"the checkpoint at {directory} was written with other trainer settings; it cannot be resumed")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(state["trainable"]):
        raise WorkloadError(f"the checkpoint at {directory} does not hold this model's trainable parameters")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name].to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), [(int(a), float(b)) for a, b in state["curve"]], float(state["train_s"])


def _evaluate(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], s: LoraSettings, device: "torch.device", ctx: WorkloadContext
) -> tuple[float | None, float | None]:
    """Completion-token loss and exact-match accuracy of the greedily generated label on ``rows``."""
    import torch

    if not rows:
        ctx.log("no eval rows (split == 'eval'): eval_loss and eval_accuracy are not measured")
        return None, None
    model.eval()
    pad = tokenizer.pad_token_id
    loss_sum, loss_tokens, correct = 0.0, 0, 0
    batch_size = max(1, s.batch_size)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ctx.check_cancelled()
            chunk = rows[start : start + batch_size]
            examples = [_example(tokenizer, r) for r in chunk]
            width = max(len(x) for x, _ in examples)
            # Right padding for scoring: padded positions are masked out and unlabelled.
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in examples], device=device)
            lab = torch.tensor([y + [_IGNORE] * (width - len(y)) for _, y in examples], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in examples], device=device)
            total, count = _completion_loss(model, ids, lab, mask)
            loss_sum += float(total)
            loss_tokens += count
            correct += sum(
                pred == r["completion"].strip() for pred, r in zip(_generate(model, tokenizer, chunk, s, device), chunk)
            )
    eval_loss = loss_sum / max(loss_tokens, 1)
    accuracy = correct / len(rows)
    ctx.metric("eval_loss", eval_loss)
    ctx.metric("eval_accuracy", accuracy)
    ctx.log(f"eval on {len(rows)} rows: loss {eval_loss:.4f}, exact-match accuracy {accuracy:.3f}")
    return eval_loss, accuracy


def _generate(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], s: LoraSettings, device: "torch.device") -> list[str]:
    """Greedy continuations of the prompts, cut at end-of-sequence and newline, stripped."""
    import torch

    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    # Left padding so every prompt ends where generation starts.
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=s.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = []
    for seq in out[:, width:].tolist():
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(seq, skip_special_tokens=True)
        texts.append(text.split("\n", 1)[0].strip())
    return texts
