"""Per-region partitions: one asset graph, an adapter per region, each trained, stored and served in its region."""

import json
import os
from datetime import UTC, datetime
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aiplane.assets.definitions import (
    build_assets, build_definitions, configured_name, endpoint_name, region_table,
)
from aiplane.assets.resource import AiplaneResource
from aiplane.assets.sources import seed_tickets
from aiplane.assets.state import stale
from aiplane.core.config import Deployment, Target, load_deployment
from aiplane.core.errors import ConfigError, PlacementError
from aiplane.core.placement import Requirements, allows_region, place
from aiplane.core.plugins import Registry
from aiplane.core.preflight import preflight
from conftest import stop_endpoints

REPO = Path(__file__).parents[1]
TINY_TRAINING = {"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_limit": 8, "log_every": 4}
REGIONS = ("eu", "us", "ap")


def _raw(name: str = "local") -> dict:
    return yaml.safe_load((REPO / "deployments" / f"{name}.yaml").read_text())


def _write(raw: dict, home: Path, name: str = "deployment.yaml") -> Path:
    path = home / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _validated(raw: dict, home: Path) -> Deployment:
    return load_deployment(_write(raw, home), home=home)


# --- the deployment's regions ---------------------------------------------------------------------


def test_regions_are_a_list_or_a_mapping_and_each_region_sets_its_own_components(tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "us"]
    assert list(_validated(raw, tmp_path).regions) == ["eu", "us"]
    raw["regions"] = {
        "eu": None,
        "us": {
            "factsheet": {"settings": {"directory": "/srv/us/factsheets"}},
            "serving": {"name": "kserve", "settings": {"namespace": "x"}},
        },
    }
    d = _validated(raw, tmp_path)
    # The same component: only the settings given change, the others (and sla) are the deployment's.
    assert d.spec("factsheet", "us").settings == {"directory": "/srv/us/factsheets"}
    assert d.spec("serving", "eu") == d.serving
    # Another component starts from its own settings, not the deployment's vllm ones.
    assert d.spec("serving", "us").name == "kserve" and d.spec("serving", "us").settings == {"namespace": "x"}
    assert d.spec("serving", "us").sla == "interactive"
    assert d.in_region("us").factsheet.settings["directory"] == "/srv/us/factsheets"
    assert d.in_region(None) is d
    with pytest.raises(ConfigError, match="Unknown region 'mars'; the deployment's regions: eu, us"):
        d.in_region("mars")


@pytest.mark.parametrize(
    "regions, message",
    [
        (["eu", "eu"], "regions are listed once each; repeated: eu"),
        (["EU"], "region 'EU' is not a lower-case name"),
        ({"eu": {"storage": {}}}, "eu: storage cannot be set per region"),
        ({"eu": {"trainer": {"target": "ray-locl"}}}, "regions.eu.trainer.target: Unknown target 'ray-locl'"),
        ({"eu": {"trainer": {"gpus": -1}}}, "regions.eu.trainer: gpus"),
    ],
)
def test_a_bad_region_is_refused_with_what_is_wrong(tmp_path, regions, message):
    raw = _raw()
    raw["regions"] = regions
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _validated(raw, tmp_path)


def test_placement_for_a_region_admits_only_its_targets_and_says_why_the_others_were_not():
    targets = [Target(name="eu-gpu", engine="local", region="eu"), Target(name="us-gpu", engine="local", region="us")]
    decision = place(Requirements(workload="train", residency=("us",), region="us"), targets, {"us": "any"}, ["local"])
    assert decision.target == "us-gpu"
    assert decision.rejected["eu-gpu"] == "in region 'eu'; this workload is for region 'us'"
    assert "in region 'us' (the partition's)" in decision.reason
    with pytest.raises(PlacementError, match=r"(?s)No target can run train \(region ap, .*eu-gpu: in region 'eu'"):
        place(Requirements(workload="train", region="ap"), targets, {}, ["local"])


def test_a_row_goes_to_a_region_only_when_its_tag_allows_it_and_an_unknown_tag_goes_nowhere():
    policy = {"eu": ("eu",), "us": "any"}
    assert allows_region("eu", policy, "eu") and not allows_region("eu", policy, "us")
    assert allows_region(" US ", policy, "ap")
    assert not allows_region("mars", policy, "eu")


# --- the code location ------------------------------------------------------------------------------


def test_the_code_location_is_partitioned_by_the_deployments_regions_all_but_the_base_model(tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "us"]
    defs = build_definitions(AiplaneResource(deployment=str(_write(raw, tmp_path)), home=str(tmp_path)))
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string(): graph.get(k).partitions_def for k in graph.get_all_asset_keys()}
    assert keys.pop("base_model") is None
    for partitions in keys.values():
        assert partitions.get_partition_keys() == ["eu", "us"]
    checks = {c.name for c in graph.asset_check_keys if c.asset_key == dg.AssetKey("features")}
    assert "residency_allows_region" in checks
    # The daily refresh asks for every region's features, each its own run.
    schedule = defs.resolve_schedule_def("refresh_features_daily")
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=UTC), repository_def=defs.get_repository_def()
    )
    requests = schedule.evaluate_tick(context).run_requests
    assert sorted(r.partition_key for r in requests) == ["eu", "us"]


def test_a_deployment_without_regions_keeps_one_unpartitioned_chain(tmp_path):
    defs = build_definitions(AiplaneResource(deployment=str(_write(_raw(), tmp_path)), home=str(tmp_path)))
    graph = defs.resolve_asset_graph()
    assert all(graph.get(k).partitions_def is None for k in graph.get_all_asset_keys())
    assert region_table("support_ticket_features", None) == "support_ticket_features"
    assert region_table("t", "eu-west") == "t_eu_west"
    # A region's endpoint is named after it, and a rollback finds the configured name back.
    assert endpoint_name("support-tickets", "eu-west") == "support-tickets-eu-west"
    assert configured_name(endpoint_name("support-tickets", "eu-west"), "eu-west") == "support-tickets"
    assert configured_name("support-tickets", None) == endpoint_name("support-tickets", None) == "support-tickets"


# --- before anything runs ---------------------------------------------------------------------------


def test_per_region_storage_needs_a_location_for_every_partition_region(tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "us"]
    raw["storage"] = {"regions": {"eu": str(tmp_path / "eu")}}
    problems = preflight(_validated(raw, tmp_path), Registry())
    assert any("region 'us' (a partition, under `regions:`) has no storage location" in p for p in problems)


def test_a_regions_component_writing_outside_its_region_is_refused_before_anything_runs(tmp_path):
    raw = _raw()
    raw["regions"] = {
        "eu": {
            "factsheet": {"settings": {"directory": str(tmp_path / "eu" / "factsheets")}},
            "feature_store": {"settings": {"warehouse": str(tmp_path / "eu" / "w")}},
        },
        "us": {
            "factsheet": {"settings": {"directory": str(tmp_path / "eu" / "factsheets")}},
            "feature_store": {"settings": {"warehouse": str(tmp_path / "us" / "w")}},
        },
    }
    raw["targets"] = [
        {"name": f"{region}-local", "engine": "local", "region": region, "sla": ["batch", "interactive"]} for region in ("eu", "us")
    ]
    raw["storage"] = {"regions": {"eu": str(tmp_path / "eu"), "us": str(tmp_path / "us")}}
    problems = preflight(_validated(raw, tmp_path), Registry())
    outside = [p for p in problems if "outside the storage location" in p]
    assert len(outside) == 1 and outside[0].startswith("regions.us.factsheet.settings.directory:"), problems


def _check(deployment: Path, example_site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(example_site)}
    for name in ("AIPLANE_S3_ACCESS_KEY_ID", "AIPLANE_S3_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(deployment), "check", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_the_hybrid_deployment_checks_offline_and_places_each_region_on_its_own_cloud(example_cloud, tmp_path):
    out = _check(REPO / "deployments" / "hybrid.yaml", example_cloud, "--offline")
    assert out.returncode == 0, out.stderr
    assert "region eu: feature store watsonx-data; trainer lora on eu-kfp; serving kserve on eu-control" in out.stdout
    assert "region us: feature store iceberg; trainer lora on us-ray; serving kserve on us-control" in out.stdout
    assert "region ap: feature store iceberg; trainer lora on ap-gpu; serving kserve on ap-control" in out.stdout
    assert "factsheet local on eu-control; storage s3://aiplane-eu/aiplane\n" in out.stdout
    # Online, the bucket's keys are needed (for the base model in it too): said, not attempted.
    online = _check(REPO / "deployments" / "hybrid.yaml", example_cloud)
    assert online.returncode == 1, online.stdout
    assert "storage.s3: the key variables AIPLANE_S3_ACCESS_KEY_ID, AIPLANE_S3_SECRET_ACCESS_KEY are not set" in online.stderr


def test_the_local_twin_has_the_hybrid_deployments_regions_residency_and_targets():
    hybrid, twin = _raw("hybrid"), _raw("hybrid-local")
    assert list(twin["regions"]) == list(hybrid["regions"]) == list(REGIONS)
    assert twin["residency"] == hybrid["residency"]
    shape = lambda raw: [(t["name"], t["engine"], t["region"], tuple(t.get("sla", ["batch"]))) for t in raw["targets"]]  # noqa: E731
    assert shape(twin) == shape(hybrid)


def test_check_fails_for_a_region_without_a_target_and_says_which_and_why(example_cloud, tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "us"]
    out = _check(_write(raw, tmp_path), example_cloud)
    assert out.returncode == 1
    assert "region eu: feature store iceberg; trainer lora on local" in out.stdout
    assert "trainer: no target: No target can run train-adapter (region us" in out.stderr
    assert "local: in region 'eu'; this workload is for region 'us'" in out.stderr


def test_a_region_without_a_target_fails_its_own_partition_before_training(tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "us"]
    resource = AiplaneResource(deployment=str(_write(raw, tmp_path)), home=str(tmp_path))
    seed_tickets(tmp_path / "sources" / "tickets.jsonl", n=120)
    instance = dg.DagsterInstance.ephemeral()
    assets = build_assets(("eu", "us"))
    result = dg.materialize(
        assets, selection=["base_model", "features", "adapter_weights"], partition_key="us",
        instance=instance, resources={"aiplane": resource}, raise_on_error=False,
    )  # fmt: skip
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "adapter_weights")
    error = failure.step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert "No target can run train-adapter (region us" in message and "this workload is for region 'us'" in message
    assert not (tmp_path / "artifacts").exists()  # nothing trained, nothing written
    # Partition us holds only the rows allowed in us (eu rows are eu-only in local.yaml).
    features = next(m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("features"))
    assert features.partition == "us" and set(features.materialization.metadata["residency"].value.split(", ")) == {"ap", "us"}


def test_a_region_no_row_may_go_to_says_the_policy_not_the_source_is_why_it_is_empty(tmp_path):
    raw = _raw()
    raw["regions"] = ["eu", "sa"]
    raw["residency"] = {"eu": ["eu"], "us": ["us", "eu"], "ap": ["eu"]}
    resource = AiplaneResource(deployment=str(_write(raw, tmp_path)), home=str(tmp_path))
    seed_tickets(tmp_path / "sources" / "tickets.jsonl", n=60)
    result = dg.materialize(
        build_assets(("eu", "sa")), selection=["features"], partition_key="sa",
        instance=dg.DagsterInstance.ephemeral(), resources={"aiplane": resource}, raise_on_error=False,
    )  # fmt: skip
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "features")
    error = failure.step_failure_data.error
    message = (error.cause or error).message
    assert "Region 'sa' may process none of the source's 60 rows: they are tagged ap, eu, us" in message, message
    assert "the residency policy allows no tag in region 'sa'" in message and "check the source data" not in message


@pytest.mark.parametrize(
    ("region", "pin", "runs"),
    [("", "", ["eu", "us", "ap"]), ("us", "", ["us"]), ("", "us-ray", ["us"]), ("ap", "ap-gpu", ["ap"])],
)
def test_up_runs_every_region_or_the_one_named_or_the_pinned_targets(region, pin, runs, tmp_path, capsys):
    import argparse

    from aiplane.assets.up import up_regions

    deployment = load_deployment(str(_write(_raw("hybrid-local"), tmp_path)), home=tmp_path)
    assert up_regions(deployment, argparse.Namespace(region=region, train_target=pin)) == runs
    said = capsys.readouterr().out
    assert (f"--train-target {pin} is in region {runs[0]}: only region {runs[0]}'s partition runs." in said) == (
        bool(pin) and not region
    )


def test_a_pin_to_a_target_outside_the_region_or_the_regions_is_refused_before_anything_runs(tmp_path):
    import argparse

    from aiplane.assets.up import up_regions
    from aiplane.core.errors import AiplaneError

    raw = _raw("hybrid-local")
    raw["targets"].append({"name": "sa-gpu", "engine": "local", "region": "sa"})
    deployment = load_deployment(str(_write(raw, tmp_path)), home=tmp_path)
    with pytest.raises(AiplaneError, match=r"--train-target eu-kfp is in region 'eu', and region 'us''s partition "
                                           r"trains only on targets in 'us': pin one of those, or leave out --region"):
        up_regions(deployment, argparse.Namespace(region="us", train_target="eu-kfp"))
    with pytest.raises(AiplaneError, match=r"sa-gpu is in region 'sa', which is not one of the deployment's regions "
                                           r"\(eu, us, ap\)"):
        up_regions(deployment, argparse.Namespace(region="", train_target="sa-gpu"))
    # Unpartitioned, a pin is the whole run's, as before.
    local = load_deployment("local", home=tmp_path)
    assert up_regions(local, argparse.Namespace(region="", train_target="local")) == [None]


def test_a_region_with_a_store_of_its_own_trains_into_it_reached_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """US in another cloud: its bucket on a store of its own, with its own keys; the deployment's
    ``storage.s3`` (the EU store, here an endpoint nothing listens on) is never needed for it."""
    from _s3 import dead_endpoint, s3_server

    from aiplane.core.config import S3Settings
    from aiplane.core.storage import ArtifactStore

    with s3_server() as s3:
        bucket = s3.create_bucket()
        monkeypatch.setenv("US_S3_KEY", s3.access_key_id)
        monkeypatch.setenv("US_S3_SECRET", s3.secret_access_key)
        us_s3 = {"endpoint": s3.endpoint_url, "region": s3.region,
                 "access_key_id": {"env": "US_S3_KEY"}, "secret_access_key": {"env": "US_S3_SECRET"}}  # fmt: skip
        raw = _raw()
        raw["targets"] = [raw["targets"][0], {"name": "us-local", "engine": "local", "region": "us", "sla": ["batch", "interactive"]}]
        raw["trainer"]["settings"].update(TINY_TRAINING)
        raw["regions"] = {
            "eu": {"feature_store": {"settings": {"warehouse": "{home}/regions/eu/iceberg"}},
                   "factsheet": {"settings": {"directory": "{home}/regions/eu/factsheets"}}},
            "us": {"feature_store": {"settings": {"warehouse": f"s3://{bucket}/us/iceberg", "s3": us_s3}},
                   "factsheet": {"settings": {"directory": f"s3://{bucket}/us/factsheets"}}},
        }  # fmt: skip
        raw["storage"] = {
            "s3": {"endpoint": dead_endpoint()},
            "regions": {"eu": "{home}/regions/eu", "us": {"root": f"s3://{bucket}/us", "s3": us_s3}},
        }
        path = _write(raw, tmp_path)
        from aiplane.assets.cli import main

        monkeypatch.setenv("AIPLANE_HOME", str(tmp_path))
        assert main(["--deployment", str(path), "check", "--offline"]) == 0
        assert f"; storage s3://{bucket}/us (a store of its own: {s3.endpoint_url})\n" in capsys.readouterr().out
        resource = AiplaneResource(deployment=str(path), home=str(tmp_path))
        seed_tickets(tmp_path / "sources" / "tickets.jsonl", n=120)
        result = dg.materialize(
            build_assets(("eu", "us")), selection=["base_model", "features", "adapter_weights"], partition_key="us",
            instance=dg.DagsterInstance.ephemeral(), resources={"aiplane": resource},
        )  # fmt: skip
        adapter = result.output_for_node("adapter_weights")
        assert adapter.uri.startswith(f"s3://{bucket}/us/adapters/")
        assert ArtifactStore(f"s3://{bucket}/us", s3=S3Settings.model_validate(us_s3)).complete(adapter.uri)
        assert not (tmp_path / "regions" / "eu").exists() and not (tmp_path / "artifacts").exists()


# --- the local twin, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory, example_cloud):
    """`aiplane up` of the local twin of hybrid.yaml, tiny training: three regions on three engines, and a fourth
    region with no target."""
    home = tmp_path_factory.mktemp("twin")
    raw = _raw("hybrid-local")
    raw["trainer"]["settings"].update(TINY_TRAINING)
    # A fourth region, between eu and us, that may process AP rows but has no target: its partition
    # fails at placement, and the regions after it still run.
    sa = {
        "feature_store": {"settings": {"warehouse": "{home}/regions/sa/iceberg"}},
        "factsheet": {"settings": {"directory": "{home}/regions/sa/factsheets"}},
    }
    raw["regions"] = {"eu": raw["regions"]["eu"], "sa": sa, **{r: raw["regions"][r] for r in ("us", "ap")}}
    raw["residency"]["ap"] = ["ap", "sa"]
    raw["storage"]["regions"]["sa"] = "{home}/regions/sa"
    deployment = _write(raw, home)
    seed_tickets(home / "sources" / "tickets.jsonl", n=300)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "AIPLANE_DEPLOYMENT")},
        "AIPLANE_HOME": str(home), "PYTHONPATH": str(example_cloud),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(deployment), "up"]
    try:
        up = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=900)
        assert up.returncode == 1 and "1 of 4 regions failed" in up.stderr, up.stdout[-3000:] + up.stderr[-3000:]
        sheets = {r: json.loads(next((home / "regions" / r / "factsheets").glob("*/factsheet.json")).read_text()) for r in REGIONS}
        # The lineage of this `up` alone: tests below run `up` again and append to the file.
        events = [json.loads(line) for line in (home / "lineage" / "events.jsonl").read_text().splitlines()]
        yield {"home": home, "up": up, "sheets": sheets, "events": events, "deployment": deployment, "env": env, "cmd": cmd}
    finally:
        stop_endpoints(home)


def _training_placement(sheet: dict) -> dict:
    return next(p for p in sheet["placement"] if p["record"] == "adapter_weights")


@pytest.mark.e2e
def test_the_factsheets_show_three_regions_three_targets_and_three_reasons(twin):
    trained = {r: _training_placement(twin["sheets"][r]) for r in REGIONS}
    assert {r: p["target"] for r, p in trained.items()} == {"eu": "eu-kfp", "us": "us-ray", "ap": "ap-gpu"}
    engines = {r: twin["sheets"][r]["training"]["execution"]["engine"] for r in REGIONS}
    assert engines == {"eu": "kfp", "us": "ray", "ap": "example-cloud"}
    for region in REGIONS:
        sheet = twin["sheets"][region]
        assert sheet["extra"]["region"] == region
        assert {p["region"] for p in sheet["placement"]} == {region}
        assert f"in region '{region}' (the partition's)" in trained[region]["reason"]
        assert f"residency: region '{region}' is allowed for data tagged {region}" in trained[region]["reason"]
        assert all(why.endswith(f"this workload is for region '{region}'") for t, why in trained[region]["rejected"].items()
                   if not t.startswith(region))
        # Only the region's rows: the features it trained on carry its tag alone.
        assert sheet["features"]["residency"] == [region]
        assert sheet["features"]["table"].endswith(f"support_ticket_features_{region}")


@pytest.mark.e2e
def test_each_regions_lineage_is_a_graph_of_its_own_jobs_and_its_own_datasets(twin):
    events = twin["events"]
    completed = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
    base = completed["base_model"]["outputs"][0]["name"]
    for region in REGIONS:
        jobs = [f"{asset}.{region}" for asset in ("features", "adapter_weights", "served_endpoint", "factsheet")]
        assert set(jobs) <= set(completed), sorted(completed)
        for job in jobs:
            run = completed[job]["run"]["facets"]["aiplane_run"]
            assert run["region"] == region and job.startswith(run["asset"] + ".")
            # Every dataset but the shared base model is the region's: its table, its root, its endpoint name.
            names = [d["name"] for d in completed[job]["inputs"] + completed[job]["outputs"] if d["name"] != base]
            assert names and all(
                n.endswith(f"_{region}") or f"/regions/{region}/" in n or n == f"support-tickets-{region}" for n in names
            ), (job, names)
    # The region without a target ended its training job with a FAIL, under its own name.
    failed = [e for e in events if e["eventType"] == "FAIL"]
    assert [e["job"]["name"] for e in failed] == ["adapter_weights.sa"]
    assert failed[0]["run"]["facets"]["aiplane_run"]["region"] == "sa"


@pytest.mark.e2e
def test_each_regions_adapter_and_factsheet_are_under_its_own_storage_location(twin):
    home = twin["home"]
    for region in REGIONS:
        sheet = twin["sheets"][region]
        root = (home / "regions" / region).as_uri()
        assert sheet["adapter"]["uri"].startswith(root + "/"), sheet["adapter"]["uri"]
        others = [r for r in REGIONS if r != region]
        assert not any(sheet["adapter"]["digest"][7:] in str(p) for r in others for p in (home / "regions" / r).rglob("*"))
    assert not (home / "artifacts").exists()  # no default root: every artifact has a region


@pytest.mark.e2e
def test_each_region_serves_its_own_adapter_under_its_own_endpoint_name(twin):
    import urllib.request

    from aiplane.plugins.vllm.client import complete

    served = {r: twin["sheets"][r]["endpoint"] for r in REGIONS}
    assert {r: e["model_name"] for r, e in served.items()} == {r: f"support-tickets-{r}" for r in REGIONS}
    for region, endpoint in served.items():
        with urllib.request.urlopen(endpoint["url"] + "/v1/models", timeout=30) as reply:
            models = {m["id"]: m for m in json.loads(reply.read())["data"]}
        # vLLM names the adapter directory each model name serves: the region's own adapter, by digest.
        digest = twin["sheets"][region]["adapter"]["digest"].removeprefix("sha256:")
        assert digest in models[endpoint["model_name"]]["root"]
        assert complete(endpoint["url"], "Ticket: printer jammed\nLabel:", max_tokens=2, model=endpoint["model_name"]) is not None
    assert len({twin["sheets"][r]["adapter"]["digest"] for r in REGIONS}) == 3


@pytest.mark.e2e
def test_a_region_without_a_target_fails_alone_in_up_before_any_side_effect_and_the_others_go_on(twin):
    up, home = twin["up"], twin["home"]
    assert [line for line in up.stdout.splitlines() if line.startswith("Region ")] == ["Region eu", "Region us", "Region ap"]
    assert "region sa: adapter_weights: No target can run train-adapter (region sa, residency ap" in up.stderr
    assert "eu-control: in region 'eu'; this workload is for region 'sa'" in up.stderr
    assert "1 of 4 regions failed; the others are up." in up.stderr
    assert "Traceback" not in up.stderr
    # Its rows were published (the AP rows sa may process), and nothing was trained or written for it.
    assert not [p for p in (home / "regions" / "sa").rglob("*") if "iceberg" not in p.parts]


@pytest.mark.e2e
def test_a_second_up_with_nothing_new_materializes_nothing_in_any_region(twin):
    again = subprocess.run(twin["cmd"], env=twin["env"], cwd=twin["home"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "region sa: adapter_weights: No target can run" in again.stderr, again.stderr[-3000:]
    assert again.stdout.count("Region ") == 3
    assert again.stdout.count("up to date (inputs and settings unchanged)") == 9  # three downstream assets, three regions
    assert "materialized (" not in again.stdout


@pytest.mark.e2e
def test_new_us_rows_make_only_the_us_adapter_stale_for_automation_and_for_up(twin, example_cloud, monkeypatch):
    home = twin["home"]
    monkeypatch.syspath_prepend(str(example_cloud))
    monkeypatch.setenv("AIPLANE_HOME", str(home))
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    defs = build_definitions(AiplaneResource(deployment=str(twin["deployment"]), home=str(home)))
    adapter = dg.AssetKey("adapter_weights")
    baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert baseline.get_requested_partitions(adapter) == set()
    source = home / "sources" / "tickets.jsonl"
    row = {
        "ticket_id": "US-NEW-1", "region": "us", "subject": "Badge", "body": "Badge reader rejects me",
        "category": "access", "priority": "high",
    }
    with source.open("a") as f:
        f.write(json.dumps(row) + "\n")
    # The daily refresh: every region's features; only us has new rows.
    features = [a for a in defs.assets if a.key == dg.AssetKey("features")]
    for region in REGIONS:
        refreshed = dg.materialize(features, partition_key=region, instance=instance, resources={"aiplane": defs.resources["aiplane"]})
        snapshot = refreshed.asset_value("features").snapshot_id
        assert (snapshot == twin["sheets"][region]["features"]["snapshot_id"]) is (region != "us")
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=baseline.cursor)
    assert after.get_requested_partitions(adapter) == {"us"}
    # `aiplane up` asks the same of each region: us is stale, eu and ap are up to date.
    why = {r: stale(instance, defs, ["adapter_weights"], r).get("adapter_weights") for r in REGIONS}
    assert why == {"eu": None, "us": "features has a new data version", "ap": None}


def _cli(twin, *args: str) -> subprocess.CompletedProcess:
    cmd = [*twin["cmd"][:-1], *args]  # the twin's `aiplane --deployment ...`, without `up`
    return subprocess.run(cmd, env=twin["env"], cwd=twin["home"], capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_up_with_region_runs_that_regions_partition_only(twin):
    # After the test above, us has new rows: `up --region eu` leaves them for us's own run.
    eu = _cli(twin, "up", "--region", "eu")
    assert eu.returncode == 0, eu.stderr[-3000:]
    assert [line for line in eu.stdout.splitlines() if line.startswith("Region ")] == ["Region eu"]
    assert eu.stdout.count("up to date (inputs and settings unchanged)") == 3 and "region sa" not in eu.stderr
    # A pin outside the region named is refused before anything runs.
    crossed = _cli(twin, "up", "--region", "us", "--train-target", "eu-kfp")
    assert crossed.returncode == 1 and "--train-target eu-kfp is in region 'eu'" in crossed.stderr
    assert "Traceback" not in crossed.stderr and "Region " not in crossed.stdout


@pytest.mark.e2e
def test_rollback_and_stop_act_on_one_region_named_with_region(twin):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return _cli(twin, *args)

    unnamed = cli("rollback")
    assert unnamed.returncode == 1 and "serves one endpoint per region: say which with --region (eu, sa, us, ap)" in unnamed.stderr
    only = cli("rollback", "--region", "us")
    assert only.returncode == 1 and "support-tickets-us has served only adapter" in only.stderr
    typo = cli("stop", "--region", "uss")
    assert typo.returncode == 1 and "Unknown region 'uss'" in typo.stderr and "Did you mean 'us'?" in typo.stderr
    stopped = cli("stop", "--region", "ap")
    assert stopped.returncode == 0 and "region ap: Stopped support-tickets-ap" in stopped.stdout
    # The shared server still serves the other regions' endpoints, and no longer ap's.
    import urllib.request

    url = twin["sheets"]["eu"]["endpoint"]["url"]
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as reply:
        names = {m["id"] for m in json.loads(reply.read())["data"]}
    assert {"support-tickets-eu", "support-tickets-us"} <= names and "support-tickets-ap" not in names
