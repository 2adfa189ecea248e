"""Attention of packed examples computed example by example, without a block mask.

A packed block holds several examples; each must attend only to itself. With
SDPA, transformers turns the position ids into a dense ``(block, block)``
boolean mask per block, and the attention kernel then scores every query
against every key of the block, 128 x 128 per head for the deployment's
``seq_len``, although an example of the sample tickets is about 26 tokens long:
most of that work is thrown away by the mask. Here the examples (the runs of
positions that count up by one, as transformers reads them) are laid side by
side as rows of their own, ``(examples, longest example)``, and SDPA runs on
them with its plain causal flag: no mask is built, only the real example-by-
example triangle and its padding are computed, and the result is put back in
block order. Rows are padded to the longest example of their group: where a
batch mixes short examples (the tails a block boundary cut off) with long ones,
the short ones get a group and an SDPA call of their own (:func:`_groups`).
It is exact, not an approximation: ``tests/test_packing.py`` holds
a packed example's logits, loss and gradients to those of the example alone.

The layout is computed once per batch (:func:`segments`) and reaches every
layer through the model's keyword arguments, the way transformers hands
variable-length metadata to its attention functions. :func:`packed_attention`
switches a model to this attention for the training loop and back afterwards,
so evaluation and generation (padded batches, a KV cache) keep SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from aiplane.core.errors import WorkloadError

if TYPE_CHECKING:
    import torch

__all__ = ["NAME", "Segments", "segments", "packed_attention"]

NAME = "aiplane_packed"
"""The name this attention is registered under in transformers' ``AttentionInterface``."""


class Segments(NamedTuple):
    """Where the tokens of a ``(blocks, seq_len)`` batch go when its examples are laid out one per row."""

    rows: "tuple[torch.Tensor, ...]"
    """Per group of examples, ``(examples, longest in the group)``: the flat token index of each slot; a slot
    past its example's end reads token 0."""
    scatter: "torch.Tensor"
    """``(blocks * seq_len,)``: each token's slot in the groups' slots laid end to end, to put them back in
    block order."""


def segments(position_ids: "torch.Tensor") -> Segments:
    """The per-example layout of a packed batch from its position ids (``(blocks, seq_len)``).

    An example starts wherever the position does not follow the previous one by
    exactly 1, and at every block's first token: the rule transformers applies
    to packed position ids, so both attentions see the same examples.
    """
    import torch

    blocks, seq_len = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] - flat[:-1] != 1
    starts[::seq_len] = True
    example = starts.cumsum(0) - 1
    first = starts.nonzero().squeeze(1)
    offset = torch.arange(flat.numel(), device=flat.device) - first[example]
    # Each example's first slot: the groups laid end to end, an example's row within its group in example order.
    row_start = torch.empty(len(first), dtype=torch.long, device=flat.device)
    sizes, base = [], 0
    for members, longest in _groups(torch.bincount(example)):
        row_start[members] = base + torch.arange(len(members), device=flat.device) * longest
        sizes.append((len(members), longest))
        base += len(members) * longest
    scatter = row_start[example] + offset
    # Slots past an example's end read token 0: as queries their outputs are never put back, and as keys
    # they come after every real query of their row, so the causal flag hides them; their gradient is zero.
    gather = torch.zeros(base, dtype=torch.long, device=flat.device)
    gather[scatter] = torch.arange(flat.numel(), device=flat.device)
    parts = gather.split([n * longest for n, longest in sizes])
    return Segments(tuple(part.view(n, longest) for part, (n, longest) in zip(parts, sizes, strict=True)), scatter)


# What a second SDPA call costs (its launch, and its rows' gather and scatter) in the unit of the causal work,
# rows * longest**2: about 130 us against 0.065 us a unit, for the fwd and bwd of 4 heads of 32 (measured on CPU).
_SECOND_CALL = 2048


def _groups(lengths: "torch.Tensor") -> "list[tuple[torch.Tensor, int]]":
    """The examples (by index, in order) of each group, and the group's longest length: one group, or two
    where splitting off the shorter examples cuts the causal attention's work (``rows * longest**2``) by a
    tenth or more and by more than a second call costs."""
    import torch

    ordered, order = torch.sort(lengths, descending=True, stable=True)
    n, longest = len(ordered), int(ordered[0])
    if n > 1:
        # Split after the k longest: k rows of the longest length, n - k of the (k+1)-th longest.
        k = torch.arange(1, n, device=lengths.device)
        cost = k * longest**2 + (n - k) * ordered[1:] ** 2
        whole, split = n * longest**2, int(cost.min())
        if 10 * split <= 9 * whole and whole - split > _SECOND_CALL:
            cut = int(cost.argmin()) + 1
            return [(order[:cut].sort().values, longest), (order[cut:].sort().values, int(ordered[cut]))]
    return [(torch.arange(n, device=lengths.device), longest)]


def _attention(module: Any, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function interface: ``query`` ``(blocks, heads, seq_len, dim)`` in, output
    ``(blocks, seq_len, heads, dim)`` and no weights out, as SDPA's integration returns them."""
    import torch
    import torch.nn.functional as F

    layout: Segments | None = kwargs.get("packed_segments")
    if layout is None:
        raise WorkloadError(
            f"attention {NAME!r} needs the batch's packed_segments; call the model with "
            "packed_segments=segments(position_ids), or outside packed_attention() for a padded batch"
        )
    blocks, heads, seq_len, dim = query.shape

    def flat(x):  # (blocks, h, seq_len, dim) -> (blocks * seq_len, h, dim)
        return x.transpose(1, 2).reshape(blocks * seq_len, x.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    outs = []
    for rows in layout.rows:  # each group's (examples, h, longest, dim) in, its slots flattened out
        out = F.scaled_dot_product_attention(
            q[rows].transpose(1, 2), k[rows].transpose(1, 2), v[rows].transpose(1, 2), dropout_p=dropout,
            is_causal=True, scale=scaling, enable_gqa=key.shape[1] != heads,
        )  # fmt: skip
        outs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs))[layout.scatter]
    return out.view(blocks, seq_len, heads, dim), None


@contextmanager
def packed_attention(*models: Any) -> Iterator[None]:
    """Run ``models`` (``None`` entries skipped) with this attention inside the block; their own attention after."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    with ExitStack() as stack:
        for model in (m for m in models if m is not None):
            before = model.config._attn_implementation
            model.set_attn_implementation(NAME)
            stack.callback(model.set_attn_implementation, before)
        yield
