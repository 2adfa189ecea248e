"""``deployments/openshift-ai-3.yaml``: checked offline, and its whole chain run against loopback doubles.

The chain runs under that deployment with only its endpoints moved to loopback:
the bucket is moto's S3 server, watsonx.data the Iceberg REST double with IBM
Cloud IAM, the cluster the Kubernetes API double (whose Trainer v2 controller
runs each TrainJob node's real command, and whose LLMInferenceService controller
rolls out generations and answers completions for the models each one serves),
watsonx.governance its factsheets double, the Model Registry its REST double.
Every client is the real one. TrainJob -> adapter in the bucket -> Model Registry
version -> LLMInferenceService rollout -> factsheet; then a second adapter rolls
out, and the first is rolled back to.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CRDS, TESTS

REPO = TESTS.parent
DEPLOYMENT = REPO / "deployments" / "openshift-ai-3.yaml"
NS = "aiplane"
API_KEY = "wx-SENTINEL-3b8e"
REGISTRY_TOKEN = "mr-SENTINEL-51c0"
USER = "admin"
TINY_TRAINING = {"max_steps": 2, "batch_size": 4, "seq_len": 64, "eval_limit": 2, "log_every": 1, "r": 4, "alpha": 8}


def test_the_deployment_checks_offline_with_trainjob_llminferenceservice_and_the_registry():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPLANE_COS_")}
    env.pop("AIPLANE_DEPLOYMENT", None)
    # Offline, no key variable is asked for: the bucket's, watsonx's and the registry's come from Secrets on the cluster.
    env.pop("AIPLANE_WATSONX_APIKEY", None)
    cmd = [sys.executable, "-m", "aiplane.assets.cli", "--deployment", str(DEPLOYMENT), "check", "--offline"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "serving kserve-llm" in out.stdout and "(trainjob, orchestrator)" in out.stdout


def test_the_deployment_trains_on_trainjob_serves_through_kserve_llm_and_publishes_to_the_registry(tmp_path):
    from aiplane.core.config import load_deployment
    from aiplane.core.plugins import Registry

    d = load_deployment(DEPLOYMENT, home=tmp_path)
    assert d.target("trainjob").engine == "trainjob" and d.serving.name == "kserve-llm"
    assert [s.name for s in d.publishers()] == ["local", "watsonx-governance", "model-registry"]
    assert Registry().problems(d) == []


def test_the_cluster_side_is_valid_and_grants_the_new_kinds_and_nothing_wide():
    from test_openshift_manifests import validation_errors

    docs = [d for d in yaml.safe_load_all((REPO / "deployments" / "openshift-ai-3" / "rbac.yaml").read_text()) if d]
    assert [validation_errors(d) for d in docs] == [[], []]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "watch", "delete"} <= granted[("trainer.kubeflow.org", "trainjobs")]
    assert {"create", "get", "update", "delete"} <= granted[("serving.kserve.io", "llminferenceservices")]
    assert granted[("apps", "deployments")] == {"get", "list", "watch"}
    assert not any("*" in rule[f] for rule in role["rules"] for f in ("apiGroups", "resources", "verbs"))
    assert not {r for _, r in granted} & {"secrets", "configmaps", "pods/exec"}
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "aiplane", "namespace": NS}]


def _secret(name: str, **data: str) -> dict:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "data": encoded}


def _loopback(raw: dict, home: Path, s3, bucket: str, catalog, governance, registry, kubeconfig: Path) -> dict:
    """The deployment with each endpoint moved to its double; everything else as shipped."""
    def rebucket(value):
        if isinstance(value, str):
            return value.replace("s3://aiplane-eu/", f"s3://{bucket}/")
        if isinstance(value, dict):
            return {k: rebucket(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebucket(v) for v in value]
        return value

    raw = rebucket(raw)
    raw.pop("home")
    cos = {"endpoint": s3.endpoint_url, "region": s3.region}
    raw["storage"]["s3"].update(cos)
    raw["feature_store"]["settings"].update(url=catalog.url.removesuffix("/mds/iceberg"), iam_url=catalog.iam_url)
    raw["feature_store"]["settings"]["s3"].update(cos)
    trainjob = raw["targets"][0]
    trainjob.pop("gpus"), trainjob.pop("gpu_type")  # CPU nodes here
    trainjob["settings"].update(num_nodes=1, python=sys.executable, kubeconfig=str(kubeconfig), watch_timeout_s=1)
    raw["trainer"]["gpus"] = 0
    raw["trainer"]["settings"].update(TINY_TRAINING)
    raw["governance"]["thresholds"] = {"eval_loss": {"max": 100.0}}  # the tiny model's accuracy is no test of the gate
    raw["serving"]["settings"].update(kubeconfig=str(kubeconfig), poll_s=0.05, readiness_timeout_s=60)
    wxgov, mr = raw["also_publish"]
    wxgov["settings"] = {**wxgov["settings"], "platform": "cpd", "url": governance.url, "username": USER,
                         "inventory_id": governance.inventory_id, "backoff_s": 0}  # fmt: skip
    wxgov["settings"].pop("region")
    (home / "sa-token").write_text(REGISTRY_TOKEN)
    mr["settings"] = {**mr["settings"], "url": registry.url, "token_path": str(home / "sa-token"), "backoff_s": 0}
    mr["settings"].pop("ca_cert")
    raw["observers"]["openlineage"]["path"] = str(home / "lineage" / "events.jsonl")
    return raw


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The chain under the deployment: first adapter, second adapter, rollback to the first."""
    import dagster as dg

    from _factsheets_service_double import factsheets_service
    from _iceberg_rest_server import IamAuth, iceberg_rest_server
    from _k8s_api_double import KubernetesApiDouble, LLMInferenceServiceController, trainjob_controller
    from _model_registry_double import model_registry_server
    from _s3 import s3_server
    from test_k8s_job_engine import _gone, _kubelet

    from aiplane.assets import ASSETS, AiplaneResource
    from aiplane.assets.sources import seed_tickets
    from aiplane.core.storage import Storage
    from aiplane.core.config import S3Settings
    from aiplane.plugins.peft.base_model import build_tiny_granite

    tmp = tmp_path_factory.mktemp("openshift-ai-3")
    home = tmp / "home"
    home.mkdir()
    started: list[int] = []
    crds = [CRDS / f for f in ("trainer.kubeflow.org_trainjobs.yaml", "trainer.kubeflow.org_clustertrainingruntimes.yaml",
                               "serving.kserve.io_llminferenceservices.yaml")]  # fmt: skip
    with (
        s3_server() as s3,
        pytest.MonkeyPatch.context() as mp,
        factsheets_service(users={USER: API_KEY}, api_keys=(API_KEY,)) as governance,
        model_registry_server(token=REGISTRY_TOKEN) as registry,
        LLMInferenceServiceController() as llm,
        KubernetesApiDouble(crds=crds) as api,
    ):
        bucket = s3.create_bucket()
        env = {"AIPLANE_COS_ACCESS_KEY_ID": s3.access_key_id, "AIPLANE_COS_SECRET_ACCESS_KEY": s3.secret_access_key,
               "AIPLANE_WATSONX_APIKEY": API_KEY}  # fmt: skip
        for name, value in env.items():
            mp.setenv(name, value)  # the orchestrator pod's Secrets, mounted as these variables
        for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            mp.delenv(proxy, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        # The cluster side: the runtime an admin applies, the project's Secrets, the operators.
        api.create(yaml.safe_load((REPO / "deployments" / "openshift-ai" / "clustertrainingruntime.yaml").read_text()))
        api.create(_secret("aiplane-cos", access_key_id=s3.access_key_id, secret_access_key=s3.secret_access_key))
        api.create(_secret("aiplane-watsonx", apikey=API_KEY))
        api.add_controller("TrainJob", trainjob_controller(_kubelet(tmp, started)))
        api.add_controller("LLMInferenceService", llm)
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(api.kubeconfig(NS)))
        with iceberg_rest_server(
            f"s3://{bucket}/warehouse", auth=IamAuth(api_keys=(API_KEY,)), file_io=s3.pyiceberg_properties(),
            vend_file_io=False, catalog_name="iceberg_data",
        ) as catalog:  # fmt: skip
            up = S3Settings(endpoint=s3.endpoint_url, region=s3.region, access_key_id={"env": "AIPLANE_COS_ACCESS_KEY_ID"},
                            secret_access_key={"env": "AIPLANE_COS_SECRET_ACCESS_KEY"})  # fmt: skip
            Storage(up).upload_dir(build_tiny_granite(tmp / "tiny"), f"s3://{bucket}/models/granite-3.3-2b-instruct")
            raw = _loopback(yaml.safe_load(DEPLOYMENT.read_text()), home, s3, bucket, catalog, governance, registry, kubeconfig)
            seed_tickets(home / "sources" / "tickets.jsonl", n=120)
            instance = dg.DagsterInstance.ephemeral()

            def materialize(name: str, selection=None, run_config=None):
                path = tmp / f"{name}.yaml"
                path.write_text(yaml.safe_dump(raw))
                resource = AiplaneResource(deployment=str(path), home=str(home))
                result = dg.materialize(ASSETS, instance=instance, resources={"aiplane": resource}, selection=selection,
                                        run_config=run_config, raise_on_error=False)  # fmt: skip
                assert result.success, [e.message for e in result.all_events if e.is_failure]
                snapshot = {
                    "endpoint": result.asset_value("served_endpoint") if "served_endpoint" in _keys(result) else None,
                    "factsheet": result.asset_value("factsheet"),
                    "adapter": result.asset_value("adapter_weights") if "adapter_weights" in _keys(result) else None,
                    "service": api.get("LLMInferenceService", NS, "support-tickets"),
                    "registry_writes": len(registry.writes()),
                    "metadata": _factsheet_metadata(result),
                }
                return snapshot

            try:
                first = materialize("first")
                raw["trainer"]["settings"]["seed"] = 1  # a second adapter: another training run
                # watsonx.governance's client takes seconds to start; the first run showed it beside the others.
                raw["also_publish"] = [p for p in raw["also_publish"] if p["name"] != "watsonx-governance"]
                second = materialize("second")
                rollback = materialize(
                    "rollback", selection=["served_endpoint", "factsheet"],
                    run_config={"ops": {"served_endpoint": {"config": {"rollback_to": first["adapter"].digest}}}},
                )  # fmt: skip
            finally:
                for pid in started:
                    if not _gone(pid):
                        os.killpg(pid, signal.SIGKILL)
            keys = [o["Key"] for page in s3.boto3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
                    for o in page.get("Contents", [])]  # fmt: skip
            yield {"first": first, "second": second, "rollback": rollback, "api": api, "registry": registry,
                   "governance": governance, "llm": llm, "bucket": bucket, "keys": keys, "home": home}  # fmt: skip


def _keys(result) -> set[str]:
    return {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def _factsheet_metadata(result) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "factsheet"]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _served(service: dict) -> dict[str, str]:
    return {a["name"]: a["uri"] for a in service["spec"]["model"]["lora"]["adapters"]}


def _version(registry, adapter) -> dict:
    version = registry.version_named("support-tickets", adapter.digest.removeprefix("sha256:")[:12])
    assert version is not None, f"no registry version for {adapter.digest}"
    return version


@pytest.mark.e2e
def test_training_runs_as_a_trainjob_on_the_shipped_runtime_and_the_adapter_lands_in_the_bucket(chain):
    trainjobs = [r for r in chain["api"].requests if r.method == "POST" and r.path.endswith("/trainjobs")]
    assert len(trainjobs) == 2 and all(r.status == 201 for r in trainjobs), "each adapter trained by a TrainJob, CRD-valid"
    assert trainjobs[0].body["spec"]["runtimeRef"]["name"] == "aiplane-torch"
    for run in ("first", "second"):
        adapter = chain[run]["adapter"]
        assert adapter.execution["engine"] == "trainjob" and adapter.placement.target == "trainjob"
        assert adapter.uri == f"s3://{chain['bucket']}/aiplane/adapters/{adapter.digest.removeprefix('sha256:')}"
        assert f"aiplane/adapters/{adapter.digest.removeprefix('sha256:')}.complete" in chain["keys"]
    assert chain["first"]["adapter"].digest != chain["second"]["adapter"].digest


@pytest.mark.e2e
def test_each_adapter_is_a_registry_version_naming_its_artifact_lineage_and_factsheet(chain):
    registry, first = chain["registry"], chain["first"]
    custom = _version(registry, first["adapter"])["customProperties"]
    props = {k: next(x for f, x in v.items() if f != "metadataType") for k, v in custom.items()}
    assert props["aiplane.adapter.digest"] == first["adapter"].digest and props["aiplane.region"] == "eu"
    assert props["aiplane.features.digest"].startswith("iceberg-snapshot:")
    assert props["aiplane.factsheet"] == first["factsheet"].uri, "the registry names where the factsheet is"
    assert props["aiplane.governance.verdict"] == "passed"
    (artifact,) = registry.artifacts_of(_version(registry, first["adapter"])["id"])
    assert artifact["uri"] == first["adapter"].uri and artifact["storageKey"] == "aiplane-cos"
    assert len(registry.versions) == 2 and registry.violations == []
    published = {p["publisher"]: p for p in first["metadata"]["also_published"]}
    assert set(published) == {"watsonx-governance", "model-registry"} and chain["governance"].models


@pytest.mark.e2e
def test_the_llm_inference_service_rolls_out_each_adapter_and_keeps_the_previous(chain):
    first, second = chain["first"], chain["second"]
    assert first["service"]["spec"]["model"]["uri"] == f"s3://{chain['bucket']}/models/granite-3.3-2b-instruct"
    assert _served(first["service"])["support-tickets"] == first["adapter"].uri
    served = _served(second["service"])
    assert served["support-tickets"] == second["adapter"].uri
    assert first["adapter"].uri in served.values(), "the previous version stays for rollback"
    assert first["factsheet"].uri.startswith(f"s3://{chain['bucket']}/aiplane/factsheets/")


@pytest.mark.e2e
def test_rolling_back_serves_the_first_adapter_again_and_republishing_it_adds_nothing_to_the_registry(chain):
    first, second, rollback = chain["first"], chain["second"], chain["rollback"]
    assert _served(rollback["service"])["support-tickets"] == first["adapter"].uri
    assert rollback["endpoint"].execution["rollback"] == {"to": first["adapter"].digest, "from": second["adapter"].digest}
    assert rollback["registry_writes"] == second["registry_writes"], "the first adapter's version exists: a no-op"
    assert "support-tickets" in chain["llm"].models()
