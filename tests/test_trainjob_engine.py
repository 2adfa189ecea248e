"""The ``trainjob`` engine: Kubeflow Trainer v2 TrainJobs, against the real CRDs and the loopback Kubernetes API double.

The double's TrainJob controller resolves the TrainJob against its
ClusterTrainingRuntime (the one aiplane ships, ``deployments/openshift-ai/``) and
plays the kubelet for each node: it runs the node container's real command
(``python -m aiplane.plugins.trainjob.task``, under torchrun for several nodes) in
a subprocess with the pod's environment (secrets resolved from the double's
Secrets), so a result here is the workload's real result, carried back through
``results_dir`` as on a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from _k8s_api_double import KubernetesApiDouble, trainjob_controller
from conftest import CRDS, TESTS
from test_k8s_job_engine import _gone, _kubelet

from aiplane.core.config import S3Settings, SecretRef, StorageSettings, Target, load_deployment
from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.workload import Resources, Workload
from aiplane.plugins.trainjob.engine import GROUP, VERSION, TrainJobEngine

NS = "aiplane-train"
RUNTIME_FILE = TESTS.parent / "deployments" / "openshift-ai" / "clustertrainingruntime.yaml"
CPU = Target(name="cluster", engine="trainjob", region="eu")
GPU = Target(name="gpu-cluster", engine="trainjob", region="eu", gpus=2, gpu_type="NVIDIA-A100-SXM4-80GB")


@pytest.fixture
def cluster(tmp_path):
    started: list[int] = []
    crds = [CRDS / "trainer.kubeflow.org_trainjobs.yaml", CRDS / "trainer.kubeflow.org_clustertrainingruntimes.yaml"]
    with KubernetesApiDouble(crds=crds) as api:
        _custom(api).create_cluster_custom_object(GROUP, VERSION, "clustertrainingruntimes", _shipped_runtime())
        api.add_controller("TrainJob", trainjob_controller(_kubelet(tmp_path, started)))
        api.started = started  # the node processes the "kubelet" started
        try:
            yield api
        finally:
            for pid in started:  # a failed test must not leave a workload running
                if not _gone(pid):
                    os.killpg(pid, signal.SIGKILL)


def _custom(api):
    import kubernetes.client

    return kubernetes.client.CustomObjectsApi(api.api_client())


def _shipped_runtime() -> dict:
    return yaml.safe_load(RUNTIME_FILE.read_text())


def _engine(api, tmp_path, **settings) -> TrainJobEngine:
    settings = {
        "image": "quay.io/aiplane/aiplane:0.1.0", "namespace": NS, "runtime": "aiplane-torch",
        "results_dir": str(tmp_path / "results"), "python": sys.executable, "watch_timeout_s": 1, **settings,
    }
    return TrainJobEngine(settings, api_client=api.api_client())


def _echo(name: str = "trainjob") -> Workload:
    return Workload(name="echo", entrypoint="_workloads:echo", params={"name": name})


def _nothing_left(api) -> None:
    assert api.list("TrainJob", NS) == [] and api.list("Pod", NS) == []


def test_the_trainjob_validates_against_its_crd_and_carries_image_command_nodes_gpus_and_secret_refs(cluster):
    engine = TrainJobEngine({
        "image": "quay.io/aiplane/aiplane:0.1.0", "namespace": NS, "results_dir": "s3://results/aiplane",
        "runtime": "torch-distributed", "num_nodes": 2, "service_account": "aiplane-trainer",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "secret_env": {"HF_TOKEN": {"secret": "huggingface", "key": "token"}},
        "pvc_mounts": {"aiplane-artifacts": "/mnt/artifacts"}, "timeout_s": 3600,
    }, api_client=object())
    storage = S3Settings(access_key_id=SecretRef(secret="aiplane-cos", key="access_key_id"),
                         secret_access_key=SecretRef(secret="aiplane-cos", key="secret_access_key"))
    workload = Workload(name="Train LoRA_adapter", entrypoint="_workloads:echo", s3=storage,
                        resources=Resources(cpus=4, memory_gb=32))
    manifest = engine.manifest(workload, GPU)

    # The double checks it against the CRD's v1alpha1 schema, closed to unknown fields (422 otherwise).
    _custom(cluster).create_namespaced_custom_object(GROUP, VERSION, NS, "trainjobs", manifest, dry_run="All")
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["name"].startswith("aiplane-train-lora-adapter-") and len(manifest["metadata"]["name"]) <= 46
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 3600
    trainer = spec["trainer"]
    assert trainer["image"] == "quay.io/aiplane/aiplane:0.1.0"
    assert trainer["command"] == ["python", "-m", "torch.distributed.run", "-m", "aiplane.plugins.trainjob.task"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "4", "memory": "32G", "nvidia.com/gpu": "2"},
        "limits": {"memory": "32G", "nvidia.com/gpu": "2"},
    }
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "huggingface", "key": "token"}}
    assert env[storage.secret_access_key.env_var]["valueFrom"] == {"secretKeyRef": {"name": "aiplane-cos", "key": "secret_access_key"}}
    assert all("value" not in e for e in trainer["env"] if "valueFrom" in e), "secrets only by reference"
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["serviceAccountName"] == "aiplane-trainer"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "aiplane-artifacts"}}]
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "pvc-0", "mountPath": "/mnt/artifacts"}]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_shipped_cluster_training_runtime_validates_against_its_crd(cluster):
    # The fixture created it through the real client: the double validated it against the CRD's schema.
    assert [r.status for r in cluster.requests if r.path.endswith("/clustertrainingruntimes")] == [201]
    runtime = _shipped_runtime()
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    (container,) = node["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node" and container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_a_workload_runs_as_a_trainjob_and_its_result_and_log_come_back(cluster, tmp_path):
    events = []
    result = _engine(cluster, tmp_path).run(_echo(), CPU, events.append)

    assert result.outputs["out"].uri == "/tmp/trainjob"
    assert result.metrics["pid"] == cluster.started[0] != os.getpid()
    workload_events = [str(e) for e in events if e.message.startswith("line") or e.type == "metric"]
    assert workload_events == ["line 0", "progress=0 (step 0)", "line 1", "progress=1 (step 1)", "line 2", "progress=2 (step 2)"]
    messages = [e.message for e in events]
    assert any(m.startswith("TrainJob aiplane-train/aiplane-echo-") and "ClusterTrainingRuntime aiplane-torch" in m
               for m in messages), messages
    assert any(m.startswith("pod aiplane-echo-") and m.endswith(": Succeeded (exit code 0)") for m in messages), messages
    assert result.engine["engine"] == "trainjob" and result.engine["runtime"] == "aiplane-torch"
    assert result.engine["region"] == "eu" and result.engine["num_nodes"] == 1
    _nothing_left(cluster)
    assert list((tmp_path / "results").rglob("*.json")) == [], "the result is removed once read"
    (create,) = [r for r in cluster.requests if r.method == "POST" and r.path.endswith("/trainjobs")]
    assert create.status == 201 and create.body["spec"]["trainer"]["command"][1:] == ["-m", "aiplane.plugins.trainjob.task"]
    (delete,) = [r for r in cluster.requests if r.method == "DELETE" and "/trainjobs/" in r.path]
    assert delete.query["propagationPolicy"] == "Background"
    assert any(r.query.get("watch") for r in cluster.requests if r.path.endswith("/trainjobs")), "watched, not polled"


def test_the_workload_s_own_error_comes_back_with_its_class_and_nothing_is_left_behind(cluster, tmp_path):
    with pytest.raises(InputError, match="training set is empty"):
        _engine(cluster, tmp_path).run(Workload(name="bad", entrypoint="_workloads:bad_input"), CPU, lambda e: None)
    _nothing_left(cluster)


def test_a_failing_command_fails_the_run_with_its_message(cluster, tmp_path):
    # The process dies before the task can write a result or a termination message: the runtime's
    # terminationMessagePolicy puts the log's tail in the message, and the TrainJob's Failed condition says so.
    with pytest.raises(WorkloadError) as failed:
        _engine(cluster, tmp_path).run(Workload(name="crash", entrypoint="_workloads:crash"), CPU, lambda e: None)
    message = str(failed.value)
    assert "FailedJobs: jobset failed due to one or more job failures" in message
    assert "container exited 3 (Error): about to crash" in message
    _nothing_left(cluster)


def test_cancel_deletes_the_trainjob_and_stops_its_node(cluster, tmp_path):
    cancel = threading.Event()

    def on_event(event):
        if event.message.startswith("sleeping in"):
            cancel.set()

    started = time.monotonic()
    with pytest.raises(WorkloadCancelled):
        _engine(cluster, tmp_path, propagation_policy="Foreground").run(
            Workload(name="sleep", entrypoint="_workloads:sleep_forever"), CPU, on_event, cancel
        )
    assert time.monotonic() - started < 30
    _nothing_left(cluster)
    (delete,) = [r for r in cluster.requests if r.method == "DELETE" and "/trainjobs/" in r.path]
    assert delete.query["propagationPolicy"] == "Foreground"
    (pid,) = cluster.started
    cluster.wait_for(lambda: _gone(pid), timeout=10)


def test_an_unknown_runtime_is_refused_before_the_trainjob_is_sent(cluster, tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown ClusterTrainingRuntime 'aiplane-trch'.*aiplane-torch\. Did you mean 'aiplane-torch'\?"):
        _engine(cluster, tmp_path, runtime="aiplane-trch").run(_echo(), CPU, lambda e: None)
    assert [r for r in cluster.requests if r.path.endswith("/trainjobs")] == []


def test_a_missing_secret_fails_fast_with_the_kubelet_s_message(cluster, tmp_path):
    with pytest.raises(WorkloadError, match=r"CreateContainerConfigError: secret \"huggingface\" not found"):
        _engine(cluster, tmp_path, secret_env={"HF_TOKEN": {"secret": "huggingface", "key": "token"}}).run(
            _echo(), CPU, lambda e: None
        )
    _nothing_left(cluster)


def test_two_nodes_run_the_workload_as_two_ranks_of_one_process_group(cluster, tmp_path):
    events = []
    workload = Workload(name="ranks", entrypoint="_distributed_workloads:all_reduce_ranks")
    result = _engine(cluster, tmp_path, num_nodes=2, timeout_s=300).run(workload, CPU, events.append)

    assert result.metrics == {"world_size": 2, "rank_sum": 3.0, "backend": "gloo"}
    assert "rank 0 of 2: sum 3" in [e.message for e in events], "node 0's log is followed"
    assert len(cluster.started) == 2, "one node container per node"
    _nothing_left(cluster)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image": "i", "results_dir": "s3://b/r", "runtime": "Torch_Distributed"}, "is not a ClusterTrainingRuntime name"),
        ({"image": "i", "results_dir": "s3://b/r", "num_node": 2}, "Did you mean 'num_nodes'"),
        ({"image": "i", "results_dir": "s3://b/r", "num_nodes": 0}, "num_nodes"),
        ({"image": "i", "results_dir": "s3://b/r", "namespace": "Team_A"}, "namespace 'Team_A' is not a Kubernetes name"),
        ({"image": "quay.io/a b", "results_dir": "s3://b/r"}, "is not an image reference"),
        ({"image": "i", "results_dir": "s3://b/r", "image_pull_policy": "Always"}, "set imagePullPolicy in the ClusterTrainingRuntime"),
    ],
)
def test_invalid_settings_fail_when_the_deployment_loads(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainJobEngine(settings)


def test_check_names_storage_credentials_the_pods_cannot_see(tmp_path):
    storage = StorageSettings.model_validate({
        "root": "s3://bucket/aiplane",
        "s3": {"access_key_id": {"env": "MY_KEY"}, "secret_access_key": {"secret": "cos", "key": "secret"}},
    })
    deployment = load_deployment("local", home=tmp_path).model_copy(update={"storage": storage})
    problems = TrainJobEngine({"image": "i", "results_dir": "s3://bucket/results"}).check(deployment)
    assert problems == [
        "storage.s3.access_key_id is SecretRef(env='MY_KEY'), this process's environment, which a TrainJob's pods do not "
        "see; reference a Kubernetes Secret in the TrainJob's namespace instead: {secret: NAME, key: KEY}"
    ]


def test_aiplane_plugins_lists_the_engine_and_listing_imports_neither_kubernetes_nor_the_trainer_api(tmp_path):
    # Run away from the checkout, so the installed distribution's entry points are the ones read.
    aiplane = Path(sys.executable).with_name("aiplane")
    listed = subprocess.run([str(aiplane), "plugins"], capture_output=True, text=True, cwd=tmp_path)
    code = (
        "import sys; from aiplane.core.plugins import Registry; "
        "assert 'trainjob' in Registry().components('engine'); "
        "print('kubernetes' in sys.modules, 'kubeflow_trainer_api' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "provides engine 'trainjob'" in listed.stdout, listed.stdout + listed.stderr
    assert out.stdout.strip() == "False False"


def test_the_preflight_asks_each_targets_engine_so_check_refuses_keys_the_pods_cannot_see(tmp_path):
    from aiplane.core.plugins import Registry
    from aiplane.core.preflight import preflight

    deployment = load_deployment("openshift-ai-3", home=tmp_path)
    s3 = deployment.storage.s3.model_copy(update={"access_key_id": SecretRef(env="MY_KEY")})
    deployment = deployment.model_copy(update={"storage": deployment.storage.model_copy(update={"s3": s3})})
    problems = preflight(deployment, Registry(), offline=True)
    assert any(p.startswith("targets.trainjob: storage.s3.access_key_id is SecretRef(env='MY_KEY')") for p in problems), problems
