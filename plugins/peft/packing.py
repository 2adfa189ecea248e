"""Examples packed into fixed-length blocks, each example attending only to itself.

Packing (every block full, no padding) is what makes the loop fast; the cost
it used to carry was attention across example boundaries: a token of the
second example in a block attended to the first. Every block therefore comes
with position ids that restart at 0 where an example starts. The training loop
reads the examples from them (:func:`.attention.segments`) and attends example
by example (:mod:`.attention`); a model left on SDPA, given position ids, no
attention mask and no cache, derives the same block-diagonal causal mask from
them (``masking_utils.find_packed_sequence_indices``), at the cost of scoring
every pair of tokens in a block. ``tests/test_packing.py`` pins that a packed
example's logits, loss and gradients equal the example's run alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["IGNORE", "Packed", "example", "pack", "batches"]

IGNORE = -100
"""The label of a token that is not scored (prompt tokens)."""


class Packed(NamedTuple):
    """``(blocks, seq_len)`` tensors of token ids, labels and per-example position ids, and the dataset's size."""

    inputs: "torch.Tensor"
    labels: "torch.Tensor"
    positions: "torch.Tensor"
    tokens: int


def example(tokenizer: Any, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + eos and labels that score only the completion and eos."""
    # Prompt and completion are tokenized apart, as generation sees them: the
    # model continues the prompt's own tokens.
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def pack(tokenizer: Any, rows: Sequence[Mapping[str, Any]], seq_len: int) -> Packed:
    """All examples concatenated and cut into ``seq_len`` blocks; no padding anywhere.

    Positions count from 0 within each example, so no token attends across an
    example boundary. An example cut by a block boundary keeps its positions in
    the next block, where it starts without its beginning (as a truncated
    example would). The last partial block is completed with tokens from the
    start of the stream (training cycles over the data anyway), so every block
    is full. The label of an example's last token is never the next example's
    first token: that is a prompt token, unscored.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        x, y = example(tokenizer, row)
        ids += x
        labels += y
        positions += range(len(x))
    total = len(ids)
    n_blocks = max(1, math.ceil(total / seq_len))
    reps = math.ceil(n_blocks * seq_len / total)
    n = n_blocks * seq_len
    ids, labels, positions = (ids * reps)[:n], (labels * reps)[:n], (positions * reps)[:n]
    return Packed(
        torch.tensor(ids, dtype=torch.long).view(n_blocks, seq_len),
        torch.tensor(labels, dtype=torch.long).view(n_blocks, seq_len),
        torch.tensor(positions, dtype=torch.long).view(n_blocks, seq_len),
        total,
    )


def batches(n_blocks: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of block indices: shuffled epochs, one after another."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(n_blocks, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch
