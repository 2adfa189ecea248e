"""Packing: examples share a block, never their attention."""

from __future__ import annotations

import pytest
import torch

from aiplane.core.sample import generate_tickets, to_features
from aiplane.plugins.peft.base_model import build_tiny_granite
from aiplane.plugins.peft.methods import label_loss, logits, method_for, scored_logits
from aiplane.plugins.peft.packing import IGNORE, example, pack
from aiplane.plugins.peft.trainer import LoraSettings


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_granite(tmp_path_factory.mktemp("home") / "tiny-granite")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def rows():
    return to_features(generate_tickets(6))


def _one_block(tokenizer, rows):
    """Three whole examples packed into one block (and the lengths of the first two)."""
    lengths = [len(example(tokenizer, r)[0]) for r in rows[:3]]
    packed = pack(tokenizer, rows[:3], sum(lengths))
    assert packed.inputs.shape == (1, sum(lengths))
    return packed, lengths


def test_a_packed_example_has_the_logits_it_has_alone(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed, (a, b, _) = _one_block(tokenizer, rows)
    second = torch.tensor([example(tokenizer, rows[1])[0]])
    with torch.no_grad():
        # The call the training loop makes on a packed batch.
        inside = logits(model, packed.inputs, packed.positions)[0, a : a + b - 1]
        alone = logits(model, second)[0]
    torch.testing.assert_close(inside, alone, atol=1e-4, rtol=1e-4)


def test_the_loss_of_a_packed_block_is_the_sum_of_its_examples_losses_alone(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    packed, _ = _one_block(tokenizer, rows)
    method = method_for("lora", LoraSettings(r=1, alpha=1, target_modules=["q_proj"], max_steps=1, batch_size=1, seq_len=16, learning_rate=1))
    with torch.no_grad():
        total, count = method.loss(model, packed.inputs, packed.labels, packed.positions)
        alone = [label_loss(model, torch.tensor([x]), torch.tensor([y])) for x, y in (example(tokenizer, r) for r in rows[:3])]
    assert count == sum(n for _, n in alone)
    torch.testing.assert_close(total, sum(t for t, _ in alone), atol=1e-3, rtol=1e-5)


def _loss_of_last_example(model, tokenizer, rows):
    """The training loss (``Method.loss``) of the last of ``rows`` packed, in this order, into one block."""
    lengths = [len(example(tokenizer, r)[0]) for r in rows]
    packed = pack(tokenizer, rows, sum(lengths))
    labels = packed.labels.clone()
    labels[:, : sum(lengths[:-1])] = IGNORE  # only the last example is scored
    method = method_for("lora", LoraSettings(r=1, alpha=1, target_modules=["q_proj"], max_steps=1, batch_size=1, seq_len=16, learning_rate=1))
    with torch.no_grad():
        total, count = method.loss(model, packed.inputs, labels, packed.positions)
    assert count == sum(y != IGNORE for y in example(tokenizer, rows[-1])[1])
    return total / count


def test_a_packed_examples_loss_does_not_change_with_the_examples_packed_before_it(model_and_tokenizer, rows):
    model, tokenizer = model_and_tokenizer
    a, b, c = rows[0], rows[1], rows[2]
    assert len(example(tokenizer, b)[0]) != len(example(tokenizer, c)[0])
    alone = _loss_of_last_example(model, tokenizer, [a])
    # Example a comes last: under a plain causal mask it would attend to all of its neighbours.
    beside_b = _loss_of_last_example(model, tokenizer, [b, a])
    beside_c = _loss_of_last_example(model, tokenizer, [c, b, a])
    torch.testing.assert_close(beside_b, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beside_c, alone, atol=1e-5, rtol=1e-5)


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
