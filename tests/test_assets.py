"""Asset-level behaviour that needs no trained model: gates, placement failures, bad deployments."""

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aiplane.assets import ASSETS, AiplaneResource
from aiplane.assets.sources import seed_tickets
from aiplane.core.config import load_deployment
from aiplane.core.errors import ConfigError

UPSTREAM = ["base_model", "features", "adapter_weights"]


def _deployment(home: Path, **changes) -> str:
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = home / "deployment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _materialize(home: Path, deployment: str, selection, run_config=None):
    seed_tickets(home / "sources" / "tickets.jsonl", n=120)
    return dg.materialize(
        ASSETS,
        selection=selection,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"aiplane": AiplaneResource(deployment=deployment, home=str(home))},
        run_config=run_config,
        raise_on_error=False,
    )


def _lineage_events(home: Path) -> list[tuple[str, str]]:
    path = home / "lineage" / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(e["job"]["name"], e["eventType"]) for e in map(json.loads, lines)]


def test_failed_blocking_feature_check_blocks_training(tmp_path):
    result = _materialize(
        tmp_path,
        _deployment(tmp_path),
        UPSTREAM,
        run_config={"ops": {"features": {"config": {"eval_fraction": 0.0}}}},
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["not_empty"] is False and checks["schema"] is True
    materialized = {m.asset_key.path[-1] for m in result.get_asset_materialization_events()}
    assert "adapter_weights" not in materialized
    assert not (tmp_path / "artifacts" / "adapters").exists()


def test_unplaceable_training_fails_before_any_side_effect_and_says_why(tmp_path):
    result = _materialize(tmp_path, _deployment(tmp_path, **{"trainer.gpus": 2}), UPSTREAM)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "adapter_weights")
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else failure.step_failure_data.error.message
    assert "No target can run train-adapter" in message
    assert "local: has 0 GPU(s), needs 2" in message
    assert not (tmp_path / "artifacts").exists()
    assert ("adapter_weights", "FAIL") in _lineage_events(tmp_path)


def test_unknown_component_in_deployment_fails_at_resource_setup_with_suggestion(tmp_path):
    deployment = _deployment(tmp_path, **{"trainer.name": "lorra"})
    resource = AiplaneResource(deployment=deployment, home=str(tmp_path))
    with pytest.raises(ConfigError, match="Unknown trainer 'lorra'.*Did you mean 'lora'"):
        resource.config  # noqa: B018 - loading is the behaviour under test
    assert not (tmp_path / "iceberg").exists()
