"""The ``k8s-job`` engine against the loopback Kubernetes API double.

The double's Job controller plays the kubelet: it runs the pod's real command
(``python -m aiplane.plugins.k8s.task``) in a subprocess with the pod's
environment, as the manifest says (secrets resolved from the double's Secrets),
streams its output into the pod log and ends the pod with its exit code and
termination message. So a result here is the workload's real result, carried
back through ``results_dir`` the way it is on a cluster.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _k8s_api_double import KubernetesApiDouble, PodRun, job_controller
from conftest import TESTS  # noqa: E402

from aiplane.core.config import S3Settings, SecretRef, Target  # noqa: E402
from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError  # noqa: E402
from aiplane.core.workload import Resources, Workload  # noqa: E402
from aiplane.plugins.k8s.engine import K8sJobEngine  # noqa: E402
from aiplane.plugins.k8s.task import TERMINATION_ENV  # noqa: E402

NS = "aiplane-jobs"
CPU = Target(name="cluster", engine="k8s-job", region="eu")
GPU = Target(name="gpu-cluster", engine="k8s-job", region="eu", gpus=2, gpu_type="NVIDIA-A100-SXM4-80GB")
# What a pod inherits from its image rather than its manifest, and where the tests keep caches.
_IMAGE_ENV = ("PATH", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "HOME", "TMPDIR")


def _kubelet(tmp: Path, started: list[int]):
    """Run the pod's command as the container would: its env, its command, its log, its termination message."""

    def run(pod: PodRun):
        termination = tmp / f"{pod.name}.termination-log"
        env = {
            **{k: os.environ[k] for k in _IMAGE_ENV if k in os.environ},
            **pod.env,
            "PYTHONPATH": str(TESTS),  # the image holds the workloads' code
            TERMINATION_ENV: str(termination),
        }
        proc = subprocess.Popen(
            pod.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        started.append(proc.pid)
        # The kubelet kills the container when its pod goes: SIGTERM, then SIGKILL after the grace period.
        killer = threading.Thread(target=lambda: pod.stopped.wait() and _stop(proc), daemon=True)
        killer.start()
        for line in proc.stdout:
            pod.log(line)
        code = proc.wait()
        pod.stopped.set()
        message = termination.read_text() if termination.exists() else ""
        return code, message

    return run


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def cluster(tmp_path):
    started: list[int] = []
    with KubernetesApiDouble() as api:
        api.add_controller("Job", job_controller(_kubelet(tmp_path, started)))
        api.started = started  # the workload processes the "kubelet" started
        try:
            yield api
        finally:
            for pid in started:  # a failed test must not leave a workload running
                if not _gone(pid):
                    os.killpg(pid, signal.SIGKILL)


def _engine(api, tmp_path, **settings) -> K8sJobEngine:
    settings = {
        "image": "registry.example.com/aiplane:1.0", "namespace": NS, "results_dir": str(tmp_path / "results"),
        "python": sys.executable, "watch_timeout_s": 1, **settings,
    }
    return K8sJobEngine(settings, api_client=api.api_client())


def _echo(name: str = "k8s") -> Workload:
    return Workload(name="echo", entrypoint="_workloads:echo", params={"name": name})


def _nothing_left(api) -> None:
    assert api.list("Job", NS) == [] and api.list("Pod", NS) == []


def test_a_workload_runs_as_a_job_and_its_result_and_log_come_back(cluster, tmp_path):
    events = []
    result = _engine(cluster, tmp_path).run(_echo(), CPU, events.append)

    assert result.outputs["out"].uri == "/tmp/k8s"
    assert result.metrics["pid"] == cluster.started[0] != os.getpid()
    workload_events = [str(e) for e in events if e.message.startswith("line") or e.type == "metric"]
    assert workload_events == ["line 0", "progress=0 (step 0)", "line 1", "progress=1 (step 1)", "line 2", "progress=2 (step 2)"]
    messages = [e.message for e in events]
    assert any(m.startswith("pod aiplane-echo-") and m.endswith(": Succeeded (exit code 0)") for m in messages), messages
    assert any("k8s event Normal SuccessfulCreate" in m for m in messages), messages
    assert result.engine["engine"] == "k8s-job" and result.engine["namespace"] == NS
    assert result.engine["job"].startswith("aiplane-echo-")
    _nothing_left(cluster)
    assert list((tmp_path / "results").rglob("*.json")) == [], "the result is removed once read"
    (delete,) = [r for r in cluster.requests if r.method == "DELETE" and "/jobs/" in r.path]
    assert delete.query["propagationPolicy"] == "Background"
    assert any(r.query.get("watch") for r in cluster.requests if r.path.endswith("/jobs")), "the Job is watched, not polled"
    (create,) = [r for r in cluster.requests if r.method == "POST" and r.path.endswith("/jobs")]
    assert create.body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aiplane"


def test_the_workload_s_own_error_comes_back_with_its_class_and_nothing_is_left_behind(cluster, tmp_path):
    with pytest.raises(InputError, match="training set is empty"):
        _engine(cluster, tmp_path).run(Workload(name="bad", entrypoint="_workloads:bad_input"), CPU, lambda e: None)
    _nothing_left(cluster)


def test_a_pod_that_dies_without_a_result_fails_with_the_pod_s_message(tmp_path):
    def oom(pod: PodRun):
        pod.log("loading shards")
        return 137, "OOMKilled: the container used more than its 8Gi memory limit"

    with KubernetesApiDouble() as api:
        api.add_controller("Job", job_controller(oom))
        events = []
        with pytest.raises(WorkloadError) as failed:
            _engine(api, tmp_path).run(_echo(), CPU, events.append)
        _nothing_left(api)
    message = str(failed.value)
    assert "container exited 137 (Error): OOMKilled: the container used more than its 8Gi memory limit" in message
    assert "BackoffLimitExceeded" in message
    assert "loading shards" in [e.message for e in events]


def test_a_crashing_workload_reports_the_termination_message_its_task_wrote(cluster, tmp_path):
    with pytest.raises(WorkloadError, match="KeyError"):
        _engine(cluster, tmp_path).run(Workload(name="buggy", entrypoint="_workloads:buggy"), CPU, lambda e: None)
    _nothing_left(cluster)


def test_a_container_that_dies_at_once_fails_with_its_last_log_lines(cluster, tmp_path):
    # The process exits before the task can write a result or a termination message:
    # the pod's terminationMessagePolicy puts the log's tail in the message instead.
    with pytest.raises(WorkloadError, match=r"container exited 3 \(Error\): about to crash"):
        _engine(cluster, tmp_path).run(Workload(name="crash", entrypoint="_workloads:crash"), CPU, lambda e: None)
    _nothing_left(cluster)


def test_cancel_deletes_the_job_and_its_pods_and_stops_the_container(cluster, tmp_path):
    cancel = threading.Event()

    def on_event(event):
        if event.message.startswith("sleeping in"):
            cancel.set()

    started = time.monotonic()
    with pytest.raises(WorkloadCancelled):
        _engine(cluster, tmp_path).run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), CPU, on_event, cancel)
    assert time.monotonic() - started < 30
    _nothing_left(cluster)
    (pid,) = cluster.started
    cluster.wait_for(lambda: _gone(pid), timeout=10)


def test_an_interrupted_caller_deletes_the_job(cluster, tmp_path):
    def on_event(event):
        if event.message.startswith("sleeping in"):
            raise KeyboardInterrupt  # how a Dagster run termination reaches the engine

    with pytest.raises(KeyboardInterrupt):
        _engine(cluster, tmp_path, propagation_policy="Foreground").run(
            Workload(name="sleep", entrypoint="_workloads:sleep_forever"), CPU, on_event
        )
    _nothing_left(cluster)
    (delete,) = [r for r in cluster.requests if r.method == "DELETE" and "/jobs/" in r.path]
    assert delete.query["propagationPolicy"] == "Foreground"


def test_an_api_server_blip_while_watching_is_retried(cluster, tmp_path):
    cluster.fail("GET", r"/namespaces/aiplane-jobs/jobs$", code=503, times=2)
    events = []
    result = _engine(cluster, tmp_path).run(_echo(), CPU, events.append)
    assert result.outputs["out"].uri == "/tmp/k8s"
    assert sum("watching failed (503" in e.message for e in events) == 2
    _nothing_left(cluster)


def test_a_service_account_that_may_not_watch_jobs_gets_an_error_naming_the_verbs(cluster, tmp_path):
    cluster.fail("GET", r"/namespaces/aiplane-jobs/jobs$", code=403, times=100)
    with pytest.raises(WorkloadError, match="needs get, list and watch on jobs, pods, pods/log and events"):
        _engine(cluster, tmp_path).run(_echo(), CPU, lambda e: None)
    _nothing_left(cluster)


def test_a_missing_secret_fails_fast_with_the_kubelet_s_message(cluster, tmp_path):
    storage = S3Settings(
        access_key_id=SecretRef(secret="object-store", key="access_key"),
        secret_access_key=SecretRef(secret="object-store", key="secret_key"),
    )
    with pytest.raises(WorkloadError, match=r"CreateContainerConfigError: secret \"object-store\" not found"):
        _engine(cluster, tmp_path).run(_echo().model_copy(update={"s3": storage}), CPU, lambda e: None)
    _nothing_left(cluster)


@pytest.mark.parametrize("routed", [False, True], ids=["storage-s3", "region-store"])
def test_results_travel_through_object_storage_with_credentials_from_a_secret(routed, cluster, tmp_path):
    """Through the deployment's store, or through the store of the region the workload is placed in
    (a route: its own endpoint and Secret, with the default store unreachable and its Secret mounted too)."""
    from _s3 import dead_endpoint, s3_server

    with s3_server() as s3:
        bucket = s3.create_bucket()
        for secret in ("object-store", "default-store"):
            cluster.create({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": NS},
                "data": {"access_key": base64.b64encode(s3.access_key_id.encode()).decode(),
                         "secret_key": base64.b64encode(s3.secret_access_key.encode()).decode()},
            })
        storage = S3Settings(
            endpoint=s3.endpoint_url,
            access_key_id=SecretRef(secret="object-store", key="access_key"),
            secret_access_key=SecretRef(secret="object-store", key="secret_key"),
        )
        # This process reads the result with the same references: the Secret's keys as its env.
        os.environ.update({storage.access_key_id.env_var: s3.access_key_id,
                           storage.secret_access_key.env_var: s3.secret_access_key})
        try:
            default = S3Settings(
                endpoint=dead_endpoint(), access_key_id=SecretRef(secret="default-store", key="access_key"),
                secret_access_key=SecretRef(secret="default-store", key="secret_key"),
            )  # fmt: skip
            where = {"s3": default, "s3_routes": {f"s3://{bucket}/runs": storage}}
            result = _engine(cluster, tmp_path, results_dir=f"s3://{bucket}/runs").run(
                _echo("via-s3").model_copy(update=where if routed else {"s3": storage}), CPU, lambda e: None
            )
        finally:
            for var in (storage.access_key_id.env_var, storage.secret_access_key.env_var):
                os.environ.pop(var, None)
        assert result.outputs["out"].uri == "/tmp/via-s3"
        keys = [o["Key"] for o in s3.boto3_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert [k for k in keys if k.endswith(".json")] == [], "the result is removed once read"
    (create,) = [r for r in cluster.requests if r.method == "POST" and r.path.endswith("/jobs")]
    assert s3.secret_access_key not in str(create.body), "no credential value travels in the Job"
    (container,) = create.body["spec"]["template"]["spec"]["containers"]
    mounted = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert mounted == ({"object-store", "default-store"} if routed else {"object-store"})


def test_the_job_carries_placement_resources_and_secrets_by_reference_and_validates(tmp_path):
    import kubernetes_validate
    engine = K8sJobEngine({
        "image": "registry.example.com/aiplane:1.0", "namespace": NS, "results_dir": "s3://results/aiplane",
        "service_account": "aiplane-runner", "memory_limit": "64Gi",
        "node_selector": {"node-role.kubernetes.io/gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "secret_env": {"HF_TOKEN": {"secret": "huggingface", "key": "token"}},
        "pvc_mounts": {"aiplane-artifacts": "/mnt/artifacts"},
    }, api_client=object())
    workload = Workload(name="Train LoRA_adapter", entrypoint="_workloads:echo",
                        resources=Resources(cpus=4, memory_gb=32, gpus=0))
    manifest = engine.manifest(workload, GPU)

    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    assert manifest["metadata"]["name"].startswith("aiplane-train-lora-adapter-") and len(manifest["metadata"]["name"]) <= 63
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "32G", "nvidia.com/gpu": "2"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/gpu": "true", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "aiplane-runner" and pod["restartPolicy"] == "Never"
    assert manifest["spec"]["backoffLimit"] == 0
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "huggingface", "key": "token"}}}
    assert container["volumeMounts"] == [{"name": "pvc-0", "mountPath": "/mnt/artifacts"}]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_a_workload_wanting_more_gpus_than_the_target_is_refused_before_anything_is_sent(cluster, tmp_path):
    workload = Workload(name="big", entrypoint="_workloads:echo", resources=Resources(gpus=4))
    with pytest.raises(ConfigError, match="asks for 4 GPU"):
        _engine(cluster, tmp_path).run(workload, GPU, lambda e: None)
    assert cluster.requests == []


def test_a_storage_credential_from_this_process_s_environment_is_refused_before_anything_is_sent(cluster, tmp_path):
    workload = _echo().model_copy(
        update={"s3": S3Settings(access_key_id=SecretRef(env="MY_KEY"), secret_access_key=SecretRef(env="MY_SECRET"))}
    )
    with pytest.raises(ConfigError, match=r"SecretRef\(env='MY_KEY'\).*reference a Kubernetes Secret"):
        _engine(cluster, tmp_path).run(workload, CPU, lambda e: None)
    assert cluster.requests == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image": "i"}, "results_dir"),
        ({"image": "i", "results_dir": "s3://b/r", "namespace": "Team_A"}, "namespace 'Team_A' is not a Kubernetes name"),
        ({"image": "i", "results_dir": "s3://b/r", "memory_request": "8GB"}, "not a memory quantity"),
        ({"image": "i", "results_dir": "s3://b/r", "tolerations": [{"operator": "Sometimes"}]}, "operator"),
    ],
)
def test_invalid_settings_fail_when_the_deployment_loads(settings, message):
    with pytest.raises(ConfigError, match=message):
        K8sJobEngine(settings)


def test_the_plugin_lists_the_engine_without_importing_kubernetes_or_dagster_k8s():
    code = (
        "import sys; from aiplane.core.plugins import Registry; "
        "assert 'k8s-job' in Registry().components('engine'); "
        "print('kubernetes' in sys.modules, 'dagster_k8s' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_a_dropped_pod_log_stream_resumes_after_the_last_line_and_repeats_none():
    from kubernetes import client

    from aiplane.core.kube import follow_pod_log

    with KubernetesApiDouble() as api:
        api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": NS},
                    "spec": {"containers": [{"name": "c", "image": "i"}]}})
        api.set_status("Pod", NS, "p", {"phase": "Running"})
        api.append_log(NS, "p", "one", "two")
        lines: list[str] = []
        stop = threading.Event()
        core = client.CoreV1Api(api.api_client())
        follower = threading.Thread(target=follow_pod_log, args=(core, NS, lambda: "p", "c", lambda e: lines.append(e.message), stop))
        follower.start()
        try:
            api.wait_for(lambda: len(lines) == 2)
            api.drop_log_streams()
            api.append_log(NS, "p", "three")
            api.wait_for(lambda: len([r for r in api.requests if r.path.endswith("/log")]) == 2)
            api.set_status("Pod", NS, "p", {"phase": "Succeeded"})
            follower.join(20)
        finally:
            stop.set()
        assert not follower.is_alive() and lines == ["one", "two", "three"]
