"""The ``kserve-llm`` target against a loopback Kubernetes API (contract tests).

The real ``kubernetes`` client, unmodified, loads a kubeconfig and talks to
``_k8s_api_double``, which validates every LLMInferenceService against the real
CRD in ``shared/crds`` (the ``v1alpha2`` schema) and whose
``LLMInferenceServiceController`` plays KServe's controller: the workload
Deployment rolled out, or stuck past its progress deadline, or nothing at all;
and the vLLM behind the gateway, which answers completions only for the models
the rolled-out generation serves.
"""

from __future__ import annotations

import functools
import threading

import jsonschema
import pytest
import yaml

from _adapter_store import adapter_bucket, bucket_s3, published_adapter, published_model  # noqa: F401 (adapter_bucket: an autouse fixture)
from _k8s_api_double import KubernetesApiDouble, LLMInferenceServiceController
from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord
from aiplane.core.serving import version_name
from aiplane.core.workload import execute
from aiplane.plugins.llmisvc import KServeLLM
from aiplane.plugins.llmisvc.render import llm_inference_service
from conftest import CRDS, crd_validator

NS = "aiplane"
NAME = "support-tickets"
CRD = "serving.kserve.io_llminferenceservices.yaml"
IMAGE = "registry.redhat.io/rhoai/odh-vllm-cuda-rhel9:v3.4.0"
BASE = BaseModelRecord(
    uri="s3://aiplane-eu/models/granite-3.3-2b-instruct", digest="sha256:" + "b" * 64, name="granite",
    architecture="GraniteForCausalLM", parameters=2_000_000_000,
)  # fmt: skip


def _adapter(n: int, r: int = 16, base: BaseModelRecord = BASE) -> AdapterRecord:
    return published_adapter(n, base, r)


def _model(n: int) -> AdapterRecord:
    return published_model(n, BASE)


@functools.lru_cache(maxsize=1)
def _schema():
    """The v1alpha2 schema's validator, built once: the CRD is 1.3 MB of YAML."""
    return crd_validator(CRD, "v1alpha2")


@pytest.fixture
def cluster(tmp_path):
    with LLMInferenceServiceController() as controller, KubernetesApiDouble(crds=[CRDS / CRD]) as api:
        api.add_controller("LLMInferenceService", controller)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(api.kubeconfig(NS)))
        yield {"api": api, "kubeconfig": str(kubeconfig), "controller": controller}


def _settings(cluster, **more):
    return {"namespace": NS, "kubeconfig": cluster["kubeconfig"], "poll_s": 0.05, "readiness_timeout_s": 30, **more}


def _workload(cluster, adapter: AdapterRecord, **more):
    """The target's deploy workload, its storage the loopback S3 the adapters are in."""
    workload = KServeLLM(_settings(cluster, **more)).workload(adapter, NAME)
    return workload.model_copy(update={"s3": bucket_s3()})


def _deploy(cluster, adapter: AdapterRecord, **more):
    lines: list[str] = []
    return execute(_workload(cluster, adapter, **more), emit=lambda e: lines.append(str(e))).outputs["endpoint"], lines


def _svc(cluster) -> dict | None:
    return cluster["api"].get("LLMInferenceService", NS, NAME)


def _adapters(cluster) -> dict[str, str]:
    return {a["name"]: a["uri"] for a in _svc(cluster)["spec"]["model"]["lora"]["adapters"]}


def _writes(cluster) -> list:
    return [r for r in cluster["api"].requests if r.method in ("POST", "PUT", "DELETE")
            and "/llminferenceservices" in r.path and r.query.get("dryRun") != "All"]  # fmt: skip


# ---------------------------------------------------------------- the rendered object


def test_rendered_service_is_valid_v1alpha2_and_carries_the_fields_aiplane_relies_on():
    settings = KServeLLM({"namespace": NS, "image": IMAGE, "gpus": 2, "service_account": "aiplane-models",
                          "max_lora_rank": 32, "max_loras": 2, "max_model_len": 4096, "base_refs": ["nvidia-h100"],
                          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}).settings  # fmt: skip
    versions = [{"digest": _adapter(2).digest, "uri": _adapter(2).uri}, {"digest": _adapter(1).digest, "uri": _adapter(1).uri}]
    svc = llm_inference_service(NAME, NS, settings, BASE.uri, versions)
    _schema().validate(svc)
    model = svc["spec"]["model"]
    # The CRD leaves adapters schemaless; each is an LLMModelSpec, so hold it to spec.model's own schema.
    model_schema = _schema().schema["properties"]["spec"]["properties"]["model"]
    for adapter in model["lora"]["adapters"]:
        jsonschema.validate(adapter, model_schema)
    assert svc["apiVersion"] == "serving.kserve.io/v1alpha2" and model["uri"] == BASE.uri and model["name"] == "base"
    assert [(a["name"], a["uri"]) for a in model["lora"]["adapters"]] == [
        (NAME, _adapter(2).uri), (version_name(NAME, _adapter(2).digest), _adapter(2).uri),
        (version_name(NAME, _adapter(1).digest), _adapter(1).uri),
    ]  # fmt: skip
    assert (model["lora"]["maxRank"], model["lora"]["maxAdapters"], model["lora"]["maxCpuAdapters"]) == (32, 2, 3)
    pod = svc["spec"]["template"]
    main = pod["containers"][0]
    assert main["name"] == "main" and main["image"] == IMAGE and pod["serviceAccountName"] == "aiplane-models"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "2" == main["resources"]["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env, "no adapter can be loaded into a pod by request"
    assert env["VLLM_ADDITIONAL_ARGS"] == "--max-model-len=4096" and env["HF_HOME"].startswith("/tmp/")
    assert svc["spec"]["rolloutStrategy"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert svc["spec"]["baseRefs"] == [{"name": "nvidia-h100"}] and "scheduler" in svc["spec"]["router"]


def test_a_whole_model_is_the_services_model_uri_served_under_the_endpoint_name():
    settings = KServeLLM({"namespace": NS}).settings
    model = _model(1)
    svc = llm_inference_service(NAME, NS, settings, model.uri, [{"digest": model.digest, "uri": model.uri, "full_model": True}])
    _schema().validate(svc)
    assert svc["spec"]["model"] == {"uri": model.uri, "name": NAME}
    assert "image" not in svc["spec"]["template"]["containers"][0]  # the platform preset's image


def test_the_schema_rejects_what_the_crd_forbids_so_validation_can_fail():
    svc = llm_inference_service(NAME, NS, KServeLLM({"namespace": NS}).settings, BASE.uri,
                                [{"digest": "sha256:1", "uri": "s3://b/a"}])  # fmt: skip
    svc["spec"]["model"]["lora"]["maxRank"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        _schema().validate(svc)


def test_settings_name_a_mistyped_key_refuse_an_unpinned_image_and_a_rank_vllm_does_not_allow():
    with pytest.raises(ConfigError, match="namespce.*namespace"):
        KServeLLM({"namespace": NS, "namespce": "x"})
    with pytest.raises(ConfigError, match="must be pinned"):
        KServeLLM({"namespace": NS, "image": "quay.io/modh/vllm:latest"})
    with pytest.raises(ConfigError, match="max_lora_rank"):
        KServeLLM({"namespace": NS, "max_lora_rank": 24})
    assert KServeLLM({"namespace": NS, "max_lora_rank": 64}).max_lora_rank() == 64


def test_an_endpoint_name_kubernetes_would_refuse_is_refused_first():
    with pytest.raises(ConfigError, match="cannot name an LLMInferenceService"):
        KServeLLM({"namespace": NS}).workload(_adapter(1), "Support_Tickets")


# ---------------------------------------------------------------- rollouts


def test_first_deploy_rolls_out_and_the_new_version_answers_by_its_version_name(cluster):
    endpoint, _ = _deploy(cluster, _adapter(1))
    assert endpoint.serving == "kserve-llm" and endpoint.url == cluster["controller"].url and endpoint.model_name == NAME
    svc = _svc(cluster)
    assert svc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aiplane"
    assert [r.method for r in _writes(cluster)] == ["POST"]
    assert [r.path.rsplit("/", 1)[-1] for r in cluster["api"].requests if r.query.get("dryRun") == "All"] == ["llminferenceservices"]
    # Only the new version's pods serve its version name: its answer proves the new adapter is loaded.
    assert cluster["controller"].requests == [version_name(NAME, _adapter(1).digest)]
    assert KServeLLM(_settings(cluster)).running(endpoint) is True


def test_a_second_adapter_rolls_out_and_the_previous_stays_served_for_rollback(cluster):
    first, _ = _deploy(cluster, _adapter(1))
    second, _ = _deploy(cluster, _adapter(2))
    assert _adapters(cluster) == {NAME: _adapter(2).uri, version_name(NAME, _adapter(2).digest): _adapter(2).uri,
                                  version_name(NAME, _adapter(1).digest): _adapter(1).uri}  # fmt: skip
    assert second.url == first.url and [r.method for r in _writes(cluster)] == ["POST", "PUT"]
    target = KServeLLM(_settings(cluster))
    assert target.running(first) is False and target.running(second) is True
    # keep_previous=1: a third version drops the first.
    _deploy(cluster, _adapter(3))
    assert version_name(NAME, _adapter(1).digest) not in _adapters(cluster)


def test_deploying_a_kept_version_again_is_a_rollback_under_the_endpoint_name(cluster):
    _deploy(cluster, _adapter(1))
    _deploy(cluster, _adapter(2))
    back, _ = _deploy(cluster, _adapter(1))
    assert _adapters(cluster)[NAME] == _adapter(1).uri and back.handle["adapter"] == _adapter(1).digest
    assert version_name(NAME, _adapter(2).digest) in _adapters(cluster)  # the one rolled back from stays addressable


def test_a_rollout_stuck_past_its_deadline_is_a_failure_though_the_old_pods_keep_it_ready(cluster):
    _deploy(cluster, _adapter(1))
    cluster["controller"].outcome = "fail"
    with pytest.raises(WorkloadError, match=r"failed to roll out: its Deployment support-tickets-kserve: "
                                            r"ProgressDeadlineExceeded.*previous spec .* was put back"):  # fmt: skip
        _deploy(cluster, _adapter(2))
    svc = _svc(cluster)
    assert svc["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest
    assert _adapters(cluster)[NAME] == _adapter(1).uri and version_name(NAME, _adapter(2).digest) not in _adapters(cluster)


def test_a_first_deploy_stuck_past_its_deadline_is_deleted_with_kserves_words(cluster):
    cluster["controller"].outcome = "fail"
    with pytest.raises(WorkloadError, match=r"ProgressDeadlineExceeded: ReplicaSet .* has timed out progressing.*was deleted"):
        _deploy(cluster, _adapter(1))
    assert _svc(cluster) is None and cluster["api"].get("Deployment", NS, f"{NAME}-kserve") is None


def test_a_version_that_fails_its_first_completion_puts_the_previous_spec_back(cluster):
    _deploy(cluster, _adapter(1))
    cluster["controller"].failing = True
    with pytest.raises(WorkloadError, match="HTTP 500.*CUDA out of memory.*put back, so adapter sha256:[0-9a-f]+ serves again"):
        _deploy(cluster, _adapter(2))
    assert _svc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest


def test_a_cancelled_rollout_puts_the_previous_spec_back(cluster):
    _deploy(cluster, _adapter(1))
    cluster["controller"].outcome = "never"
    cancel = threading.Event()
    workload = _workload(cluster, _adapter(2))
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(WorkloadCancelled):
        execute(workload, cancel=cancel)
    assert _svc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest


def test_a_cancel_the_moment_a_first_service_is_created_deletes_it(cluster, monkeypatch):
    from aiplane.core.serving_cluster import ClusterObjects

    real, fired = ClusterObjects.apply, []

    def apply(self, obj, current, dry_run=False):  # made, then the worker's SIGTERM handler raises
        done = real(self, obj, current, dry_run)
        if not dry_run and not fired:
            fired.append(obj)
            raise WorkloadCancelled("workload deploy-endpoint was cancelled (signal 15)")
        return done

    monkeypatch.setattr(ClusterObjects, "apply", apply)
    with pytest.raises(WorkloadCancelled):
        _deploy(cluster, _adapter(1))
    assert fired and _svc(cluster) is None


def test_a_first_deploy_that_never_rolls_out_is_a_bounded_wait_and_leaves_nothing(cluster):
    cluster["controller"].outcome = "never"
    with pytest.raises(WorkloadError, match=r"not rolled out within readiness_timeout_s=0.5 s.*was deleted"):
        _deploy(cluster, _adapter(1), readiness_timeout_s=0.5)
    assert _svc(cluster) is None


def test_a_whole_model_rolls_out_after_an_adapter_and_answers_under_the_endpoint_name(cluster):
    _deploy(cluster, _adapter(1))
    served, _ = _deploy(cluster, _model(1))
    assert _svc(cluster)["spec"]["model"] == {"uri": _model(1).uri, "name": NAME}
    assert cluster["controller"].requests[-1] == NAME and served.handle["full_model"] is True


def test_what_a_pod_cannot_read_or_a_rank_above_max_rank_is_refused_before_any_request(cluster):
    local = _adapter(1).model_copy(update={"uri": "/var/lib/aiplane/artifacts/adapters/1"})
    with pytest.raises(InputError, match="a KServe pod cannot read: the kserve-llm target serves from object storage"):
        _deploy(cluster, local)
    with pytest.raises(ConfigError, match="rank 32, above the kserve-llm target's max_lora_rank 16"):
        _deploy(cluster, _adapter(1, r=32))
    assert cluster["api"].requests == []


def test_a_flipped_byte_in_the_stored_adapter_is_refused_and_nothing_is_applied(cluster, adapter_bucket):
    altered = _adapter(90)
    adapter_bucket.flip_byte(altered.uri)
    with pytest.raises(InputError, match=rf"adapter '{altered.uri}' is not the artifact its digest names: "
                                         r"adapter_model.safetensors changed.*aiplane up --force.*roll back"):
        _deploy(cluster, altered)
    assert cluster["api"].requests == []


def test_a_rollback_to_an_altered_kept_version_is_refused_and_the_endpoint_keeps_serving(cluster, adapter_bucket):
    earlier, current = _adapter(91), _adapter(92)
    _deploy(cluster, earlier)
    _deploy(cluster, current)
    before = _svc(cluster)["metadata"]["resourceVersion"]
    adapter_bucket.flip_byte(earlier.uri, "adapter_config.json")
    with pytest.raises(InputError, match="adapter_config.json changed"):
        _deploy(cluster, earlier)
    assert _svc(cluster)["metadata"]["resourceVersion"] == before
    assert _svc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == current.digest


def test_an_adapter_of_another_base_model_is_refused_and_nothing_changes(cluster):
    _deploy(cluster, _adapter(1))
    before = _svc(cluster)["metadata"]["resourceVersion"]
    other = BASE.model_copy(update={"uri": "s3://aiplane-eu/models/other", "digest": "sha256:" + "c" * 64})
    with pytest.raises(InputError, match="one endpoint, one base model"):
        _deploy(cluster, _adapter(2, base=other))
    assert _svc(cluster)["metadata"]["resourceVersion"] == before


def test_stop_deletes_what_aiplane_created_and_leaves_the_rest(cluster):
    endpoint, _ = _deploy(cluster, _adapter(1))
    theirs = llm_inference_service("someone-else", NS, KServeLLM({"namespace": NS}).settings, BASE.uri,
                                   [{"digest": "sha256:9", "uri": "s3://b/9"}])  # fmt: skip
    theirs["metadata"]["labels"] = {}
    cluster["api"].create(theirs)
    target = KServeLLM(_settings(cluster))
    assert target.stop(endpoint) is True
    assert _svc(cluster) is None and cluster["api"].get("Deployment", NS, f"{NAME}-kserve") is None
    assert cluster["api"].get("LLMInferenceService", NS, "someone-else") is not None
    assert target.stop(endpoint) is False and target.running(endpoint) is False
    # A service of that name aiplane did not create is neither changed nor stopped.
    cluster["api"].create({**theirs, "metadata": {**theirs["metadata"], "name": NAME}})
    with pytest.raises(InputError, match="was not created by aiplane"):
        _deploy(cluster, _adapter(1))
    assert target.stop(endpoint) is False and _svc(cluster) is not None


def test_check_names_a_store_a_pod_cannot_read_and_a_name_kubernetes_would_refuse():
    from pathlib import Path

    from aiplane.core.config import load_deployment

    deployment = load_deployment(Path(__file__).parents[1] / "deployments" / "openshift-ai.yaml")
    target = KServeLLM({"namespace": NS})
    assert target.check(deployment) == []
    local = deployment.model_copy(update={"storage": deployment.storage.model_copy(update={"root": "/var/lib/aiplane", "regions": {}})})
    assert [p.split(",")[0] for p in target.check(local)] == ["storage.root is '/var/lib/aiplane'"]
    assert "cannot name an LLMInferenceService" in target.check(deployment, "Bad_Name")[0]


def test_probe_says_whether_the_cluster_serves_llm_inference_services_and_changes_nothing():
    import socket

    import kubernetes

    with KubernetesApiDouble(crds=[CRDS / CRD]) as api:
        assert KServeLLM({"namespace": NS}, api_client=api.api_client()).probe(None) == []
        assert [r.method for r in api.requests] == ["GET"]
    with KubernetesApiDouble() as api:
        assert "serves no serving.kserve.io/v1alpha2" in KServeLLM({"namespace": NS}, api_client=api.api_client()).probe(None)[0]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    nowhere = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=closed))
    assert "is unreachable" in KServeLLM({"namespace": NS}, api_client=nowhere).probe(None)[0]
