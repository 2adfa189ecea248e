"""The ``kfp`` engine: versioned KFP v2 pipelines, run for real with kfp.local and against a contract server."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import crd_validator
from aiplane.core.config import S3Settings, SecretRef, Target
from aiplane.core.errors import ConfigError, InputError, WorkloadCancelled, WorkloadError
from aiplane.core.plugins import Registry
from aiplane.core.records import AdapterRecord, FeaturesRecord
from aiplane.core.storage import local_path
from aiplane.core.workload import Workload
from aiplane.plugins.kfp.pipeline import compile_workload
from aiplane.plugins.kfp.settings import KfpSettings

from _kfp_contract_server import FakeKfp

REPO = Path(__file__).resolve().parents[1]
LOCAL = Target(name="kfp-local", engine="kfp", region="eu")
REMOTE = Target(name="kfp", engine="kfp", region="eu")
IMAGE = "quay.io/example/aiplane:0.1.0"
TOKEN_ENV = "AIPLANE_TEST_KFP_TOKEN"
TOKEN = "sha256~t0ken-that-must-never-leak-7f3a9c"
# Tiny but real LoRA training: a few seconds inside the kfp.local task on a 2-core CPU.
TINY_LORA = dict(
    r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], max_steps=8, batch_size=4, seq_len=32,
    learning_rate=0.01, seed=0, eval_limit=4, log_every=4, max_new_tokens=4,
)


def _echo(name: str = "x", **kw) -> Workload:
    return Workload(name="echo", entrypoint="_workloads:echo", params={"name": name}, **kw)


def _features(snapshot_id: int = 1) -> FeaturesRecord:
    return FeaturesRecord(
        uri=f"iceberg://t/aiplane.tickets?snapshot={snapshot_id}", digest=f"iceberg-snapshot:{snapshot_id}",
        table="aiplane.tickets", snapshot_id=snapshot_id, row_count=10,
        columns=("id", "prompt", "completion", "residency", "split"), residency=("eu",),
    )


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def tiny_base_model(tmp_path_factory):
    from aiplane.plugins.peft.base_model import build_tiny_granite, resolve

    home = tmp_path_factory.mktemp("home")
    return resolve(str(build_tiny_granite(home / "tiny-granite")), str(home))


@pytest.fixture
def local_engine(tmp_path):
    return Registry().engine("kfp", {"pipeline_root": str(tmp_path / "kfp")})


# -- compiling and versioning -------------------------------------------------------------------


def test_same_code_and_config_compile_to_identical_yaml_and_version():
    settings = KfpSettings(base_image=IMAGE)
    first, second = compile_workload(_echo(), LOCAL, settings), compile_workload(_echo(), LOCAL, settings)
    assert first.spec == second.spec and first.digest == second.digest
    assert first.version == "sha256-" + first.digest.removeprefix("sha256:")
    # Another process (another Dagster run), another hash seed: the same bytes.
    script = (
        "import sys; from aiplane.core.config import Target; from aiplane.core.workload import Workload; "
        "from aiplane.plugins.kfp.pipeline import compile_workload; from aiplane.plugins.kfp.settings import KfpSettings; "
        "print(compile_workload(Workload.model_validate_json(sys.argv[1]), Target.model_validate_json(sys.argv[2]), "
        "KfpSettings.model_validate_json(sys.argv[3])).digest)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, _echo().model_dump_json(), LOCAL.model_dump_json(), settings.model_dump_json()],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip() == first.digest


def test_a_workload_run_again_reuses_its_compiled_spec_and_a_changed_one_is_compiled_anew(monkeypatch):
    from aiplane.plugins.kfp import pipeline

    settings = Registry().engine("kfp").settings
    compiled, real = [], pipeline._compile
    monkeypatch.setattr(pipeline, "_compile", lambda *a: compiled.append(a[0].params) or real(*a))
    monkeypatch.setattr(pipeline, "_SPECS", type(pipeline._SPECS)())
    first = compile_workload(_echo("a"), LOCAL, settings)
    again = compile_workload(_echo("a", run_id="run-2"), LOCAL, settings, "/tmp/r2.json")
    changed = compile_workload(_echo("b"), LOCAL, settings)
    assert compiled == [{"name": "a"}, {"name": "b"}]
    assert again.digest == first.digest and again.arguments["run_id"] == "run-2" and again.arguments["result_path"] == "/tmp/r2.json"
    assert changed.digest != first.digest
    pipeline._SPECS.clear()
    assert compile_workload(_echo("a"), LOCAL, settings).spec == first.spec, "what the cache gave is what compiling gives"


def test_run_specific_values_are_run_arguments_not_part_of_the_spec():
    settings = KfpSettings(base_image=IMAGE)
    a = compile_workload(_echo(run_id="run-aaaa", inputs={"features": _features(1)}), LOCAL, settings, "/r/a.json")
    b = compile_workload(_echo(run_id="run-bbbb", inputs={"features": _features(2)}), LOCAL, settings, "/r/b.json")
    assert a.digest == b.digest
    for value in ("run-aaaa", "iceberg://t/aiplane.tickets", "/r/a.json"):
        assert value not in a.spec
    assert set(a.arguments) == {"run_id", "inputs_json", "result_path", "run_params_json"}
    assert a.arguments["run_id"] == "run-aaaa" and a.arguments["result_path"] == "/r/a.json"
    assert json.loads(a.arguments["inputs_json"])["features"]["snapshot_id"] == 1
    # A factsheet document changes every run: it is a run argument too, not a new version.
    doc1 = Workload(name="publish", entrypoint="m:f", params={"document": {"run": 1}, "directory": "/d"})
    doc2 = doc1.model_copy(update={"params": {"document": {"run": 2}, "directory": "/d"}})
    assert compile_workload(doc1, LOCAL, settings).digest == compile_workload(doc2, LOCAL, settings).digest


def test_changed_hyperparameter_default_is_a_new_version(tiny_base_model, tmp_path):
    settings = KfpSettings(base_image=IMAGE)

    def digest(**change):
        trainer = Registry().create("trainer", "lora", {**TINY_LORA, **change})
        return compile_workload(trainer.workload(tiny_base_model, _features(), str(tmp_path)), LOCAL, settings).digest

    assert digest() == digest()
    assert digest(learning_rate=0.02) != digest()
    spec = yaml.safe_load(compile_workload(
        Registry().create("trainer", "lora", TINY_LORA).workload(tiny_base_model, _features(), str(tmp_path)), LOCAL, settings
    ).spec)
    defaults = json.loads(spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"])
    assert defaults["settings"]["learning_rate"] == 0.01


def test_target_resources_are_compiled_into_the_task():
    settings = KfpSettings(
        base_image=IMAGE, cpu_limit="4", memory_request="8Gi", memory_limit="16Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "toleration_seconds": 300}],
        pvc_mounts={"aiplane-data": "/mnt/aiplane"},
    )
    gpu_target = Target(name="kfp-gpu", engine="kfp", region="eu", gpus=2)
    workload = Workload(name="train", entrypoint="m:f", resources={"cpus": 2.5, "gpus": 1})
    main, platform = yaml.safe_load_all(compile_workload(workload, gpu_target, settings).spec)
    executor = next(iter(main["deploymentSpec"]["executors"].values()))["container"]
    assert executor["image"] == IMAGE
    res = executor["resources"]
    assert res["resourceCpuRequest"] == "2500m" and res["resourceCpuLimit"] == "4"
    assert res["resourceMemoryRequest"] == "8Gi" and res["resourceMemoryLimit"] == "16Gi"
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
    k8s = next(iter(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()))
    assert k8s["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}
    assert k8s["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": "300"}
    ]
    assert k8s["pvcMount"] == [
        {"constant": "aiplane-data", "mountPath": "/mnt/aiplane", "pvcNameParameter": {"runtimeValue": {"constant": "aiplane-data"}}}
    ]
    # A workload asking for no GPU on a GPU target gets the target's GPUs (the deployment placed it there).
    main, _ = yaml.safe_load_all(compile_workload(Workload(name="t", entrypoint="m:f"), gpu_target, settings).spec)
    assert next(iter(main["deploymentSpec"]["executors"].values()))["container"]["resources"]["accelerator"]["resourceCount"] == "2"


def test_workload_needing_more_gpus_than_the_target_is_rejected_before_anything_runs(local_engine, tmp_path):
    workload = Workload(name="train", entrypoint="m:f", resources={"gpus": 4})
    with pytest.raises(ConfigError, match=r"asks for 4 GPU\(s\) but target 'kfp-local' has 0"):
        local_engine.run(workload, LOCAL, lambda e: None)
    assert not (tmp_path / "kfp").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "remote"}, "mode 'remote' needs host, base_image, results_dir"),
        ({"cpu_request": "two"}, "not a CPU quantity"),
        ({"memory_limit": "1.5G"}, "not a memory quantity"),
        ({"token": "plain-text-token"}, "token"),
        ({"host": "kfp.example.com"}, "must start with https://"),
        ({"run_url": "{host}/runs/{run}"}, "unknown placeholder"),
        ({"nodeselector": {}}, "Unknown setting 'nodeselector'.*Did you mean 'node_selector'"),
        ({"token": {"env": "T"}, "token_path": "/t"}, "not both"),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        Registry().engine("kfp", settings)


def test_importing_the_plugin_and_listing_engines_does_not_import_kfp():
    code = (
        "import sys; from aiplane.core.plugins import Registry; "
        "assert 'kfp' in Registry().components('engine'); print('kfp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- local: the same pipeline through kfp.local ---------------------------------------------------


def test_local_run_returns_output_records_and_streams_events_in_order(workload_path, local_engine, tmp_path):
    events = []
    result = local_engine.run(_echo("local"), LOCAL, events.append)
    assert result.outputs["out"].uri == "/tmp/local" and result.metrics["pid"] != os.getpid()
    workload_events = [str(e) for e in events if e.message.startswith("line") or e.type == "metric"]
    assert workload_events == ["line 0", "progress=0 (step 0)", "line 1", "progress=1 (step 1)", "line 2", "progress=2 (step 2)"]
    assert any("finished with status SUCCESS" in e.message for e in events)
    assert not any("executor_input" in e.message or "parameterValues" in e.message for e in events)
    meta = result.engine
    assert meta["pipeline"] == "aiplane-echo" and meta["pipeline_version"].startswith("sha256-")
    assert meta["run_id"].startswith("aiplane-echo-") and meta["run_url"].startswith("file://")
    # The task also wrote the result to its KFP output artifact, and the spec is kept by version.
    assert json.loads(Path(meta["result_artifact"]).read_text())["outputs"]["out"]["uri"] == "/tmp/local"
    assert Path(meta["pipeline_spec"]).read_text() == compile_workload(_echo("local"), LOCAL, local_engine.settings).spec


def test_local_workload_error_keeps_its_class_and_a_crash_shows_the_last_output(workload_path, local_engine):
    with pytest.raises(InputError, match="training set is empty"):
        local_engine.run(Workload(name="bad", entrypoint="_workloads:bad_input"), LOCAL, lambda e: None)
    with pytest.raises(WorkloadError, match=r"no result(.|\n)*about to crash"):
        local_engine.run(Workload(name="crash", entrypoint="_workloads:crash"), LOCAL, lambda e: None)


def test_cancelling_a_local_run_kills_the_kfp_local_task(workload_path, local_engine):
    cancel, pids = threading.Event(), []

    def on_event(event):
        if event.message.startswith("sleeping in"):
            pids.append(int(event.message.split()[-1]))
            cancel.set()

    started = time.monotonic()
    with pytest.raises(WorkloadCancelled):
        local_engine.run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), LOCAL, on_event, cancel)
    assert time.monotonic() - started < 30
    assert len(pids) == 1 and _gone(pids[0])


def test_the_next_local_run_is_handed_the_runner_the_last_one_started_and_runs_as_a_new_one(workload_path, local_engine):
    from aiplane.plugins.kfp import standby

    try:
        first = local_engine.run(_echo("first"), LOCAL, lambda e: None)
        events = []
        second = local_engine.run(_echo("second"), LOCAL, events.append)
        assert second.engine["prestarted"] is True and second.outputs["out"].uri == "/tmp/second"
        assert second.engine["pid"] != first.engine["pid"], "each run is a runner process of its own"
        assert second.engine["run_id"] != first.engine["run_id"]
        workload_events = [str(e) for e in events if e.message.startswith("line") or e.type == "metric"]
        assert workload_events == ["line 0", "progress=0 (step 0)", "line 1", "progress=1 (step 1)", "line 2", "progress=2 (step 2)"]
    finally:
        standby._discard_all()


def test_a_kfp_runner_started_before_the_environment_changed_is_not_used(workload_path, local_engine, monkeypatch):
    from aiplane.plugins.kfp import standby

    try:
        assert local_engine.prestart("_workloads:echo", wait_s=120)
        (waiting,) = standby._RUNNERS.values()
        monkeypatch.setenv("AIPLANE_TEST_CHANGED", "1")
        events = []
        result = local_engine.run(_echo("changed"), LOCAL, events.append)
        assert "prestarted" not in result.engine and result.outputs["out"].uri == "/tmp/changed"
        assert any("not used" in e.message and "AIPLANE_TEST_CHANGED" in e.message for e in events)
        assert _gone(waiting.proc.pid)
    finally:
        standby._discard_all()


def test_an_unused_kfp_runner_ends_with_the_process_that_started_it(tmp_path):
    code = (
        "import os\n"
        "from aiplane.core.plugins import Registry\n"
        "from aiplane.plugins.kfp import standby\n"
        f"assert Registry().engine('kfp', {{'pipeline_root': {str(tmp_path)!r}}}).prestart('x:y', wait_s=120)\n"
        "(waiting,) = standby._RUNNERS.values()\n"
        "print(waiting.proc.pid, flush=True)\n"
        "os._exit(0)  # as if killed: no atexit clean-up\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    runner = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not _gone(runner) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(runner)


def test_lora_trainer_on_kfp_local_produces_an_adapter_peft_can_load(workload_path, local_engine, tiny_base_model, tmp_path):
    import pyarrow as pa
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aiplane.core.sample import generate_tickets, to_features

    store = Registry().create(
        "feature store", "iceberg", {"catalog_uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "warehouse")}
    )
    features = store.publish(pa.Table.from_pylist(to_features(generate_tickets(120))), "tickets")
    workload = Registry().create("trainer", "lora", TINY_LORA).workload(tiny_base_model, features, str(tmp_path / "artifacts"))
    events = []
    result = local_engine.run(workload, LOCAL, events.append)
    adapter = result.outputs["adapter"]
    assert isinstance(adapter, AdapterRecord) and adapter.run_id == workload.run_id
    assert adapter.source("features") == features and adapter.source("base_model") == tiny_base_model
    assert any(e.type == "metric" and e.name == "train_loss" for e in events)
    assert result.engine["pipeline"] == "aiplane-train-adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_model.uri), local_path(adapter.uri))
    assert any("lora_A" in name for name, _ in model.named_parameters())


# -- remote: contract tests against a loopback KFP v2beta1 API server ------------------------------


@pytest.fixture
def fake(tmp_path, monkeypatch, workload_path):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with FakeKfp(tmp_path / "server", token=TOKEN) as server:
        yield server


def _remote(host: str, tmp_path: Path, **extra):
    settings = {
        "mode": "remote", "host": host, "namespace": "aiplane", "base_image": IMAGE,
        "results_dir": str(tmp_path / "results"), "token": {"env": TOKEN_ENV},
        "poll_interval_s": 0.05, "poll_max_interval_s": 0.2, "connect_timeout_s": 2, **extra,
    }
    return Registry().engine("kfp", settings)


def test_remote_run_uploads_a_digest_named_version_runs_it_and_returns_the_records(fake, tmp_path):
    events = []
    workload = _echo("remote", inputs={"features": _features(7)})
    result = _remote(fake.url, tmp_path).run(workload, REMOTE, events.append)
    assert result.outputs["out"].uri == "/tmp/remote"
    route = [(c.method, c.path.removeprefix("/apis/v2beta1")) for c in fake.calls]
    assert route[:8] == [
        ("GET", "/healthz"), ("GET", "/pipelines"), ("POST", "/pipelines"), ("GET", "/pipelines/pipeline-1/versions"),
        ("POST", "/pipelines/upload_version"), ("GET", "/experiments"), ("POST", "/experiments"), ("POST", "/runs"),
    ]
    assert {c.authorization for c in fake.calls} == {f"Bearer {TOKEN}"}
    (version,) = fake.versions.values()
    compiled = compile_workload(workload, REMOTE, KfpSettings.model_validate(_remote(fake.url, tmp_path).settings.model_dump()))
    assert version["display_name"] == compiled.version and fake.specs[version["pipeline_version_id"]] == compiled.spec
    (run_call,) = fake.calls_to("POST", "/apis/v2beta1/runs")
    params = run_call.body["runtime_config"]["parameters"]
    assert set(params) == {"run_id", "inputs_json", "result_path", "run_params_json"} and params["run_id"] == workload.run_id
    assert run_call.body["pipeline_version_reference"]["pipeline_version_id"] == version["pipeline_version_id"]
    meta = result.engine
    assert meta["pipeline"] == "aiplane-echo" and meta["pipeline_digest"] == compiled.digest
    assert meta["run_id"] == "run-4" and meta["run_url"] == f"{fake.url}/#/runs/details/run-4"
    assert [e.message for e in events if e.message.startswith("KFP run run-4:")][-1] == "KFP run run-4: SUCCEEDED"
    assert not any((tmp_path / "results").rglob("*.json")), "the result file is removed once read"


def test_second_upload_of_the_same_spec_reuses_the_version_and_a_changed_spec_adds_one(fake, tmp_path):
    engine = _remote(fake.url, tmp_path)
    first = engine.run(_echo("same"), REMOTE, lambda e: None)
    second = engine.run(_echo("same"), REMOTE, lambda e: None)
    assert len(fake.calls_to("POST", "/apis/v2beta1/pipelines/upload_version")) == 1 and len(fake.versions) == 1
    assert not first.engine["version_reused"] and second.engine["version_reused"]
    assert second.engine["pipeline_version_id"] == first.engine["pipeline_version_id"]
    assert len(fake.calls_to("POST", "/apis/v2beta1/pipelines")) == 1  # the pipeline is created once too
    third = engine.run(_echo("changed default"), REMOTE, lambda e: None)
    assert len(fake.versions) == 2 and third.engine["pipeline_digest"] != first.engine["pipeline_digest"]


def test_cancel_terminates_the_kfp_run(fake, tmp_path):
    cancel = threading.Event()

    def on_event(event):
        if event.message.endswith(": RUNNING"):
            cancel.set()

    with pytest.raises(WorkloadCancelled, match=r"/#/runs/details/run-4"):
        _remote(fake.url, tmp_path).run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), REMOTE, on_event, cancel)
    assert len(fake.calls_to("POST", r"/apis/v2beta1/runs/run-4:terminate")) == 1
    run = fake.runs["run-4"]
    assert run.proc.poll() is not None and run.record["state"] in ("CANCELING", "CANCELED")


def test_interrupting_the_caller_terminates_the_kfp_run(fake, tmp_path):
    """Dagster run termination raises inside engine.run; the KFP run must not outlive it."""

    class Interrupted(BaseException):
        pass

    def on_event(event):
        if event.message.endswith(": RUNNING"):
            raise Interrupted()

    with pytest.raises(Interrupted):
        _remote(fake.url, tmp_path).run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), REMOTE, on_event)
    assert len(fake.calls_to("POST", r"/apis/v2beta1/runs/run-4:terminate")) == 1
    assert fake.runs["run-4"].proc.poll() is not None


def test_run_past_its_timeout_is_terminated(fake, tmp_path):
    engine = _remote(fake.url, tmp_path, timeout_s=0.5)
    with pytest.raises(WorkloadError, match=r"did not finish within 0.5 s"):
        engine.run(Workload(name="sleep", entrypoint="_workloads:sleep_forever"), REMOTE, lambda e: None)
    assert len(fake.calls_to("POST", r"/apis/v2beta1/runs/run-4:terminate")) == 1


def test_failed_run_raises_with_the_run_url_and_returns_no_record(fake, tmp_path):
    engine = _remote(fake.url, tmp_path)
    with pytest.raises(WorkloadError, match=r"ended FAILED(.|\n)*/#/runs/details/run-\d+"):
        engine.run(Workload(name="crash", entrypoint="_workloads:crash"), REMOTE, lambda e: None)
    # A workload that failed on purpose keeps its error class, as on every engine.
    with pytest.raises(InputError, match=r"training set is empty(.|\n)*/#/runs/details/run-\d+"):
        engine.run(Workload(name="bad", entrypoint="_workloads:bad_input"), REMOTE, lambda e: None)
    assert [r.record["state"] for r in fake.runs.values()] == ["FAILED", "FAILED"]
    assert not any((tmp_path / "results").rglob("*.json"))


def test_unreachable_host_fails_fast_naming_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(WorkloadError, match=f"Cannot reach the KFP API server at {host}") as err:
        _remote(host, tmp_path).run(_echo(), REMOTE, lambda e: None)
    assert time.monotonic() - started < 5 and TOKEN not in str(err.value)


def test_rejected_token_is_a_clear_error_without_the_token(fake, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "an-expired-token-0000")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"token rejected by {fake.url}.*check the secret {TOKEN_ENV}") as err:
        _remote(fake.url, tmp_path).run(_echo(), REMOTE, lambda e: None)
    assert time.monotonic() - started < 5
    assert "an-expired-token-0000" not in str(err.value)
    assert [c.path for c in fake.calls] == ["/apis/v2beta1/healthz"] and not fake.pipelines


def test_missing_token_secret_fails_before_any_request(fake, tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        _remote(fake.url, tmp_path).run(_echo(), REMOTE, lambda e: None)
    assert fake.calls == []


def test_token_file_is_read_at_call_time(fake, tmp_path):
    token_file = tmp_path / "token"
    engine = _remote(fake.url, tmp_path, token=None, token_path=str(token_file))  # need not exist yet
    with pytest.raises(ConfigError, match=f"Cannot read the KFP token from {token_file}"):
        engine.run(_echo(), REMOTE, lambda e: None)
    assert fake.calls == []
    token_file.write_text(TOKEN + "\n")
    assert engine.run(_echo(), REMOTE, lambda e: None).outputs["out"].uri == "/tmp/x"
    assert {c.authorization for c in fake.calls} == {f"Bearer {TOKEN}"}


def test_token_never_appears_in_logs_events_results_or_the_spec(fake, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    events = []
    result = _remote(fake.url, tmp_path).run(_echo("leak"), REMOTE, events.append)
    out, err = capfd.readouterr()
    sinks = {
        "logs": caplog.text, "stdout": out, "stderr": err,
        "events": "\n".join(e.model_dump_json() for e in events),
        "result": result.model_dump_json(), "engine metadata": json.dumps(result.engine),
        "uploaded specs": "\n".join(fake.specs.values()),
        "run requests": json.dumps([c.body for c in fake.calls if c.body is not None]),
        "settings": repr(_remote(fake.url, tmp_path).settings),
    }
    assert {name: TOKEN in text for name, text in sinks.items()} == {name: False for name in sinks}
    assert fake.calls and {c.authorization for c in fake.calls} == {f"Bearer {TOKEN}"}


# -- the OpenShift AI pipeline server manifest ----------------------------------------------------


def _dspa_validator():
    return crd_validator("datasciencepipelinesapplications.opendatahub.io_datasciencepipelinesapplications.yaml")


def _dspa():
    return yaml.safe_load((REPO / "deployments" / "openshift-ai" / "dspa.yaml").read_text())


def test_dspa_manifest_validates_against_the_crd_schema():
    doc = _dspa()
    assert doc["kind"] == "DataSciencePipelinesApplication" and doc["spec"]["dspVersion"] == "v2"
    assert list(_dspa_validator().iter_errors(doc)) == []
    creds = doc["spec"]["objectStorage"]["externalStorage"]["s3CredentialsSecret"]
    assert set(creds) == {"secretName", "accessKey", "secretKey"}  # a reference, never the keys themselves


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("spec", "objectStorge"), {"minio": {"image": "x"}}, "Additional properties are not allowed"),
        (("spec", "objectStorage", "externalStorage", "s3CredentialsSecret", "secretname"), "x", "Additional properties"),
        (("spec", "apiServer", "enableOauth"), "yes", "is not of type 'boolean'"),
        (("spec", "persistenceAgent", "numWorkers"), "two", "is not of type 'integer'"),
    ],
)
def test_dspa_with_a_misspelled_field_or_wrong_type_is_rejected(path, value, message):
    doc = _dspa()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = [e.message for e in _dspa_validator().iter_errors(doc)]
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("routed", [False, True], ids=["storage-s3", "region-store"])
def test_remote_results_travel_through_object_storage_and_pods_get_credentials_from_secrets(
    routed, fake, tmp_path, monkeypatch
):
    """Through the deployment's store, or through the store of the region the workload is placed in
    (a route: its own endpoint and Secret, with the default store unreachable)."""
    from _s3 import dead_endpoint, s3_server

    with s3_server() as s3:
        bucket = s3.create_bucket()
        # What the Secret `aiplane-s3` mounts in the pod; the fake runs the pod's code in a local process.
        monkeypatch.setenv("AIPLANE_S3_ACCESS_KEY", s3.access_key_id)
        monkeypatch.setenv("AIPLANE_S3_SECRET_KEY", s3.secret_access_key)
        storage = S3Settings(
            endpoint=s3.endpoint_url,
            access_key_id=SecretRef(secret="aiplane-s3", key="access_key"),
            secret_access_key=SecretRef(secret="aiplane-s3", key="secret_key"),
        )
        default = S3Settings(
            endpoint=dead_endpoint(), access_key_id=SecretRef(secret="default-store", key="access_key"),
            secret_access_key=SecretRef(secret="default-store", key="secret_key"),
        )  # fmt: skip
        where = {"s3": default, "s3_routes": {f"s3://{bucket}/runs": storage}}
        workload = _echo("via-s3").model_copy(update=where if routed else {"s3": storage})
        result = _remote(fake.url, tmp_path, results_dir=f"s3://{bucket}/runs").run(workload, REMOTE, lambda e: None)
        assert result.outputs["out"].uri == "/tmp/via-s3"
        keys = [o["Key"] for o in s3.boto3_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [k for k in keys if k.endswith(".json")], "the result is removed once read"
    (spec,) = fake.specs.values()
    platform = list(yaml.safe_load_all(spec))[-1]["platforms"]["kubernetes"]
    (executor,) = platform["deploymentSpec"]["executors"].values()
    def mount(secret: str) -> dict:
        prefix = secret.upper().replace("-", "_")
        return {
            "secretName": secret,
            "secretNameParameter": {"runtimeValue": {"constant": secret}},
            "keyToEnv": [
                {"secretKey": "access_key", "envVar": f"{prefix}_ACCESS_KEY"},
                {"secretKey": "secret_key", "envVar": f"{prefix}_SECRET_KEY"},
            ],
        }

    # Routed, the pod gets both stores' Secrets: the default's (for a base model, say) and the region's.
    secrets = sorted(executor["secretAsEnv"], key=lambda m: m["secretName"])
    assert secrets == ([mount("aiplane-s3"), mount("default-store")] if routed else [mount("aiplane-s3")])
    assert s3.secret_access_key not in spec, "no credential value is compiled into the pipeline"


def test_a_pipeline_pod_cannot_read_this_processes_environment_so_env_references_are_refused():
    workload = _echo("env-ref").model_copy(
        update={"s3": S3Settings(access_key_id=SecretRef(env="MY_KEY"), secret_access_key=SecretRef(env="MY_SECRET"))}
    )
    with pytest.raises(ConfigError, match=r"SecretRef\(env='MY_KEY'\).*reference a Kubernetes Secret instead"):
        compile_workload(workload, REMOTE, KfpSettings(mode="remote", host="https://kfp", base_image="img", results_dir="s3://b/r"))


def test_remote_check_names_storage_credentials_the_pipeline_pods_cannot_see_and_local_mode_does_not(tmp_path):
    from aiplane.core.config import StorageSettings, load_deployment

    storage = StorageSettings.model_validate({
        "root": "s3://bucket/aiplane",
        "s3": {"access_key_id": {"secret": "cos", "key": "id"}, "secret_access_key": {"env": "MY_SECRET"}},
    })
    deployment = load_deployment("local", home=tmp_path).model_copy(update={"storage": storage})
    (problem,) = _remote("https://dsp.example.com", tmp_path).check(deployment)
    assert problem.startswith("storage.s3.secret_access_key is SecretRef(env='MY_SECRET')")
    assert "reference a Kubernetes Secret" in problem
    assert Registry().engine("kfp", {}).check(deployment) == []
