"""The ``vllm`` target: a real vLLM server (the CPU build, in its own environment) serving the tiny Granite.

One endpoint (``tickets``) is deployed once for the module through the local
engine (a worker process that exits afterwards) and shared. Tests run in file
order: the cheap checks first, then what reads the live endpoint, then what
changes it (new adapters, a second endpoint, a rollback, a killed server,
a whole model served as its own base model and back), and stop last. The
vLLM runtime is provisioned by the first deploy when this machine has none
(``$AIPLANE_RUNTIMES``, else a cache under the session's temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from aiplane.core.artifacts import sha256_path
from aiplane.core.config import Target
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.plugins import Registry
from aiplane.core.processes import TREE_ENV
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord, lineage
from aiplane.core.storage import local_path
from aiplane.plugins.vllm import VllmLocal
from aiplane.plugins.vllm import _server as server
from aiplane.plugins.vllm.runtime import SERVER_MODULE

NAME = "tickets"
PROMPT = "Subject: printer offline"
# Settings for deploying a whole model: without LoRA, vLLM compiles the model before its server answers (about
# 30 s more on 2 cores, with the fresh compile cache every test session has); under test is the switching, not
# the compiler. A server with LoRA on is not compiled on CPU either way.
EAGER = {"extra_args": ["--enforce-eager"]}
# In the orchestrator's environment while the module's servers start, as a deployment's S3 secret key would be
# (``storage.s3.secret_access_key: {env: ...}``).
SECRET_VAR = "AIPLANE_TEST_S3_SECRET_KEY"


# ---------------------------------------------------------------- fixtures


def _make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # Random (not zero) LoRA B, so each adapter visibly changes what the model generates.
    config = LoraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def _adapter_record(path: Path, base: BaseModelRecord, r: int = 4) -> AdapterRecord:
    return AdapterRecord(
        uri=str(path), digest=sha256_path(path), method="lora", config={"r": r}, metrics={}, run_id=path.name,
        sources=(base,),
    )  # fmt: skip


def _base_record(path: Path) -> BaseModelRecord:
    return BaseModelRecord(
        uri=str(path), digest=sha256_path(path), name=path.name, architecture="GraniteForCausalLM", parameters=1
    )


def _servers_under(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and SERVER_MODULE in cmdline and any(str(root) in a for a in cmdline):
            found.append(proc)
    return found


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: the server's parent, the deploy's worker, is gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    """The server ``pid`` and every process it started (vLLM's engine core, its workers, resource trackers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that run: the same processes (psutil tells a reused pid apart), zombies excluded."""
    left = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
    return left


def _trees_under(root: Path) -> list[psutil.Process]:
    """Every running process of a server tree (its marker in the environment) working under ``root``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and TREE_ENV in proc.environ() and proc.cwd().startswith(str(root)):
                found.append(proc)
    return found


def _broken_adapter(models, directory: Path) -> AdapterRecord:
    """An adapter whose config is fine and whose weights vLLM refuses."""
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes((Path(models["c"].uri) / "adapter_config.json").read_bytes())
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return _adapter_record(directory, models["base"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from aiplane.plugins.peft.base_model import build_tiny_granite

    root = tmp_path_factory.mktemp("vllm")
    base_dir = build_tiny_granite(root / "base")
    base = _base_record(base_dir)
    adapters = {
        key: _adapter_record(_make_adapter(base_dir, root / f"adapter-{key}", seed=seed), base)
        for key, seed in (("a", 1), ("b", 2), ("c", 3))
    }
    other_base_dir = build_tiny_granite(root / "other-base", seed=7)
    other = _adapter_record(_make_adapter(other_base_dir, root / "adapter-other", seed=4), _base_record(other_base_dir))
    wide = _adapter_record(_make_adapter(base_dir, root / "adapter-wide", seed=5, r=32), base, r=32)
    yield {"root": root, "home": root / "home", "base": base, **adapters, "other": other, "wide": wide}
    # Whatever the tests did, no server of ours (nor its scratch directory) outlives the module.
    for proc in _servers_under(root):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for directory in server.servers_dir(root / "home").glob("*"):
        server.forget(directory)


@pytest.fixture(scope="module")
def whole(models):
    """A whole model, as the real ``sft`` trainer publishes it (two steps on the tiny Granite), and a copy of it
    whose weights vLLM cannot read."""
    import shutil

    from aiplane.core.components import FEATURE_COLUMNS
    from aiplane.core.records import FeaturesRecord
    from aiplane.core.sample import generate_tickets, to_features
    from aiplane.core.workload import Workload, WorkloadContext
    from aiplane.plugins.peft.train import train

    rows = to_features(generate_tickets(40))
    features = FeaturesRecord(
        uri="iceberg://test/aiplane.tickets?snapshot=1", digest="iceberg-snapshot:1", table="aiplane.tickets",
        snapshot_id=1, row_count=len(rows), columns=FEATURE_COLUMNS, residency=("eu",),
    )  # fmt: skip
    settings = {"max_steps": 2, "batch_size": 4, "seq_len": 64, "eval_limit": 2, "max_new_tokens": 2, "learning_rate": 0.01}
    ctx = WorkloadContext(Workload(name="train-adapter", entrypoint="x:y"), lambda e: None)
    model = train(models["base"], features, rows, settings, str(models["root"] / "artifacts"), ctx, trainer="sft")
    assert model.config["full_model"] is True and model.source("base_model") == models["base"]
    broken_dir = models["root"] / "whole-broken"
    shutil.copytree(local_path(model.uri), broken_dir)
    (broken_dir / "model.safetensors").write_bytes(b"not safetensors")
    broken = model.model_copy(update={"uri": str(broken_dir), "digest": sha256_path(broken_dir)})
    return {"model": model, "broken": broken}


def _deploy(models, adapter: AdapterRecord, name: str = NAME, **settings) -> tuple[EndpointRecord, list[str]]:
    """Deploy through the local engine, as the asset does; returns the record and the workload's log lines."""
    lines: list[str] = []
    # This module is about LoRA mode, adapters loaded by request on the base model's shared server;
    # merged mode (the default) is tests/test_vllm_merged.py's.
    workload = VllmLocal({"adapters": "lora", **settings}, home=models["home"]).workload(adapter, name)
    result = Registry().engine("local").run(
        workload, Target(name="local", engine="local", region="eu"), on_event=lambda e: lines.append(str(e))
    )
    return result.outputs["endpoint"], lines


@pytest.fixture(scope="module")
def live(models):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SECRET_VAR, "s3cr3t-of-the-orchestrator")
        endpoint, lines = _deploy(models, models["a"])
        state = {"endpoint": endpoint, "lines": lines}
        yield state
        VllmLocal().stop(state["endpoint"])


def _complete(url: str, model: str, prompt: str = PROMPT, tokens: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _text(url: str, model: str) -> str:
    response = _complete(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _models(url: str) -> dict[str, str | None]:
    return {m["id"]: m["parent"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def _state(models, name: str = NAME) -> dict:
    return json.loads((models["home"] / "serving" / name / server.ENDPOINT_STATE).read_text())


# ---------------------------------------------------------------- cheap checks


def test_importing_the_plugin_loads_no_heavy_library_and_registers_vllm():
    code = (
        "import sys, aiplane.plugins.vllm\n"
        "heavy = {'torch', 'transformers', 'vllm', 'kserve', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from aiplane.core.plugins import Registry\n"
        "assert 'vllm' in Registry().components('serving target')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_setting_and_a_rank_vllm_does_not_allow_are_rejected():
    with pytest.raises(ConfigError, match="keep_previous"):
        VllmLocal({"keep_prevoius": 2})
    with pytest.raises(ConfigError, match="max_lora_rank.*one of 1, 8, 16"):
        VllmLocal({"max_lora_rank": 12})


def test_endpoint_name_that_is_not_a_safe_path_segment_is_rejected(models):
    with pytest.raises(ConfigError, match="Endpoint name '../x' is not usable"):
        VllmLocal(home=models["home"]).workload(models["a"], "../x")


def test_the_server_flags_are_the_ones_the_cluster_runtime_gets():
    from aiplane.plugins.vllm.runtime import server_args

    args = server_args("/mnt/models", "base", max_lora_rank=32, max_loras=2)
    assert args == ["--model=/mnt/models", "--served-model-name=base", "--enable-lora", "--max-lora-rank=32", "--max-loras=2"]
    with pytest.raises(ValueError, match="max_lora_rank"):
        server_args("/m", "base", max_lora_rank=12)


def test_the_servers_environment_is_allow_listed_not_the_orchestrators(monkeypatch):
    from aiplane.plugins.vllm.runtime import server_env

    for name in (SECRET_VAR, "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WATSONX_APIKEY", "PYTHONPATH", "AIPLANE_HOME"):
        monkeypatch.setenv(name, "not for the server")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = server_env()
    assert not {SECRET_VAR, "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WATSONX_APIKEY", "PYTHONPATH", "AIPLANE_HOME"} & set(env)
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["OMP_NUM_THREADS"]) == ("2", "2")
    assert env["PATH"] == os.environ["PATH"] and env["HF_HOME"] == os.environ["HF_HOME"]


def test_a_whole_models_server_takes_no_adapters(monkeypatch):
    from aiplane.plugins.vllm import target
    from aiplane.plugins.vllm.runtime import server_args, server_env

    monkeypatch.setattr(target, "has_nvidia_gpu", lambda: True)  # a GPU machine's flags: none of the CPU ones
    flags = VllmLocal({"max_model_len": 256}).settings.flags(lora=False)
    assert server_args("/m/sft", "tickets", **flags) == ["--model=/m/sft", "--served-model-name=tickets", "--max-model-len=256"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in server_env(lora=False)


def test_servers_run_eager_without_a_gpu_and_compile_with_one_unless_the_setting_says(monkeypatch):
    from aiplane.plugins.vllm import target

    for gpu, default in ((False, True), (True, False)):
        monkeypatch.setattr(target, "has_nvidia_gpu", lambda gpu=gpu: gpu)
        for lora in (True, False):
            assert ("--enforce-eager" in VllmLocal({}).settings.flags(lora)["extra"]) is default
        assert "--enforce-eager" in VllmLocal({"enforce_eager": True}).settings.flags(False)["extra"]
        assert "--enforce-eager" not in VllmLocal({"enforce_eager": False}).settings.flags(False)["extra"]
    # Said twice (in extra_args too), it is passed once.
    assert VllmLocal({"extra_args": ["--enforce-eager"]}).settings.flags(False)["extra"].count("--enforce-eager") == 1


def test_without_a_gpu_the_model_runs_in_the_engines_process_unless_extra_args_pick_an_executor(monkeypatch):
    from aiplane.plugins.vllm import target
    from aiplane.plugins.vllm.runtime import CPU_ONE_PROCESS, server_env

    monkeypatch.setattr(target, "has_nvidia_gpu", lambda: False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    for lora in (True, False):
        assert CPU_ONE_PROCESS in VllmLocal({}).settings.flags(lora)["extra"]
    # vLLM's CPU platform keeps the `uni` executor only with this set; the server's environment has it.
    assert server_env()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    mp = "--distributed-executor-backend=mp"
    assert VllmLocal({"extra_args": [mp]}).settings.flags(False)["extra"] == [mp, "--enforce-eager"]
    monkeypatch.setattr(target, "has_nvidia_gpu", lambda: True)
    assert CPU_ONE_PROCESS not in VllmLocal({}).settings.flags(False)["extra"]


def test_a_whole_model_that_is_not_a_model_directory_is_refused_before_any_server_starts(models, tmp_path):
    mislabelled = models["a"].model_copy(update={"method": "sft", "config": {"full_model": True}})
    with pytest.raises(InputError, match=r"has no config.json .* holds a LoRA adapter \(adapter_config.json\)"):
        _deploy({**models, "home": tmp_path / "home"}, mislabelled)
    without_weights = tmp_path / "no-weights"
    without_weights.mkdir()
    (without_weights / "config.json").write_bytes((Path(models["base"].uri) / "config.json").read_bytes())
    with pytest.raises(InputError, match=r"has no weights in .*no-weights"):
        _deploy({**models, "home": tmp_path / "home"}, mislabelled.model_copy(update={"uri": str(without_weights)}))
    assert not (tmp_path / "home" / "serving").exists() and not _servers_under(tmp_path)


def test_adapter_without_adapter_config_is_rejected_before_any_server_starts(models, tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    broken = models["a"].model_copy(update={"uri": str(empty)})
    with pytest.raises(InputError, match="has no adapter_config.json"):
        _deploy({**models, "home": tmp_path / "home"}, broken)
    assert not (tmp_path / "home" / "serving").exists()


def test_an_adapter_above_the_servers_max_rank_is_refused_before_any_server_starts(models, tmp_path):
    with pytest.raises(ConfigError, match=r"LoRA rank 32, above the vllm target's max_lora_rank 16"):
        _deploy({**models, "home": tmp_path / "home"}, models["wide"])
    assert not (tmp_path / "home" / "serving").exists() and not _servers_under(tmp_path)


def test_one_endpoint_one_base_model_binds_adapters_only(models):
    from aiplane.plugins.vllm.deploy import _check_same_base

    other = models["other"]
    on_base = {"endpoint": NAME, "full_model": False, "base_model_digest": models["base"].digest}
    with pytest.raises(InputError, match="one endpoint, one base model"):
        _check_same_base(on_base, NAME, other, other.source("base_model"))
    # From a whole model (its own server) an adapter of any base model moves the endpoint; none is refused.
    on_model = {"endpoint": NAME, "full_model": True, "base_model_digest": "sha256:" + "f" * 64}
    for adapter in (models["a"], other):
        _check_same_base(on_model, NAME, adapter, adapter.source("base_model"))


# ---------------------------------------------------------------- the live endpoint


def test_v1_models_is_vllms_and_lists_the_base_the_endpoint_and_its_version(models, live):
    endpoint = live["endpoint"]
    version = server.version_name(NAME, models["a"].digest)
    assert _models(endpoint.url) == {"base": None, NAME: "base", version: "base"}
    assert httpx.get(f"{endpoint.url}/version", timeout=10).json()["version"] == "0.32.0"


def test_endpoint_record_pins_what_is_served(models, live):
    endpoint: EndpointRecord = live["endpoint"]
    assert endpoint.serving == "vllm" and endpoint.model_name == NAME
    assert set(endpoint.protocols) == {"openai-completions", "openai-chat-completions"}
    assert endpoint.source("adapter_weights").digest == models["a"].digest and endpoint.handle["full_model"] is False
    state = _state(models)
    assert (state["current"], state["url"]) == (models["a"].digest, endpoint.url)
    assert endpoint.handle["pid"] == server.server_info(Path(endpoint.handle["server_dir"]))["pid"]


def test_the_endpoint_name_answers_with_its_adapter_not_the_base_model(live):
    url = live["endpoint"].url
    assert _text(url, NAME) == _text(url, server.version_name(NAME, live["endpoint"].handle["adapter"]))
    assert _text(url, NAME) != _text(url, "base")


def test_chat_completions_and_streaming_answer_through_the_endpoint_name(live):
    url = live["endpoint"].url
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "ignore_eos": True},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert streamed == _text(url, NAME)[: len(streamed)] and streamed


def test_an_unknown_model_name_is_a_404_and_the_client_names_what_exists(live):
    from aiplane.plugins.vllm import complete

    response = _complete(live["endpoint"].url, "ticket")
    assert response.status_code == 404
    with pytest.raises(InputError, match=r"serves no model 'ticket'; it serves: base, .*tickets"):
        complete(live["endpoint"].url, PROMPT, model="ticket")


def test_the_server_outlives_the_process_that_deployed_it_and_is_running(live):
    pid = live["endpoint"].handle["pid"]
    assert psutil.Process(pid).is_running()
    assert VllmLocal().running(live["endpoint"]) is True


def test_the_server_and_every_process_it_started_see_no_secret_of_the_orchestrator(live):
    assert os.environ[SECRET_VAR], "the orchestrator (and the worker that deployed) has the secret"
    tree = _tree(live["endpoint"].handle["pid"])
    assert len(tree) >= 2, "vLLM's engine core runs in a process of its own"
    for proc in tree:
        env = proc.environ()
        assert SECRET_VAR not in env, f"{proc.cmdline()[:3]} can read the orchestrator's secret"
        assert env["HF_HOME"] == os.environ["HF_HOME"], "what the server needs still reaches it"


def test_the_server_listens_on_loopback_only(live):
    proc = psutil.Process(live["endpoint"].handle["pid"])
    connections = getattr(proc, "net_connections", proc.connections)(kind="inet")
    listening = {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}


# ---------------------------------------------------------------- changing what is served


def test_a_second_adapter_is_served_by_the_same_process_at_the_same_url(models, live):
    before = live["endpoint"]
    old_text = _text(before.url, NAME)
    after, lines = _deploy(models, models["b"])
    assert (after.url, after.handle["pid"]) == (before.url, before.handle["pid"])
    assert not any("starting the vLLM server" in line for line in lines)
    assert _text(after.url, NAME) != old_text
    # The previous version stays loaded for rollback and still answers as it did.
    assert _text(after.url, server.version_name(NAME, models["a"].digest)) == old_text
    assert VllmLocal().running(before) is False and VllmLocal().running(after) is True
    live["endpoint"] = after


def test_older_versions_than_keep_previous_are_unloaded(models, live):
    after, lines = _deploy(models, models["c"], keep_previous=1)
    loaded = _models(after.url)
    assert server.version_name(NAME, models["a"].digest) not in loaded
    assert {server.version_name(NAME, models[k].digest) for k in "bc"} <= set(loaded)
    assert [v["digest"] for v in _state(models)["versions"]] == [models["c"].digest, models["b"].digest]
    assert any("unloaded tickets@" in line for line in lines)
    live["endpoint"] = after


def test_rolling_back_to_a_still_loaded_adapter_needs_no_restart(models, live):
    pid = live["endpoint"].handle["pid"]
    b_text = _text(live["endpoint"].url, server.version_name(NAME, models["b"].digest))
    after, lines = _deploy(models, models["b"])
    assert after.handle["pid"] == pid and after.handle["rolled_back"] is True
    assert _text(after.url, NAME) == b_text
    assert any("a rollback to an earlier version" in line for line in lines)
    live["endpoint"] = after


def test_an_adapter_the_server_refuses_leaves_the_endpoint_serving_the_previous_one(models, live, tmp_path):
    broken = _broken_adapter(models, tmp_path / "broken")
    before = _text(live["endpoint"].url, NAME)
    with pytest.raises(InputError, match="refused adapter"):
        _deploy(models, broken)
    assert _text(live["endpoint"].url, NAME) == before
    assert _state(models)["current"] == live["endpoint"].handle["adapter"]
    assert server.version_name(NAME, broken.digest) not in _models(live["endpoint"].url)


def test_an_adapter_of_another_base_model_is_refused_and_nothing_changes(models, live):
    before = _state(models)
    with pytest.raises(InputError, match="one endpoint, one base model"):
        _deploy(models, models["other"])
    assert _state(models) == before


def test_a_second_endpoint_of_the_same_base_shares_the_server(models, live):
    other, _ = _deploy(models, models["a"], name="tickets-eu")
    assert (other.url, other.handle["pid"]) == (live["endpoint"].url, live["endpoint"].handle["pid"])
    assert {"tickets-eu", NAME} <= set(_models(other.url))
    assert VllmLocal().stop(other) is True
    # The shared server keeps serving the first endpoint.
    assert "tickets-eu" not in _models(other.url) and VllmLocal().running(live["endpoint"]) is True


def test_changed_server_settings_restart_it_on_the_same_url_with_every_endpoint_loaded_back(models, live):
    before = live["endpoint"]
    expected = _text(before.url, NAME)
    after, lines = _deploy(models, models["b"], max_loras=2)
    assert after.url == before.url and after.handle["pid"] != before.handle["pid"]
    assert any("restarting the vLLM server" in line and "settings changed" in line for line in lines)
    assert _text(after.url, NAME) == expected
    assert server.version_name(NAME, models["c"].digest) in _models(after.url)
    live["endpoint"] = after


def test_a_killed_server_leaves_no_process_behind_once_a_deploy_restarts_it_on_the_same_url(models, live):
    endpoint = live["endpoint"]
    expected = _text(endpoint.url, NAME)
    old = _tree(endpoint.handle["pid"])
    assert len(old) >= 2, "vLLM's engine core runs in a process of its own"
    os.kill(endpoint.handle["pid"], signal.SIGKILL)  # the server's pid alone, as an operator (or the OOM killer) does
    deadline = time.monotonic() + 10
    while server.alive(server.server_info(Path(endpoint.handle["server_dir"]))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert VllmLocal().running(endpoint) is False
    after, lines = _deploy(models, models["b"])
    assert not _still_running(old), "the killed server's engine core, workers and resource tracker are stopped"
    assert after.url == endpoint.url and after.handle["pid"] != endpoint.handle["pid"]
    assert any("is gone; starting it again on the same port" in line for line in lines)
    # Restored: the endpoint and the version kept for rollback are loaded again.
    assert {NAME, server.version_name(NAME, models["c"].digest)} <= set(_models(after.url))
    assert _text(after.url, NAME) == expected
    live["endpoint"] = after


def test_a_whole_model_is_served_under_the_endpoint_name_by_a_server_of_its_own(models, live, whole):
    # Another endpoint keeps the base model's server up, so leaving it unloads this endpoint from it.
    live["other"], _ = _deploy(models, models["a"], name="tickets-eu")
    before = live["endpoint"]
    live["adapter"] = next(models[k] for k in "abc" if models[k].digest == before.handle["adapter"])
    live["adapter_text"] = _text(before.url, NAME)
    model = whole["model"]
    after, lines = _deploy(models, model, **EAGER)
    assert after.url != before.url and after.model_name == NAME and after.handle["full_model"] is True
    response = _complete(after.url, NAME)
    assert response.status_code == 200 and response.json()["model"] == NAME, response.text
    assert _models(after.url) == {NAME: None}, "the model itself, under the endpoint name, no adapters"
    # What is served, with its lineage: the whole model, and the base model it was trained from.
    assert after.source("adapter_weights") == model
    assert {r.digest for r in lineage(after)} >= {model.digest, models["base"].digest}
    state = _state(models)
    assert (state["full_model"], state["current"], state["url"]) == (True, model.digest, after.url)
    assert state["trained_from"] == models["base"].digest
    # The base model's server no longer answers to this endpoint, and still serves the other one.
    names = set(_models(before.url))
    assert "tickets-eu" in names and not {n for n in names if n == NAME or n.startswith(f"{NAME}@")}
    assert VllmLocal().running(after) is True and VllmLocal().running(before) is False
    assert any(f"its URL changed from {before.url}" in line for line in lines)
    live["endpoint"] = after


def test_a_whole_model_whose_server_fails_leaves_the_endpoint_serving_the_previous_one(models, live, whole):
    endpoint = live["endpoint"]
    expected = _text(endpoint.url, NAME)
    broken = whole["broken"]
    message = rf"was not routed to endpoint 'tickets'; it keeps serving {endpoint.handle['adapter']} at {endpoint.url}"
    with pytest.raises(WorkloadError, match=message + r"\. The vLLM server exited"):
        _deploy(models, broken, **EAGER)
    assert _text(endpoint.url, NAME) == expected and _state(models)["current"] == endpoint.handle["adapter"]
    assert not _servers_under(Path(broken.uri))
    assert server.server_info(server.model_server_dir(models["home"], broken.digest, NAME)) is None
    assert VllmLocal().running(endpoint) is True


def test_switching_back_to_an_adapter_moves_the_endpoint_back_and_stops_the_whole_models_server(models, live, whole):
    full = live["endpoint"]
    back, lines = _deploy(models, live["adapter"])
    assert back.url == live["other"].url, "back on the base model's server, which kept running for tickets-eu"
    assert _text(back.url, NAME) == live["adapter_text"]
    assert not _servers_under(local_path(whole["model"].uri)) and not _running(full.handle["pid"])
    assert any(f"stopped the vLLM server on {full.url}" in line for line in lines)
    assert back.handle["rolled_back"] is True and back.handle["full_model"] is False
    assert VllmLocal().running(full) is False and VllmLocal().running(back) is True
    live["endpoint"] = back


def test_rolling_back_to_a_whole_model_serves_it_again_and_stop_leaves_nothing_of_it(models, live, whole):
    again, lines = _deploy(models, whole["model"], **EAGER)
    assert again.handle["rolled_back"] is True and any("a rollback to an earlier version" in line for line in lines)
    assert _complete(again.url, NAME).json()["model"] == NAME
    scratch = Path(server.server_info(Path(again.handle["server_dir"]))["scratch"])
    assert VllmLocal().stop(again) is True
    assert not _servers_under(local_path(whole["model"].uri)) and not scratch.exists()
    assert not (models["home"] / "serving" / NAME / server.ENDPOINT_STATE).exists()
    assert VllmLocal().stop(again) is False and VllmLocal().running(again) is False
    # The module's endpoint goes on as it was: adapter b on the base model's server, alone there again.
    live["endpoint"], _ = _deploy(models, live["adapter"])
    assert VllmLocal().stop(live["other"]) is True and VllmLocal().running(live["endpoint"]) is True


def test_stop_says_whether_it_stopped_something_and_leaves_nothing_behind(models, live):
    endpoint = live["endpoint"]
    scratch = Path(server.server_info(Path(endpoint.handle["server_dir"]))["scratch"])
    assert scratch.is_dir() and len(str(scratch)) < 60, "vLLM's unix sockets live there: short paths only"
    tree = _tree(endpoint.handle["pid"])
    assert VllmLocal().stop(endpoint) is True
    assert not _still_running(tree) and not _trees_under(models["root"])
    assert not _servers_under(models["root"]) and not scratch.exists()
    assert VllmLocal().stop(endpoint) is False


def test_a_deploy_that_fails_on_a_server_it_started_stops_that_server(models, live, tmp_path):
    # No endpoint is served any more: the deploy starts the base model's server, which then refuses the adapter.
    assert not server.endpoints_on(models["home"], Path(live["endpoint"].handle["server_dir"]).name)
    with pytest.raises(InputError, match="refused adapter"):
        _deploy(models, _broken_adapter(models, tmp_path / "broken"))
    assert not _trees_under(models["root"]) and not _servers_under(models["root"])
    assert server.server_info(Path(live["endpoint"].handle["server_dir"])) is None


def test_a_server_that_is_not_ready_in_time_is_stopped_with_its_log(models, live):
    with pytest.raises(WorkloadError, match=r"not ready within readiness_timeout_s=2 s.*Last lines"):
        _deploy(models, models["a"], readiness_timeout_s=2)
    assert not _servers_under(models["root"]) and not _trees_under(models["root"])
    assert not (models["home"] / "serving" / NAME / server.ENDPOINT_STATE).exists()
