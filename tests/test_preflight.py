"""`aiplane check` refuses, before anything is trained or written, every input that would fail only later.

Each test runs the check the CLI runs (``main([... "check"])``) on a variant of the
embedded ``local`` deployment whose base model is a tiny model directory written
here (a config and one safetensors file, so no torch is needed to check it), with
``AIPLANE_HOME`` pointing at a directory that must still not exist afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from _s3 import dead_endpoint
from aiplane.assets.cli import main
from aiplane.core.config import load_deployment
from aiplane.core.errors import InputError
from aiplane.core.placement import allows_region
from aiplane.core.records import BaseModelRecord
from aiplane.plugins.peft.trainer import LoraTrainer

REPO = Path(__file__).parents[1]
IMAGE = "quay.io/modh/vllm:rhoai-2.19-cuda"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A two-layer model directory: what the preflight reads of a model (config, weights' headers), nothing more."""
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "granite", "architectures": ["GraniteForCausalLM"], "vocab_size": 64}))
    weights = {f"model.layers.{i}.self_attn.{m}.weight": np.zeros((8, 8), np.float32) for i in (0, 1) for m in ("q_proj", "v_proj")}
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture
def check(tmp_path, model_dir, monkeypatch, capsys):
    """Run `aiplane check` on the local deployment changed by ``edit(raw)``: (exit code, what it printed)."""
    home = tmp_path / "home"
    monkeypatch.setenv("AIPLANE_HOME", str(home))

    def run(edit, *args: str) -> tuple[int, str]:
        raw = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
        raw["base_model"] = {"uri": str(model_dir)}
        edit(raw)
        path = tmp_path / "deployment.yaml"
        path.write_text(yaml.safe_dump(raw))
        code = main(["--deployment", str(path), "check", *args])
        out = capsys.readouterr()
        assert not home.exists(), "the check wrote under the home"
        return code, out.out + out.err

    return run


def _set(*path_and_value):
    *path, key, value = path_and_value

    def edit(raw):
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value

    return edit


def _kserve(**settings):
    return _set("serving", {"name": "kserve", "sla": "interactive", "settings": {"namespace": "aiplane", "image": IMAGE, **settings}})


def _kubeconfig(tmp_path: Path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "aiplane"}}],
    }))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (_set("trainer", "settings", "learning_rate", float("inf")), "learning_rate: inf is not a finite number"),
        (_set("trainer", "settings", "learning_rate", float("nan")), "learning_rate must be > 0 (got nan)"),
        (_set("trainer", "settings", "r", True), "r: true is a boolean, not a number; write the number itself"),
        (_set("serving", "settings", "readiness_timeout_s", float("inf")), "readiness_timeout_s: inf is not a finite number"),
        (_set("serving", "settings", "max_loras", True), "max_loras: true is a boolean, not a number"),
        (
            _set("governance", "thresholds", "eval_loss", {"max": float("inf")}),
            "governance.thresholds.eval_loss.max: Input should be a finite number",
        ),
    ],
    ids=["learning-rate-inf", "learning-rate-nan", "rank-true", "serving-timeout-inf", "serving-count-true", "threshold-inf"],
)
def test_a_boolean_for_a_number_or_a_non_finite_number_is_refused_before_training(check, edit, said):
    code, out = check(edit)
    assert code == 1 and said in out, out


def test_a_boolean_for_a_count_in_the_deployment_itself_is_refused(check):
    code, out = check(lambda raw: raw["targets"][0].update(gpus=True))
    assert code == 1 and "targets.0.gpus: Input should be a valid integer" in out, out


@pytest.mark.parametrize("serving", ["vllm", "kserve"])
def test_a_lora_rank_above_the_serving_runtimes_maximum_is_refused_before_training(check, tmp_path, serving):
    def edit(raw):
        if serving == "kserve":
            _kserve(max_lora_rank=8)(raw)
            raw["storage"] = {"root": "s3://aiplane/artifacts"}
        else:
            raw["serving"]["settings"]["max_lora_rank"] = 8

    code, out = check(edit, "--offline")  # offline: the rank is a setting, no cluster is needed to compare it
    assert code == 1
    assert f"trainer.settings: the LoRA rank (r) is 16, above the {serving} serving target's max_lora_rank 8" in out, out
    assert "train with r <= 8, or raise serving.settings.max_lora_rank to 16 or more" in out


def test_a_threshold_on_a_metric_the_trainer_does_not_produce_says_did_you_mean_and_not_retrain(check):
    code, out = check(_set("governance", "thresholds", "eval_acuracy", 0.5))
    assert code == 1
    assert "governance.thresholds.eval_acuracy: the trainer does not produce a metric 'eval_acuracy'" in out, out
    assert "Did you mean 'eval_accuracy'?" in out and "It produces: dataset_tokens, duration_s, eval_accuracy, eval_loss" in out
    assert "retrain" not in out


def test_without_evaluation_the_eval_metrics_are_not_produced_so_a_threshold_on_them_is_refused(check):
    def edit(raw):
        raw["trainer"]["settings"]["eval_limit"] = 0
        raw["governance"] = {"thresholds": {"eval_accuracy": 0.5}}

    code, out = check(edit)
    assert code == 1 and "does not produce a metric 'eval_accuracy'" in out, out


def test_residency_regions_compare_like_tags_whatever_their_case(check, tmp_path):
    def edit(raw):
        raw["residency"]["eu"] = ["EU"]
        raw["targets"][1]["region"] = " Eu "

    code, out = check(edit)
    assert code == 0, out
    deployment = load_deployment(tmp_path / "deployment.yaml")
    assert deployment.residency["eu"] == ("eu",) and deployment.targets[1].region == "eu"
    assert allows_region("EU", deployment.residency, deployment.targets[0].region)


def test_unset_s3_key_variables_are_named_never_their_values(check, monkeypatch):
    monkeypatch.setenv("H3_S3_KEY_ID", "AKIA-THE-VALUE-MUST-NOT-SHOW")
    monkeypatch.delenv("H3_S3_SECRET", raising=False)
    refs = {"access_key_id": {"env": "H3_S3_KEY_ID"}, "secret_access_key": {"env": "H3_S3_SECRET"}}
    code, out = check(_set("storage", {"root": "s3://aiplane/artifacts", "s3": refs}))
    assert code == 1
    assert "storage.s3: the key variable H3_S3_SECRET is not set, so s3://aiplane/artifacts cannot be reached" in out, out
    assert "export H3_S3_SECRET=..." in out and "AKIA-THE-VALUE" not in out


def test_an_s3_endpoint_nothing_listens_on_is_named_unreachable(check):
    endpoint = dead_endpoint()
    code, out = check(_set("storage", {"root": "s3://aiplane/artifacts", "s3": {"endpoint": endpoint}}))
    assert code == 1
    assert f"storage.s3.endpoint: {endpoint} is unreachable (Connection refused), so s3://aiplane/artifacts cannot be reached" in out, out


def test_a_kserve_cluster_that_cannot_be_reached_is_named_and_offline_it_is_not_asked(check, tmp_path):
    server = dead_endpoint()
    edit = lambda raw: (_kserve(kubeconfig=_kubeconfig(tmp_path, server))(raw), raw.update(storage={"root": "s3://aiplane/a"}))  # noqa: E731
    code, out = check(edit)
    assert code == 1 and f"serving: the cluster's API server at {server} is unreachable" in out, out
    code, out = check(edit, "--offline")
    assert code == 0 and "unreachable" not in out, out


def test_a_kserve_cluster_that_answers_passes_the_probe(check, tmp_path):
    from _k8s_api_double import KubernetesApiDouble

    with KubernetesApiDouble(crds=[]) as api:
        kubeconfig = tmp_path / "reachable"
        kubeconfig.write_text(yaml.safe_dump(api.kubeconfig("aiplane")))
        code, out = check(lambda raw: (_kserve(kubeconfig=str(kubeconfig))(raw), raw.update(storage={"root": "s3://aiplane/a"})))
    assert code == 0, out


def test_kserve_refuses_a_storage_root_its_pods_cannot_read(check):
    code, out = check(_kserve(), "--offline")
    assert code == 1 and "serving: storage.root is" in out and "which a KServe pod cannot read" in out, out


def test_kserve_refuses_a_base_model_outside_a_regions_own_store(check):
    def edit(raw):
        _kserve()(raw)
        raw["base_model"] = {"uri": "s3://models/granite"}
        raw["storage"] = {"root": "s3://aiplane/a", "regions": {"eu": {"root": "s3://eu-cloud/a", "s3": {"region": "eu-de"}}}}

    code, out = check(edit, "--offline")
    assert code == 1, out
    assert "serving: storage.regions.eu is a store of its own, and base_model.uri s3://models/granite is not in it" in out


def test_a_regions_own_trainer_is_held_to_the_serving_rank_too(check):
    def edit(raw):
        raw["serving"]["settings"]["max_lora_rank"] = 16
        raw["regions"] = {"eu": {"trainer": {"settings": {"r": 32}}}}

    code, out = check(edit)
    too_large = "regions.eu.trainer.settings: the LoRA rank (r) is 32, above the vllm serving target's max_lora_rank 16"
    assert code == 1 and too_large in out, out
    assert "raise regions.eu.serving.settings.max_lora_rank to 32" in out


def test_a_base_model_config_cut_short_is_named_by_check_and_by_the_load(check, model_dir):
    (model_dir / "config.json").write_text('{"model_type": "gran')
    code, out = check(lambda raw: None)
    assert code == 1 and f"The model's config {model_dir / 'config.json'} is not valid JSON" in out, out
    assert "Copy (or download) the model again" in out and "Traceback" not in out
    with pytest.raises(InputError, match="config.json is not valid JSON"):
        LoraTrainer({"r": 8, "alpha": 16, "target_modules": ["q_proj"], "max_steps": 1, "batch_size": 1, "seq_len": 16,
                     "learning_rate": 0.1}).validate(_record(model_dir))  # fmt: skip


def test_a_truncated_weights_file_is_named_by_check_and_by_the_load(check, model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, out = check(lambda raw: None)
    assert code == 1 and f"base_model.uri: Weights file {str(weights)!r} cannot be read" in out, out
    assert "cut short while it was copied (200 bytes)" in out and "Traceback" not in out
    with pytest.raises(InputError, match="model.safetensors' cannot be read"):
        LoraTrainer({"r": 8, "alpha": 16, "target_modules": ["q_proj"], "max_steps": 1, "batch_size": 1, "seq_len": 16,
                     "learning_rate": 0.1}).validate(_record(model_dir))  # fmt: skip


def test_a_home_that_cannot_be_created_is_said_before_anything_runs(check, monkeypatch):
    home = f"/sys/aiplane-{os.getpid()}/home"  # sysfs: no one may create a directory there, root included
    monkeypatch.setenv("AIPLANE_HOME", home)
    code, out = check(lambda raw: None)
    assert code == 1 and f"home: {home} cannot be created (in /sys)" in out, out
    assert "set AIPLANE_HOME (or the deployment's `home:`) to a directory this user can create and write" in out


def test_every_problem_is_listed_at_once(check, tmp_path):
    def edit(raw):
        raw["serving"]["settings"]["max_lora_rank"] = 8
        raw["governance"] = {"thresholds": {"eval_acuracy": 0.5}}
        raw["storage"] = {"root": "s3://aiplane/artifacts", "s3": {"endpoint": dead_endpoint(), "access_key_id": {"env": "H3_UNSET_A"},
                                                                  "secret_access_key": {"env": "H3_UNSET_B"}}}  # fmt: skip

    code, out = check(edit)
    assert code == 1 and "4 problems" in out, out
    for said in ("max_lora_rank 8", "eval_acuracy", "H3_UNSET_A, H3_UNSET_B are not set", "is unreachable"):
        assert said in out


def _record(path: Path) -> BaseModelRecord:
    return BaseModelRecord(uri=str(path), digest="sha256:" + "0" * 64, name="model", architecture="GraniteForCausalLM", parameters=1)


def test_the_serving_target_checks_each_regions_endpoint_name_before_anything_runs(check):
    region = "europe-west-" + "x" * 40  # support-tickets-<region> is longer than a vLLM endpoint name may be
    code, out = check(_set("regions", {region: {}}))
    assert code == 1 and f"serving: Endpoint name 'support-tickets-{region}'" in out, out
