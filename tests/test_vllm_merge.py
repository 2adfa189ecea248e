"""Merging a LoRA adapter into its base model's weights (what a ``merged`` vllm endpoint serves): the same
weights PEFT's own merge gives, and a clear refusal of what a merge cannot reproduce. No vLLM server here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiplane.core.errors import InputError
from aiplane.plugins.vllm.merge import merge_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from aiplane.plugins.peft.base_model import build_tiny_granite

    return build_tiny_granite(tmp_path_factory.mktemp("merge") / "base")


def _adapter(base_dir: Path, out: Path, **lora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj", "down_proj"], "use_rslora": True,
         "rank_pattern": {"o_proj": 4}, "alpha_pattern": {"down_proj": 2}},
    ],
    ids=["plain", "rslora-and-patterns"],
)  # fmt: skip
def test_merged_weights_are_the_ones_peft_merge_and_unload_gives(base_dir, tmp_path, lora):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = _adapter(base_dir, tmp_path / "adapter", **lora)
    merged = merge_adapter(base_dir, adapter, tmp_path / "merged")

    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    ours = load_file(str(merged / "model.safetensors"))
    changed = 0
    for name, tensor in expected.state_dict().items():
        if name in ours:
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)
            changed += not torch.equal(ours[name], load_file(str(base_dir / "model.safetensors")).get(name, ours[name]))
    assert changed == 2 * len(lora["target_modules"])  # every adapted module of both layers, nothing else
    assert json.loads((merged / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    assert (merged / "tokenizer.json").is_file()


def test_an_existing_merge_is_reused_not_redone(base_dir, tmp_path):
    adapter = _adapter(base_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    merged = merge_adapter(base_dir, adapter, tmp_path / "merged")
    written = (merged / "model.safetensors").stat().st_mtime_ns
    assert merge_adapter(base_dir, adapter, tmp_path / "merged") == merged
    assert (merged / "model.safetensors").stat().st_mtime_ns == written


def test_what_a_merge_cannot_reproduce_is_refused_before_anything_is_written(base_dir, tmp_path):
    adapter = _adapter(base_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(InputError, match=r"DoRA.*adapters: lora"):
        merge_adapter(base_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_an_adapter_of_another_architecture_is_refused_naming_the_modules(base_dir, tmp_path):
    adapter = _adapter(base_dir, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = {k.replace("q_proj", "qkv_proj"): v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"does not have \(model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        merge_adapter(base_dir, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cleanup_after_one_endpoints_failed_deploy_leaves_another_endpoints_prepared_server_running(tmp_path):
    """A failed deploy of ``a`` stops what ``a``'s deploy may have started; ``b``'s server, prepared while ``b``'s
    adapter trains and not yet named by any endpoint, keeps running."""
    import sys

    from aiplane.core.processes import process_gone, stop_tree, start_tree
    from aiplane.plugins.vllm import VllmLocal
    from aiplane.plugins.vllm import _server as server

    base = "sha256:" + "ab" * 32
    started = {}
    for endpoint in ("a", "b"):
        sdir = server.merged_server_dir(tmp_path, base, endpoint)
        sdir.mkdir(parents=True)
        proc, handle = start_tree([sys.executable, "-c", "import time; time.sleep(120)"], {})
        (sdir / "server.json").write_text(json.dumps({**handle, "url": "http://127.0.0.1:9/"}))
        started[endpoint] = (proc, handle)
    try:
        VllmLocal({}, home=tmp_path).cleanup("a")
        started["a"][0].wait(timeout=30)
        assert process_gone(started["b"][1]["pid"], started["b"][1]["token"]) is False, "b's server was stopped"
        assert server.server_info(server.merged_server_dir(tmp_path, base, "b")) is not None
    finally:
        for _, handle in started.values():
            stop_tree(handle, 1)
