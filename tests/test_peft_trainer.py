"""The ``lora`` trainer: real LoRA training of the built-in tiny Granite on the sample tickets."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import yaml

import aiplane.core
from aiplane.core.storage import local_path
from aiplane.core.artifacts import sha256_path
from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled
from aiplane.core.factsheet import build_factsheet
from aiplane.core.plugins import Registry
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.sample import generate_tickets, to_features
from aiplane.core.workload import Event, Workload, WorkloadContext, execute
from aiplane.plugins.peft.base_model import build_tiny_granite, resolve
from aiplane.plugins.peft.train import train
from aiplane.plugins.peft.trainer import LoraTrainer
from conftest import features_record

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU in about a second, large enough that the loss clearly falls.
SETTINGS = dict(
    r=8,
    alpha=16,
    dropout=0.0,
    target_modules=["q_proj", "v_proj"],
    max_steps=30,
    batch_size=8,
    seq_len=64,
    learning_rate=0.01,
    seed=0,
    eval_limit=12,
    log_every=5,
    max_new_tokens=6,
)
LINEAR = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> BaseModelRecord:
    home = tmp_path_factory.mktemp("home")
    return resolve(str(build_tiny_granite(home / "tiny-granite")), str(home))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return to_features(generate_tickets(300))


class _Recorder:
    """A workload context for calling ``train`` directly, keeping every event it emits."""

    def __init__(self, workload: Workload | None = None, cancel: threading.Event | None = None):
        self.events: list[Event] = []
        self.ctx = WorkloadContext(workload or Workload(name="train-adapter", entrypoint="x:y"), self.events.append, cancel)

    def metrics(self, name: str) -> list[Event]:
        return [e for e in self.events if e.type == "metric" and e.name == name]


@pytest.fixture(scope="module")
def trained(base_model, rows, tmp_path_factory) -> tuple[AdapterRecord, _Recorder, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    features = features_record(rows)
    workload = LoraTrainer(SETTINGS).workload(base_model, features, str(root))
    recorder = _Recorder(workload)
    record = train(base_model, features, rows, SETTINGS, str(root), recorder.ctx)
    return record, recorder, root


def test_training_lowers_the_completion_loss(trained):
    record, _, _ = trained
    m = record.metrics
    assert m["train_loss_last"] < m["train_loss_first"] - 0.2
    assert [step for step, _ in m["loss_curve"]] == list(range(1, SETTINGS["max_steps"] + 1))
    assert m["steps"] == SETTINGS["max_steps"]
    assert m["train_tokens"] == SETTINGS["max_steps"] * SETTINGS["batch_size"] * SETTINGS["seq_len"]
    assert m["tokens_per_s"] > 0 and m["duration_s"] > 0 and m["device"] == "cpu"


def test_the_record_says_what_the_training_steps_computed_through(trained):
    import torch

    from aiplane.plugins.peft.fused import bf16_native

    # The deployment's settings (precision auto) on the tiny Granite: fused wherever the CPU has bfloat16 products.
    expected = ("fused LoRA decoder, frozen products in bfloat16" if bf16_native(torch.device("cpu")) else
                "transformers' forward, float32 (this CPU has no bfloat16 dot-product instructions)")  # fmt: skip
    assert trained[0].metrics["train_forward"] == expected


def test_adapter_is_published_content_addressed_with_no_staging_leftovers(trained):
    record, _, root = trained
    path = local_path(record.uri)
    assert path.parent == root / "adapters"
    assert record.digest == sha256_path(path) == "sha256:" + path.name
    # Only the PEFT adapter itself, so the digest pins exactly the weights and their config.
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in root.iterdir()) in (["adapters"], [".staging", "adapters"])
    assert not any((root / ".staging").glob("*"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_published_adapter_loads_with_peft_and_changes_the_model(trained, base_model, rows):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record, _, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(base_model.uri)
    ids = tokenizer(rows[0]["prompt"] + rows[0]["completion"], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_model.uri)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, local_path(record.uri))
        after = model(input_ids=ids).logits
    assert model.peft_config["default"].r == SETTINGS["r"]
    assert not torch.allclose(before, after)


def test_progress_is_reported_through_the_workload_context(trained):
    record, recorder, _ = trained
    expected_steps = list(range(SETTINGS["log_every"], SETTINGS["max_steps"] + 1, SETTINGS["log_every"]))
    losses = recorder.metrics("train_loss")
    assert [e.step for e in losses] == expected_steps
    curve = dict(record.metrics["loss_curve"])
    assert all(math.isclose(e.value, curve[e.step], rel_tol=1e-6) for e in losses)
    assert [e.step for e in recorder.metrics("tokens_per_s")] == expected_steps
    assert any(e.type == "log" and e.message.startswith(f"step {SETTINGS['max_steps']}/") for e in recorder.events)
    # ctx.metrics (the workload result's metrics) holds the scalars, not the curve.
    assert recorder.ctx.metrics["eval_loss"] == record.metrics["eval_loss"]
    assert "loss_curve" not in recorder.ctx.metrics


def test_adapter_record_carries_eval_metrics_settings_and_lineage(trained, base_model, rows):
    record, recorder, _ = trained
    m = record.metrics
    n_eval = sum(r["split"] == "eval" for r in rows)
    assert m["eval_rows"] == min(SETTINGS["eval_limit"], n_eval)
    assert m["train_rows"] == sum(r["split"] == "train" for r in rows)
    assert 0 < m["eval_loss"] < math.log(1024) + 1
    assert 0.0 <= m["eval_accuracy"] <= 1.0
    assert recorder.metrics("eval_accuracy")[0].value == m["eval_accuracy"]
    assert record.method == "lora" and record.config == LoraTrainer(SETTINGS).settings.model_dump(mode="json")
    assert record.run_id == recorder.ctx.run_id
    assert record.source("base_model") == base_model and record.source("features").table == "aiplane.tickets"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 0}, "r must be > 0"),
        ({"alpha": -1}, "alpha must be > 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"target_modules": []}, "target_modules must name at least one module"),
        ({"seq_len": 8}, "seq_len must be >= 16"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"lr": 0.1}, "lr: Unknown setting 'lr'; allowed settings: alpha"),
    ],
)
def test_invalid_settings_are_config_errors(change, message):
    with pytest.raises(ConfigError) as err:
        LoraTrainer({**SETTINGS, **change})
    assert message in str(err.value)


def test_unknown_target_module_is_rejected_listing_available_modules(base_model, rows, tmp_path):
    settings = {**SETTINGS, "target_modules": ["q_proj", "qkv_proj"]}
    trainer = LoraTrainer(settings)
    with pytest.raises(ConfigError) as err:
        trainer.validate(base_model)
    assert "'qkv_proj'" in str(err.value) and "'q_proj'" not in str(err.value)
    assert "Available Linear modules: " + ", ".join(LINEAR) in str(err.value)
    with pytest.raises(ConfigError):
        trainer.workload(base_model, features_record(rows), str(tmp_path / "artifacts"))
    with pytest.raises(ConfigError):
        train(base_model, features_record(rows), rows, settings, str(tmp_path / "artifacts"), _Recorder().ctx)
    assert not (tmp_path / "artifacts").exists()


def test_weight_headers_confirm_present_targets_and_leave_any_doubt_to_building_the_model(base_model):
    from aiplane.plugins.peft.base_model import weights

    shapes = weights(base_model.uri, "")
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)
    assert LoraTrainer(SETTINGS).check_weights(shapes, "tiny")
    # Absent from the files, so not settled here: a typo, a 1-D norm, and the tied lm_head (which does exist).
    for targets in (["q_proj", "qkv_proj"], ["input_layernorm"], ["q_proj", "lm_head"]):
        assert not LoraTrainer({**SETTINGS, "target_modules": targets}).check_weights(shapes, "tiny")
    LoraTrainer({**SETTINGS, "target_modules": ["q_proj", "lm_head"]}).validate(base_model)  # the model check says yes


def test_preflight_of_a_model_on_disk_needs_neither_torch_nor_transformers(base_model, tmp_path):
    import subprocess
    import sys

    raw = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    deployment = tmp_path / "deployment.yaml"
    for targets, expect in ((["q_proj", "v_proj"], "[]"), (["q_proj", "qkv_proj"], "'qkv_proj'")):
        raw["base_model"] = {"uri": base_model.uri}
        raw["trainer"]["settings"]["target_modules"] = targets
        deployment.write_text(yaml.safe_dump(raw))
        code = (
            "import sys\n"
            "from aiplane.core.config import load_deployment\n"
            "from aiplane.core.plugins import Registry\n"
            "from aiplane.core.preflight import preflight\n"
            f"print(preflight(load_deployment({str(deployment)!r}, home={str(tmp_path)!r}), Registry()))\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        problems, imported = out.stdout.strip().splitlines()
        assert expect in problems
        # The orchestrator stays light when the weights settle it; a problem is confirmed by building the model.
        assert imported == ("False False" if expect == "[]" else "True True")


def test_empty_training_set_is_an_input_error_and_writes_nothing(base_model, rows, tmp_path):
    eval_only = [r for r in rows if r["split"] == "eval"]
    with pytest.raises(InputError, match="empty training set"):
        train(base_model, features_record(eval_only), eval_only, SETTINGS, str(tmp_path / "artifacts"), _Recorder().ctx)
    assert not (tmp_path / "artifacts").exists()


def test_missing_base_model_directory_is_an_input_error(base_model, rows, tmp_path):
    gone = base_model.model_copy(update={"uri": str(tmp_path / "no-such-model")})
    with pytest.raises(InputError, match="does not exist"):
        LoraTrainer(SETTINGS).validate(gone)
    with pytest.raises(InputError, match="does not exist"):
        LoraTrainer(SETTINGS).workload(gone, features_record(rows), str(tmp_path / "artifacts"))
    assert not (tmp_path / "artifacts").exists()


def test_cancelled_training_stops_and_publishes_nothing(base_model, rows, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(WorkloadCancelled):
        train(base_model, features_record(rows), rows, SETTINGS, str(tmp_path), _Recorder(cancel=cancel).ctx)
    assert not (tmp_path / "adapters").exists()
    assert not any((tmp_path / ".staging").glob("*"))


def test_lora_trainer_comes_from_the_plugin_manager_with_the_deployment_settings():
    deployment = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    assert deployment["trainer"]["name"] == "lora"
    trainer = Registry().create("trainer", "lora", deployment["trainer"]["settings"])
    assert isinstance(trainer, LoraTrainer)
    assert trainer.settings.target_modules == ["q_proj", "v_proj"]


def test_workload_names_the_training_entrypoint_and_round_trips_as_json(base_model, rows, tmp_path):
    features = features_record(rows)
    workload = LoraTrainer(SETTINGS).workload(base_model, features, str(tmp_path))
    assert (workload.name, workload.entrypoint) == ("train-adapter", "aiplane.plugins.peft.train:run")
    assert workload.inputs == {"base_model": base_model, "features": features}
    assert workload.params == {"settings": LoraTrainer(SETTINGS).settings.model_dump(mode="json"), "artifact_root": str(tmp_path)}
    assert Workload.model_validate_json(workload.model_dump_json()) == workload
    assert not any(tmp_path.iterdir())


def test_workload_reads_its_rows_through_the_iceberg_store_and_reproduces_the_adapter(
    trained, base_model, rows, tmp_path
):
    import pyarrow as pa

    store = Registry().create(
        "feature store",
        "iceberg",
        {"catalog_uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "warehouse")},
    )
    # Shuffled on the way in: training sorts by id, so the row order in the store does not matter.
    features = store.publish(pa.Table.from_pylist(rows[::-1]), "tickets")
    workload = LoraTrainer(SETTINGS).workload(base_model, features, str(tmp_path / "artifacts"))
    events: list[Event] = []
    result = execute(workload, events.append)
    adapter = result.outputs["adapter"]
    assert adapter.source("features") == features
    assert result.metrics["train_rows"] == trained[0].metrics["train_rows"]
    assert any(e.type == "log" and e.message.startswith(f"read {len(rows)} rows") for e in events)
    # Same rows, settings and seed: the same adapter bytes, hence the same digest.
    assert adapter.digest == trained[0].digest


def test_adapter_digest_does_not_depend_on_where_the_base_model_sat(base_model, rows, tmp_path):
    settings = {**SETTINGS, "max_steps": 4, "eval_limit": 2}
    digests, configs = [], []
    for home in ("home-a", "elsewhere/home-b"):
        # The same base model bytes, at another path on each "machine".
        path = shutil.copytree(base_model.uri, tmp_path / home / "models" / "granite")
        base = resolve(str(path), str(tmp_path / home))
        assert base.digest == base_model.digest and base.uri == str(path)
        adapter = train(base, features_record(rows), rows, settings, str(tmp_path / home / "artifacts"), _Recorder().ctx)
        digests.append(adapter.digest)
        configs.append((local_path(adapter.uri) / "adapter_config.json").read_text())
    assert digests[0] == digests[1]
    assert str(tmp_path) not in configs[0]
    # The adapter names its base model by content, so it still says which weights it applies to.
    assert json.loads(configs[0])["base_model_name_or_path"] == base_model.digest


def _training_run_digest(adapter: AdapterRecord) -> str:
    endpoint = EndpointRecord(
        uri="http://127.0.0.1:1/v1", digest="sha256:e", url="http://127.0.0.1:1", model_name="m",
        protocols=("openai-completions",), serving="vllm", sources=(adapter,),
    )  # fmt: skip
    return next(step["digest"] for step in build_factsheet(endpoint)["lineage"] if step["kind"] == "training_run")


def test_training_run_digest_covers_rows_base_model_settings_and_code_version_not_measurements(
    trained, base_model, rows, tmp_path
):
    record, _, _ = trained
    assert record.metrics["aiplane_version"] == aiplane.core.__version__
    digest = _training_run_digest(record)
    fewer = rows[:200]
    other_rows = train(base_model, features_record(fewer), fewer, SETTINGS, str(tmp_path), _Recorder().ctx)
    assert _training_run_digest(other_rows) != digest

    other_base = base_model.model_copy(update={"digest": "sha256:" + "0" * 64})
    changed = [
        record.model_copy(update={"sources": (other_base, record.source("features"))}),
        record.model_copy(update={"config": {**record.config, "learning_rate": 0.02}}),
        record.model_copy(update={"metrics": {**record.metrics, "aiplane_version": "99.0.0"}}),
    ]
    assert all(_training_run_digest(r) != digest for r in changed)
    # A rerun of the same inputs measures other things and gets another run id, but it is the same run.
    rerun = record.model_copy(update={"metrics": {**record.metrics, "duration_s": 1e6, "tokens_per_s": 1.0}, "run_id": "x"})
    assert _training_run_digest(rerun) == digest


def _counting_reads(monkeypatch, delay_s: float = 0.0) -> list[Path]:
    """Every full read of a model tree from here on, by path (``delay_s`` stretches each, to overlap two)."""
    import time

    from aiplane.core import artifacts

    reads: list[Path] = []
    real = artifacts.sha256_path

    def counted(path):
        reads.append(Path(path))
        time.sleep(delay_s)
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_path", counted)
    return reads


def test_a_local_base_model_is_read_once_while_its_files_stay_and_read_again_once_one_changed(tmp_path, monkeypatch):
    model = build_tiny_granite(tmp_path / "granite")
    home = tmp_path / "home"
    reads = _counting_reads(monkeypatch)
    first, second = resolve(str(model), str(home)), resolve(str(model), str(home))
    assert first.digest == second.digest == sha256_path(model) and len(reads) == 1
    # The same size, other bytes: the digest must follow the bytes, not the sizes.
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    third = resolve(str(model), str(home))
    assert len(reads) == 2 and third.digest == sha256_path(model) != first.digest


def test_two_resolves_of_one_base_model_at_once_read_it_once(tmp_path, monkeypatch):
    # As `aiplane up` does: the hint preparing the model's server and the run's base_model step.
    model = build_tiny_granite(tmp_path / "granite")
    home = tmp_path / "home"
    reads = _counting_reads(monkeypatch, delay_s=0.5)
    digests: list[str] = []
    threads = [threading.Thread(target=lambda: digests.append(resolve(str(model), str(home)).digest)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and digests[0] == digests[1] == sha256_path(model)
