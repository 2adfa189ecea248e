"""The ``sft`` and ``distill`` trainers: the ``lora`` loop with other weights, another loss, another output.

Direct calls to ``train`` on the built-in tiny Granite pin what each trainer
produces; the chain tests run both through Dagster's ``adapter_weights`` on the
``local`` engine, on Ray (``ray-local``: a private Ray, two DDP workers) and on
``kfp-local`` (Kubeflow Pipelines' local runner).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aiplane.core.artifacts import sha256_path
from aiplane.core.config import load_deployment
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.plugins import Registry
from aiplane.core.records import AdapterRecord, BaseModelRecord, FeaturesRecord
from aiplane.core.sample import generate_tickets, to_features
from aiplane.core.storage import local_path
from conftest import CheckpointingRuntime, features_record
from aiplane.core.workload import Runtime, Workload, WorkloadContext
from aiplane.plugins.peft.base_model import BUILTIN, build_tiny_granite, resolve
from aiplane.plugins.peft.train import train
from aiplane.plugins.peft.trainer import DistillTrainer, SftTrainer

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
LOOP = dict(max_steps=24, batch_size=8, seq_len=64, seed=0, eval_limit=8, log_every=4, max_new_tokens=6)
SFT = dict(LOOP, learning_rate=0.003)
LORA = dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
# The teacher: the tiny Granite with an adapter trained on the tickets, so it knows what the base does not.
TEACHER_TRAINING = dict(LOOP, **LORA, learning_rate=0.01, max_steps=40)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def base_model(home) -> BaseModelRecord:
    # Where the built-in model lives in a home, so `teacher: builtin:tiny-granite` finds it beside the base model.
    build_tiny_granite(home / "models" / "tiny-granite")
    return resolve(BUILTIN, str(home))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return to_features(generate_tickets(300))


def _features(rows) -> FeaturesRecord:
    return features_record(rows, residency=("eu",))


def _ctx(runtime: Runtime | None = None) -> WorkloadContext:
    return WorkloadContext(Workload(name="train-adapter", entrypoint="x:y"), lambda e: None, runtime=runtime)


def _train(base_model, rows, root: Path, trainer: str, settings: dict, runtime: Runtime | None = None) -> AdapterRecord:
    return train(base_model, _features(rows), rows, settings, str(root), _ctx(runtime), trainer=trainer)


@pytest.fixture(scope="module")
def sft(base_model, rows, tmp_path_factory) -> AdapterRecord:
    return _train(base_model, rows, tmp_path_factory.mktemp("sft"), "sft", SFT)


@pytest.fixture(scope="module")
def teacher_adapter(base_model, rows, tmp_path_factory) -> Path:
    record = _train(base_model, rows, tmp_path_factory.mktemp("teacher"), "lora", TEACHER_TRAINING)
    return local_path(record.uri)


def _distill_settings(adapter: Path, **change) -> dict:
    return {**LOOP, "learning_rate": 0.01, "teacher": BUILTIN, "teacher_adapter": str(adapter),
            "temperature": 2.0, "alpha": 0.8, "lora": LORA, **change}  # fmt: skip


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _weights(model) -> dict[str, "torch.Tensor"]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- sft


def test_sft_publishes_a_complete_model_directory_content_addressed(sft, base_model):
    from transformers import AutoTokenizer

    path = local_path(sft.uri)
    assert sorted(p.name for p in path.iterdir()) == MODEL_FILES
    assert sft.digest == sha256_path(path) == "sha256:" + path.name and path.parent.name == "adapters"
    # It loads as a model of its own, with its tokenizer, no base model needed.
    model, tokenizer = _load(path), AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.vocab_size == 1024
    assert str(path.parents[1]) not in (path / "config.json").read_text() + (path / "tokenizer_config.json").read_text()


def test_sft_trains_every_weight_and_lowers_the_loss(sft, base_model):
    changed = _weights(_load(local_path(sft.uri)))
    before = _weights(_load(Path(base_model.uri)))
    assert all(not torch.equal(changed[n], before[n]) for n in before)
    m = sft.metrics
    assert m["trainable_parameters"] == sum(p.numel() for p in before.values())
    assert m["train_loss_last"] < m["train_loss_first"] - 1.0
    assert m["eval_loss"] is not None and 0.0 <= m["eval_accuracy"] <= 1.0


def test_sft_record_is_an_adapter_record_that_says_full_model_with_the_base_model_as_source(sft, base_model):
    assert isinstance(sft, AdapterRecord) and sft.method == "sft"
    assert sft.config == {**SftTrainer(SFT).settings.model_dump(mode="json"), "full_model": True}
    assert sft.source("base_model") == base_model and sft.source("features").table == "aiplane.tickets"
    draft = build_factsheet(sft)  # what the governance gate judges
    assert draft["training"]["method"] == "sft" and draft["training"]["config"]["full_model"] is True
    assert draft["base_model"]["digest"] == base_model.digest and draft["adapter"]["digest"] == sft.digest


def test_sft_with_unfreeze_trains_only_the_named_layers(base_model, rows, tmp_path):
    record = _train(base_model, rows, tmp_path, "sft", {**SFT, "max_steps": 4, "unfreeze": ["model.layers.1", "model.norm"]})
    after, before = _weights(_load(local_path(record.uri))), _weights(_load(Path(base_model.uri)))
    moved = {n for n in before if not torch.equal(after[n], before[n])}
    assert moved and all(n.startswith(("model.layers.1.", "model.norm.")) for n in moved)
    assert record.metrics["trainable_parameters"] == sum(
        p.numel() for n, p in before.items() if n.startswith(("model.layers.1.", "model.norm."))
    )


def test_sft_digest_does_not_depend_on_where_the_base_model_sat(base_model, rows, tmp_path):
    settings = {**SFT, "max_steps": 3, "eval_limit": 2}
    digests = []
    for where in ("a", "elsewhere/b"):
        path = shutil.copytree(base_model.uri, tmp_path / where / "granite")
        digests.append(_train(resolve(str(path), str(tmp_path / where)), rows, tmp_path / where / "artifacts", "sft", settings).digest)
    assert digests[0] == digests[1]


@pytest.mark.parametrize(
    ("trainer", "change", "message"),
    [
        ("sft", {"unfreeze": []}, "unfreeze must name at least one layer"),
        ("sft", {"learning_rate": 0}, "learning_rate must be > 0"),
        ("sft", {"r": 8}, "r: Unknown setting 'r'; allowed settings: batch_size"),
        ("distill", {"temperature": 0}, "temperature must be > 0"),
        ("distill", {"alpha": 1.5}, "alpha (the KL term's weight) must be in [0, 1]"),
        ("distill", {"lora": None}, "student: lora needs lora: {r, alpha, target_modules}"),
        ("distill", {"student": "full"}, "lora: applies to student: lora"),
        ("distill", {"unfreeze": ["lm_head"]}, "unfreeze applies to student: full"),
        ("distill", {"student": "half"}, "student: Input should be 'lora' or 'full'"),
        ("distill", {"lora": {**LORA, "r": 0}}, "r must be > 0"),
        ("distill", {"temprature": 1}, "temprature: Unknown setting 'temprature'"),
    ],
)
def test_invalid_settings_are_config_errors_naming_the_setting(trainer, change, message):
    base = SFT if trainer == "sft" else _distill_settings(Path("/nonexistent"))
    with pytest.raises(ConfigError) as err:
        Registry().create("trainer", trainer, {**base, **change})
    assert message in str(err.value)


def test_unfreeze_naming_no_layer_is_rejected_before_anything_is_written(base_model, rows, tmp_path):
    trainer = SftTrainer({**SFT, "unfreeze": ["model.layers.7", "lm_head"]})
    with pytest.raises(ConfigError) as err:
        trainer.workload(base_model, _features(rows), str(tmp_path / "artifacts"))
    assert "'model.layers.7'" in str(err.value) and "'lm_head'" not in str(err.value)
    assert "model.layers.1" in str(err.value)  # what exists is suggested
    with pytest.raises(ConfigError):
        _train(base_model, rows, tmp_path / "artifacts", "sft", {**SFT, "unfreeze": ["model.layers.7"]})
    assert not (tmp_path / "artifacts").exists()


def test_sft_weight_headers_confirm_present_layers_and_leave_tied_ones_to_the_model_check(base_model):
    from aiplane.plugins.peft.base_model import weights

    shapes = weights(base_model.uri, "")
    assert SftTrainer(SFT).check_weights(shapes, "tiny")
    assert SftTrainer({**SFT, "unfreeze": ["model.layers.0", "mlp"]}).check_weights(shapes, "tiny")
    assert not SftTrainer({**SFT, "unfreeze": ["lm_head"]}).check_weights(shapes, "tiny")  # tied: not in the file
    SftTrainer({**SFT, "unfreeze": ["lm_head"]}).validate(base_model)  # the model check says yes


# ---------------------------------------------------------------- distill


def _kl_to_teacher(student, teacher, tokenizer, rows) -> float:
    """Mean KL(teacher || student) per completion token over ``rows``, at temperature 1."""
    from aiplane.plugins.peft.methods import logits
    from aiplane.plugins.peft.packing import IGNORE, example

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            x, y = example(tokenizer, row)
            ids, scored = torch.tensor([x]), torch.tensor(y[1:]) != IGNORE
            s, t = logits(student, ids)[0][scored], logits(teacher, ids)[0][scored]
            kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
            total, count = total + float(kl), count + int(scored.sum())
    return total / count


@pytest.fixture(scope="module")
def distilled(base_model, rows, teacher_adapter, tmp_path_factory) -> AdapterRecord:
    return _train(base_model, rows, tmp_path_factory.mktemp("distill"), "distill", _distill_settings(teacher_adapter))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_distilled_lora_student_is_closer_to_the_teacher_than_the_base_model(distilled, base_model, rows, teacher_adapter):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model.uri)
    teacher = PeftModel.from_pretrained(_load(Path(base_model.uri)), teacher_adapter).merge_and_unload().eval()
    student = PeftModel.from_pretrained(_load(Path(base_model.uri)), local_path(distilled.uri)).eval()
    held_out = [r for r in rows if r["split"] == "eval"][:16]
    before = _kl_to_teacher(_load(Path(base_model.uri)), teacher, tokenizer, held_out)
    after = _kl_to_teacher(student, teacher, tokenizer, held_out)
    assert after < before / 2, (before, after)
    assert sorted(p.name for p in local_path(distilled.uri).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_distill_record_names_the_teacher_as_source_and_by_digest(distilled, base_model, teacher_adapter):
    assert distilled.method == "distill" and "full_model" not in distilled.config
    teacher = DistillTrainer(_distill_settings(teacher_adapter)).teacher(base_model)
    assert distilled.config["teacher_digest"] == teacher.digest == f"{base_model.digest}+{sha256_path(teacher_adapter)}"
    assert distilled.sources[0] == base_model and distilled.sources[2].digest == teacher.digest
    assert build_factsheet(distilled)["base_model"]["digest"] == base_model.digest


def test_distill_loss_is_the_temperature_scaled_kl_mixed_with_the_label_loss(base_model, rows, teacher_adapter):
    from aiplane.plugins.peft.methods import label_loss, logits, method_for
    from aiplane.plugins.peft.packing import IGNORE, pack
    from aiplane.plugins.peft.trainer import DistillSettings
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model.uri)
    student, teacher = _load(Path(base_model.uri)), _load(build_tiny_granite(Path(base_model.uri).parent / "seed-1", seed=1))
    packed = pack(tokenizer, rows[:8], 64)
    x, y, pos = packed.inputs[:2], packed.labels[:2], packed.positions[:2]
    method = method_for("distill", DistillSettings(**_distill_settings(teacher_adapter, temperature=3.0, alpha=0.25)))
    method.teacher = teacher
    with torch.no_grad():
        total, count = method.loss(student, x, y, pos)
        scored = y[:, 1:] != IGNORE
        s, t = logits(student, x, pos)[scored], logits(teacher, x, pos)[scored]
        kl = (t.div(3).softmax(-1) * (t.div(3).log_softmax(-1) - s.div(3).log_softmax(-1))).sum()
        ce, n = label_loss(student, x, y, pos)
    assert count == n == int(scored.sum())
    torch.testing.assert_close(total, 0.25 * 9 * kl + 0.75 * ce, rtol=1e-4, atol=1e-3)
    assert not torch.isclose(total, ce)  # the teacher really weighs in


def test_distill_full_student_from_a_teacher_directory_publishes_a_model(base_model, rows, tmp_path):
    teacher = build_tiny_granite(tmp_path / "teacher", seed=1)
    settings = {**LOOP, "max_steps": 4, "learning_rate": 0.003, "teacher": str(teacher), "student": "full", "unfreeze": ["model.layers.1"]}
    record = _train(base_model, rows, tmp_path / "artifacts", "distill", settings)
    assert sorted(p.name for p in local_path(record.uri).iterdir()) == MODEL_FILES
    assert record.config["full_model"] is True and record.config["teacher_digest"] == sha256_path(teacher)
    assert record.source("base_model") == base_model


def test_a_teacher_with_another_vocabulary_or_no_adapter_is_rejected_before_training(base_model, rows, tmp_path, teacher_adapter):
    other = tmp_path / "other"
    shutil.copytree(base_model.uri, other)
    (other / "aiplane.json").unlink()  # what marks the built-in model: this one is a directory like any other
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 2048}))
    with pytest.raises(ConfigError, match="vocabulary of 2048 tokens and the base model .* of 1024"):
        DistillTrainer(_distill_settings(teacher_adapter, teacher=str(other), teacher_adapter=None)).validate(base_model)
    with pytest.raises(InputError, match="holds no adapter_config.json"):
        DistillTrainer(_distill_settings(tmp_path)).workload(base_model, _features(rows), str(tmp_path / "artifacts"))
    with pytest.raises(ConfigError, match="give the teacher's model directory"):
        DistillTrainer(_distill_settings(teacher_adapter)).validate(resolve(str(other), str(tmp_path)))
    assert not (tmp_path / "artifacts").exists()


def test_distill_workload_carries_the_teacher_as_an_input_record(base_model, rows, tmp_path, teacher_adapter):
    workload = DistillTrainer(_distill_settings(teacher_adapter)).workload(base_model, _features(rows), str(tmp_path))
    assert workload.entrypoint == "aiplane.plugins.peft.train:run_distill"
    assert set(workload.inputs) == {"base_model", "features", "teacher"}
    assert Workload.model_validate_json(workload.model_dump_json()) == workload


# ---------------------------------------------------------------- shared loop




@pytest.mark.parametrize("trainer", ["sft", "distill"])
def test_training_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(trainer, base_model, rows, tmp_path, teacher_adapter):
    settings = {**SFT, "max_steps": 8} if trainer == "sft" else _distill_settings(teacher_adapter, max_steps=8)
    whole = _train(base_model, rows, tmp_path / "whole", trainer, settings, CheckpointingRuntime(tmp_path / "a", every=4))
    with pytest.raises(RuntimeError, match="worker lost"):
        _train(base_model, rows, tmp_path / "resumed", trainer, settings, CheckpointingRuntime(tmp_path / "b", crash_at=4, every=4))
    assert not (tmp_path / "resumed" / "adapters").exists()
    resumed = _train(base_model, rows, tmp_path / "resumed", trainer, settings, CheckpointingRuntime(tmp_path / "b", every=4))
    assert resumed.metrics["resumed_from_step"] == 4
    assert resumed.digest == whole.digest and resumed.metrics["loss_curve"] == whole.metrics["loss_curve"]


def test_aiplane_plugins_lists_the_sft_and_distill_trainers():
    cli = Path(sys.executable).parent / "aiplane"
    out = subprocess.run([str(cli), "plugins"], capture_output=True, text=True, timeout=120, check=True)
    line = next(line for line in out.stdout.splitlines() if "trainer 'lora'" in line)
    assert line.split("provides", 1)[1].split() == ["trainer", "'lora',", "trainer", "'sft',", "trainer", "'distill'"]


# ---------------------------------------------------------------- through the asset chain

TINY = dict(max_steps=8, batch_size=4, seq_len=64, eval_limit=4, log_every=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def chain_home(tmp_path_factory, base_model, teacher_adapter) -> Path:
    from aiplane.assets.sources import seed_tickets

    chain = tmp_path_factory.mktemp("chain")
    seed_tickets(chain / "sources" / "tickets.jsonl", n=300)
    return chain


def _materialize(chain: Path, trainer: dict, target: str):
    from aiplane.assets import ASSETS, AiplaneResource

    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["trainer"] = {**raw["trainer"], **trainer}
    deployment = chain / f"{trainer['name']}-{target}.yaml"
    deployment.write_text(yaml.safe_dump(raw))
    resource = AiplaneResource(deployment=str(deployment), home=str(chain))
    return dg.materialize(
        ASSETS,
        selection=["base_model", "features", "adapter_weights"],
        instance=dg.DagsterInstance.ephemeral(),
        resources={"aiplane": resource},
        run_config={"ops": {"adapter_weights": {"config": {"target": target}}}},
        raise_on_error=False,
    )


def _chain_trainer(name: str, teacher_adapter: Path) -> dict:
    if name == "sft":
        return {"name": "sft", "settings": {**TINY, "learning_rate": 0.003}}
    settings = {**TINY, "learning_rate": 0.01, "teacher": BUILTIN, "teacher_adapter": str(teacher_adapter), "lora": LORA}
    return {"name": "distill", "settings": settings}


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["local", "ray-local", "kfp-local"])
@pytest.mark.parametrize("name", ["sft", "distill"])
def test_trainer_runs_through_the_asset_chain(name, target, chain_home, teacher_adapter):
    result = _materialize(chain_home, _chain_trainer(name, teacher_adapter), target)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    record = result.asset_value("adapter_weights")
    assert record.method == name and record.placement.target == target
    assert record.metrics["world_size"] == (2 if target == "ray-local" else 1)
    path = local_path(record.uri)
    assert record.digest == sha256_path(path)
    files = sorted(p.name for p in path.iterdir())
    assert files == (MODEL_FILES if name == "sft" else ["adapter_config.json", "adapter_model.safetensors"])
    assert record.config.get("full_model", False) is (name == "sft")
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["loss_decreased"] and checks["governance_gate"]
    meta = next(m for m in result.get_asset_materialization_events() if m.asset_key.path[-1] == "adapter_weights")
    assert meta.materialization.metadata["method"].value == name


def test_aiplane_check_names_a_missing_teacher_and_adapter(tmp_path):
    from aiplane.core.preflight import preflight

    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    settings = _distill_settings(tmp_path / "no-adapter", teacher=str(tmp_path / "no-teacher"))
    raw["trainer"] = {**raw["trainer"], "name": "distill", "settings": settings}
    deployment = tmp_path / "distill.yaml"
    deployment.write_text(yaml.safe_dump(raw))
    problems = preflight(load_deployment(str(deployment), home=str(tmp_path)), Registry())
    assert any("settings.teacher" in p and "no-teacher" in p and "not a model directory" in p for p in problems), problems
    assert any("settings.teacher_adapter" in p and "no adapter_config.json" in p for p in problems), problems
