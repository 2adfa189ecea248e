"""Benchmark: the training loop's packing, each example attending to itself, against HF Trainer + PEFT with padding.

The same LoRA steps on the same model and rows (the settings of
``deployments/local.yaml``: r 16 on q_proj/v_proj, batch 8, seq_len 128,
learning rate 0.01), each timed over the optimisation steps only:

* ``packed-masked``: aiplane's loop (``aiplane.plugins.peft.train``) as the
  ``lora`` trainer runs it by default (``precision: auto``): examples packed
  into full blocks with per-example position ids, each example attending only
  to itself (no block mask), the vocabulary head applied only where a label is
  scored, one fused AdamW step; on a CPU with bfloat16 instructions through the
  fused training forward (``aiplane.plugins.peft.fused``: fused projections,
  the frozen weights' products on bfloat16 operands with float32 accumulation);
* ``packed-masked-fp32``: the same with ``precision: fp32``, through
  transformers' own forward in float32 (what the loop did before the fused
  forward);
* ``packed-sdpa-mask``: as ``packed-masked-fp32``, attention by SDPA with the
  block-diagonal mask transformers derives from the position ids, over whole
  blocks (what the loop did before the per-example attention);
* ``packed-unmasked``: as ``packed-masked-fp32``, each block one causal
  sequence, so examples attend across their boundaries (the cost of not masking
  at all);
* ``hf-padded``: ``transformers.Trainer`` on the PEFT model, one example per
  row, padded per batch (``DataCollatorForSeq2Seq``), the usual recipe, with
  the same optimizer settings (AdamW, warm-up, clipping at 1.0), in float32;
* ``hf-padded-bf16``: the same with ``bf16=True``, HF's own mixed precision
  (autocast), so HF may use bfloat16 products too. Ratios are taken against
  the faster of the two HF runs (``hf-best``).

Throughput is real (non-padding) tokens per second: a packed batch holds only
real tokens; a padded one is counted without its padding. Ratios are printed
by wall-clock time and by the process's CPU time: on a machine other processes
load, a round's wall time includes the time it waited for a core, its CPU time
does not.

    .venv/bin/python bench/packing.py [--steps N] [--rounds R] [--threads T] [--model DIR]

Torch runs on ``--threads`` threads (default 1) in every variant: on a shared
2-core machine two threads wait on each other whenever another process takes
a core, and a run's figure swung 10x between rounds.

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _settings(steps: int) -> dict:
    raw = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())["trainer"]["settings"]
    return {**raw, "max_steps": steps, "log_every": steps, "eval_limit": 0}


def _lora_model(path: str, s):
    from transformers import set_seed

    from aiplane.plugins.peft.methods import method_for
    from aiplane.plugins.peft.train import _load

    set_seed(s.seed)
    model, tokenizer, device = _load(path)
    method = method_for("lora", s)
    return method.prepare(model), method, tokenizer, device


def _packed(path: str, rows, s, variant: str) -> tuple[float, float]:
    """Real tokens per second (wall, CPU) of the aiplane loop: ``masked`` (the trainer's default),
    ``masked-fp32``, ``sdpa-mask`` or ``unmasked`` attention."""
    import contextlib
    from unittest import mock

    import torch

    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft import train
    from aiplane.plugins.peft.packing import pack

    if variant != "masked":  # the earlier loops: transformers' forward in float32
        s = s.model_copy(update={"precision": "fp32"})
    model, method, tokenizer, device = _lora_model(path, s)
    packed = pack(tokenizer, rows, s.seq_len)
    if variant == "unmasked":
        # One position run per block: every block is one causal sequence.
        packed = packed._replace(positions=torch.arange(s.seq_len).expand_as(packed.inputs).contiguous())
    # sdpa-mask: the model keeps SDPA, which ignores the per-example layout; transformers masks from the positions.
    keep_sdpa = mock.patch.object(train, "packed_attention", lambda *models: contextlib.nullcontext())
    ctx = WorkloadContext(Workload(name="bench", entrypoint="x:y"), lambda event: None)
    with keep_sdpa if variant == "sdpa-mask" else contextlib.nullcontext():
        cpu = time.process_time()
        _, seconds, _, _ = train._optimize(model, method, packed, s, device, ctx)
        cpu = time.process_time() - cpu
    tokens = s.max_steps * s.batch_size * s.seq_len
    return tokens / seconds, tokens / cpu


def _hf_padded(path: str, rows, s, bf16: bool) -> tuple[float, float]:
    """Real tokens per second (wall, CPU) of HF Trainer on the PEFT model with per-batch padding; ``bf16``: with
    HF's mixed precision (on a GPU it always uses it)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from aiplane.plugins.peft.packing import example

    model, _, tokenizer, device = _lora_model(path, s)
    data = []
    for row in rows:
        ids, labels = example(tokenizer, row)
        data.append({"input_ids": ids[: s.seq_len], "labels": labels[: s.seq_len]})
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    real = [0]

    def collate(batch):
        out = pad(batch)
        real[0] += int(out["attention_mask"].sum())
        return out

    class Clock(TrainerCallback):
        """Wall and CPU time from the first step's start to the last step's end: the steps only, as on the
        packed side (``train()`` first spends about 0.2 s setting up, a ``gc.collect()`` among it)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if "wall" not in marks:
                marks.update(wall=time.perf_counter(), cpu=time.process_time())

        def on_train_end(self, args, state, control, **kwargs):
            marks.update(wall=time.perf_counter() - marks["wall"], cpu=time.process_time() - marks["cpu"])

    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
            learning_rate=s.learning_rate, warmup_steps=max(1, s.max_steps // 20), lr_scheduler_type="constant_with_warmup",
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=s.max_steps, save_strategy="no", report_to=[],
            seed=s.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=device.type == "cpu",
            bf16=bf16 or device.type == "cuda", remove_unused_columns=False,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    return real[0] / marks["wall"], real[0] / marks["cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every variant")
    parser.add_argument("--model", help="a Hugging Face model directory; default: the built-in tiny Granite")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)

    from aiplane.core.sample import generate_tickets, to_features
    from aiplane.plugins.peft.base_model import build_tiny_granite
    from aiplane.plugins.peft.trainer import LoraTrainer

    s = LoraTrainer(_settings(args.steps)).settings
    rows = sorted((r for r in to_features(generate_tickets(300)) if r["split"] == "train"), key=lambda r: r["id"])
    with tempfile.TemporaryDirectory(prefix="aiplane-bench-") as tmp:
        path = args.model or str(build_tiny_granite(Path(tmp) / "tiny-granite"))
        variants = ("masked", "masked-fp32", "sdpa-mask", "unmasked")
        runs: dict[str, list[tuple[float, float]]] = {f"packed-{v}": [] for v in variants}
        runs |= {"hf-padded": [], "hf-padded-bf16": []}
        for _ in range(args.rounds):
            for v in variants:
                runs[f"packed-{v}"].append(_packed(path, rows, s, v))
            runs["hf-padded"].append(_hf_padded(path, rows, s, bf16=False))
            runs["hf-padded-bf16"].append(_hf_padded(path, rows, s, bf16=True))
    print(
        f"{len(rows)} rows, {s.max_steps} steps of batch {s.batch_size}, seq_len {s.seq_len}, "
        f"{args.threads} torch thread(s), {args.rounds} rounds (median)"
    )
    for i, clock in enumerate(("wall", "CPU")):
        median = {name: statistics.median(v[i] for v in values) for name, values in runs.items()}
        median["hf-best"] = max(median["hf-padded"], median["hf-padded-bf16"])
        print(f" real tokens per {clock}-clock second")
        for name, values in runs.items():
            print(f"  {name:18} {median[name]:10,.0f}   ({', '.join(f'{v[i]:,.0f}' for v in values)})")
        for a, b in (("packed-masked", "hf-best"), ("packed-masked-fp32", "hf-best"), ("packed-sdpa-mask", "hf-best"),
                     ("packed-unmasked", "hf-best"), ("packed-masked", "packed-masked-fp32"),
                     ("packed-masked-fp32", "packed-sdpa-mask"), ("packed-masked-fp32", "packed-unmasked")):  # fmt: skip
            print(f"  {a:18} / {b:18} {median[a] / median[b]:.2f}x")


if __name__ == "__main__":
    main()
