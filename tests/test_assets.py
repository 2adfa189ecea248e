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
from conftest import stop_endpoints

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
    # The preflight runs when the resource loads, before the first asset: no model, no table.
    deployment = _deployment(tmp_path, **{"trainer.gpus": 2})
    resource = AiplaneResource(deployment=deployment, home=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        resource.config  # noqa: B018 - loading is the behaviour under test
    assert "No target can run train-adapter" in str(err.value)
    assert "local: has 0 GPU(s), needs 2" in str(err.value)
    assert "nothing was changed" in str(err.value)
    assert not (tmp_path / "models").exists() and not (tmp_path / "iceberg").exists()


def _tickets(home: Path, regions: list[str]) -> Path:
    """A tickets file whose rows carry the given region tags, in turn."""
    seed_tickets(home / "seed.jsonl", n=120)
    rows = [json.loads(line) for line in (home / "seed.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["region"] = regions[i % len(regions)]
    path = home / "tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A deployment whose first target is in the US: only residency keeps EU rows off it.
US_FIRST = {
    "targets": [
        {"name": "us-local", "engine": "local", "region": "us", "sla": ["batch", "interactive"]},
        {"name": "eu-local", "engine": "local", "region": "eu", "sla": ["batch", "interactive"]},
    ]
}


def test_rows_tagged_EU_with_odd_case_and_space_never_train_serve_or_publish_on_a_us_target(tmp_path):
    source = _tickets(tmp_path, ["EU ", "us"])
    deployment = _deployment(tmp_path, **US_FIRST, **{"trainer.settings.max_steps": 2, "trainer.settings.eval_limit": 0})
    try:
        result = _materialize(
            tmp_path, deployment, "*", run_config={"ops": {"features": {"config": {"source": str(source)}}}}
        )
    finally:
        stop_endpoints(tmp_path)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert result.asset_value("features").residency == ("eu", "us")
    # The adapter, its endpoint and its factsheet are EU data too: residency travels with lineage.
    sheet = json.loads(Path(result.asset_value("factsheet").uri).read_text())
    placements = {
        "adapter_weights": result.asset_value("adapter_weights").placement.model_dump(),
        "served_endpoint": result.asset_value("served_endpoint").placement.model_dump(),
        "factsheet": sheet["extra"]["publish_placement"],
    }
    for asset, placement in placements.items():
        assert placement["target"] == "eu-local" and placement["region"] == "eu", asset
        assert placement["rejected"]["us-local"].startswith("residency: region 'us' is outside"), asset


def test_an_unknown_residency_tag_stops_features_and_nothing_trains(tmp_path):
    source = _tickets(tmp_path, ["eu", "us", "mars"])
    result = _materialize(
        tmp_path, _deployment(tmp_path), UPSTREAM, run_config={"ops": {"features": {"config": {"source": str(source)}}}}
    )
    assert not result.success
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "residency_known")
    assert check.passed is False
    assert check.metadata["unknown_tags"].value == ["mars"]
    assert "40 row(s) are tagged 'mars'" in check.description and "rows T" in check.description
    materialized = {m.asset_key.path[-1] for m in result.get_asset_materialization_events()}
    assert "adapter_weights" not in materialized
    assert not (tmp_path / "artifacts").exists()


def test_an_empty_tickets_file_says_there_are_no_tickets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = _materialize(
        tmp_path, _deployment(tmp_path), ["base_model", "features"],
        run_config={"ops": {"features": {"config": {"source": str(empty)}}}},
    )  # fmt: skip
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "features")
    error = failure.step_failure_data.error
    message = (error.cause or error).message
    assert "has no tickets: it is empty" in message and "wrong columns" not in message


def test_unknown_component_in_deployment_fails_at_resource_setup_with_suggestion(tmp_path):
    deployment = _deployment(tmp_path, **{"trainer.name": "lorra"})
    resource = AiplaneResource(deployment=deployment, home=str(tmp_path))
    with pytest.raises(ConfigError, match="Unknown trainer 'lorra'.*Did you mean 'lora'"):
        resource.config  # noqa: B018 - loading is the behaviour under test
    assert not (tmp_path / "iceberg").exists()


def _shape(deployment: str, home: Path, **kwargs) -> dict[str, tuple[set[str], str | None, str]]:
    """Each asset's kinds, code version and description, as the code location declares them for ``deployment``."""
    from aiplane.assets import build_definitions

    defs = build_definitions(AiplaneResource(deployment=deployment, home=str(home)), **kwargs)
    return {
        a.key.to_user_string(): (set(a.specs_by_key[a.key].kinds), a.code_versions_by_key[a.key], a.descriptions_by_key[a.key])
        for a in defs.assets
    }


def test_asset_kinds_and_descriptions_name_the_plugins_in_use(tmp_path):
    local = _shape("local", tmp_path)
    assert local["served_endpoint"][0] == {"vllm"} and local["features"][0] == {"iceberg"}
    assert local["adapter_weights"][0] == {"lora"} and "trainer 'lora'" in local["adapter_weights"][2]
    openshift = _shape("openshift-ai", tmp_path)
    assert openshift["served_endpoint"][0] == {"kserve"} and "serving target 'kserve'" in openshift["served_endpoint"][2]
    assert openshift["features"][0] == {"watsonx-data"}


def test_a_third_party_serving_target_names_its_asset_by_its_name_or_the_kinds_it_declares(tmp_path, clean_plugin_env):
    from aiplane.assets.definitions import build_assets
    from aiplane.core.components import ServingTarget
    from aiplane.core.hookspecs import hookimpl
    from aiplane.core.plugins import Registry, get_plugin_manager

    class EdgeServe(ServingTarget):
        name = "edge-serve"

    class EdgeServeDeclared(ServingTarget):
        name = "edge-declared"
        kinds = ("edge", "onnx")

    class Plugin:
        @hookimpl
        def aiplane_serving_targets(self):
            return [EdgeServe, EdgeServeDeclared]

    pm = get_plugin_manager()
    pm.register(Plugin(), name="throwaway-serving")
    try:
        for name, kinds in (("edge-serve", {"edge-serve"}), ("edge-declared", {"edge", "onnx"})):
            deployment = load_deployment(_deployment(tmp_path, **{"serving.name": name, "serving.settings": {}}), home=tmp_path)
            served = next(a for a in build_assets((), deployment, Registry(pm)) if a.key == dg.AssetKey("served_endpoint"))
            assert set(served.specs_by_key[served.key].kinds) == kinds
    finally:
        pm.unregister(name="throwaway-serving")


def test_code_versions_change_with_the_settings_that_shape_each_asset_and_nothing_else(tmp_path):
    before = _shape(_deployment(tmp_path), tmp_path)
    changed = _shape(_deployment(tmp_path, **{"trainer.settings.learning_rate": 0.001}), tmp_path)
    assert {k for k in before if before[k][1] != changed[k][1]} == {"adapter_weights"}
    assert changed["adapter_weights"][1].startswith("trainer lora ")
    # A pinned target shapes the adapter too; a rollback and a value equal to the default do not.
    pinned = _shape(_deployment(tmp_path), tmp_path, configs={"adapter_weights": {"target": "local"}})
    assert pinned["adapter_weights"][1] != before["adapter_weights"][1]
    same = _shape(_deployment(tmp_path), tmp_path, configs={"served_endpoint": {"rollback_to": "sha256:ab", "target": ""}})
    assert same == before
