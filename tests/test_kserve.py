"""The ``kserve`` target against a loopback Kubernetes API (contract tests).

The real ``kubernetes`` client, unmodified, loads a kubeconfig and talks to
``_k8s_api_double``, which validates every object against the real CRDs in
``shared/crds`` and lets each test play KServe's controller: Ready, failed with
a message, a canary then promoted, or never ready. The vLLM server behind an
InferenceService is a loopback stub of ``/v1/completions`` that records which
model each request named, so the canary's smoke request is real HTTP.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from _adapter_store import adapter_bucket, bucket_s3, published_adapter, published_model  # noqa: F401 (adapter_bucket: an autouse fixture)
from _k8s_api_double import KubernetesApiDouble
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord
from aiplane.core.workload import execute
from aiplane.plugins.kserve import KServe
from aiplane.plugins.kserve.render import inference_service, runtime_object
from conftest import CRDS, crd_validator

NS = "aiplane"
NAME = "support-tickets"
IMAGE = "quay.io/modh/vllm:rhoai-2.19-cuda"
BASE = BaseModelRecord(
    uri="s3://aiplane-eu/models/granite-3.3-2b-instruct", digest="sha256:" + "b" * 64, name="granite",
    architecture="GraniteForCausalLM", parameters=2_000_000_000,
)  # fmt: skip


def _adapter(n: int, r: int = 16, base: BaseModelRecord = BASE) -> AdapterRecord:
    return published_adapter(n, base, r)


def _model(n: int, base: BaseModelRecord = BASE) -> AdapterRecord:
    """A whole model (what ``sft`` publishes), in object storage, trained from ``base``."""
    return published_model(n, base, max_steps=24)


class _Vllm:
    """A loopback stand-in for the pods' vLLM: answers /v1/completions, or fails while ``failing``."""

    def __init__(self):
        self.models: list[str] = []
        self.failing = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.models.append(body["model"])
                code, answer = (500, {"error": {"message": "CUDA out of memory"}}) if outer.failing else (
                    200, {"choices": [{"text": " ok", "index": 0}]})  # fmt: skip
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


class _KServeController:
    """Plays KServe for InferenceServices: ``outcome`` decides what the next generation does."""

    def __init__(self, vllm: _Vllm):
        self.vllm = vllm
        self.outcome = "ready"  # or "fail", "never"

    def __call__(self, api: KubernetesApiDouble, event: str, obj: dict) -> None:
        if event == "DELETED" or self.outcome == "never":
            return
        meta, predictor = obj["metadata"], obj["spec"]["predictor"]
        generation, name = meta["generation"], meta["name"]
        status = obj.get("status") or {}
        old = (status.get("components") or {}).get("predictor") or {}
        revision = f"{name}-predictor-{generation:05d}"
        if self.outcome == "fail":
            api.set_status("InferenceService", meta["namespace"], name, {
                "observedGeneration": generation,
                "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed",
                                "message": f"Revision \"{revision}\" failed with message: 0/3 nodes are available: "
                                           "3 Insufficient nvidia.com/gpu."}],
            })  # fmt: skip
            return
        canary = predictor.get("canaryTrafficPercent")
        previous = old.get("latestReadyRevision")
        if canary is not None and canary < 100 and previous:
            traffic = [
                {"revisionName": revision, "percent": canary, "latestRevision": True, "tag": "latest",
                 "url": self.vllm.url},
                {"revisionName": previous, "percent": 100 - canary, "latestRevision": False, "tag": "prev"},
            ]  # fmt: skip
        else:
            traffic = [{"revisionName": revision, "percent": 100, "latestRevision": True}]
        api.set_status("InferenceService", meta["namespace"], name, {
            "observedGeneration": generation,
            "url": self.vllm.url,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PredictorReady", "status": "True"}],
            "components": {"predictor": {"latestCreatedRevision": revision, "latestReadyRevision": revision,
                                         "traffic": traffic}},
        }, merge=False)  # fmt: skip


@pytest.fixture
def cluster(tmp_path):
    vllm = _Vllm()
    controller = _KServeController(vllm)
    with KubernetesApiDouble(
        crds=[CRDS / "serving.kserve.io_inferenceservices.yaml", CRDS / "serving.kserve.io_servingruntimes.yaml"]
    ) as api:
        api.add_controller("InferenceService", controller)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(api.kubeconfig(NS)))
        yield {"api": api, "kubeconfig": str(kubeconfig), "controller": controller, "vllm": vllm}
    vllm.server.shutdown()


def _settings(cluster, **more):
    return {"namespace": NS, "image": IMAGE, "kubeconfig": cluster["kubeconfig"], "poll_s": 0.05, **more}


def _workload(cluster, adapter: AdapterRecord, **more):
    """The target's deploy workload, its storage the loopback S3 the adapters are in."""
    workload = KServe(_settings(cluster, **more)).workload(adapter, NAME)
    return workload.model_copy(update={"s3": bucket_s3()})


def _deploy(cluster, adapter: AdapterRecord, **more):
    lines: list[str] = []
    result = execute(_workload(cluster, adapter, **more), emit=lambda e: lines.append(str(e)))
    return result.outputs["endpoint"], lines


def _isvc(cluster) -> dict:
    return cluster["api"].get("InferenceService", NS, NAME)


def _writes(cluster, plural: str) -> list[dict]:
    """The changes the client sent for ``plural`` (dry runs excluded), in order."""
    return [
        r for r in cluster["api"].requests
        if r.method in ("POST", "PUT", "PATCH", "DELETE") and f"/{plural}" in r.path and r.query.get("dryRun") != "All"
    ]  # fmt: skip


# ---------------------------------------------------------------- the rendered objects


@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
def test_rendered_runtime_and_inference_service_are_valid_against_the_crds(mode):
    settings = KServe({"namespace": NS, "image": IMAGE, "deployment_mode": mode, "gpus": 2,
                       "node_selector": {"nvidia.com/gpu.present": "true"},
                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                       "service_account": "aiplane-models"}).settings  # fmt: skip
    runtime = runtime_object("aiplane-vllm", NS, settings)
    versions = [{"digest": _adapter(2).digest, "uri": _adapter(2).uri}, {"digest": _adapter(1).digest, "uri": _adapter(1).uri}]
    isvc = inference_service(NAME, NS, settings, "aiplane-vllm", BASE.uri, versions, canary_percent=10)
    crd_validator("serving.kserve.io_servingruntimes.yaml").validate(runtime)
    crd_validator("serving.kserve.io_inferenceservices.yaml").validate(isvc)
    args = runtime["spec"]["containers"][0]["args"]
    assert {"--enable-lora", "--max-lora-rank=16", "--model=/mnt/models"} <= set(args)
    env = {e["name"]: e["value"] for e in runtime["spec"]["containers"][0]["env"]}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env, "no adapter can be loaded into a pod by request"
    assert env["HF_HOME"].startswith("/tmp/")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == BASE.uri and model["runtime"] == "aiplane-vllm"
    d1, d2 = _adapter(1).digest[7:19], _adapter(2).digest[7:19]
    assert model["args"] == ["--lora-modules", f"{NAME}=/mnt/adapters/{d2}", f"{NAME}@{d2}=/mnt/adapters/{d2}",
                             f"{NAME}@{d1}=/mnt/adapters/{d1}"]  # fmt: skip
    assert [s["mountPath"] for s in isvc["spec"]["predictor"]["storageUris"]] == [f"/mnt/adapters/{d2}", f"/mnt/adapters/{d1}"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == mode


def test_a_whole_models_inference_service_is_valid_and_serves_it_as_its_own_base_model():
    settings = KServe({"namespace": NS, "image": IMAGE}).settings
    model = _model(1)
    isvc = inference_service(NAME, NS, settings, "aiplane-vllm", model.uri,
                             [{"digest": model.digest, "uri": model.uri, "full_model": True}], canary_percent=10)  # fmt: skip
    crd_validator("serving.kserve.io_inferenceservices.yaml").validate(isvc)
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == model.uri and "storageUris" not in predictor
    # The runtime's `--served-model-name=base` comes first on vLLM's command line; the last one wins.
    assert predictor["model"]["args"] == ["--served-model-name", NAME]
    assert isvc["metadata"]["annotations"]["aiplane.io/adapter"] == model.digest
    with pytest.raises(ValueError, match="serves it alone"):
        both = [{"digest": model.digest, "uri": model.uri, "full_model": True}, {"digest": "sha256:1", "uri": "s3://b/a"}]
        inference_service(NAME, NS, settings, "aiplane-vllm", model.uri, both)


def test_the_double_rejects_what_the_crd_forbids_so_validation_can_fail():
    settings = KServe({"namespace": NS, "image": IMAGE}).settings
    isvc = inference_service(NAME, NS, settings, "aiplane-vllm", BASE.uri, [{"digest": "sha256:1", "uri": "s3://b/a"}])
    isvc["spec"]["predictor"]["storageUris"][0]["mountPath"] = "relative/path"
    with pytest.raises(Exception, match="mountPath"):
        crd_validator("serving.kserve.io_inferenceservices.yaml").validate(isvc)


def test_settings_refuse_an_unpinned_image_and_a_rank_vllm_does_not_allow():
    with pytest.raises(ConfigError, match="must be pinned"):
        KServe({"namespace": NS, "image": "quay.io/modh/vllm:latest"})
    with pytest.raises(ConfigError, match="max_lora_rank"):
        KServe({"namespace": NS, "image": IMAGE, "max_lora_rank": 24})


def test_an_endpoint_name_kubernetes_would_refuse_is_refused_first():
    with pytest.raises(ConfigError, match="cannot name an InferenceService"):
        KServe({"namespace": NS, "image": IMAGE}).workload(_adapter(1), "Support_Tickets")


# ---------------------------------------------------------------- rollouts


def test_first_deploy_creates_the_runtime_and_the_service_and_waits_for_ready(cluster):
    endpoint, lines = _deploy(cluster, _adapter(1))
    assert endpoint.serving == "kserve" and endpoint.url == cluster["vllm"].url and endpoint.model_name == NAME
    assert endpoint.handle["revision"] == f"{NAME}-predictor-00001"
    runtime = cluster["api"].get("ServingRuntime", NS, "aiplane-vllm")
    assert runtime["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aiplane"
    assert [r.method for r in _writes(cluster, "inferenceservices")] == ["POST"]
    # Both objects went through a server-side dry run before anything was stored.
    dry = [r.path.rsplit("/", 1)[-1] for r in cluster["api"].requests if r.query.get("dryRun") == "All"]
    assert dry == ["servingruntimes", "inferenceservices"]
    assert cluster["vllm"].models == [NAME]  # the smoke completion, by endpoint name
    assert KServe(_settings(cluster)).running(endpoint) is True


def test_a_new_adapter_rolls_out_as_a_canary_and_is_promoted_after_a_completion(cluster):
    first, _ = _deploy(cluster, _adapter(1))
    second, lines = _deploy(cluster, _adapter(2))
    puts = [r.body for r in _writes(cluster, "inferenceservices") if r.method == "PUT"]
    assert [p["spec"]["predictor"].get("canaryTrafficPercent") for p in puts] == [10, 100]
    assert second.url == first.url and second.handle["revision"] == f"{NAME}-predictor-00003"
    isvc = _isvc(cluster)
    args = isvc["spec"]["predictor"]["model"]["args"]
    assert f"{NAME}=/mnt/adapters/{_adapter(2).digest[7:19]}" in args
    assert f"{NAME}@{_adapter(1).digest[7:19]}=/mnt/adapters/{_adapter(1).digest[7:19]}" in args  # kept for rollback
    assert any("promoted the new revision" in line for line in lines)
    assert KServe(_settings(cluster)).running(first) is False and KServe(_settings(cluster)).running(second) is True
    # The runtime did not change, so it was written once.
    assert len(_writes(cluster, "servingruntimes")) == 1


def test_raw_deployment_mode_updates_without_a_canary(cluster):
    _deploy(cluster, _adapter(1), deployment_mode="RawDeployment")
    _deploy(cluster, _adapter(2), deployment_mode="RawDeployment")
    puts = [r.body for r in _writes(cluster, "inferenceservices") if r.method == "PUT"]
    assert len(puts) == 1 and "canaryTrafficPercent" not in puts[0]["spec"]["predictor"]
    assert puts[0]["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_a_failed_rollout_names_the_condition_and_leaves_the_previous_adapter_serving(cluster):
    _deploy(cluster, _adapter(1))
    cluster["controller"].outcome = "fail"
    with pytest.raises(WorkloadError, match=r"failed to roll out: Ready: RevisionFailed: .*Insufficient nvidia.com/gpu.*"
                                            r"previous spec .* was put back"):  # fmt: skip
        _deploy(cluster, _adapter(2))
    annotations = _isvc(cluster)["metadata"]["annotations"]
    assert annotations["aiplane.io/adapter"] == _adapter(1).digest
    assert "canaryTrafficPercent" not in _isvc(cluster)["spec"]["predictor"]


def test_a_canary_that_fails_its_completion_is_not_promoted(cluster):
    _deploy(cluster, _adapter(1))
    cluster["vllm"].failing = True
    with pytest.raises(WorkloadError, match="HTTP 500.*CUDA out of memory.*was put back"):
        _deploy(cluster, _adapter(2))
    puts = [r.body["spec"]["predictor"].get("canaryTrafficPercent") for r in _writes(cluster, "inferenceservices")
            if r.method == "PUT"]  # fmt: skip
    assert puts == [10, None]  # the canary, then the previous spec; never 100
    assert _isvc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest


def test_a_service_that_never_becomes_ready_is_a_bounded_wait_and_a_first_deploy_leaves_nothing(cluster):
    cluster["controller"].outcome = "never"
    with pytest.raises(WorkloadError, match=r"not Ready within readiness_timeout_s=0.5 s.*was deleted"):
        _deploy(cluster, _adapter(1), readiness_timeout_s=0.5)
    assert _isvc(cluster) is None


def test_a_cancelled_rollout_puts_the_previous_spec_back(cluster):
    from aiplane.core.errors import WorkloadCancelled

    _deploy(cluster, _adapter(1))
    cluster["controller"].outcome = "never"
    cancel = threading.Event()
    workload = _workload(cluster, _adapter(2))
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(WorkloadCancelled):
        execute(workload, cancel=cancel)
    isvc = _isvc(cluster)
    assert isvc["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def _cancelled_once_applied(monkeypatch, kind: str) -> None:
    """The first real (not dry-run) apply of ``kind`` is made, then a cancel lands: as the worker's SIGTERM
    handler raises the moment the request returned."""
    from aiplane.core.errors import WorkloadCancelled
    from aiplane.core.serving_cluster import ClusterObjects

    real, fired = ClusterObjects.apply, []

    def apply(self, obj, current, dry_run=False):
        done = real(self, obj, current, dry_run)
        if not dry_run and obj["kind"] == kind and not fired:
            fired.append(obj)
            raise WorkloadCancelled("workload deploy-endpoint was cancelled (signal 15)")
        return done

    monkeypatch.setattr(ClusterObjects, "apply", apply)


def test_a_cancel_the_moment_the_new_spec_is_applied_puts_the_previous_spec_back(cluster, monkeypatch):
    from aiplane.core.errors import WorkloadCancelled

    _deploy(cluster, _adapter(1))
    _cancelled_once_applied(monkeypatch, "InferenceService")
    with pytest.raises(WorkloadCancelled):
        _deploy(cluster, _adapter(2))
    assert _isvc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == _adapter(1).digest


def test_a_new_spec_the_api_server_refuses_puts_nothing_back(cluster, monkeypatch):
    from aiplane.core.serving_cluster import ClusterObjects

    _deploy(cluster, _adapter(1))
    before, real = len(_writes(cluster, "inferenceservices")), ClusterObjects.apply

    def refused(self, obj, current, dry_run=False):
        if not dry_run and obj["kind"] == "InferenceService":
            raise WorkloadError("Could not apply InferenceService tickets: Conflict (409)")
        return real(self, obj, current, dry_run)

    monkeypatch.setattr(ClusterObjects, "apply", refused)
    with pytest.raises(WorkloadError, match=r"Conflict \(409\)$"):
        _deploy(cluster, _adapter(2))
    # Nothing changed, so nothing was put back: a put-back would overwrite whatever change the 409 was about.
    assert len(_writes(cluster, "inferenceservices")) == before


def test_adapters_outside_object_storage_are_refused_before_any_request(cluster):
    local = _adapter(1).model_copy(update={"uri": "/var/lib/aiplane/artifacts/adapters/1"})
    with pytest.raises(InputError, match="a KServe pod cannot read: the kserve target serves from object storage"):
        _deploy(cluster, local)
    assert cluster["api"].requests == []


def test_a_base_model_and_an_adapter_in_different_stores_are_refused_before_any_request(cluster):
    from aiplane.core.config import S3Settings

    # The adapter is in the region's own store (a route over its root); the base model in storage.s3's.
    own = {"s3://aiplane-eu/aiplane": bucket_s3()}
    workload = _workload(cluster, _adapter(1)).model_copy(
        update={"s3": S3Settings(endpoint="https://s3.storage.example.com"), "s3_routes": own}
    )
    with pytest.raises(ConfigError, match=r"different object stores .* a KServe pod fetches both with its service account"):
        execute(workload)
    assert cluster["api"].requests == []
    # A route that holds both is one store: the rollout goes ahead.
    together = workload.model_copy(update={"s3_routes": {"s3://aiplane-eu": own["s3://aiplane-eu/aiplane"]}})
    assert execute(together).outputs["endpoint"].model_name == NAME


def test_a_flipped_byte_in_the_stored_adapter_is_refused_and_nothing_is_applied(cluster, adapter_bucket):
    altered = _adapter(90)
    adapter_bucket.flip_byte(altered.uri)
    with pytest.raises(InputError, match=rf"adapter '{altered.uri}' is not the artifact its digest names: "
                                         r"adapter_model.safetensors changed.*aiplane up --force.*roll back"):
        _deploy(cluster, altered)
    assert cluster["api"].requests == []


def test_a_rollback_to_an_altered_adapter_is_refused_and_the_endpoint_keeps_serving(cluster, adapter_bucket):
    earlier, current = _adapter(91), _adapter(92)
    _deploy(cluster, earlier)
    _deploy(cluster, current)
    before = _isvc(cluster)
    adapter_bucket.flip_byte(earlier.uri, "adapter_config.json")
    with pytest.raises(InputError, match="adapter_config.json changed"):
        _deploy(cluster, earlier)
    assert _isvc(cluster)["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert _isvc(cluster)["metadata"]["annotations"]["aiplane.io/adapter"] == current.digest


def test_a_version_kept_for_rollback_that_was_altered_is_no_longer_served(cluster, adapter_bucket):
    kept, new = _adapter(93), _adapter(94)
    _deploy(cluster, kept)
    adapter_bucket.flip_byte(kept.uri)
    _, lines = _deploy(cluster, new)
    assert [s["uri"] for s in _isvc(cluster)["spec"]["predictor"]["storageUris"]] == [new.uri]
    assert any(f"version {kept.digest} is no longer kept for rollback" in line and "adapter_model.safetensors changed" in line
               for line in lines)  # fmt: skip


def test_a_rank_above_the_runtimes_max_is_refused_before_any_request(cluster):
    with pytest.raises(ConfigError, match="rank 32, above the kserve target's max_lora_rank 16"):
        _deploy(cluster, _adapter(1, r=32))
    assert cluster["api"].requests == []


def test_an_adapter_of_another_base_model_is_refused_and_nothing_changes(cluster):
    _deploy(cluster, _adapter(1))
    before = _isvc(cluster)
    other = BASE.model_copy(update={"uri": "s3://aiplane-eu/models/other", "digest": "sha256:" + "c" * 64})
    with pytest.raises(InputError, match="one endpoint, one base model"):
        _deploy(cluster, _adapter(2, base=other))
    assert _isvc(cluster)["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_a_whole_model_rolls_out_after_an_adapter_as_a_canary_and_an_adapter_rolls_back_after_it(cluster):
    first, _ = _deploy(cluster, _adapter(1))
    served, lines = _deploy(cluster, _model(1))
    puts = [r.body for r in _writes(cluster, "inferenceservices") if r.method == "PUT"]
    assert [p["spec"]["predictor"].get("canaryTrafficPercent") for p in puts] == [10, 100]
    predictor = _isvc(cluster)["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == _model(1).uri and "storageUris" not in predictor
    assert predictor["model"]["args"] == ["--served-model-name", NAME]
    assert cluster["vllm"].models == [NAME, NAME]  # each smoke completion by endpoint name
    assert any(f"model {_model(1).digest}, canary at 10%" in line for line in lines)
    assert served.url == first.url and served.handle["full_model"] is True
    assert [r.digest for r in served.sources] == [_model(1).digest] and served.source("adapter_weights").sources == (BASE,)
    target = KServe(_settings(cluster))
    assert target.running(served) is True and target.running(first) is False
    # Back to an adapter (a rollback): the base model again, and no adapter of before the whole model is carried over.
    back, _ = _deploy(cluster, _adapter(1))
    predictor = _isvc(cluster)["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == BASE.uri
    assert [s["uri"] for s in predictor["storageUris"]] == [_adapter(1).uri]
    assert target.running(back) is True and target.running(served) is False


def test_from_a_whole_model_an_adapter_of_another_base_model_rolls_out(cluster):
    _deploy(cluster, _model(1))
    other = BASE.model_copy(update={"uri": "s3://aiplane-eu/models/other", "digest": "sha256:" + "c" * 64})
    endpoint, _ = _deploy(cluster, _adapter(2, base=other))
    assert _isvc(cluster)["spec"]["predictor"]["model"]["storageUri"] == other.uri
    assert endpoint.handle["adapter"] == _adapter(2).digest and endpoint.handle["full_model"] is False


def test_raw_deployment_mode_updates_one_whole_model_to_another_without_a_canary(cluster):
    _deploy(cluster, _model(1), deployment_mode="RawDeployment")
    second, _ = _deploy(cluster, _model(2), deployment_mode="RawDeployment")
    puts = [r.body for r in _writes(cluster, "inferenceservices") if r.method == "PUT"]
    assert len(puts) == 1 and "canaryTrafficPercent" not in puts[0]["spec"]["predictor"]
    assert puts[0]["spec"]["predictor"]["model"]["storageUri"] == _model(2).uri
    assert KServe(_settings(cluster)).running(second) is True


def test_a_failed_whole_model_rollout_puts_the_previous_whole_model_back(cluster):
    _deploy(cluster, _model(1))
    cluster["controller"].outcome = "fail"
    with pytest.raises(WorkloadError, match=rf"Insufficient nvidia.com/gpu.*so model {_model(1).digest} serves again"):
        _deploy(cluster, _model(2))
    isvc = _isvc(cluster)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == _model(1).uri
    assert isvc["metadata"]["annotations"]["aiplane.io/adapter"] == _model(1).digest
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def test_a_whole_model_outside_object_storage_is_refused_before_any_request(cluster):
    local = _model(1).model_copy(update={"uri": "/var/lib/aiplane/artifacts/adapters/1"})
    with pytest.raises(InputError, match="The model is at '/var/lib.*a KServe pod cannot read"):
        _deploy(cluster, local)
    assert cluster["api"].requests == []


def test_an_inference_service_aiplane_did_not_create_is_left_alone(cluster):
    theirs = inference_service(NAME, NS, KServe(_settings(cluster)).settings, "theirs", BASE.uri,
                               [{"digest": "sha256:9", "uri": "s3://b/9"}])  # fmt: skip
    theirs["metadata"]["labels"] = {}
    cluster["api"].create(theirs)
    with pytest.raises(InputError, match="was not created by aiplane"):
        _deploy(cluster, _adapter(1))
    assert _writes(cluster, "inferenceservices") == []


def test_stop_deletes_what_aiplane_created_and_nothing_else(cluster):
    endpoint, _ = _deploy(cluster, _adapter(1))
    other_settings = KServe(_settings(cluster)).settings
    unrelated = inference_service("someone-else", NS, other_settings, "their-runtime", BASE.uri,
                                  [{"digest": "sha256:9", "uri": "s3://b/9"}])  # fmt: skip
    unrelated["metadata"]["labels"] = {}
    cluster["api"].create(unrelated)
    target = KServe(_settings(cluster))
    assert target.stop(endpoint) is True
    assert _isvc(cluster) is None and cluster["api"].get("ServingRuntime", NS, "aiplane-vllm") is None
    assert cluster["api"].get("InferenceService", NS, "someone-else") is not None
    assert target.stop(endpoint) is False and target.running(endpoint) is False


def test_running_says_not_running_only_when_the_service_is_gone_and_raises_on_a_refusal_or_no_answer(cluster):
    endpoint, _ = _deploy(cluster, _adapter(1))
    target = KServe(_settings(cluster))
    cluster["api"].fail("GET", "/inferenceservices/", code=403)
    with pytest.raises(WorkloadError, match=r"answered 403.*Check the kserve target's namespace and the RBAC"):
        target.running(endpoint)
    nowhere = KServe({**_settings(cluster), "kubeconfig": None}, api_client=_unreachable_client())
    with pytest.raises(WorkloadError, match=r"nothing answered at http://127\.0\.0\.1:\d+ .*Check the kserve target's kubeconfig"):
        nowhere.running(endpoint)
    assert target.running(endpoint) is True
    cluster["api"].delete("InferenceService", NS, NAME)
    assert target.running(endpoint) is False


def _unreachable_client():
    """An ApiClient for an API server that is not there (a closed loopback port), failing at once."""
    import socket

    from kubernetes import client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    return client.ApiClient(configuration)


def test_the_target_uses_an_injected_client(cluster):
    endpoint, _ = _deploy(cluster, _adapter(1))
    with cluster["api"].api_client() as client:
        # No kubeconfig: only the injected client can reach the double.
        target = KServe({"namespace": NS, "image": IMAGE}, api_client=client)
        assert target.running(endpoint) is True


def test_openshift_ai_deployment_serves_through_kserve():
    from aiplane.core.config import load_deployment

    deployment = load_deployment(Path(__file__).parents[1] / "deployments" / "openshift-ai.yaml")
    assert deployment.serving.name == "kserve"
    settings = KServe(deployment.serving.settings).settings
    assert settings.namespace and settings.image
