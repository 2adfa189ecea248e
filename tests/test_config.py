import textwrap
from pathlib import Path

import pytest

from aiplane.core.config import SecretRef, load_deployment
from aiplane.core.errors import ConfigError, PluginError
from aiplane.core.plugins import Registry


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path



def test_local_deployment_is_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.delenv("AIPLANE_DEPLOYMENT", raising=False)
    monkeypatch.setenv("AIPLANE_HOME", str(tmp_path))
    d = load_deployment()
    assert d.name == "local"
    assert d.home == tmp_path
    assert [t.name for t in d.targets][0] == "local"
    assert d.feature_store.settings["warehouse"] == f"{tmp_path}/iceberg/warehouse"
    Registry().validate(d)


def test_aiplane_deployment_env_chooses_another(tmp_path, monkeypatch):
    path = _write(tmp_path, open(load_deployment("local").source).read().replace("name: local", "name: other"), "other.yaml")
    monkeypatch.setenv("AIPLANE_DEPLOYMENT", str(path))
    assert load_deployment().name == "other"


def test_unknown_deployment_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="Unknown deployment 'locl'.*Did you mean 'local'"):
        load_deployment("locl")


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "name: x\ntargets: [\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_deployment(path)


def test_bad_keys_and_values_are_named_with_allowed_values(tmp_path):
    path = _write(
        tmp_path,
        """
        name: broken
        targets:
          - name: t1
            engine: local
            region: eu
            sla: [fast]
            gpu: 1
        feature_store: {name: iceberg}
        trainer: {name: lora}
        serving: {name: vllm}
        """,
    )
    with pytest.raises(ConfigError) as err:
        load_deployment(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "targets.0.sla.0: Input should be 'batch', 'interactive' or 'critical' (got 'fast')" in msg
    assert (
        "targets.0.gpu: Unknown key 'gpu'; allowed keys: engine, gpu_type, gpus, name, region, settings, sla. Did you mean 'gpus'?"
    ) in msg
    assert "factsheet: Field required" in msg


def test_unknown_component_names_suggest_the_closest(tmp_path):
    text = open(load_deployment("local").source).read()
    path = _write(
        tmp_path,
        text.replace("name: lora", "name: lroa").replace("engine: local", "engine: locl").replace("  openlineage:", "  openlinage:"),
    )
    with pytest.raises(ConfigError) as err:
        Registry().validate(load_deployment(path, home=tmp_path))
    msg = str(err.value)
    assert "trainer: Unknown trainer 'lroa'" in msg and "Did you mean 'lora'?" in msg
    assert "targets[0].engine: Unknown engine 'locl'" in msg and "Did you mean 'local'?" in msg
    assert "observers.openlinage: Unknown plugin 'openlinage'" in msg and "Did you mean 'openlineage'?" in msg


def test_unknown_engine_lookup_suggests_the_closest():
    with pytest.raises(PluginError, match="Unknown engine 'lcoal'; installed engines: .*local.*Did you mean 'local'"):
        Registry().engine("lcoal")


def test_literal_secret_in_config_is_rejected(tmp_path):
    path = _write(tmp_path, "name: x\ntargets:\n  - {name: t, engine: kfp, region: us, settings: {token: abc123}}\n")
    with pytest.raises(ConfigError, match=r"targets\[0\].settings.token hold a literal value") as err:
        load_deployment(path)
    assert "abc123" not in str(err.value)


def test_secret_reference_resolves_at_use_and_never_shows_its_value(monkeypatch):
    ref = SecretRef(env="AIPLANE_TEST_TOKEN")
    with pytest.raises(ConfigError, match="export AIPLANE_TEST_TOKEN"):
        ref.resolve()
    monkeypatch.setenv("AIPLANE_TEST_TOKEN", "s3cr3t-value")
    assert ref.resolve() == "s3cr3t-value"
    assert "s3cr3t" not in repr(ref) and "s3cr3t" not in str(ref)
    assert repr(SecretRef(secret="kfp-token", key="token")) == "SecretRef(secret='kfp-token', key='token')"
    with pytest.raises(ValueError):
        SecretRef(env="A", secret="b", key="c")


def test_deployment_repr_holds_no_secret_value(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLANE_TEST_TOKEN", "s3cr3t-value")
    path = _write(
        tmp_path,
        open(load_deployment("local").source).read()
        + "  example:\n    api_key: {env: AIPLANE_TEST_TOKEN}\n",
    )
    d = load_deployment(path)
    assert d.observers["example"]["api_key"] == {"env": "AIPLANE_TEST_TOKEN"}
    assert "s3cr3t" not in repr(d)


def test_secret_scan_accepts_references_and_innocent_names(tmp_path):
    text = open(load_deployment("local").source).read()
    text = text.replace(
        "    readiness_timeout_s: 300",
        "    readiness_timeout_s: 300\n    max_loras: 4\n    api_key: {secret: watsonx, key: apikey}\n    token: {env: KFP_TOKEN}",
    )
    d = load_deployment(_write(tmp_path, text, "refs.yaml"), home=tmp_path)
    assert d.serving.settings["api_key"] == {"secret": "watsonx", "key": "apikey"}
    assert d.serving.settings["max_loras"] == 4


@pytest.mark.parametrize("key", ["api_key", "apikey", "password", "hmac-secret", "client_credentials", "TOKEN"])
def test_secret_scan_rejects_literal_values_under_secret_names(tmp_path, key):
    path = _write(tmp_path, f"name: x\ntargets:\n  - {{name: t, engine: kfp, region: us, settings: {{{key}: hunter2}}}}\n")
    with pytest.raises(ConfigError, match=rf"settings.{key} hold a literal value") as err:
        load_deployment(path)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "deployments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_deployment_validates_against_the_installed_plugins(path, tmp_path, example_cloud, monkeypatch):
    # hybrid.yaml's AP region trains on the third-party example engine: installed, as its comment says.
    monkeypatch.syspath_prepend(str(example_cloud))
    Registry().validate(load_deployment(path, home=tmp_path))


def test_openshift_ai_trains_on_cluster_gpus_and_serves_from_the_orchestrator(tmp_path):
    from aiplane.core.placement import Requirements, place

    d = load_deployment("openshift-ai", home=tmp_path)
    engines = Registry().components("engine")
    train = place(Requirements(workload="train", residency=("eu", "us"), gpus=d.trainer.gpus), d.targets, d.residency, engines)
    assert train.region == "eu" and train.gpus == 1 and train.target != "orchestrator"
    assert "has 0 GPU(s), needs 1" in train.rejected["orchestrator"]
    serve = place(Requirements(workload="serve", sla="interactive", target=d.serving.target), d.targets, d.residency, engines)
    assert serve.target == "orchestrator"


def test_a_validators_own_message_reaches_the_user_without_pydantic_prefixes():
    from aiplane.plugins.iceberg.store import IcebergFeatureStore

    with pytest.raises(ConfigError) as err:
        IcebergFeatureStore({"catalog_uri": "not a url", "warehouse": "/tmp/w"})
    assert "catalog_uri: 'not a url' is not a SQLAlchemy URL" in str(err.value)
    assert "Value error" not in str(err.value)


def _with_residency(tmp_path, policy):
    import yaml

    raw = yaml.safe_load(Path(load_deployment("local").source).read_text())
    raw["residency"] = policy
    path = tmp_path / "residency.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_residency_policy_tags_are_normalized_and_any_declares_a_tag_unrestricted(tmp_path):
    d = load_deployment(_with_residency(tmp_path, {" EU": ["eu"], "US": "any", "ap": "ANY"}), home=tmp_path)
    assert d.residency == {"eu": ("eu",), "us": "any", "ap": "any"}


def test_residency_policy_rejects_a_tag_listed_twice_and_a_bare_region(tmp_path):
    with pytest.raises(ConfigError, match=r"tag '(EU |eu)' is listed twice"):
        load_deployment(_with_residency(tmp_path, {"eu": ["eu"], "EU ": ["us"]}), home=tmp_path)
    with pytest.raises(ConfigError, match=r"eu: give a list of regions \(e.g. \[eu\]\) or `any`"):
        load_deployment(_with_residency(tmp_path, {"eu": "eu"}), home=tmp_path)
