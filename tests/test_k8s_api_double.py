"""The loopback Kubernetes API double answers the real ``kubernetes`` client as the API server would.

These pin the behaviour other tests rely on: if the double drifts from the
server, an engine tested against it would pass here and fail on a cluster.
"""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException  # noqa: E402

from _k8s_api_double import KubernetesApiDouble, job_controller  # noqa: E402
from conftest import CRDS  # noqa: E402

ISVC_CRD = CRDS / "serving.kserve.io_inferenceservices.yaml"
NS = "aiplane"


@pytest.fixture
def api():
    if not ISVC_CRD.is_file():
        pytest.skip(f"CRD {ISVC_CRD.name} not found in {CRDS} (set AIPLANE_CRDS_DIR to the shared crds folder)")
    with KubernetesApiDouble(crds=[ISVC_CRD]) as double:
        yield double


@pytest.fixture
def k8s(api):
    with api.api_client() as api_client:
        yield api_client


def _isvc(name: str, **predictor) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": "s3://b/m"}, **predictor}},
    }


def _status(exc: ApiException) -> dict:
    import json

    return json.loads(exc.body)


def test_the_real_client_creates_reads_lists_replaces_patches_and_deletes_a_configmap(k8s, api):
    core = client.CoreV1Api(k8s)
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings", labels={"app": "aiplane"}), data={"a": "1"})
    created = core.create_namespaced_config_map(NS, body)
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.namespace == NS

    read = core.read_namespaced_config_map("settings", NS)
    read.data["b"] = "2"
    replaced = core.replace_namespaced_config_map("settings", NS, read)
    assert replaced.data == {"a": "1", "b": "2"}
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)

    core.patch_namespaced_config_map("settings", NS, {"data": {"a": None, "c": "3"}})  # a merge patch
    core.patch_namespaced_config_map("settings", NS, [{"op": "add", "path": "/data/d", "value": "4"}])  # a JSON patch
    assert core.read_namespaced_config_map("settings", NS).data == {"b": "2", "c": "3", "d": "4"}

    assert [c.metadata.name for c in core.list_namespaced_config_map(NS, label_selector="app=aiplane").items] == ["settings"]
    assert core.list_namespaced_config_map(NS, label_selector="app=other").items == []
    assert [c.metadata.name for c in core.list_config_map_for_all_namespaces().items] == ["settings"]

    core.delete_namespaced_config_map("settings", NS)
    assert api.get("ConfigMap", NS, "settings") is None
    assert [(r.method, r.status) for r in api.requests][-1] == ("DELETE", 200)
    patches = [r.content_type for r in api.requests if r.method == "PATCH"]
    assert patches == ["application/strategic-merge-patch+json", "application/json-patch+json"]


def test_missing_and_duplicate_objects_answer_with_a_status_body_like_the_api_server(k8s):
    core = client.CoreV1Api(k8s)
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_secret("nope", NS)
    assert missing.value.status == 404
    assert _status(missing.value) | {"details": None} == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'secrets "nope" not found', "reason": "NotFound", "code": 404, "details": None,
    }

    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="s3"), string_data=None, data={"key": "c2VjcmV0"})
    core.create_namespaced_secret(NS, secret)
    with pytest.raises(ApiException) as duplicate:
        core.create_namespaced_secret(NS, secret)
    assert duplicate.value.status == 409
    assert _status(duplicate.value)["reason"] == "AlreadyExists"


def test_a_replace_with_a_stale_resource_version_is_a_conflict(k8s):
    core = client.CoreV1Api(k8s)
    first = core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={}))
    core.patch_namespaced_config_map("c", NS, {"data": {"x": "1"}})
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map("c", NS, first)
    assert stale.value.status == 409 and _status(stale.value)["reason"] == "Conflict"


def test_an_invalid_core_object_is_rejected_with_422_naming_the_field(k8s, api):
    batch = client.BatchV1Api(k8s)
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "Bad_Name"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i", "cpu": 1}]}}},
    }
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(NS, job)
    status = _status(invalid.value)
    assert (invalid.value.status, status["reason"]) == (422, "Invalid")
    fields = {cause["field"] for cause in status["details"]["causes"]}
    assert "metadata.name" in fields
    assert any(f.startswith("spec.template.spec.containers[0]") for f in fields), fields
    assert api.list("Job") == []


def test_a_watch_streams_the_changes_the_client_makes(k8s, api):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="before"), data={}))
    listed = core.list_namespaced_config_map(NS)  # what the watch resumes from: changes after this list
    seen: list[tuple[str, str]] = []

    def follow():
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_config_map, NS, resource_version=listed.metadata.resource_version,
                              timeout_seconds=10):
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                w.stop()

    watcher = threading.Thread(target=follow)
    watcher.start()
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="w"), data={}))
    core.patch_namespaced_config_map("w", NS, {"data": {"x": "1"}})
    core.delete_namespaced_config_map("w", NS)
    watcher.join(timeout=15)
    assert not watcher.is_alive()
    assert seen == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


def test_a_watch_without_a_resource_version_starts_with_what_exists_and_ends_after_its_timeout(k8s):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="old"), data={}))
    events = list(watch.Watch().stream(core.list_namespaced_config_map, NS, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "old")]


def test_a_custom_resource_is_validated_against_its_crd_schema(k8s, api):
    custom = client.CustomObjectsApi(k8s)
    args = ("serving.kserve.io", "v1beta1", NS, "inferenceservices")
    with pytest.raises(ApiException) as wrong_type:
        custom.create_namespaced_custom_object(*args, _isvc("bad", minReplicas="two"))
    status = _status(wrong_type.value)
    assert (wrong_type.value.status, status["reason"]) == (422, "Invalid")
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.predictor.minReplicas"]
    assert status["message"].startswith('InferenceService.serving.kserve.io "bad" is invalid: spec.predictor.minReplicas')

    with pytest.raises(ApiException) as unknown:
        custom.create_namespaced_custom_object(*args, _isvc("typo", minReplica=1))
    assert [c["field"] for c in _status(unknown.value)["details"]["causes"]] == ["spec.predictor.minReplica"]

    no_predictor = _isvc("empty")
    del no_predictor["spec"]["predictor"]
    with pytest.raises(ApiException) as missing:
        custom.create_namespaced_custom_object(*args, no_predictor)
    assert "predictor" in _status(missing.value)["message"]
    assert api.list("InferenceService") == []

    created = custom.create_namespaced_custom_object(*args, _isvc("good", minReplicas=1))
    assert created["metadata"]["generation"] == 1
    with pytest.raises(ApiException) as bad_patch:
        custom.patch_namespaced_custom_object(*args, "good", {"spec": {"predictor": {"maxReplicas": "many"}}})
    assert bad_patch.value.status == 422
    assert api.get("InferenceService", NS, "good")["spec"]["predictor"].get("maxReplicas") is None


def test_a_controller_moves_a_custom_resource_along_and_a_status_write_does_not_call_it_again(k8s, api):
    calls = []

    def ready(api, event, obj):
        calls.append(event)
        if event != "DELETED":
            api.set_status("InferenceService", NS, obj["metadata"]["name"],
                           {"conditions": [{"type": "Ready", "status": "True"}], "url": "http://m.example.com"})

    api.add_controller("InferenceService", ready)
    custom = client.CustomObjectsApi(k8s)
    custom.create_namespaced_custom_object("serving.kserve.io", "v1beta1", NS, "inferenceservices", _isvc("m"))
    api.wait_for(lambda: (api.get("InferenceService", NS, "m").get("status") or {}).get("url"))
    got = custom.get_namespaced_custom_object_status("serving.kserve.io", "v1beta1", NS, "inferenceservices", "m")
    assert got["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert calls == ["ADDED"]


def test_a_job_controller_runs_the_pod_and_deleting_the_job_in_the_background_takes_its_pods(k8s, api):
    ran = []

    def run(pod):
        ran.append((pod.command, pod.env))
        pod.log("hello", "bye")
        return 3, "out of luck"

    api.add_controller("Job", job_controller(run))
    client.CoreV1Api(k8s).create_namespaced_secret(
        NS, client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), data={"token": "dG9rZW4="})
    )
    batch = client.BatchV1Api(k8s)
    env = [client.V1EnvVar(name="TOKEN", value_from=client.V1EnvVarSource(
        secret_key_ref=client.V1SecretKeySelector(name="creds", key="token")))]
    batch.create_namespaced_job(NS, client.V1Job(
        metadata=client.V1ObjectMeta(name="j"),
        spec=client.V1JobSpec(backoff_limit=0, template=client.V1PodTemplateSpec(spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[client.V1Container(name="main", image="img", command=["python"], args=["-c", "x"], env=env)],
        ))),
    ))
    api.wait_for(lambda: (api.get("Job", NS, "j").get("status") or {}).get("failed"))
    assert ran == [(["python", "-c", "x"], {"TOKEN": "token"})]
    core = client.CoreV1Api(k8s)
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=j").items
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.message == "out of luck"
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "hello\nbye\n"
    assert [c.type for c in batch.read_namespaced_job_status("j", NS).status.conditions] == ["Failed"]

    batch.delete_namespaced_job("j", NS, propagation_policy="Background")
    assert api.list("Job") == [] and api.list("Pod") == []


def test_deleting_a_job_without_a_propagation_policy_orphans_its_pods_as_the_api_does(k8s, api):
    api.add_controller("Job", job_controller(lambda pod: 0))
    batch = client.BatchV1Api(k8s)
    batch.create_namespaced_job(NS, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}},
    })
    api.wait_for(lambda: (api.get("Job", NS, "j").get("status") or {}).get("succeeded"))
    batch.delete_namespaced_job("j", NS)
    assert api.list("Job") == [] and len(api.list("Pod")) == 1


def test_discovery_lists_core_and_registered_groups(k8s):
    groups = {g.name: g for g in client.ApisApi(k8s).get_api_versions().groups}
    assert {"batch", "serving.kserve.io"} <= set(groups)
    resources = client.CustomObjectsApi(k8s).get_api_resources("serving.kserve.io", "v1beta1").resources
    assert {r.name for r in resources} == {"inferenceservices", "inferenceservices/status"}
    assert "pods/log" in {r.name for r in client.CoreV1Api(k8s).get_api_resources().resources}


def test_a_following_log_read_streams_until_the_pod_ends(k8s, api):
    release = threading.Event()

    def run(pod):
        pod.log("first")
        release.wait(10)
        pod.log("second")
        return 0

    api.add_controller("Job", job_controller(run))
    client.BatchV1Api(k8s).create_namespaced_job(NS, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "f"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}},
    })
    pod = api.wait_for(lambda: next(iter(api.list("Pod", NS)), None))
    api.wait_for(lambda: api.log(NS, pod["metadata"]["name"]))
    lines = []
    core = client.CoreV1Api(k8s)
    for line in watch.Watch().stream(core.read_namespaced_pod_log, pod["metadata"]["name"], NS):
        lines.append(line)
        release.set()
    assert lines == ["first", "second"]


def test_dagster_k8s_creates_a_job_and_sees_it_succeed(k8s, api):
    from dagster_k8s import client as dagster_k8s_client
    api.add_controller("Job", job_controller(lambda pod: 0))
    dk = dagster_k8s_client.DagsterKubernetesClient(
        batch_api=client.BatchV1Api(k8s), core_api=client.CoreV1Api(k8s),
        logger=lambda message: None, sleeper=lambda s: threading.Event().wait(0.05), timer=__import__("time").time,
    )
    dk.create_namespaced_job_with_retries(client.V1Job(
        api_version="batch/v1", kind="Job", metadata=client.V1ObjectMeta(name="d"),
        spec=client.V1JobSpec(template=client.V1PodTemplateSpec(spec=client.V1PodSpec(
            restart_policy="Never", containers=[client.V1Container(name="c", image="i")]))),
    ), NS)
    dk.wait_for_job_success("d", NS, wait_timeout=10, wait_time_between_attempts=0.05)
    assert dk.get_pod_names_in_job("d", NS)
    assert dk.delete_job("d", NS) is True
    assert api.list("Job") == [] and api.list("Pod") == []


def test_the_status_subresource_is_separate_from_the_object_as_on_the_api_server(k8s, api):
    custom = client.CustomObjectsApi(k8s)
    args = ("serving.kserve.io", "v1beta1", NS, "inferenceservices")
    custom.create_namespaced_custom_object(*args, {**_isvc("s"), "status": {"url": "http://ignored"}})
    assert "status" not in api.get("InferenceService", NS, "s"), "create ignores status"
    custom.patch_namespaced_custom_object_status(*args, "s", {"status": {"url": "http://s.example.com"}})
    current = custom.get_namespaced_custom_object(*args, "s")
    current["spec"]["predictor"]["minReplicas"] = 2
    current["status"]["url"] = "http://changed-through-the-object"
    replaced = custom.replace_namespaced_custom_object(*args, "s", current)
    assert replaced["status"]["url"] == "http://s.example.com"
    assert replaced["metadata"]["generation"] == 2
    custom.patch_namespaced_custom_object(*args, "s", [{"op": "replace", "path": "/spec/predictor/minReplicas", "value": 3}])
    assert api.get("InferenceService", NS, "s")["spec"]["predictor"]["minReplicas"] == 3


def test_every_shared_crd_registers_and_a_serving_runtime_needs_its_containers(k8s):
    crds = sorted(CRDS.glob("*.yaml"))
    if not crds:
        pytest.skip(f"no CRDs in {CRDS}")
    with KubernetesApiDouble(crds=crds) as api, api.api_client() as api_client:
        groups = {g.name for g in client.ApisApi(api_client).get_api_versions().groups}
        assert {"serving.kserve.io", "ray.io", "datasciencepipelinesapplications.opendatahub.io"} <= groups
        custom = client.CustomObjectsApi(api_client)
        args = ("serving.kserve.io", "v1alpha1", NS, "servingruntimes")
        runtime = {
            "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": {"name": "vllm"},
            "spec": {"supportedModelFormats": [{"name": "huggingface", "autoSelect": True}]},
        }
        with pytest.raises(ApiException) as missing:
            custom.create_namespaced_custom_object(*args, runtime)
        assert missing.value.status == 422 and "spec.containers" in _status(missing.value)["message"]
        runtime["spec"]["containers"] = [{"name": "kserve-container", "image": "vllm/vllm-openai:v0.8.5"}]
        custom.create_namespaced_custom_object(*args, runtime)
        assert api.get("ServingRuntime", NS, "vllm")["spec"]["containers"][0]["name"] == "kserve-container"
