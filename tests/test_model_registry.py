"""The ``model-registry`` publisher, with the real ``model-registry`` client against a loopback registry.

The double (``_model_registry_double``) serves the REST paths of
``../shared/openapi/model-registry.yaml``, checks each request body against the
spec and each of its answers before sending it; every test ends with no answer
outside the spec.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from _model_registry_double import check_schema, model_registry_server
from aiplane.core.components import FEATURE_COLUMNS
from aiplane.core.config import load_deployment
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.plugins import Registry
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, FeaturesRecord, PlacementDecision
from aiplane.core.workload import execute

TOKEN_ENV = "AIPLANE_TEST_MR_TOKEN"
TOKEN = "mr-SENTINEL-7d2e91"
FACTSHEET = {"publisher": "local", "uri": "s3://aiplane-eu/factsheets/tickets-1/factsheet.json",
             "page_uri": "s3://aiplane-eu/factsheets/tickets-1/factsheet.html", "digest": "sha256:" + "f" * 64}  # fmt: skip


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with model_registry_server(token=TOKEN) as double:
        yield double
        assert double.violations == [], "the double answered outside the spec"


def _endpoint(digest_char: str = "a", full_model: bool = False, region: str = "eu") -> EndpointRecord:
    base = BaseModelRecord(
        uri="s3://aiplane-eu/models/granite", digest="sha256:" + "b" * 64, name="granite",
        architecture="GraniteForCausalLM", parameters=2_000_000,
    )  # fmt: skip
    features = FeaturesRecord(
        uri="iceberg://iceberg_data/aiplane.tickets?snapshot=42", digest="iceberg-snapshot:42", table="aiplane.tickets",
        snapshot_id=42, row_count=120, columns=FEATURE_COLUMNS, residency=("eu",),
    )  # fmt: skip
    adapter = AdapterRecord(
        uri=f"s3://aiplane-eu/aiplane/adapters/{digest_char * 64}", digest="sha256:" + digest_char * 64,
        method="sft" if full_model else "lora", config={"r": 8, "full_model": full_model}, metrics={"eval_accuracy": 0.7},
        run_id="run-" + digest_char,
        placement=PlacementDecision(workload="train-adapter", target="trainjob", engine="trainjob", region=region, reason="eu"),
        sources=(base, features),
    )  # fmt: skip
    return EndpointRecord(
        uri="http://tickets.aiplane.svc/v1/models/tickets", digest="sha256:" + "e" * 64, url="http://tickets.aiplane.svc",
        model_name="tickets", protocols=("openai-completions",), serving="llmisvc", sources=(adapter,),
    )  # fmt: skip


def _document(endpoint: EndpointRecord, **extra) -> dict:
    governance = {"passed": True, "rules": [{"rule": "metric eval_accuracy", "passed": True, "value": 0.7, "min": 0.6}]}
    return build_factsheet(endpoint, who="auditor", extra={"deployment": "openshift-ai-3", "governance": governance,
                                                          "factsheets": [FACTSHEET], **extra})  # fmt: skip


@functools.cache
def _plugins() -> Registry:
    return Registry()


def _publisher(double, **settings):
    return _plugins().create(
        "factsheet publisher", "model-registry", {"url": double.url, "token": {"env": TOKEN_ENV}, "backoff_s": 0, **settings}
    )


def _publish(double, endpoint: EndpointRecord, document: dict | None = None, events: list | None = None, **settings):
    workload = _publisher(double, **settings).workload(endpoint, document or _document(endpoint))
    return execute(workload, (events if events is not None else []).append).outputs["factsheet"]


def _properties(version: dict) -> dict:
    return {k: next(v for f, v in value.items() if f != "metadataType") for k, value in version["customProperties"].items()}


# ---------------------------------------------------------------- publishing


def test_a_served_adapter_becomes_a_version_with_its_artifact_uri_format_and_lineage(registry):
    endpoint = _endpoint()
    record = _publish(registry, endpoint)

    (model,) = registry.registered_models.values()
    assert model["name"] == "tickets" and model["owner"] == "aiplane"
    version = registry.version_named("tickets", "a" * 12)
    assert version is not None and version["author"] == "aiplane"
    props = _properties(version)
    document = _document(endpoint)
    training_run = next(s for s in document["lineage"] if s["kind"] == "training_run")
    assert props["aiplane.adapter.digest"] == "sha256:" + "a" * 64
    assert props["aiplane.features.digest"] == "iceberg-snapshot:42" and props["aiplane.features.snapshot_id"] == "42"
    assert props["aiplane.base_model.digest"] == "sha256:" + "b" * 64
    assert props["aiplane.training_run.digest"] == training_run["digest"]
    assert props["aiplane.region"] == "eu"
    assert props["aiplane.factsheet"] == FACTSHEET["uri"] and props["aiplane.factsheet.page"] == FACTSHEET["page_uri"]
    assert props["aiplane.governance.verdict"] == "passed" and "eval_accuracy" in props["aiplane.governance.rules"]
    (artifact,) = registry.artifacts_of(version["id"])
    assert artifact["uri"] == "s3://aiplane-eu/aiplane/adapters/" + "a" * 64
    assert artifact["modelFormatName"] == "peft-lora" and artifact["artifactType"] == "model-artifact"
    assert artifact["state"] == "LIVE"
    assert record.publisher == "model-registry" and record.uri.endswith(f"/model_versions/{version['id']}")
    assert record.sources == (endpoint,)


def test_republishing_the_same_digest_changes_nothing_in_the_registry(registry):
    endpoint = _endpoint()
    first = _publish(registry, endpoint)
    writes = len(registry.writes())
    again = _publish(registry, endpoint, _document(endpoint, dagster_run_id="another-run"))
    assert len(registry.writes()) == writes == 3, [c.path for c in registry.writes()]
    assert (again.uri, again.digest) == (first.uri, first.digest)
    assert len(registry.versions) == 1 and len(registry.artifacts) == 1


def test_a_new_adapter_is_the_next_version_of_the_endpoints_registered_model(registry):
    _publish(registry, _endpoint("a"))
    _publish(registry, _endpoint("c"))
    assert len(registry.registered_models) == 1
    assert sorted(v["name"] for v in registry.versions.values()) == ["a" * 12, "c" * 12]


def test_a_whole_model_is_registered_in_the_format_its_serving_runtime_lists(registry):
    _publish(registry, _endpoint("d", full_model=True), storage_key="aiplane-cos")
    (artifact,) = registry.artifacts.values()
    assert artifact["modelFormatName"] == "vLLM" and artifact["storageKey"] == "aiplane-cos"
    assert _properties(registry.version_named("tickets", "d" * 12))["aiplane.adapter.full_model"] is True


def test_a_publish_cut_short_before_the_artifact_is_completed_by_the_next(registry):
    endpoint = _endpoint()
    original = registry.answer

    def gone_before_the_artifact(method, path, query, body):
        if method == "POST" and path.endswith("/artifacts"):
            registry.answer = original
            raise ConnectionResetError("the registry went away")  # the connection drops, no answer
        return original(method, path, query, body)

    registry.answer = gone_before_the_artifact
    with pytest.raises(WorkloadError, match="did not answer usably after 1 attempts"):
        _publish(registry, endpoint, attempts=1)
    assert len(registry.versions) == 1 and not registry.artifacts
    _publish(registry, endpoint)
    assert len(registry.versions) == 1 and len(registry.artifacts) == 1


def test_a_version_another_publish_creates_first_is_found_on_the_next_attempt(registry):
    original = registry.answer

    def raced(method, path, query, body):
        if method == "POST" and path.endswith("/model_versions"):
            registry.answer = original
            original(method, path, query, body)  # the other publish wins the race
            return 409, {"code": "409", "message": "version exists"}
        return original(method, path, query, body)

    registry.answer = raced
    _publish(registry, _endpoint())
    assert len(registry.versions) == 1 and len(registry.artifacts) == 1


def test_an_unavailable_registry_is_retried_then_fails_saying_what_to_do(registry):
    registry.fail_next = [503] * 3
    with pytest.raises(WorkloadError) as err:
        _publish(registry, _endpoint(), attempts=3)
    assert "did not answer usably after 3 attempts" in str(err.value) and "publish the factsheet again" in str(err.value)
    assert not registry.versions and [c.status for c in registry.calls] == [503, 503, 503]


def test_a_registry_that_recovers_within_the_attempts_registers_once(registry):
    registry.fail_next = [503, 503]
    _publish(registry, _endpoint(), attempts=3)
    assert len(registry.versions) == 1 and len(registry.artifacts) == 1


def test_a_refused_token_fails_at_once_naming_the_reference_never_the_value(registry, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "a-stale-token")
    events: list = []
    with pytest.raises(ConfigError) as err:
        _publish(registry, _endpoint(), events=events)
    assert "refused the credentials (HTTP 401" in str(err.value) and TOKEN_ENV in str(err.value)
    assert "a-stale-token" not in str(err.value) and "a-stale-token" not in json.dumps([e.model_dump() for e in events])
    assert len(registry.calls) == 1, "a refused token is not retried"


def test_the_token_is_read_from_a_file_as_a_pods_service_account_token_is(registry, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    _publish(registry, _endpoint(), token=None, token_path=str(token_file))
    assert registry.versions and all(c.auth == "Bearer" for c in registry.calls)


def test_a_version_name_held_by_another_digest_is_refused_not_taken_over(registry):
    _publish(registry, _endpoint("a"))
    impostor = _endpoint("a")
    adapter = impostor.sources[0].model_copy(update={"digest": "sha256:" + "a" * 12 + "0" * 52})
    with pytest.raises(InputError, match="a version aiplane did not register holds that name"):
        _publish(registry, impostor.model_copy(update={"sources": (adapter,)}))
    assert len(registry.artifacts) == 1


def test_the_workload_carries_the_tokens_reference_only(registry):
    workload = _publisher(registry).workload(_endpoint(), _document(_endpoint()))
    assert TOKEN not in workload.model_dump_json() and TOKEN_ENV in workload.model_dump_json()


# ---------------------------------------------------------------- the double keeps to the spec


def test_the_doubles_answers_are_checked_against_the_spec_and_the_check_can_fail():
    good = {"id": "2", "name": "aaaa", "registeredModelId": "1", "state": "LIVE"}
    assert check_schema({"$ref": "#/components/schemas/ModelVersion"}, good) == []
    assert check_schema({"$ref": "#/components/schemas/ModelVersion"}, {"id": "2", "registeredModelId": "0"})
    bad_property = {**good, "customProperties": {"x": {"metadataType": "MetadataStringValue", "int_value": "1"}}}
    assert check_schema({"$ref": "#/components/schemas/ModelVersion"}, bad_property)


def test_a_request_the_spec_refuses_is_answered_400(registry):
    request = urllib.request.Request(
        f"{registry.url}/api/model_registry/v1alpha3/model_versions", data=json.dumps({"name": "v1"}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "registeredModelId" in err.value.read().decode()


# ---------------------------------------------------------------- settings and the deployment


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"url": "https://registry.example.com"}, "an https registry needs a bearer token"),
        ({"url": "registry.example.com"}, "is not an http(s) address"),
        ({"url": "http://r", "token": {"env": "T"}, "token_path": "/t"}, "give the token one way"),
        ({"url": "http://r", "page_url": "https://d/{model}"}, "may name only"),
        ({"url": "http://r", "token": "literal"}, "token"),
    ],
)
def test_settings_say_what_is_wrong(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Registry().create("factsheet publisher", "model-registry", settings)


def test_the_registry_is_declared_as_a_location_no_region_holds():
    publisher = Registry().create("factsheet publisher", "model-registry", {"url": "http://r"})
    assert publisher.locations() == {"url": ""}


def test_preflight_check_names_an_unset_token_reference(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    publisher = Registry().create("factsheet publisher", "model-registry", {"url": "http://r", "token": {"env": TOKEN_ENV}})
    (problem,) = publisher.check(None)
    assert TOKEN_ENV in problem and "is not set" in problem


def test_the_online_check_asks_the_registry_once_and_names_a_refused_token(registry, monkeypatch):
    publisher = _publisher(registry)
    assert publisher.probe(None) == [] and [c.path for c in registry.calls] == [
        "/api/model_registry/v1alpha3/registered_models"
    ]
    monkeypatch.setenv(TOKEN_ENV, "a-stale-token")
    (problem,) = publisher.probe(None)
    assert "refused" in problem and TOKEN_ENV in problem and "a-stale-token" not in problem
    (problem,) = _plugins().create("factsheet publisher", "model-registry", {"url": "http://127.0.0.1:9"}).probe(None)
    assert "is unreachable" in problem


def _deployment(tmp_path: Path, also_publish) -> Path:
    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["also_publish"] = also_publish
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_also_publish_lists_publishers_after_the_factsheet_and_each_is_validated(tmp_path):
    d = load_deployment(_deployment(tmp_path, [{"name": "model-registry", "settings": {"url": "https://r.example.com"}}]),
                        home=tmp_path)  # fmt: skip
    assert [s.name for s in d.publishers()] == ["local", "model-registry"]
    problems = Registry().problems(d)
    assert len(problems) == 1 and problems[0].startswith("also_publish[0]: ") and "needs a bearer token" in problems[0]


def test_the_preflight_checks_and_places_each_also_publish_publisher(tmp_path, monkeypatch):
    from aiplane.core.preflight import preflight

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = _deployment(tmp_path, [
        {"name": "model-registry", "settings": {"url": "http://r", "token": {"env": TOKEN_ENV}}},
        {"name": "model-registry", "sla": "critical", "settings": {"url": "http://r"}},
    ])  # fmt: skip
    problems = preflight(load_deployment(path, home=tmp_path), _plugins(), offline=True)
    assert any(p.startswith("also_publish[0]: settings.token:") and TOKEN_ENV in p for p in problems), problems
    assert any(p.startswith("also_publish[1]: No target can run publish-factsheet") for p in problems), problems


def test_an_also_publish_pin_to_an_unknown_target_fails_when_the_deployment_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"also_publish\[0\]\.target"):
        load_deployment(_deployment(tmp_path, [{"name": "model-registry", "target": "nowhere", "settings": {"url": "http://r"}}]))


def test_a_deployment_without_also_publish_publishes_to_its_factsheet_alone(tmp_path):
    d = load_deployment("local", home=tmp_path)
    assert d.also_publish == () and [s.name for s in d.publishers()] == ["local"]


def test_aiplane_plugins_lists_the_model_registry_publisher():
    from aiplane.assets.cli import main

    info = next(p for p in Registry().plugins() if p.name == "model_registry")
    assert ("factsheet publisher", "model-registry") in info.components and info.hooks == ("aiplane_factsheet_publishers",)
    assert main(["plugins"]) == 0
