"""The governance gate: bounds on an adapter's evaluation and facts on record, judged before it serves."""

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aiplane.assets import ASSETS, AiplaneResource
from aiplane.assets.sources import seed_tickets
from aiplane.core.config import GovernanceSettings, load_deployment
from aiplane.core.errors import ConfigError, InputError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.governance import judge
from aiplane.core.records import AdapterRecord, BaseModelRecord, FeaturesRecord
from conftest import stop_endpoints


def _draft(**metrics) -> dict:
    base = BaseModelRecord(uri="/m", digest="sha256:b", name="tiny", architecture="GraniteForCausalLM", parameters=1)
    features = FeaturesRecord(
        uri="iceberg://c/t?snapshot=1", digest="iceberg-snapshot:1", table="aiplane.t", snapshot_id=1,
        row_count=10, columns=("id",), residency=("eu",),
    )  # fmt: skip
    adapter = AdapterRecord(
        uri="s3://b/adapters/a", digest="sha256:a", method="lora", config={"r": 8}, metrics=metrics, run_id="r1",
        sources=(base, features),
    )  # fmt: skip
    return build_factsheet(adapter)


def test_a_draft_factsheet_describes_the_adapter_before_it_serves():
    draft = _draft(eval_accuracy=0.7)
    assert draft["stage"] == "draft" and draft["endpoint"] is None and draft["model"] is None
    assert [step["kind"] for step in draft["lineage"]] == ["features", "base_model", "training_run", "adapter_weights"]
    assert draft["training"]["metrics"] == {"eval_accuracy": 0.7}


def test_bounds_pass_within_and_fail_outside_saying_value_and_bound():
    policy = GovernanceSettings(thresholds={"eval_accuracy": 0.6, "eval_loss": {"max": 2.5}})
    assert judge(policy, _draft(eval_accuracy=0.6, eval_loss=2.5)).passed
    verdict = judge(policy, _draft(eval_accuracy=0.55, eval_loss=3.0))
    assert not verdict.passed
    assert verdict.problems == ["eval_accuracy 0.55 is below the minimum 0.6", "eval_loss 3 is above the maximum 2.5"]
    assert verdict.summary().startswith("governance gate failed: eval_accuracy 0.55 is below")


def test_a_missing_metric_or_fact_fails_closed():
    policy = GovernanceSettings(
        thresholds={"eval_accuracy": 0.6}, required_facts=("features.snapshot_id", "training.execution.target")
    )
    verdict = judge(policy, _draft(eval_loss=1.0))
    assert verdict.problems == [
        "the adapter has no metric 'eval_accuracy' (it has: eval_loss)",
        "fact training.execution.target is missing or empty in the factsheet",
    ]
    assert [rule["passed"] for rule in verdict.rules] == [False, True, False]
    # NaN reaches the factsheet as null (JSON has no NaN).
    assert judge(policy, _draft(eval_accuracy=float("nan"))).problems[0] == "eval_accuracy is not a number (None)"


def test_no_policy_is_no_gate():
    verdict = judge(GovernanceSettings(), _draft())
    assert verdict.passed and verdict.summary() == "no governance gate configured"


@pytest.mark.parametrize(
    "thresholds, message",
    [({"eval_accuracy": {}}, "give min, max or both"), ({"eval_loss": {"min": 3, "max": 2}}, "min 3.0 is above max 2.0")],
)
def test_a_threshold_without_a_sensible_bound_is_a_config_error(tmp_path, thresholds, message):
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["governance"] = {"thresholds": thresholds}
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_deployment(path, home=tmp_path)


def _deployment(home: Path, governance: dict) -> str:
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["trainer"]["settings"].update(max_steps=4, eval_limit=8, batch_size=4, seq_len=64)
    raw["governance"] = governance
    path = home / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _materialize(home: Path, deployment: str, selection="*", instance=None):
    seed_tickets(home / "sources" / "tickets.jsonl", n=120)
    try:
        return dg.materialize(
            ASSETS,
            selection=selection,
            instance=instance or dg.DagsterInstance.ephemeral(),
            resources={"aiplane": AiplaneResource(deployment=deployment, home=str(home))},
            raise_on_error=False,
        )
    finally:
        stop_endpoints(home)


def test_an_adapter_that_fails_the_gate_is_trained_and_recorded_but_never_served(tmp_path):
    deployment = _deployment(tmp_path, {"thresholds": {"eval_accuracy": 1.01}})
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(tmp_path, deployment, instance=instance)
    assert not result.success
    materialized = {m.asset_key.path[-1] for m in result.get_asset_materialization_events()}
    assert "adapter_weights" in materialized and "served_endpoint" not in materialized and "factsheet" not in materialized
    (gate,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "governance_gate"]
    assert gate.passed is False and "is below the minimum 1.01" in gate.description
    assert gate.metadata["draft_factsheet"].value["stage"] == "draft"
    assert not (tmp_path / "serving").exists(), "no server was started"
    # Launched on its own (from the UI, or a later run), the endpoint step refuses the adapter too.
    alone = _materialize(tmp_path, deployment, selection=["served_endpoint"], instance=instance)
    assert not alone.success
    (failure,) = [e for e in alone.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    error = error.cause if error.cls_name == "DagsterExecutionStepExecutionError" else error
    assert error.cls_name == "GovernanceError"
    assert "is not served: governance gate failed: eval_accuracy" in error.message and "minimum 1.01" in error.message
    assert not (tmp_path / "serving").exists()


def test_an_adapter_that_passes_serves_and_its_factsheet_records_the_gate(tmp_path):
    governance = {"thresholds": {"eval_loss": {"max": 100}}, "required_facts": ["features.snapshot_id"]}
    result = _materialize(tmp_path, _deployment(tmp_path, governance))
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    sheet = json.loads(Path(result.asset_value("factsheet").uri).read_text())
    assert sheet["stage"] == "served"
    gate = sheet["extra"]["governance"]
    assert gate["passed"] is True and gate["policy"]["thresholds"] == {"eval_loss": {"min": None, "max": 100.0}}
    assert [rule["rule"] for rule in gate["rules"]] == ["metric eval_loss", "fact features.snapshot_id"]


def test_a_record_without_an_adapter_has_no_gate_to_judge():
    from aiplane.assets.outputs import adapter_of

    with pytest.raises(InputError, match="records no adapter"):
        adapter_of(BaseModelRecord(uri="/m", digest="sha256:b", name="t", architecture="x", parameters=1))
