"""The whole chain, for real, on tiny settings: Iceberg -> LoRA -> KServe -> factsheet, through Dagster."""

import json
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aiplane.assets import ASSETS, AiplaneResource, build_definitions
from aiplane.assets.sources import seed_tickets
from aiplane.core.config import load_deployment
from conftest import stop_endpoints

pytestmark = pytest.mark.e2e

TINY_TRAINING = {"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_limit": 8, "log_every": 4}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One Dagster instance with all five assets materialized on a tiny deployment."""
    home = tmp_path_factory.mktemp("home")
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["trainer"]["settings"].update(TINY_TRAINING)
    deployment = home / "tiny.yaml"
    deployment.write_text(yaml.safe_dump(raw))
    seed_tickets(home / "sources" / "tickets.jsonl", n=400)
    resource = AiplaneResource(deployment=str(deployment), home=str(home))
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = dg.materialize(ASSETS, instance=instance, resources={"aiplane": resource}, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        endpoint = result.asset_value("served_endpoint")
        yield {"result": result, "instance": instance, "resource": resource, "home": home, "endpoint": endpoint}
    finally:
        stop_endpoints(home)


def test_all_five_assets_materialize_with_data_versions_and_lineage_metadata(chain):
    result = chain["result"]
    assert result.success
    mats = {m.asset_key.path[-1]: m for m in result.get_asset_materialization_events()}
    assert set(mats) == {"base_model", "features", "adapter_weights", "served_endpoint", "factsheet"}
    for name, event in mats.items():
        meta = event.materialization.metadata
        record = result.asset_value(name)
        assert meta["digest"].value == record.digest
        assert event.materialization.tags["dagster/data_version"] == record.digest
    placement = mats["adapter_weights"].materialization.metadata["placement_reason"].value
    assert "residency: region 'eu' is allowed for data tagged eu;" in placement
    adapter = result.asset_value("adapter_weights")
    assert adapter.metrics["train_loss_last"] < adapter.metrics["train_loss_first"]
    assert "eval_accuracy" in adapter.metrics and "eval_loss" in adapter.metrics


def test_a_run_that_trains_starts_the_trainer_while_its_sources_materialize(chain):
    # dg.materialize selects all five assets: the resource prestarts the training worker when the run begins.
    assert chain["result"].asset_value("adapter_weights").execution["prestarted"] is True


def test_a_run_that_does_not_train_starts_no_trainer(chain):
    from aiplane.plugins.local import engine as local_engine

    local_engine._discard_standbys()
    result = dg.materialize(
        ASSETS, selection=["features"], instance=chain["instance"], resources={"aiplane": chain["resource"]}
    )
    assert result.success and local_engine._STANDBYS == {}


def test_the_code_location_runs_each_run_in_one_process():
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "in_process"


def test_feature_checks_the_training_loss_check_and_the_open_governance_gate_pass(chain):
    evaluations = chain["result"].get_asset_check_evaluations()
    checks = {e.check_name: e.passed for e in evaluations}
    assert checks == {
        "schema": True, "not_empty": True, "residency_tagged": True, "residency_known": True, "loss_decreased": True,
        "governance_gate": True,
    }  # fmt: skip
    (gate,) = [e for e in evaluations if e.check_name == "governance_gate"]
    assert gate.description == "no governance gate configured"  # local.yaml states none


def test_endpoint_answers_a_completion_over_http(chain):
    endpoint = chain["endpoint"]
    assert endpoint.url.startswith("http://127.0.0.1:")
    body = json.dumps({"model": endpoint.model_name, "prompt": "Ticket: Mailbox full.\nLabel:", "max_tokens": 4}).encode()
    req = urllib.request.Request(endpoint.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["object"] == "text_completion" and answer["model"] == endpoint.model_name
    assert isinstance(answer["choices"][0]["text"], str)
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert answer["usage"]["prompt_tokens"] > 0


def test_factsheet_names_snapshot_base_digest_adapter_sha_endpoint_and_placement(chain):
    result = chain["result"]
    sheet = json.loads(Path(result.asset_value("factsheet").uri).read_text())
    features = result.asset_value("features")
    base = result.asset_value("base_model")
    adapter = result.asset_value("adapter_weights")
    text = json.dumps(sheet)
    assert str(features.snapshot_id) in text
    assert base.digest in text
    assert adapter.digest.startswith("sha256:") and adapter.digest in text
    assert chain["endpoint"].url in text
    assert "first qualifying target in deployment order" in text
    assert Path(result.asset_value("factsheet").page_uri).is_file()


def test_openlineage_events_cover_every_materialization(chain):
    events = [json.loads(line) for line in (chain["home"] / "lineage" / "events.jsonl").read_text().splitlines()]
    seen = {(e["job"]["name"], e["eventType"]) for e in events}
    for asset in ("base_model", "features", "adapter_weights", "served_endpoint", "factsheet"):
        assert (asset, "START") in seen and (asset, "COMPLETE") in seen


def test_refresh_without_new_data_keeps_the_snapshot_and_retrains_nothing(chain):
    instance, resource, home = chain["instance"], chain["resource"], chain["home"]
    defs = build_definitions(resource)
    features_asset = [a for a in ASSETS if a.key == dg.AssetKey("features")]
    deps = [a for a in ASSETS if a.key != dg.AssetKey("features")]
    before = chain["result"].asset_value("features")

    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert tick.total_requested == 0

    again = dg.materialize(features_asset + deps, selection=["features"], instance=instance, resources={"aiplane": resource})
    after = again.asset_value("features")
    assert after.snapshot_id == before.snapshot_id
    assert after.digest == before.digest
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert tick.total_requested == 0, "a refresh with no new data must not re-run anything downstream"

    # New upstream data: a new snapshot, and training is requested.
    seed_tickets(home / "sources" / "tickets.jsonl", n=450)
    changed = dg.materialize(features_asset + deps, selection=["features"], instance=instance, resources={"aiplane": resource})
    assert changed.asset_value("features").snapshot_id != before.snapshot_id
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    # Training, and what reads its result in the same tick: exactly what `aiplane up` redoes.
    for asset in ("adapter_weights", "served_endpoint", "factsheet"):
        assert tick.get_requested_partitions(dg.AssetKey(asset)) == {None}, asset
    assert tick.total_requested == 3
