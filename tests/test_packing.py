"""Packing: examples share a block, never their attention."""

from __future__ import annotations

import pytest
import torch

from aiplane.core.sample import generate_tickets, to_features
from aiplane.plugins.peft.base_model import build_tiny_granite
from aiplane.core.errors import WorkloadError
from aiplane.plugins.peft import attention
from aiplane.plugins.peft.attention import packed_attention, segments
from aiplane.plugins.peft.methods import label_loss, logits, method_for, scored_logits
from aiplane.plugins.peft.packing import IGNORE, example, pack
from aiplane.plugins.peft.trainer import LoraSettings

_SETTINGS = LoraSettings(r=2, alpha=2, target_modules=["q_proj", "v_proj"], max_steps=1, batch_size=1, seq_len=16, learning_rate=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_granite(tmp_path_factory.mktemp("home") / "tiny-granite")


@pytest.fixture(scope="module")
def model_and_tokenizer(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def rows():
    return to_features(generate_tickets(6))


def _one_block(tokenizer, rows):
    """Three whole examples packed into one block (and the lengths of the first two)."""
    lengths = [len(example(tokenizer, r)[0]) for r in rows[:3]]
    packed = pack(tokenizer, rows[:3], sum(lengths))
    assert packed.inputs.shape == (1, sum(lengths))
    return packed, lengths


def _packed_logits(model, packed):
    """The logits the training loop's model computes for a packed batch: attention example by example."""
    with torch.no_grad(), packed_attention(model):
        out = model(input_ids=packed.inputs, position_ids=packed.positions, use_cache=False,
                    packed_segments=segments(packed.positions))  # fmt: skip
    return out.logits[:, :-1].float()


def test_a_packed_example_has_the_logits_it_has_alone(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed, (a, b, _) = _one_block(tokenizer, rows)
    second = torch.tensor([example(tokenizer, rows[1])[0]])
    inside = _packed_logits(model, packed)[0, a : a + b - 1]
    with torch.no_grad():
        alone = logits(model, second)[0]
    torch.testing.assert_close(inside, alone, atol=1e-4, rtol=1e-4)


# Whether the shorter examples of a batch get rows (and an SDPA call) of their own: at any gain, or never.
_GROUPED = pytest.mark.parametrize("grouping", [0, 10**9], ids=["short-ones-apart", "one-group"])


@_GROUPED
def test_attention_example_by_example_equals_transformers_mask_from_positions_on_blocks_that_cut_examples(
    model_and_tokenizer, rows, grouping, monkeypatch
):
    monkeypatch.setattr(attention, "_SECOND_CALL", grouping)
    model, tokenizer = model_and_tokenizer
    packed = pack(tokenizer, rows, 40)  # 6 examples of 20-30 tokens: most blocks start inside an example
    assert packed.inputs.shape[0] > 2 and (packed.positions[:, 0] > 0).any()
    assert len(segments(packed.positions).rows) == (2 if grouping == 0 else 1)
    with torch.no_grad():
        masked = logits(model, packed.inputs, packed.positions)  # SDPA with the block-diagonal mask transformers derives
    torch.testing.assert_close(_packed_logits(model, packed), masked, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # packed_attention gave the model its own attention back


def test_the_loss_of_a_packed_block_is_the_sum_of_its_examples_losses_alone(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed, _ = _one_block(tokenizer, rows)
    method = method_for("lora", _SETTINGS)
    with torch.no_grad():
        with packed_attention(model):
            total, count = method.loss(model, packed.inputs, packed.labels, packed.positions, segments(packed.positions))
        alone = [label_loss(model, torch.tensor([x]), torch.tensor([y])) for x, y in (example(tokenizer, r) for r in rows[:3])]
    assert count == sum(n for _, n in alone)
    torch.testing.assert_close(total, sum(t for t, _ in alone), atol=1e-3, rtol=1e-5)


def _loss_of(model, tokenizer, rows, scored):
    """The training loss (``Method.loss``, the loop's attention) of ``rows[scored]``, all of ``rows`` packed in this
    order into one block."""
    lengths = [len(example(tokenizer, r)[0]) for r in rows]
    packed = pack(tokenizer, rows, sum(lengths))
    labels = torch.full_like(packed.labels, IGNORE)
    at = sum(lengths[:scored])
    labels[:, at : at + lengths[scored]] = packed.labels[:, at : at + lengths[scored]]  # only that example is scored
    with torch.no_grad(), packed_attention(model):
        total, count = method_for("lora", _SETTINGS).loss(model, packed.inputs, labels, packed.positions, segments(packed.positions))
    assert count == sum(y != IGNORE for y in example(tokenizer, rows[scored])[1])
    return total / count


def test_a_packed_examples_loss_does_not_change_with_the_examples_packed_before_or_after_it(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    a, b, c = rows[0], rows[1], rows[2]
    assert len(example(tokenizer, b)[0]) != len(example(tokenizer, c)[0])
    alone = _loss_of(model, tokenizer, [a], 0)
    # Where a comes last, under a plain causal mask it would attend to all of its neighbours; where it comes
    # first or in the middle, attention that is not causal within the block would let it see what follows.
    for neighbours, at in (([b, a], 1), ([c, b, a], 2), ([a, b], 0), ([c, a, b], 1)):
        torch.testing.assert_close(_loss_of(model, tokenizer, neighbours, at), alone, atol=1e-5, rtol=1e-5)


@_GROUPED
def test_a_packed_blocks_adapter_gradients_are_the_sum_of_its_examples_gradients_alone(
    model_path, model_and_tokenizer, rows, grouping, monkeypatch
):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(attention, "_SECOND_CALL", grouping)

    tokenizer = model_and_tokenizer[1]
    method = method_for("lora", _SETTINGS)
    model = method.prepare(AutoModelForCausalLM.from_pretrained(model_path))  # a model of its own: PEFT wraps it in place
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero, which leaves A without a gradient: give both one to check
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(ids, labels, positions, layout=None):
        model.zero_grad()
        method.loss(model, ids, labels, positions, layout)[0].backward()
        return [p.grad.clone() for p in trainable]

    packed, _ = _one_block(tokenizer, rows)
    assert len(segments(packed.positions).rows) == (2 if grouping == 0 else 1)
    with packed_attention(model):
        inside = grads(packed.inputs, packed.labels, packed.positions, segments(packed.positions))
    alone = [grads(torch.tensor([x]), torch.tensor([y]), None) for x, y in (example(tokenizer, r) for r in rows[:3])]
    for got, *each in zip(inside, *alone, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, sum(each), atol=1e-4, rtol=1e-4)


def test_examples_start_where_transformers_reads_a_new_sequence_in_packed_positions():
    from transformers.masking_utils import find_packed_sequence_indices

    # Blocks as pack() makes them: runs counting up from 0, a block starting inside an example, a run of one.
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10, 11, 12]])
    layout = segments(positions)
    examples = find_packed_sequence_indices(positions)
    theirs = [(b, int(e)) for b in range(3) for e in examples[b]]
    slots = torch.cat([rows.flatten() for rows in layout.rows])
    row_of_slot = torch.arange(sum(len(rows) for rows in layout.rows)).repeat_interleave(
        torch.tensor([rows.shape[1] for rows in layout.rows for _ in rows]))
    # Tokens are in the same example under one rule exactly when they are under the other.
    ours = row_of_slot[layout.scatter].tolist()
    assert [[o == p for p in ours] for o in ours] == [[t == u for u in theirs] for t in theirs]
    # Putting the tokens in rows and back is the identity; every row starts with its example's first token.
    flat = torch.arange(positions.numel())
    assert flat[slots][layout.scatter].tolist() == flat.tolist()
    assert [tuple(rows.shape) for rows in layout.rows] == [(8, 8)]
    assert [int(positions.flatten()[i]) for i in layout.rows[0][:, 0]] == [0, 0, 0, 0, 3, 0, 0, 5]


def test_short_examples_beside_long_ones_get_rows_of_their_own_length_and_come_back_in_place():
    # Blocks of 96: three examples of 30 and a tail of 6 each, as a block boundary leaves them (sample tickets
    # are 20 to 30 tokens long); a tail padded to 30 would do 25 times its own attention work.
    run = [*range(30), *range(30), *range(30), *range(6)]
    positions = torch.tensor([run, run[-6:] + run[:90]] * 2)
    layout = segments(positions)
    assert [tuple(rows.shape) for rows in layout.rows] == [(12, 30), (4, 6)]
    flat = torch.arange(positions.numel())
    assert flat[torch.cat([rows.flatten() for rows in layout.rows])][layout.scatter].tolist() == flat.tolist()
    assert [int(positions.flatten()[i]) for rows in layout.rows for i in rows[:, 0]] == [0] * 16


def test_examples_of_like_length_share_one_group():
    positions = torch.tensor([[*range(30), *range(26), *range(28), *range(12)]])
    assert [tuple(rows.shape) for rows in segments(positions).rows] == [(4, 30)]


def test_a_model_in_example_by_example_attention_refuses_a_batch_without_its_layout(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed = pack(tokenizer, rows, 32)
    with pytest.raises(WorkloadError, match="packed_segments"), torch.no_grad(), packed_attention(model):
        model(input_ids=packed.inputs, position_ids=packed.positions, use_cache=False)
    assert model.config._attn_implementation == "sdpa"


def test_logits_taken_only_where_a_label_is_scored_are_the_full_logits_there(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed = pack(tokenizer, rows, 48)
    with torch.no_grad():
        scores, targets = scored_logits(model, packed.inputs, packed.labels, packed.positions)
        full = logits(model, packed.inputs, packed.positions)
    scored = packed.labels[:, 1:] != IGNORE
    assert scores.shape == (int(scored.sum()), full.size(-1)) and 0 < scores.size(0) < scored.numel() // 2
    torch.testing.assert_close(scores, full[scored], atol=1e-5, rtol=1e-5)
    assert targets.tolist() == packed.labels[:, 1:][scored].tolist()


def test_positions_restart_with_every_example_and_no_label_crosses_into_the_next(model_and_tokenizer, rows):
    _, tokenizer = model_and_tokenizer
    packed = pack(tokenizer, rows, 32)
    lengths = [len(example(tokenizer, r)[0]) for r in rows]
    stream = packed.positions.flatten().tolist()
    starts, at = [], 0
    for n in lengths:
        starts.append(at)
        assert stream[at : at + n] == list(range(n))[: len(stream) - at]
        at += n
    labels = packed.labels.flatten().tolist()
    # The first token of every example is a prompt token: the previous example's last label never predicts it.
    assert all(labels[s] == IGNORE for s in starts if s < len(labels))
    # Every block is full: the stream wraps around rather than padding.
    assert packed.inputs.numel() == packed.inputs.shape[0] * 32 and packed.tokens == sum(lengths)
