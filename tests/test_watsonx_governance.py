"""The ``watsonx-governance`` factsheet publisher, against a loopback double of the service.

IBM's ``ibm-aigov-facts-client`` runs unmodified: in Cloud Pak for Data mode it
is given the double's URL; in IBM Cloud mode it reaches its built-in IBM Cloud
hosts through the double acting as an HTTPS proxy (see ``_factsheets_service_double``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# IBM's client (the test extra installs it) is not imported here: importing it writes ./logs, and the tests
# check it writes nowhere but aiplane's home.
from _factsheets_service_double import factsheets_service  # noqa: E402

from aiplane.core.components import FEATURE_COLUMNS  # noqa: E402
from aiplane.core.config import Target  # noqa: E402
from aiplane.core.errors import ConfigError, WorkloadError  # noqa: E402
from aiplane.core.factsheet import build_factsheet  # noqa: E402
from aiplane.core.plugins import Registry  # noqa: E402
from aiplane.core.records import (  # noqa: E402
    AdapterRecord,
    BaseModelRecord,
    EndpointRecord,
    FactsheetRecord,
    FeaturesRecord,
    PlacementDecision,
    record_to_json,
)
from aiplane.core.workload import execute  # noqa: E402
from aiplane.plugins.watsonx_gov.facts import FACTS  # noqa: E402

KEY_ENV = "AIPLANE_TEST_WXGOV_APIKEY"
SENTINEL = "wxgov-SENTINEL-4f1c9a"
USER = "admin"
TRAIN_REASON = "first target in eu with the engine and SLA batch; data tagged eu stays in eu"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and working directory: IBM's client must write into neither."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return {"home": home, "cwd": cwd, "aiplane": tmp_path / "aiplane"}


def _endpoint(tmp: Path, digest_char: str = "a", eval_accuracy: float = 0.625) -> EndpointRecord:
    base = BaseModelRecord(
        uri=str(tmp / "models" / "tiny-granite"), digest="sha256:" + "b" * 64, name="tiny-granite",
        architecture="GraniteForCausalLM", parameters=443_008,
    )
    features = FeaturesRecord(
        uri="iceberg://aiplane/aiplane.tickets?snapshot=7290512345", digest="iceberg-snapshot:7290512345",
        table="aiplane.tickets", snapshot_id=7290512345, row_count=480, columns=FEATURE_COLUMNS,
        residency=("eu",), store={"name": "iceberg"},
    )
    adapter = AdapterRecord(
        uri=str(tmp / "artifacts" / digest_char), digest="sha256:" + digest_char * 64, method="lora",
        config={"r": 8, "alpha": 16, "max_steps": 6},
        metrics={"loss_curve": [6.9, 5.2, 4.1], "eval_loss": 4.02, "eval_accuracy": eval_accuracy, "train_seconds": 2.5},
        run_id="run-" + digest_char,
        placement=PlacementDecision(
            workload="train-lora", target="local", engine="local", region="eu", reason=TRAIN_REASON,
            rejected={"us-gpu": "region 'us' is outside the regions allowed for data tagged eu (eu)"},
        ),
        sources=(base, features),
    )
    return EndpointRecord(
        uri="http://127.0.0.1:38123/v1/models/tickets", digest=adapter.digest, url="http://127.0.0.1:38123",
        model_name="tickets", protocols=("openai-completions",), serving="vllm", handle={"pid": 1},
        sources=(adapter,),
    )


def _publisher(**settings):
    return Registry().create("factsheet publisher", "watsonx-governance", {"api_key": {"env": KEY_ENV}, **settings})


def _cpd(service, **extra):
    settings = {"platform": "cpd", "url": service.url, "username": USER, "inventory_id": service.inventory_id, "backoff_s": 0}
    return _publisher(**{**settings, **extra})


def _publish(
    publisher, endpoint: EndpointRecord, state: Path, events: list | None = None, extra: dict | None = None
) -> FactsheetRecord:
    workload = publisher.workload(endpoint, build_factsheet(endpoint, who="auditor", extra=extra))
    workload = workload.model_copy(update={"cache_dir": str(state / "cache")})
    emit = events.append if events is not None else (lambda event: None)
    return execute(workload, emit).outputs["factsheet"]


def _custom_facts(service, model_id: str) -> dict:
    return service.models[model_id].entity["modelfacts_user"]


# ---------------------------------------------------------------- publishing


def test_first_publish_saves_the_adapter_as_an_external_model_with_facts_attachments_and_a_use_case(home):
    endpoint = _endpoint(home["aiplane"])
    verdict = {"passed": True, "rules": [{"rule": "eval_accuracy >= 0.6", "value": 0.625, "passed": True}]}
    with factsheets_service(users={USER: SENTINEL}) as service:
        record = _publish(
            _cpd(service), endpoint, home["aiplane"], extra={"deployment": "local", "governance": verdict}
        )

        assert len(service.models) == 1
        (model,) = service.models.values()
        stub = model.entity["model_stub"]
        assert model.name == "tickets"
        assert stub["external_model_identifier"] == f"aiplane:tickets:{endpoint.digest}"
        assert stub["deployment_details"]["external_identifier"] == endpoint.url

        facts = _custom_facts(service, model.asset_id)
        assert set(facts) == set(FACTS)
        assert facts["aiplane_adapter_digest"] == endpoint.digest
        assert facts["aiplane_iceberg_snapshot"] == "aiplane.tickets@7290512345"
        lineage = json.loads(facts["aiplane_lineage"])
        assert [step["kind"] for step in lineage] == [
            "features", "base_model", "training_run", "adapter_weights", "served_endpoint",
        ]
        assert all(step["digest"] for step in lineage)
        (placement,) = json.loads(facts["aiplane_placement"])
        assert placement["reason"] == TRAIN_REASON and "us-gpu" in placement["rejected"]
        assert json.loads(facts["aiplane_evaluation"]) == {"eval_accuracy": 0.625, "eval_loss": 4.02}
        assert json.loads(facts["aiplane_training"])["config"]["r"] == 8
        assert json.loads(facts["aiplane_served_at"])["url"] == endpoint.url
        assert facts["aiplane_stage"] == "served"
        assert json.loads(facts["aiplane_governance"]) == verdict
        assert json.loads(facts["aiplane_context"]) == {"deployment": "local"}
        assert json.loads(facts["aiplane_generated_by"])["who"] == "auditor"

        attachments = {a["user_data"]["fact_id"]: a for a in model.attachments}
        assert set(attachments) == {"aiplane_factsheet_page", "aiplane_loss_chart"}
        page = service.uploads[attachments["aiplane_factsheet_page"]["id"]]
        assert page.startswith(b"<!DOCTYPE html>") and b"aiplane.tickets" in page
        chart = service.uploads[attachments["aiplane_loss_chart"]["id"]]
        assert chart[:8] == b"\x89PNG\r\n\x1a\n" or chart[:3] == b"\xff\xd8\xff"  # IBM's client may send it as JPEG

        (usecase,) = service.usecases.values()
        assert usecase.name == "aiplane" and usecase.catalog_id == service.inventory_id
        approach = next(a for a in service.approaches[usecase.asset_id] if a["name"] == "aiplane")
        assert [v["models"] for v in approach["versions"]] == [[model.asset_id]]
        assert service.tracked[model.asset_id]["usecase_id"] == usecase.asset_id

    assert isinstance(record, FactsheetRecord) and record.publisher == "watsonx-governance"
    assert model.asset_id in record.uri and record.uri.startswith(service.url)
    assert model.asset_id in record.page_uri
    assert record.digest.startswith("sha256:")
    assert record.sources == (endpoint,)


def test_publishing_the_same_adapter_again_updates_its_entry_and_duplicates_nothing(home):
    endpoint = _endpoint(home["aiplane"])
    with factsheets_service(users={USER: SENTINEL}) as service:
        publisher = _cpd(service)
        first = _publish(publisher, endpoint, home["aiplane"])
        (model,) = service.models.values()
        first_facts = dict(_custom_facts(service, model.asset_id))

        second = _publish(publisher, endpoint, home["aiplane"])

        assert len(service.models) == 1 and len(service.usecases) == 1
        (usecase,) = service.usecases.values()
        approaches = service.approaches[usecase.asset_id]
        assert [a["name"] for a in approaches].count("aiplane") == 1
        assert sum(len(a["versions"]) for a in approaches) == 1
        assert len(model.attachments) == 2  # replaced, not added
        assert len(service.uploads) == 2
        facts = _custom_facts(service, model.asset_id)
        assert facts["aiplane_adapter_digest"] == first_facts["aiplane_adapter_digest"]
        # The second document is newer (generated_by.when), and the facts say so.
        assert facts["aiplane_factsheet_digest"] == second.digest
        assert len(service.calls("POST", "/v1/aigov/model_inventory/model_entries")) == 1
        assert len(service.calls("POST", "/v1/aigov/model_inventory/models/")) == 1  # tracked once
    assert second.uri == first.uri


def test_a_new_adapter_of_the_endpoint_is_the_next_version_in_the_same_use_case(home):
    first, second = _endpoint(home["aiplane"], "a"), _endpoint(home["aiplane"], "c", eval_accuracy=0.75)
    with factsheets_service(users={USER: SENTINEL}) as service:
        publisher = _cpd(service)
        one = _publish(publisher, first, home["aiplane"])
        two = _publish(publisher, second, home["aiplane"])

        assert len(service.models) == 2 and len(service.usecases) == 1
        (usecase,) = service.usecases.values()
        approach = next(a for a in service.approaches[usecase.asset_id] if a["name"] == "aiplane")
        by_model = {v["models"][0]: v["number"] for v in approach["versions"]}
        ids = {m.entity["model_stub"]["external_model_identifier"]: m.asset_id for m in service.models.values()}
        v1, v2 = by_model[ids[f"aiplane:tickets:{first.digest}"]], by_model[ids[f"aiplane:tickets:{second.digest}"]]
        assert tuple(map(int, v2.split("."))) > tuple(map(int, v1.split(".")))
        assert {t["usecase_id"] for t in service.tracked.values()} == {usecase.asset_id}
        new_facts = _custom_facts(service, ids[f"aiplane:tickets:{second.digest}"])
        assert json.loads(new_facts["aiplane_evaluation"])["eval_accuracy"] == 0.75
    assert one.uri != two.uri


def test_an_existing_use_case_is_found_by_name_and_used(home):
    with factsheets_service(users={USER: SENTINEL}) as service:
        _publish(_cpd(service, use_case="tickets-triage"), _endpoint(home["aiplane"], "a"), home["aiplane"])
        # A second deployment (another home) that names the same use case tracks into it.
        _publish(_cpd(service, use_case="tickets-triage"), _endpoint(home["aiplane"], "d"), home["aiplane"] / "other")
        assert [u.name for u in service.usecases.values()] == ["tickets-triage"]


def test_a_missing_use_case_without_an_inventory_to_create_it_in_says_what_to_set(home):
    with factsheets_service(users={USER: SENTINEL}) as service:
        publisher = _publisher(platform="cpd", url=service.url, username=USER, backoff_s=0)
        with pytest.raises(ConfigError, match="inventory_id"):
            _publish(publisher, _endpoint(home["aiplane"]), home["aiplane"])
        assert not service.usecases


# ---------------------------------------------------------------- outages


def test_an_outage_fails_after_bounded_retries_with_a_clear_error_and_changes_nothing(home):
    endpoint = _endpoint(home["aiplane"])
    with factsheets_service(users={USER: SENTINEL}) as service:
        publisher = _cpd(service, attempts=3)
        _publish(publisher, endpoint, home["aiplane"])
        before = {
            "models": {k: json.dumps(v.entity, sort_keys=True) for k, v in service.models.items()},
            "tracked": json.dumps(service.tracked, sort_keys=True),
            "approaches": json.dumps(service.approaches, sort_keys=True),
        }
        asked = len(service.requests)
        service.outage(503)

        with pytest.raises(WorkloadError) as failed:
            _publish(publisher, _endpoint(home["aiplane"], "e"), home["aiplane"])

        message = str(failed.value)
        assert "did not answer usably after 3 attempts to sign in" in message
        assert service.url in message and "publish the factsheet again" in message
        assert "Traceback" not in message
        sign_ins = [r for r in service.requests[asked:] if r.path == "/icp4d-api/v1/authorize"]
        assert len(sign_ins) == 3  # bounded: one per attempt, then it stops
        assert len(service.requests) == asked + 3
        after = {
            "models": {k: json.dumps(v.entity, sort_keys=True) for k, v in service.models.items()},
            "tracked": json.dumps(service.tracked, sort_keys=True),
            "approaches": json.dumps(service.approaches, sort_keys=True),
        }
        assert after == before


def test_an_outage_through_the_local_engine_fails_the_workload_with_the_message_and_no_traceback(home):
    endpoint = _endpoint(home["aiplane"])
    with factsheets_service(users={USER: SENTINEL}) as service:
        service.outage(503)
        workload = _cpd(service, attempts=2).workload(endpoint, build_factsheet(endpoint))
        workload = workload.model_copy(update={"cache_dir": str(home["aiplane"] / "cache")})
        with pytest.raises(WorkloadError) as failed:
            Registry().engine("local").run(workload, Target(name="local", engine="local", region="eu"), lambda e: None)
        assert len(service.calls("POST", "/icp4d-api/v1/authorize")) == 2
        assert not service.models
    message = str(failed.value)
    assert "did not answer usably after 2 attempts" in message and "Nothing served was changed" in message
    assert "Traceback" not in message and SENTINEL not in message


def test_an_unreachable_ibm_cloud_fails_without_quoting_the_api_key_from_the_url(home, monkeypatch):
    # IBM's client sends the key in IAM's introspection query string; a connection error quotes that URL.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(WorkloadError) as failed:
        _publish(_publisher(attempts=2, backoff_s=0), _endpoint(home["aiplane"]), home["aiplane"])
    message = str(failed.value)
    assert "did not answer usably after 2 attempts to sign in" in message
    assert "introspect" in message and "apikey=***" in message
    assert SENTINEL not in message
    for path in home["aiplane"].rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), f"{path} holds the API key"


def test_a_service_that_recovers_within_the_attempts_publishes(home):
    with factsheets_service(users={USER: SENTINEL}) as service:
        service.outage(502)
        recover = threading.Timer(0.5, service.outage, args=(None,))
        recover.start()
        try:
            record = _publish(_cpd(service, attempts=6, backoff_s=0.2), _endpoint(home["aiplane"]), home["aiplane"])
        finally:
            recover.cancel()
        assert len(service.models) == 1 and record.publisher == "watsonx-governance"


def test_a_refused_api_key_fails_at_once_naming_the_reference_not_the_key(home, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    with factsheets_service(users={USER: SENTINEL}) as service:
        with pytest.raises(ConfigError, match=KEY_ENV) as failed:
            _publish(_cpd(service, attempts=4), _endpoint(home["aiplane"]), home["aiplane"])
        assert len(service.calls("POST", "/icp4d-api/v1/authorize")) == 1
    assert "not-the-key" not in str(failed.value)


# ---------------------------------------------------------------- platforms


def test_cloud_pak_for_data_mode_talks_only_to_the_given_url_as_the_given_user(home):
    with factsheets_service(users={USER: SENTINEL}) as service:
        _publish(_cpd(service), _endpoint(home["aiplane"]), home["aiplane"])
        netloc = urlsplit(service.url).netloc
        assert {r.headers.get("Host") for r in service.requests} == {netloc}
        (sign_in,) = service.calls("POST", "/icp4d-api/v1/authorize")[:1]
        assert sign_in.json()["username"] == USER
        assert not service.calls(path_prefix="/identity/")  # no IBM Cloud IAM in CPD mode
        api = [r for r in service.requests if r.path != "/icp4d-api/v1/authorize"]
        assert api and all(r.headers["Authorization"].startswith("Bearer ") for r in api)


def test_ibm_cloud_mode_exchanges_the_api_key_at_iam_and_uses_the_regions_api_host(home, monkeypatch):
    with factsheets_service(api_keys=(SENTINEL,), tls_proxy=True) as service:
        monkeypatch.setenv("HTTPS_PROXY", service.proxy_url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", service.ca_bundle)
        publisher = _publisher(inventory_id=service.inventory_id, backoff_s=0)
        record = _publish(publisher, _endpoint(home["aiplane"]), home["aiplane"])

        hosts = {r.host for r in service.requests}
        assert hosts <= {"iam.cloud.ibm.com", "api.dataplatform.cloud.ibm.com", "resource-controller.cloud.ibm.com"}
        (token,) = service.calls("POST", "/identity/token")
        assert token.host == "iam.cloud.ibm.com"
        assert len(service.models) == 1 and len(service.usecases) == 1
    assert record.uri.startswith("https://api.dataplatform.cloud.ibm.com/v2/assets/")


# ---------------------------------------------------------------- secrets and side effects


@pytest.mark.parametrize("platform", ["cpd", "ibm-cloud"])
def test_an_api_key_given_by_reference_appears_nowhere_but_the_auth_calls(home, monkeypatch, caplog, platform):
    events: list = []
    tls = platform == "ibm-cloud"
    with caplog.at_level(logging.DEBUG), factsheets_service(
        users={USER: SENTINEL}, api_keys=(SENTINEL,), tls_proxy=tls
    ) as service:
        if tls:
            monkeypatch.setenv("HTTPS_PROXY", service.proxy_url)
            monkeypatch.setenv("REQUESTS_CA_BUNDLE", service.ca_bundle)
            publisher = _publisher(inventory_id=service.inventory_id, backoff_s=0)
        else:
            publisher = _cpd(service)
        endpoint = _endpoint(home["aiplane"])
        workload = publisher.workload(endpoint, build_factsheet(endpoint))
        record = _publish(publisher, endpoint, home["aiplane"], events)

        auth_paths = {"/icp4d-api/v1/authorize", "/identity/token", "/identity/introspect"}
        assert any(r.path in auth_paths for r in service.requests)
        for r in service.requests:
            if r.path in auth_paths:
                continue
            seen = r.body + json.dumps(r.query).encode() + json.dumps(r.headers).encode()
            assert SENTINEL.encode() not in seen, f"{r.method} {r.path} carries the API key"
        for upload in service.uploads.values():
            assert SENTINEL.encode() not in upload
        for model in service.models.values():
            assert SENTINEL not in json.dumps(model.entity)

    assert SENTINEL not in workload.model_dump_json()  # what travels to the engine: the reference only
    assert KEY_ENV in workload.model_dump_json()
    assert SENTINEL not in json.dumps(record_to_json(record))
    assert SENTINEL not in json.dumps(build_factsheet(endpoint))
    assert SENTINEL not in caplog.text
    assert SENTINEL not in " ".join(str(e) for e in events)
    assert SENTINEL not in repr(publisher)
    for path in home["aiplane"].rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), f"{path} holds the API key"


def test_a_chain_publishing_to_watsonx_governance_keeps_the_key_out_of_dagster_lineage_and_files(home, tmp_path):
    """The whole asset graph with this publisher: the key reaches the service's login and nothing else."""
    import dagster as dg
    import yaml
    from dagster._serdes import serialize_value

    from aiplane.assets import ASSETS, AiplaneResource
    from aiplane.assets.sources import seed_tickets
    from aiplane.core.config import load_deployment
    from conftest import stop_endpoints

    state = home["aiplane"]
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["trainer"]["settings"].update({"max_steps": 6, "batch_size": 4, "seq_len": 64, "eval_limit": 4, "log_every": 2})
    with factsheets_service(users={USER: SENTINEL}, api_keys=(SENTINEL,)) as service:
        raw["factsheet"] = {"name": "watsonx-governance", "settings": {
            "platform": "cpd", "url": service.url, "username": USER, "inventory_id": service.inventory_id,
            "backoff_s": 0, "api_key": {"env": KEY_ENV},
        }}  # fmt: skip
        deployment = tmp_path / "wxgov.yaml"
        deployment.write_text(yaml.safe_dump(raw))
        seed_tickets(state / "sources" / "tickets.jsonl", n=120)
        instance = dg.DagsterInstance.ephemeral()
        try:
            result = dg.materialize(
                ASSETS, instance=instance, raise_on_error=False,
                resources={"aiplane": AiplaneResource(deployment=str(deployment), home=str(state))},
            )  # fmt: skip
        finally:
            stop_endpoints(state)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert result.asset_value("factsheet").publisher == "watsonx-governance" and service.models
        assert any(r.path == "/icp4d-api/v1/authorize" for r in service.requests), "the key was used, at the login"

    logs = "".join(serialize_value(entry) for entry in instance.all_logs(result.run_id))
    assert "watsonx-governance" in logs and "factsheet" in logs, "the records are in the run's metadata"
    assert SENTINEL not in logs, "no Dagster event or metadata holds the key"
    lineage = (state / "lineage" / "events.jsonl").read_text()
    assert lineage.count('"eventType": "COMPLETE"') >= 5 and SENTINEL not in lineage
    for path in state.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SENTINEL.encode() not in path.read_bytes(), f"{path} holds the API key"


def test_ibm_clients_files_go_under_aiplanes_home_never_the_working_directory_or_home(home):
    """Through the local engine, in a fresh worker process, where IBM's client is imported for the first time."""
    endpoint = _endpoint(home["aiplane"])
    with factsheets_service(users={USER: SENTINEL}) as service:
        workload = _cpd(service).workload(endpoint, build_factsheet(endpoint))
        workload = workload.model_copy(update={"cache_dir": str(home["aiplane"] / "cache")})
        events: list = []
        result = Registry().engine("local").run(workload, Target(name="local", engine="local", region="eu"), events.append)
        assert len(service.models) == 1
    assert result.outputs["factsheet"].publisher == "watsonx-governance"
    assert any("published aiplane:tickets:" in str(e) for e in events)
    # IBM's banners and tables went to a file, not to the worker's event stream.
    assert not any("Tracking Process Started" in str(e) for e in events)
    assert Path.cwd() == home["cwd"]
    assert list(home["cwd"].iterdir()) == []
    assert list(home["home"].iterdir()) == []
    state = home["aiplane"] / "cache" / "watsonx-governance"
    assert (state / "logs").is_dir()  # the facts client's own log folder, where it would have been ./logs
    assert "Tracking Process Started" in (state / "client-output.log").read_text()


def test_state_dir_setting_moves_the_clients_files(home):
    with factsheets_service(users={USER: SENTINEL}) as service:
        _publish(_cpd(service, state_dir=str(home["aiplane"] / "gov")), _endpoint(home["aiplane"]), home["aiplane"])
    assert (home["aiplane"] / "gov" / "client-output.log").is_file()
    assert (home["aiplane"] / "gov" / "attachments").is_dir()
    assert not (home["aiplane"] / "cache" / "watsonx-governance").exists()
    assert list(home["cwd"].iterdir()) == [] and list(home["home"].iterdir()) == []


# ---------------------------------------------------------------- settings and listing


def test_settings_say_what_each_platform_needs():
    with pytest.raises(ConfigError, match="platform 'cpd' needs url and username"):
        _publisher(platform="cpd")
    with pytest.raises(ConfigError, match="url and username are for platform 'cpd'"):
        _publisher(url="https://cpd.example.com")
    with pytest.raises(ConfigError, match="api_key"):
        Registry().create("factsheet publisher", "watsonx-governance", {"api_key": "literal"})
    with pytest.raises(ConfigError, match="needs its scheme"):
        _publisher(platform="cpd", url="cpd.example.com", username=USER)


def test_the_service_is_declared_as_a_location_no_region_holds():
    assert _publisher().locations() == {"url": ""}
    assert _publisher(state_dir="/data/eu/gov").locations() == {"url": "", "state_dir": "/data/eu/gov"}


def test_the_online_preflight_names_an_unset_api_key_reference_and_the_offline_one_does_not_ask(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert _publisher().check(None) == [], "offline, this machine's environment is not asked"
    (problem,) = _publisher().probe(None)
    assert f"export {KEY_ENV}=" in problem
    monkeypatch.setenv(KEY_ENV, "x")
    assert _publisher().probe(None) == []


def test_aiplane_plugins_lists_the_watsonx_governance_publisher(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPLANE_")}
    out = subprocess.run(
        [sys.executable, "-m", "aiplane.assets.cli", "plugins"],
        env={**env, "HOME": str(tmp_path)}, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("watsonx_gov "))
    assert lines[i].endswith("aiplane_factsheet_publishers")
    assert lines[i + 1].split() == ["provides", "factsheet", "publisher", "'watsonx-governance'"]
