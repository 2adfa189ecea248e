"""Benchmark: the training loop's packing, masked per example, against HF Trainer + PEFT with padding.

Three ways to take the same LoRA steps on the same model and rows (the
settings of ``deployments/local.yaml``: r 16 on q_proj/v_proj, batch 8,
seq_len 128, learning rate 0.01), each timed over the optimisation steps only:

* ``packed-masked``: aiplane's loop (``aiplane.plugins.peft.train``), examples
  packed into full blocks with per-example position ids, so each example
  attends only to itself, the vocabulary head applied only where a label is
  scored, one fused AdamW step (what the trainers do now);
* ``packed-unmasked``: the same loop and blocks with one causal mask per block,
  so examples attend across their boundaries (what the loop did before);
* ``hf-padded``: ``transformers.Trainer`` on the PEFT model, one example per
  row, padded per batch (``DataCollatorForSeq2Seq``), the usual recipe, with
  the same optimizer settings (AdamW, warm-up, clipping at 1.0).

Throughput is real (non-padding) tokens per second: a packed batch holds only
real tokens; a padded one is counted without its padding. Ratios are printed
against ``hf-padded`` and between the two packed variants, by wall-clock time
and by the process's CPU time: on a machine other processes load, a round's
wall time includes the time it waited for a core, its CPU time does not.

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


def _packed(path: str, rows, s, masked: bool) -> tuple[float, float]:
    """Real tokens per second (wall, CPU) of the aiplane loop, with or without the per-example mask."""
    import torch

    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft.packing import pack
    from aiplane.plugins.peft.train import _optimize

    model, method, tokenizer, device = _lora_model(path, s)
    packed = pack(tokenizer, rows, s.seq_len)
    if not masked:
        # One position run per block: transformers sees one sequence and applies a plain causal mask.
        packed = packed._replace(positions=torch.arange(s.seq_len).expand_as(packed.inputs).contiguous())
    ctx = WorkloadContext(Workload(name="bench", entrypoint="x:y"), lambda event: None)
    cpu = time.process_time()
    _, seconds, _ = _optimize(model, method, packed, s, device, ctx)
    cpu = time.process_time() - cpu
    tokens = s.max_steps * s.batch_size * s.seq_len
    return tokens / seconds, tokens / cpu


def _hf_padded(path: str, rows, s) -> tuple[float, float]:
    """Real tokens per second (wall, CPU) of HF Trainer on the PEFT model with per-batch padding."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

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

    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
            learning_rate=s.learning_rate, warmup_steps=max(1, s.max_steps // 20), lr_scheduler_type="constant_with_warmup",
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=s.max_steps, save_strategy="no", report_to=[],
            seed=s.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=device.type == "cpu",
            bf16=device.type == "cuda", remove_unused_columns=False,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
        started, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return real[0] / seconds, real[0] / cpu


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
        runs: dict[str, list[tuple[float, float]]] = {"packed-masked": [], "packed-unmasked": [], "hf-padded": []}
        for _ in range(args.rounds):
            runs["packed-masked"].append(_packed(path, rows, s, masked=True))
            runs["packed-unmasked"].append(_packed(path, rows, s, masked=False))
            runs["hf-padded"].append(_hf_padded(path, rows, s))
    print(
        f"{len(rows)} rows, {s.max_steps} steps of batch {s.batch_size}, seq_len {s.seq_len}, "
        f"{args.threads} torch thread(s), {args.rounds} rounds (median)"
    )
    for i, clock in enumerate(("wall", "CPU")):
        median = {name: statistics.median(v[i] for v in values) for name, values in runs.items()}
        print(f" real tokens per {clock}-clock second")
        for name, values in runs.items():
            print(f"  {name:16} {median[name]:10,.0f}   ({', '.join(f'{v[i]:,.0f}' for v in values)})")
        print(f"  packed-masked   / hf-padded       {median['packed-masked'] / median['hf-padded']:.2f}x")
        print(f"  packed-unmasked / hf-padded       {median['packed-unmasked'] / median['hf-padded']:.2f}x")
        print(f"  packed-masked   / packed-unmasked {median['packed-masked'] / median['packed-unmasked']:.2f}x")


if __name__ == "__main__":
    main()
