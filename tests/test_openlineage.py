"""The OpenLineage observer: run events for every materialization, through the real plugin manager."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import uuid
from pathlib import Path

import pytest

from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.config import load_deployment
from aiplane.core.plugins import get_plugin_manager, materialization
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord
from aiplane.plugins.openlineage.naming import dataset_name, run_uuid

SECRET = "ol-key-7c1f9e2d-never-log-me"


@pytest.fixture(autouse=True)
def _isolated_openlineage_env(monkeypatch, tmp_path):
    # The client also reads OPENLINEAGE_* variables and ./openlineage.yml; keep the runner's out.
    for var in ("OPENLINEAGE_DISABLED", "OPENLINEAGE_URL", "OPENLINEAGE_API_KEY", "OPENLINEAGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


@pytest.fixture
def deployment(tmp_path):
    return load_deployment("local", home=tmp_path)


@pytest.fixture
def records(tmp_path):
    base = BaseModelRecord(
        uri=str(tmp_path / "models" / "tiny-granite"),
        digest="sha256:" + "b" * 64,
        name="tiny-granite",
        architecture="GraniteForCausalLM",
        parameters=443_008,
    )
    features = FeaturesRecord(
        uri="iceberg://aiplane/aiplane.tickets?snapshot=99",
        digest="iceberg-snapshot:99",
        table="aiplane.tickets",
        snapshot_id=99,
        row_count=480,
        columns=FEATURE_COLUMNS,
        residency=("eu",),
        store={"name": "iceberg", "settings": {"catalog_name": "aiplane"}},
    )
    adapter = AdapterRecord(
        uri=str(tmp_path / "artifacts" / "adapter_weights" / ("a" * 64)),
        digest="sha256:" + "a" * 64,
        method="lora",
        config={"r": 8},
        metrics={"eval_loss": 4.0},
        run_id="r1",
        sources=(base, features),
    )
    return {"base": base, "features": features, "adapter": adapter}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _datasets(event: dict, key: str) -> list[tuple[str, str, str, str]]:
    return [
        (d["namespace"], d["name"], d["facets"]["version"]["datasetVersion"], d["facets"]["aiplane_record"]["kind"])
        for d in event[key]
    ]


def test_successful_materialization_writes_start_then_complete_with_one_run_id(pm, deployment, records, tmp_path):
    inputs = [records["base"], records["features"]]
    with materialization(pm, "adapter_weights", "dagster-run-1", inputs, deployment) as holder:
        holder["output"] = records["adapter"]

    start, complete = _events(tmp_path / "lineage" / "events.jsonl")
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    for event in (start, complete):
        assert event["job"] == {**event["job"], "namespace": "aiplane-local", "name": "adapter_weights"}
        assert event["run"]["facets"]["aiplane_run"]["runId"] == "dagster-run-1"
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert uuid.UUID(start["run"]["runId"])
    expected_inputs = [
        ("file", records["base"].uri, records["base"].digest, "base_model"),
        ("iceberg://aiplane", "aiplane.tickets", "iceberg-snapshot:99", "features"),
    ]
    assert _datasets(start, "inputs") == _datasets(complete, "inputs") == expected_inputs
    assert start["outputs"] == []
    assert _datasets(complete, "outputs") == [
        ("file", records["adapter"].uri, records["adapter"].digest, "adapter_weights")
    ]


def test_failing_materialization_writes_start_then_fail_and_the_error_propagates(pm, deployment, records, tmp_path):
    with pytest.raises(ValueError, match="loss went NaN"):
        with materialization(pm, "adapter_weights", "dagster-run-2", [records["features"]], deployment):
            raise ValueError("loss went NaN at step 3")

    start, fail = _events(tmp_path / "lineage" / "events.jsonl")
    assert [start["eventType"], fail["eventType"]] == ["START", "FAIL"]
    assert start["run"]["runId"] == fail["run"]["runId"]
    error = fail["run"]["facets"]["errorMessage"]
    assert error["message"] == "ValueError: loss went NaN at step 3"
    assert error["programmingLanguage"] == "python"
    assert "loss went NaN" in error["stackTrace"]
    assert fail["outputs"] == []


def test_a_regions_partition_is_a_job_of_its_own_and_its_run_facet_names_the_region(pm, deployment, records, tmp_path):
    inputs = [records["base"], records["features"]]
    with materialization(pm, "adapter_weights", "dagster-run-3", inputs, deployment, region="eu") as holder:
        holder["output"] = records["adapter"]
    with materialization(pm, "adapter_weights", "dagster-run-3", inputs, deployment) as holder:
        holder["output"] = records["adapter"]

    events = _events(tmp_path / "lineage" / "events.jsonl")
    assert [(e["eventType"], e["job"]["name"]) for e in events] == [
        ("START", "adapter_weights.eu"), ("COMPLETE", "adapter_weights.eu"),
        ("START", "adapter_weights"), ("COMPLETE", "adapter_weights"),
    ]
    regional, unpartitioned = events[1]["run"], events[3]["run"]
    assert regional["facets"]["aiplane_run"]["region"] == "eu"
    assert "region" not in unpartitioned["facets"]["aiplane_run"]
    assert regional["runId"] == events[0]["run"]["runId"] != unpartitioned["runId"]


def test_run_ids_are_deterministic_per_run_and_job():
    assert run_uuid("run-a", "features") == run_uuid("run-a", "features")
    assert len({run_uuid("run-a", "features"), run_uuid("run-a", "adapter_weights"), run_uuid("run-b", "features")}) == 3


def test_endpoint_dataset_is_named_by_scheme_host_port_and_model(records):
    def endpoint(url: str) -> EndpointRecord:
        return EndpointRecord(
            uri=url, digest=records["adapter"].digest, url=url, model_name="tickets",
            protocols=("v1",), serving="vllm",
        )

    assert dataset_name(endpoint("http://127.0.0.1:38123/v1/models/tickets")) == ("http://127.0.0.1:38123", "tickets")
    assert dataset_name(endpoint("https://serve.example.com")) == ("https://serve.example.com:443", "tickets")


def test_unwritable_lineage_path_does_not_break_materialization(pm, deployment, records, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the lineage folder should be")
    broken = deployment.model_copy(update={"observers": {"openlineage": {"path": str(blocker / "events.jsonl")}}})

    with caplog.at_level(logging.WARNING, logger="aiplane.plugins.openlineage"):
        with materialization(pm, "features", "dagster-run-3", [], broken) as holder:
            holder["output"] = records["features"]
        with pytest.raises(KeyError, match="original"):
            with materialization(pm, "features", "dagster-run-4", [], broken):
                raise KeyError("original")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # START + COMPLETE, START + FAIL
    assert all("was not emitted" in w for w in warnings)


def test_invalid_observer_settings_warn_naming_the_key_and_do_not_break(pm, deployment, records, caplog):
    typo = deployment.model_copy(update={"observers": {"openlineage": {"namespcae": "x"}}})
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins.openlineage"):
        with materialization(pm, "features", "dagster-run-5", [], typo) as holder:
            holder["output"] = records["features"]
    assert "namespcae: Unknown setting 'namespcae'" in caplog.text and "Did you mean 'namespace'" in caplog.text


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str | None, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def lineage_server():
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_transport_sends_the_referenced_api_key_and_never_logs_it(
    pm, deployment, records, tmp_path, monkeypatch, caplog, lineage_server
):
    url, received = lineage_server
    monkeypatch.setenv("AIPLANE_TEST_OL_KEY", SECRET)
    remote = deployment.model_copy(update={"observers": {"openlineage": {
        "namespace": "prod", "http": {"url": url, "api_key": {"env": "AIPLANE_TEST_OL_KEY"}},
    }}})

    with caplog.at_level(logging.DEBUG):
        with materialization(pm, "features", "dagster-run-6", [], remote) as holder:
            holder["output"] = records["features"]

    assert [(path, auth, body["eventType"], body["job"]["namespace"]) for path, auth, body in received] == [
        ("/api/v1/lineage", f"Bearer {SECRET}", "START", "prod"),
        ("/api/v1/lineage", f"Bearer {SECRET}", "COMPLETE", "prod"),
    ]
    assert SECRET not in caplog.text
    assert not (tmp_path / "lineage").exists()


def test_http_transport_with_unset_key_warns_naming_the_variable(pm, deployment, records, monkeypatch, caplog):
    monkeypatch.delenv("AIPLANE_TEST_OL_MISSING", raising=False)
    remote = deployment.model_copy(update={"observers": {"openlineage": {
        "http": {"url": "http://127.0.0.1:9", "api_key": {"env": "AIPLANE_TEST_OL_MISSING"}},
    }}})
    with caplog.at_level(logging.WARNING, logger="aiplane.plugins.openlineage"):
        with materialization(pm, "features", "dagster-run-7", [], remote) as holder:
            holder["output"] = records["features"]
    assert "AIPLANE_TEST_OL_MISSING" in caplog.text
