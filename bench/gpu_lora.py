"""Benchmark: aiplane's LoRA training loop on a Granite-3.3-2B-shaped model, tokens per second and MFU.

For a machine with a GPU (the ``device`` tool's, when one is lent): the model is
built from a configuration shaped like ``ibm-granite/granite-3.3-2b-instruct``
(2048 hidden, 40 layers, 32 heads, 8 KV heads, 8192 MLP, 49,159 tokens of
vocabulary) with random weights, so nothing is downloaded; speed does not
depend on the weights' values. It trains with the loop ``aiplane up`` runs
(``aiplane.plugins.peft.train``: packed blocks, examples attending only to
themselves, the vocabulary head only where a label is scored, fused AdamW),
bf16 on CUDA, on random token blocks of ``--examples`` examples each.

MFU counts the work LoRA training does, not the work of full fine-tuning:

* the frozen base model: its forward pass, ``2 * N`` FLOPs per token for its
  ``N`` non-embedding parameters in the decoder layers, plus attention's scores
  and weighted sum, ``4 * layers * hidden * L / 2`` per token for examples of
  ``L`` tokens (causal: half the square); the vocabulary head, ``2 * hidden *
  vocab`` per scored token; then the backward pass through it, which computes
  the input gradients only (no weight gradient of a frozen matrix), as many
  FLOPs again: ``2x`` the forward in all;
* the adapters: ``2 * r * (in + out)`` per token per adapted matrix forward,
  and twice that backward (input and weight gradients): ``3x`` their forward.

That sum, times tokens per second, over the GPU's dense bf16 peak (``--peak-tflops``;
989 for an H100 SXM or H200) is the MFU. Full fine-tuning's usual ``6 * N``
would count weight gradients LoRA never computes, and overstate it.

    .venv/bin/python bench/gpu_lora.py [--steps N] [--batch B] [--seq-len S] [--peak-tflops T]
    .venv/bin/python bench/gpu_lora.py --tiny      # the same on a small shape, on CPU: checks the script

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse

GRANITE_3_3_2B = {
    "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 8192, "vocab_size": 49159, "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 8.0,
}  # fmt: skip
TINY = {**GRANITE_3_3_2B, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 256, "vocab_size": 1024}  # fmt: skip


def flops_per_token(shape: dict, r: int, targets: list[str], example_len: int, scored: float) -> tuple[float, float]:
    """(frozen base model, adapters) training FLOPs per token; see the module docstring."""
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    matrices = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    dense = 2 * layers * sum(i * o for i, o in matrices.values())
    attention = 4 * layers * h * example_len / 2
    head = 2 * h * shape["vocab_size"] * scored
    adapters = 2 * layers * sum(r * (matrices[t][0] + matrices[t][1]) for t in targets)
    return 2 * (dense + attention + head), 3 * adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps before the clock starts (CUDA's own warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="blocks per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=8, help="examples packed into each block")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="a small shape and short blocks, on CPU: checks the script")
    args = parser.parse_args()

    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft import train
    from aiplane.plugins.peft.methods import method_for
    from aiplane.plugins.peft.packing import IGNORE, Packed
    from aiplane.plugins.peft.trainer import LoraTrainer

    shape = TINY if args.tiny else GRANITE_3_3_2B
    seq_len = 256 if args.tiny else args.seq_len
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(**shape)).to(device=device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    targets = args.targets.split(",")

    def loop(steps: int):
        return LoraTrainer({
            "max_steps": steps, "batch_size": args.batch, "seq_len": seq_len, "learning_rate": 1e-4, "log_every": steps,
            "eval_limit": 0, "r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "target_modules": targets,
        }).settings  # fmt: skip

    settings = loop(args.steps)
    method = method_for("lora", settings)
    model = method.prepare(model)

    # Random blocks of --examples examples each; the second half of every example is its labelled completion.
    blocks = args.batch * max(args.warmup, args.steps)
    length = seq_len // args.examples
    inputs = torch.randint(0, shape["vocab_size"], (blocks, seq_len))
    positions = torch.arange(length).repeat(args.examples).expand(blocks, -1).contiguous()
    labels = inputs.roll(-1, dims=1).masked_fill(positions < length // 2, IGNORE)
    packed = Packed(inputs, labels, positions, blocks * seq_len)
    scored = float((labels != IGNORE).float().mean())

    ctx = WorkloadContext(Workload(name="bench", entrypoint="x:y"), lambda event: None)
    if args.warmup:  # CUDA's own warm-up (kernel choice, allocator), untimed; then the timed steps
        train._optimize(model, method, packed, loop(args.warmup), device, ctx)
    curve, seconds, _, _ = train._optimize(model, method, packed, settings, device, ctx)
    per_step = seconds / len(curve)
    tokens_per_s = args.batch * seq_len / per_step
    base, adapters = flops_per_token(shape, args.r, targets, length, scored)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}: {'tiny shape' if args.tiny else 'Granite-3.3-2B shape'}, LoRA r={args.r} on {', '.join(targets)}; "
          f"{args.steps} timed steps (after {args.warmup}) of {args.batch} x {seq_len} tokens "
          f"({args.examples} examples a block), {dtype}")  # fmt: skip
    print(f"  {tokens_per_s:,.0f} tokens/s ({per_step * 1000:.1f} ms a step); loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}")
    print(f"  FLOPs per token: frozen base {base / 1e9:.2f} G (forward + input gradients), adapters {adapters / 1e6:.1f} M")
    achieved = (base + adapters) * tokens_per_s
    print(f"  {achieved / 1e12:.1f} TFLOP/s = MFU {achieved / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops:g} TFLOP/s")


if __name__ == "__main__":
    main()
