"""The fused training forward: the model's own forward, computed with fewer passes, and bfloat16 only where it says."""

from __future__ import annotations

import pytest
import torch

from aiplane.core.sample import generate_tickets, to_features
from aiplane.plugins.peft import attention, fused
from aiplane.plugins.peft.attention import packed_attention, segments
from aiplane.plugins.peft.base_model import TINY_CONFIG, build_tiny_granite
from aiplane.plugins.peft.methods import method_for, scored_logits
from aiplane.plugins.peft.packing import IGNORE, example, pack
from aiplane.plugins.peft.trainer import LoraSettings, SftSettings

_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _settings(targets, dropout=0.0) -> LoraSettings:
    return LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=targets, max_steps=1, batch_size=1, seq_len=40, learning_rate=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_granite(tmp_path_factory.mktemp("home") / "tiny-granite"))


@pytest.fixture(scope="module")
def rows():
    return to_features(generate_tickets(12))


def _model(kind: str):
    """A small random model of ``kind``: a Granite with a real Granite's multipliers and norm weights that are not
    ones (so every fold is exercised), with grouped-query attention; or a Llama with one key/value head per query
    head."""
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "granite":
        model = GraniteForCausalLM(GraniteConfig(**TINY_CONFIG, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                 logits_scaling=8.0, attention_multiplier=0.0156))  # fmt: skip
    else:
        shape = {k: v for k, v in TINY_CONFIG.items() if k not in ("tie_word_embeddings", "num_key_value_heads")}
        model = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=4, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.config._attn_implementation = "sdpa"
    return model


def _adapted(kind: str, targets, dropout=0.0):
    model = method_for("lora", _settings(targets, dropout)).prepare(_model(kind))
    with torch.no_grad():  # PEFT starts B at zero, which leaves A without a gradient: give both one to check
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(net, model, packed):
    trainable = [p for p in model.parameters() if p.requires_grad]
    layout = segments(packed.positions)
    scores, target = scored_logits(net, packed.inputs, packed.labels, packed.positions, layout=layout)
    loss = torch.nn.functional.cross_entropy(scores, target, reduction="sum")
    return scores.detach(), torch.autograd.grad(loss, trainable)


@pytest.mark.parametrize("grouping", [0, 10**9], ids=["short-ones-apart", "one-group"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], _ALL, ["k_proj", "up_proj"]], ids=["q-v", "all-seven", "k-up"])
@pytest.mark.parametrize("kind", ["granite", "llama"])
def test_the_fused_forward_in_float32_has_the_models_logits_and_adapter_gradients(kind, targets, grouping, tokenizer, rows, monkeypatch):
    monkeypatch.setattr(attention, "_SECOND_CALL", grouping)
    model = _adapted(kind, targets)
    packed = pack(tokenizer, rows, 40)  # blocks that cut examples: padded per-example rows, one or two groups
    assert len(segments(packed.positions).rows) == (2 if grouping == 0 else 1)
    with packed_attention(model):
        expected, expected_grads = _loss_and_grads(model, model, packed)
    decoder = fused.fused_decoder(model, torch.float32)
    assert isinstance(decoder, fused.FusedDecoder)
    got, grads = _loss_and_grads(decoder, model, packed)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for g, e in zip(grads, expected_grads, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # The parameters that train are the model's own adapters, so an optimizer over either steps the same tensors.
    assert {id(p) for p in decoder.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}


def test_in_bfloat16_it_stays_within_bfloat16s_rounding_of_the_model(tokenizer, rows):
    model = _adapted("granite", ["q_proj", "v_proj"])
    packed = pack(tokenizer, rows, 40)
    with packed_attention(model):
        expected, expected_grads = _loss_and_grads(model, model, packed)
    got, grads = _loss_and_grads(fused.fused_decoder(model, torch.bfloat16), model, packed)
    # bfloat16 keeps 8 bits of mantissa (a relative step of 2**-8): a few steps' worth, not a different model.
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 0.05 * e.abs().max()


def _loss_of(decoder, tokenizer, rows, scored):
    """The training loss of ``rows[scored]`` through ``decoder``, all of ``rows`` packed in this order into one block."""
    lengths = [len(example(tokenizer, r)[0]) for r in rows]
    packed = pack(tokenizer, rows, sum(lengths))
    labels = torch.full_like(packed.labels, IGNORE)
    at = sum(lengths[:scored])
    labels[:, at : at + lengths[scored]] = packed.labels[:, at : at + lengths[scored]]
    with torch.no_grad():
        total, count = method_for("lora", _settings(["q_proj"])).loss(decoder, packed.inputs, labels, packed.positions,
                                                                     segments(packed.positions))  # fmt: skip
    return float(total / count)


def test_in_bfloat16_a_packed_examples_loss_does_not_change_with_the_examples_packed_beside_it(tokenizer, rows):
    decoder = fused.fused_decoder(_adapted("granite", _ALL), torch.bfloat16)
    a, b, c = rows[0], rows[1], rows[2]
    alone = _loss_of(decoder, tokenizer, [a], 0)
    for neighbours, at in (([b, a], 1), ([c, b, a], 2), ([a, b], 0), ([c, a, b], 1)):
        assert _loss_of(decoder, tokenizer, neighbours, at) == pytest.approx(alone, rel=1e-5)


def test_it_trains_only_packed_batches():
    decoder = fused.fused_decoder(_adapted("granite", ["q_proj"]), torch.float32)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="packed batches only"):
        decoder(input_ids=ids, position_ids=torch.arange(8)[None], attention_mask=torch.ones(1, 8))


def test_what_the_fused_forward_does_not_cover_trains_through_the_models_own_forward(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fused, "bf16_native", lambda device: True)
    covered = _adapted("granite", ["q_proj", "v_proj"])
    net, what = fused.training_forward(covered, cpu, "auto")
    assert isinstance(net, fused.FusedDecoder) and what == "fused LoRA decoder, frozen products in bfloat16"
    assert fused.training_forward(covered, cpu, "fp32") == (covered, "transformers' forward, float32 (precision: fp32)")

    for model, reason in (
        (_adapted("granite", ["q_proj"], dropout=0.1), "adapter dropout is set"),
        (method_for("sft", SftSettings(max_steps=1, batch_size=1, seq_len=16, learning_rate=1)).prepare(_model("granite")),
         "not a LoRA-adapted model"),
    ):  # fmt: skip
        net, what = fused.training_forward(model, cpu, "auto")
        assert net is model and what == f"transformers' forward, float32 ({reason})"
    other = _adapted("granite", ["q_proj"])
    other.get_base_model().config.model_type = "mistral"
    assert "not 'mistral'" in fused.training_forward(other, cpu, "auto")[1]

    monkeypatch.setattr(fused, "bf16_native", lambda device: False)
    net, what = fused.training_forward(covered, cpu, "auto")
    assert net is covered and what == "transformers' forward, float32 (this CPU has no bfloat16 dot-product instructions)"
