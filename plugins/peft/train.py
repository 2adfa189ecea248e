"""The ``train-adapter`` workload: one plain PyTorch loop for the ``lora``, ``sft`` and ``distill`` trainers.

:func:`run`, :func:`run_sft` and :func:`run_distill` are the trainers' workload
entry points; each reads the feature rows through the feature store named in
the features record and calls :func:`train`, which tests and other callers can
use directly with rows in hand. What differs between the trainers (how the
model is prepared, hence what trains; the loss; what is saved) is a
:class:`~aiplane.plugins.peft.methods.Method`; everything else is here, once.
The same code trains the built-in tiny Granite on a CPU and a real Granite
directory on a GPU.

Distributed and recoverable without knowing the engine: when the engine has set
up ``torch.distributed`` (Ray Train does), the model is wrapped in
DistributedDataParallel and every global batch of ``batch_size`` packed blocks
is split across the ranks, with the loss normalised over the whole batch, so
one worker and N workers take the same optimisation steps. Every
``ctx.checkpoint_every`` steps the trainable weights (the adapter's, or the
model's), optimizer, schedule and step go to ``ctx.report``; a restarted run
resumes from ``ctx.latest_checkpoint()`` and, the batch order being a function
of the step, ends with the same weights. Only rank 0 logs progress, evaluates
and publishes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiplane.core import __version__ as _AIPLANE_VERSION
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.evaluation import check_evaluation, evaluate
from aiplane.core.artifacts import sha256_path
from aiplane.core.records import AdapterRecord, BaseModelRecord, FeaturesRecord, record_from_json, record_to_json
from aiplane.core.workload import WorkloadContext

from .attention import Segments, packed_attention, segments
from .methods import Method, label_loss, method_for
from .packing import IGNORE, Packed, batches, example, pack
from .trainer import DistillTrainer, LoopSettings, LoraTrainer, SftTrainer, model_path

if TYPE_CHECKING:
    import torch

__all__ = ["run", "run_sft", "run_distill", "train"]

_REQUIRED = ("prompt", "completion", "split")
_CHECKPOINT_FILE = "train_state.pt"
_KEPT_RECORD = "record.json"
_TRAINERS = {t.name: t for t in (LoraTrainer, SftTrainer, DistillTrainer)}


def run(ctx: WorkloadContext) -> dict[str, AdapterRecord]:
    """The ``lora`` trainer's workload entry point: read the features through their store, train, return ``{"adapter": ...}``.

    Ranks other than the primary return no outputs: the primary publishes the one adapter.
    """
    return _run(ctx, LoraTrainer.name)


def run_sft(ctx: WorkloadContext) -> dict[str, AdapterRecord]:
    """The ``sft`` trainer's workload entry point; as :func:`run`, the output a full model's record."""
    return _run(ctx, SftTrainer.name)


def run_distill(ctx: WorkloadContext) -> dict[str, AdapterRecord]:
    """The ``distill`` trainer's workload entry point; as :func:`run`, with the ``teacher`` input record."""
    return _run(ctx, DistillTrainer.name)


def _run(ctx: WorkloadContext, trainer: str) -> dict[str, AdapterRecord]:
    from aiplane.core.plugins import Registry

    base_model, features = ctx.inputs.get("base_model"), ctx.inputs.get("features")
    if not isinstance(base_model, BaseModelRecord) or not isinstance(features, FeaturesRecord):
        raise InputError("The train-adapter workload needs a 'base_model' and a 'features' input record.")
    settings = _TRAINERS[trainer](ctx.params.get("settings")).settings
    store = features.store or {}
    if not store.get("name"):
        raise InputError(
            f"Features record for table {features.table!r} names no feature store (its 'store' is empty), "
            "so the rows cannot be read. Publish the features through a feature store plugin."
        )
    artifact_root = ctx.params.get("artifact_root")
    if not artifact_root:
        raise InputError("The train-adapter workload has no 'artifact_root' parameter; build it with the trainer's workload().")
    table = Registry().create("feature store", store["name"], store.get("settings")).read(features)
    if ctx.is_primary:
        ctx.log(f"read {table.num_rows} rows of {features.table} at snapshot {features.snapshot_id}")
    teacher = ctx.inputs.get("teacher")
    if teacher is not None and not isinstance(teacher, BaseModelRecord):
        raise InputError(f"The train-adapter workload's 'teacher' input must be a base model, not a {type(teacher).__name__}.")
    adapter = train(base_model, features, table.to_pylist(), settings, artifact_root, ctx, trainer=trainer, teacher=teacher)
    return {"adapter": adapter} if adapter is not None else {}


def train(
    base_model: BaseModelRecord,
    features: FeaturesRecord,
    rows: Sequence[Mapping[str, Any]],
    settings: LoopSettings | Mapping[str, Any],
    artifact_root: str,
    ctx: WorkloadContext,
    *,
    trainer: str = LoraTrainer.name,
    teacher: BaseModelRecord | None = None,
) -> AdapterRecord | None:
    """Train with ``trainer`` (``lora``, ``sft`` or ``distill``) on the ``train`` rows, evaluate on the ``eval`` rows, publish.

    ``rows`` are feature rows (prompt, completion, split, ...). Progress goes to
    ``ctx`` (``train_loss`` and ``tokens_per_s`` metrics, log lines) and
    ``ctx.check_cancelled()`` is called every step. Every input is checked
    before anything is written; the adapter (or, for a full model, the model
    directory) is published atomically under ``<artifact_root>/adapters/<sha256>``
    only after training and evaluation succeeded, so a failed or cancelled run
    leaves nothing behind. A trained result the store would not take (after its
    retries) is kept under the workload's cache (``<home>/cache/staged/<key>``
    by default) with its record, and the next run of the same training publishes
    it, checked against its digest, instead of training again. On several workers every rank trains its share; the
    primary returns the record, the others ``None``. ``teacher`` (``distill``
    only) is the record the trainer's ``workload()`` resolved; resolved here when
    not given.
    """
    started = time.perf_counter()
    component, s, method = _trainer(trainer, settings)
    train_rows, eval_rows = _split_rows(rows, features)
    eval_rows = eval_rows[: s.eval_limit]
    sources: list[Any] = [base_model, features]
    base_model, teacher = _local_inputs(component, base_model, teacher, sources, ctx)
    if ctx.is_primary:
        check_evaluation(s.evaluation)
    rank, world = _world(ctx)
    if s.batch_size < world:
        raise ConfigError(
            f"trainer.settings.batch_size ({s.batch_size}) is the global batch, split across the {world} workers; "
            f"it must be at least the number of workers. Raise batch_size or use fewer workers."
        )
    store = ctx.artifacts(artifact_root)
    kept = _kept_dir(ctx, trainer, s, sources, store.root)
    # What an earlier run of this very training trained, but could not publish: published now, not trained again.
    if _on_every_rank(ctx.is_primary and _kept_record(kept, ctx) is not None, world):
        return _publish_kept(store, kept, ctx) if ctx.is_primary else None

    _set_cpu_threads()
    model, tokenizer, device, packed = _model_and_blocks(base_model, teacher, method, s, train_rows, ctx, world)
    curve, train_s, resumed_from, forward = _optimize(model, method, packed, s, device, ctx, rank, world)
    if not ctx.is_primary:
        return None
    eval_loss, eval_accuracy, predictions = _evaluate(model, tokenizer, eval_rows, s, device, ctx)
    # Before publishing: an adapter whose evaluation failed is never published.
    evaluation = {"eval_loss": eval_loss, "eval_accuracy": eval_accuracy, **evaluate(s.evaluation, eval_rows, predictions, ctx)}
    counts = {"dataset_tokens": packed.tokens, "steps": s.max_steps, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = _metrics(curve, s, train_s, counts, evaluation, trainable, time.perf_counter() - started, device, world)
    metrics["train_forward"] = forward
    if resumed_from is not None:
        metrics["resumed_from_step"] = resumed_from
    ctx.metrics = {name: v for name, v in metrics.items() if not isinstance(v, list)}
    # Where and under which digest are filled in by the publish. The base model first among the sources:
    # consumers take the first base_model source as what was trained from.
    unpublished = AdapterRecord(uri="", digest="", method=trainer, config=method.record_config(s), metrics=metrics,
                                run_id=ctx.run_id, sources=tuple(sources))  # fmt: skip
    with store.staging() as staged:
        method.save(model, tokenizer, staged, base_model)
        record = _publish(store, staged, kept, ctx, unpublished)
    ctx.log(
        f"published {'model' if method.full_model else 'adapter'} {record.digest} to {record.uri}: train loss "
        f"{metrics['train_loss_first']:.3f} -> {metrics['train_loss_last']:.3f}, eval loss {_fmt(eval_loss)}, "
        f"eval accuracy {_fmt(eval_accuracy)}"
    )
    return record


def _trainer(trainer: str, settings: LoopSettings | Mapping[str, Any]) -> tuple[Any, LoopSettings, Method]:
    """The trainer component named ``trainer`` with ``settings`` checked, its settings, and its method."""
    if trainer not in _TRAINERS:
        raise ConfigError(f"Unknown trainer {trainer!r} for the train-adapter workload; known: {', '.join(_TRAINERS)}.")
    component = _TRAINERS[trainer](settings)
    s: LoopSettings = component.settings
    return component, s, method_for(trainer, s)


def _local_inputs(
    component: Any, base_model: BaseModelRecord, teacher: BaseModelRecord | None, sources: list[Any], ctx: WorkloadContext
) -> tuple[BaseModelRecord, BaseModelRecord | None]:
    """The base model (and a distillation's teacher) as records of this worker's copies, checked.

    A base model in object storage is fetched once per digest; the rest reads it
    from disk. ``sources`` gains the teacher as the record names it where it is
    kept (s3://...), never this worker's copy, as the base model already is.
    """
    base_model = base_model.model_copy(update={"uri": str(ctx.local(base_model.uri, base_model.digest))})
    component.validate(base_model)
    if isinstance(component, DistillTrainer):
        teacher = teacher if teacher is not None else component.teacher(base_model)
        sources.append(teacher)
        teacher = teacher.model_copy(update={"uri": str(ctx.local(teacher.uri))})
    return base_model, teacher


def _model_and_blocks(
    base_model: BaseModelRecord, teacher: BaseModelRecord | None, method: Method, s: LoopSettings,
    train_rows: Sequence[Mapping[str, Any]], ctx: WorkloadContext, world: int,
) -> tuple[Any, Any, "torch.device", Packed]:
    """The model prepared to train (and the method's teacher loaded), its tokenizer and device, the packed rows."""
    from transformers import set_seed

    set_seed(s.seed)
    model, tokenizer, device = _load(str(model_path(base_model)))
    if teacher is not None:
        method.teacher = _load_teacher(teacher, s, device, ctx)
        method.extra_config["teacher_digest"] = teacher.digest
    model = method.prepare(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    packed = pack(tokenizer, train_rows, s.seq_len)
    if ctx.is_primary:
        ctx.log(
            f"{method.describe(trainable)}; "
            f"{len(train_rows)} train rows -> {packed.tokens:,} tokens in {packed.inputs.shape[0]} blocks of {s.seq_len}; "
            f"{s.max_steps} steps of batch {s.batch_size} on {device}"
            + (f" split across {world} workers" if world > 1 else "")
        )
    return model, tokenizer, device, packed


def _metrics(
    curve: Sequence[tuple[int, float]], s: LoopSettings, train_s: float, counts: Mapping[str, int],
    evaluation: Mapping[str, Any], trainable: int, duration_s: float, device: "torch.device", world: int,
) -> dict[str, Any]:
    """The adapter record's metrics: the loss curve and its ends, throughput, sizes, evaluation, where it ran."""
    k = max(1, min(10, len(curve) // 5))
    train_tokens = s.max_steps * s.batch_size * s.seq_len
    return {
        "loss_curve": [[step, loss] for step, loss in curve],
        "train_loss_first": sum(loss for _, loss in curve[:k]) / k,
        "train_loss_last": sum(loss for _, loss in curve[-k:]) / k,
        "tokens_per_s": train_tokens / train_s if train_s > 0 else 0.0,
        "train_tokens": train_tokens,
        **counts,
        **evaluation,
        "trainable_parameters": trainable,
        "duration_s": duration_s,
        "device": _device_name(device),
        "world_size": world,
        # The code that trained, so the training run's digest (see aiplane.core.factsheet) covers it too.
        "aiplane_version": _AIPLANE_VERSION,
    }


def _kept_dir(ctx: WorkloadContext, trainer: str, s: LoopSettings, sources: Sequence[Any], root: str) -> Path:
    """Where a trained result whose publish failed waits: ``<cache>/staged/<key>``, under the home by default.

    The key is the training's identity (trainer, settings, the digests of what it
    trained on, this code's version, the store it publishes to), so only a run of
    the very same training takes it up.
    """
    identity = {
        "trainer": trainer,
        "settings": s.model_dump(mode="json"),
        "sources": [r.digest for r in sources],
        "aiplane_version": _AIPLANE_VERSION,
        "artifact_root": root,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    cache = Path(ctx.workload.cache_dir or Path(tempfile.gettempdir()) / "aiplane-cache")
    return cache / "staged" / key


def _kept_record(kept: Path, ctx: WorkloadContext) -> AdapterRecord | None:
    """The record of what is kept at ``kept``, when its files are still what was trained; one that changed is dropped."""
    try:
        record = record_from_json(json.loads((kept / _KEPT_RECORD).read_text())["record"])
    except (OSError, ValueError, KeyError):
        return None
    if not isinstance(record, AdapterRecord):
        return None  # not anything this trainer keeps
    got = sha256_path(kept / "files") if (kept / "files").is_dir() else "nothing"
    if got != record.digest:
        ctx.log(f"the adapter kept at {kept} is not what run {record.run_id} trained ({record.digest}; "
                f"its files hash to {got}): dropping it and training again")  # fmt: skip
        shutil.rmtree(kept, ignore_errors=True)
        return None
    return record


def _publish_kept(store: Any, kept: Path, ctx: WorkloadContext) -> AdapterRecord:
    """Publish what :func:`_publish` kept; its record and final metrics are the run's that trained it."""
    data = json.loads((kept / _KEPT_RECORD).read_text())
    trained: AdapterRecord = record_from_json(data["record"])  # type: ignore[assignment]  # _kept_record read it as one
    record = _publish(store, kept / "files", kept, ctx, trained)
    shutil.rmtree(kept, ignore_errors=True)
    ctx.metrics = data["metrics"]
    ctx.log(f"published adapter {record.digest} to {record.uri}: trained by run {record.run_id} and kept at {kept} "
            "when its publish failed; not training again")  # fmt: skip
    return record


def _publish(store: Any, files: Path, kept: Path, ctx: WorkloadContext, record: AdapterRecord) -> AdapterRecord:
    """Publish ``files`` and return ``record`` with their URI and digest. When the store fails (after its
    retries), the files and that record are kept at ``kept`` first, so the next run of this training publishes them."""

    def record_for(uri: str, digest: str) -> AdapterRecord:
        return record.model_copy(update={"uri": uri, "digest": digest})

    try:
        uri, digest = store.publish(files, "adapters", log=ctx.log)
    except (InputError, OSError) as exc:
        reason = str(exc).rstrip(".")
        if files != kept / "files":
            digest = sha256_path(files)
            try:
                _keep(files, kept, record_for(store.uri_for("adapters", digest), digest), ctx.metrics)
            except OSError as keep_exc:
                raise InputError(f"Could not publish the trained result to {store.root} ({reason}), nor keep it at "
                                 f"{kept} ({keep_exc}); it is lost. Fix the store and the disk, then run again.") from None  # fmt: skip
        raise InputError(
            f"Could not publish the trained result to {store.root}: {reason}. It is kept at {kept}: once the store "
            "is reachable, the next `aiplane up` publishes it without training again."
        ) from None
    return record_for(uri, digest)


def _keep(files: Path, kept: Path, record: AdapterRecord, metrics: Mapping[str, Any]) -> None:
    """Move ``files`` and what is needed to publish them as their run's result to ``kept``, all at once."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=kept.parent, prefix=f".{kept.name}."))
    try:
        shutil.move(str(files), tmp / "files")
        (tmp / _KEPT_RECORD).write_text(json.dumps({"record": record_to_json(record), "metrics": dict(metrics)}))
        shutil.rmtree(kept, ignore_errors=True)  # a kept result that no longer matched, dropped already or now
        os.rename(tmp, kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _on_every_rank(flag: bool, world: int) -> bool:
    """The primary's ``flag``, agreed by every rank (a collective when there are several)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    agreed = [flag]
    dist.broadcast_object_list(agreed, src=0)
    return bool(agreed[0])


def _load_teacher(teacher: BaseModelRecord, s: LoopSettings, device: "torch.device", ctx: WorkloadContext) -> Any:
    """The teacher in eval mode without gradients, its adapter (if any) merged in, on the student's device."""
    model, _, _ = _load(str(model_path(teacher)))
    adapter = getattr(s, "teacher_adapter", None)
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(ctx.local(adapter))).merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


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


def cpu_threads() -> int:
    """The CPU threads training runs on: ``$OMP_NUM_THREADS`` when the environment sets it (Ray does, per worker;
    so may a user), else one fewer than the CPUs this process may run on, at least one.

    Not all of them, torch's own default: the training loop shares the machine with the orchestrator and, when
    aiplane serves while training, with the server starting beside it. An OpenMP team as large as the machine
    then waits at every barrier for the thread the scheduler gave away. Measured on 2 cores (``aiplane up``,
    150 steps of the tiny Granite while its vLLM server starts): 13 s on 2 threads, 5.2 s on 1; alone, 3.8 s
    and 4.9 s.
    """
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _set_cpu_threads() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())


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
    # SDPA, named rather than left to the default or the model's config: evaluation and generation (padded
    # batches, a cache) use it; training switches to the per-example attention of .attention and back.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)  # type: ignore[arg-type]  # transformers' typed .to() wrapper misses the device overload
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, device


def _device_name(device: "torch.device") -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def _optimize(
    model: Any,
    method: Method,
    packed: Packed,
    s: LoopSettings,
    device: "torch.device",
    ctx: WorkloadContext,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[tuple[int, float]], float, int | None, str]:
    """The AdamW loop; returns the loss at every step, the seconds spent in it, the step it resumed from and what
    the steps computed through (:func:`.fused.training_forward`, by ``s.precision``).

    With ``world > 1`` rank ``r`` takes blocks ``r, r + world, ...`` of every
    global batch; the loss of each rank is its summed token loss over the
    labelled tokens of the whole batch (times ``world``, which DDP's gradient
    mean divides out), so the update equals the single-process one. The model
    (and a teacher) attend example by example (:mod:`.attention`) while it trains.
    """
    from .fused import training_forward

    _retain_freed_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, s)
    curve: list[tuple[int, float]] = []
    done_s, start = 0.0, 0
    checkpoint = ctx.latest_checkpoint()
    if checkpoint is not None:
        start, curve, done_s = _restore(checkpoint, model, optimizer, scheduler, s)
        if ctx.is_primary:
            ctx.log(f"resumed from checkpoint at step {start}/{s.max_steps}")
    student, forward = training_forward(model, device, s.precision)
    if ctx.is_primary:
        ctx.log(f"training steps through {forward}")
    net = _distributed(student, device) if world > 1 else student
    model.train()
    order = batches(packed.inputs.shape[0], s.batch_size, s.seed)
    for _ in range(start):
        # The batch order is a function of the step, so a resumed run sees what the first attempt would have.
        next(order)
    tokens_per_step = s.batch_size * s.seq_len
    every = ctx.checkpoint_every
    started = window_start = time.perf_counter()
    with packed_attention(model, method.teacher):
        for step in range(start + 1, s.max_steps + 1):
            ctx.check_cancelled()
            value = _step(net, method, _batch(packed, next(order)[rank::world], device), params, optimizer, scheduler, world)
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
    return curve, done_s + time.perf_counter() - started, (start if checkpoint is not None else None), forward


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _retain_freed_memory() -> None:
    """Keep glibc from handing a step's freed tensors back to the kernel, only for the next step to fault them in.

    A step allocates and frees the same tensors, from hundreds of kilobytes to megabytes, every time. By
    default glibc serves such sizes from fresh ``mmap`` calls and trims the heap as they are freed, so each
    step faults its pages in again: an eighth of the fused loop's time went to the kernel (``perf``, the
    tiny Granite on one thread), and these two settings made its steps about a tenth faster. An allocation
    above 64 MiB (weights, a large model's activations) is still mapped on its own and returned when freed,
    and the heap is still trimmed once 256 MiB at its top are free. Elsewhere than glibc: nothing changes.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _optimizer(params: list[Any], s: LoopSettings) -> tuple[Any, Any]:
    """AdamW over ``params`` and its learning-rate schedule."""
    import torch

    # One fused kernel for all parameters (CPU and CUDA alike) rather than a loop of small ops per tensor.
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0, fused=True)
    # A short linear warm-up keeps the first updates of a high LoRA learning rate from overshooting.
    warmup = max(1, s.max_steps // 20)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def _distributed(model: Any, device: "torch.device") -> Any:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (rotary tables) are identical on every rank; broadcasting them each step is waste.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def _batch(packed: Packed, idx: list[int], device: "torch.device") -> tuple[Any, Any, Any, Segments]:
    """Blocks ``idx`` of ``packed`` on ``device``: token ids, labels, positions and their per-example layout.

    The layout is worked out on the host, where the positions are, and moves with the batch."""
    pos = packed.positions[idx]
    layout = segments(pos)
    return (packed.inputs[idx].to(device), packed.labels[idx].to(device), pos.to(device),
            Segments(tuple(rows.to(device) for rows in layout.rows), layout.scatter.to(device)))  # fmt: skip


def _step(net: Any, method: Method, batch: tuple[Any, Any, Any, Segments], params: list[Any],
          optimizer: Any, scheduler: Any, world: int) -> float:  # fmt: skip
    """One AdamW step on ``batch`` (clipped at norm 1); returns the mean token loss of the global batch."""
    import torch

    x, y, pos, layout = batch
    total, count = method.loss(net, x, y, pos, layout)
    if world > 1:
        import torch.distributed as dist

        sums = torch.tensor([float(total.detach()), float(count)], dtype=torch.float64, device=x.device)
        dist.all_reduce(sums)
        batch_total, batch_count = float(sums[0]), float(sums[1])
        loss = total * world / max(batch_count, 1.0)
        value = batch_total / max(batch_count, 1.0)
    else:
        loss = total / max(count, 1)
        value = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    scheduler.step()
    return value


def _checkpoint(ctx: WorkloadContext, model: Any, optimizer: Any, scheduler: Any, s: LoopSettings,
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


def _restore(directory: Path, model: Any, optimizer: Any, scheduler: Any, s: LoopSettings) -> tuple[int, list[tuple[int, float]], float]:
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
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], s: LoopSettings, device: "torch.device", ctx: WorkloadContext
) -> tuple[float | None, float | None, list[str]]:
    """Completion-token loss and exact-match accuracy of the greedily generated label on ``rows``, and the labels."""
    import torch

    if not rows:
        ctx.log("no eval rows (split == 'eval'): eval_loss and eval_accuracy are not measured")
        return None, None, []
    model.eval()
    pad = tokenizer.pad_token_id
    loss_sum, loss_tokens = 0.0, 0
    predictions: list[str] = []
    batch_size = max(1, s.batch_size)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ctx.check_cancelled()
            chunk = rows[start : start + batch_size]
            examples = [example(tokenizer, r) for r in chunk]
            width = max(len(x) for x, _ in examples)
            # Right padding for scoring: padded positions are masked out and unlabelled.
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in examples], device=device)
            lab = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in examples], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in examples], device=device)
            total, count = label_loss(model, ids, lab, attention_mask=mask)
            loss_sum += float(total)
            loss_tokens += count
            predictions += _generate(model, tokenizer, chunk, s, device)
    eval_loss = loss_sum / max(loss_tokens, 1)
    accuracy = sum(pred == r["completion"].strip() for pred, r in zip(predictions, rows, strict=True)) / len(rows)
    ctx.metric("eval_loss", eval_loss)
    ctx.metric("eval_accuracy", accuracy)
    ctx.log(f"eval on {len(rows)} rows: loss {eval_loss:.4f}, exact-match accuracy {accuracy:.3f}")
    return eval_loss, accuracy, predictions


def _generate(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], s: LoopSettings, device: "torch.device") -> list[str]:
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
