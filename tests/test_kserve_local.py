"""kserve-local: a real KServe ModelServer process serving the tiny Granite with a LoRA adapter.

One endpoint (``tickets``) is deployed once for the module through the local
engine (a worker process that exits afterwards) and shared; the tests that
re-deploy or stop it run last and update the shared record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from aiplane.core.artifacts import sha256_path
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.config import Target
from aiplane.core.plugins import Registry
from aiplane.core.workload import execute
from aiplane.plugins.kserve import KServeLocal, complete

SERVER_MODULE = "aiplane.plugins.kserve.server"
NAME = "tickets"
PROMPT = "Subject: printer offline"


# ---------------------------------------------------------------- fixtures


def _make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # Random (not zero) LoRA B, so each adapter visibly changes what the model generates.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def _adapter_record(path: Path, base: BaseModelRecord) -> AdapterRecord:
    return AdapterRecord(
        uri=str(path),
        digest=sha256_path(path),
        method="lora",
        config={"r": 4},
        metrics={},
        run_id=path.name,
        sources=(base,),
    )


def _servers_under(root: Path) -> list[psutil.Process]:
    """Our server processes whose command line points into this module's temp dir."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if SERVER_MODULE in cmdline and any(str(root) in arg for arg in cmdline):
            found.append(proc)
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from aiplane.plugins.peft.base_model import build_tiny_granite

    root = tmp_path_factory.mktemp("kserve")
    base_dir = build_tiny_granite(root / "base")
    base = BaseModelRecord(
        uri=str(base_dir), digest=sha256_path(base_dir), name="tiny", architecture="GraniteForCausalLM", parameters=1
    )
    adapter_a = _adapter_record(_make_adapter(base_dir, root / "adapter-a", seed=1), base)
    adapter_b = _adapter_record(_make_adapter(base_dir, root / "adapter-b", seed=2), base)
    yield {"root": root, "home": root / "home", "base": base, "a": adapter_a, "b": adapter_b}
    # Whatever the tests did, no server of ours outlives the module.
    for proc in _servers_under(root):
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def live(models):
    """The shared endpoint, deployed through the local engine: its worker process exits when the deploy is done."""
    workload = KServeLocal().workload(models["a"], NAME, str(models["home"]))
    engine = Registry().engine("local")
    result = engine.run(workload, Target(name="local", engine="local", region="eu"), on_event=lambda event: None)
    state = {"endpoint": result.outputs["endpoint"], "deployer_pid": result.engine["pid"]}
    yield state
    if state["endpoint"] is not None:
        KServeLocal().stop(state["endpoint"])


def _current_json(models) -> bytes:
    return (models["home"] / "serving" / NAME / "current.json").read_bytes()


def _v2_infer(url: str, prompts: list[str], max_tokens: int) -> dict:
    body = {
        "inputs": [{"name": "text_input", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}],
        "parameters": {"max_tokens": max_tokens},
    }
    response = httpx.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- cheap checks


def test_importing_the_plugin_loads_no_heavy_library_and_registers_kserve_local():
    code = (
        "import sys, aiplane.plugins.kserve as k;"
        "from aiplane.core.plugins import Registry;"
        "assert Registry().get('serving target', 'kserve-local') is k.KServeLocal;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'kserve', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_setting_is_rejected_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"prot: Unknown setting 'prot'; allowed settings: .*readiness_timeout_s.*Did you mean 'port'"):
        KServeLocal({"prot": 8080})


def test_endpoint_name_that_is_not_a_safe_path_segment_is_rejected(models):
    with pytest.raises(ConfigError, match="Endpoint name '../escape' is not usable"):
        KServeLocal().workload(models["a"], "../escape", str(models["home"]))


def test_adapter_without_adapter_config_is_rejected_before_any_process_starts(models, live, tmp_path):
    broken = tmp_path / "no-config"
    shutil.copytree(Path(models["a"].uri), broken)
    (broken / "adapter_config.json").unlink()
    before, current = len(_servers_under(models["root"])), _current_json(models)
    with pytest.raises(InputError, match="has no adapter_config.json"):
        execute(KServeLocal().workload(_adapter_record(broken, models["base"]), NAME, str(models["home"])))
    assert len(_servers_under(models["root"])) == before
    assert _current_json(models) == current


def test_fixed_port_in_use_fails_before_any_process_starts(models):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        before = len(_servers_under(models["root"]))
        target = KServeLocal({"port": port})
        with pytest.raises(ConfigError, match=rf"port {port} on 127.0.0.1 is in use; .*use port: 0"):
            execute(target.workload(models["a"], "blocked", str(models["home"])))
    assert len(_servers_under(models["root"])) == before
    assert not (models["home"] / "serving" / "blocked").exists()


def test_fixed_port_of_the_current_server_says_blue_green_needs_another_port(models, live):
    port = httpx.URL(live["endpoint"].url).port
    with pytest.raises(ConfigError, match=rf"port {port} .* in use by the current server of endpoint 'tickets'"):
        execute(KServeLocal({"port": port}).workload(models["b"], NAME, str(models["home"])))


# ---------------------------------------------------------------- the shared endpoint


def test_endpoint_record_pins_what_is_served(models, live):
    endpoint: EndpointRecord = live["endpoint"]
    assert endpoint.serving == "kserve-local"
    assert endpoint.model_name == NAME
    assert set(endpoint.protocols) == {"kserve-v2", "openai-completions"}
    assert endpoint.source("adapter_weights").digest == models["a"].digest
    assert endpoint.digest.startswith("sha256:")
    current = json.loads(_current_json(models))
    assert (current["pid"], current["url"], current["adapter_digest"]) == (
        endpoint.handle["pid"],
        endpoint.url,
        models["a"].digest,
    )


def test_v2_infer_returns_generated_text_for_each_prompt(live):
    answer = _v2_infer(live["endpoint"].url, [PROMPT, "Subject: VPN"], max_tokens=4)
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2]
    assert all(isinstance(t, str) and t for t in output["data"])
    # Both protocols run the same model, greedily: the same prompt gives the same text.
    assert output["data"][0] == complete(live["endpoint"].url, PROMPT, max_tokens=4, model=NAME)


def test_openai_completions_returns_choices_like_vllm(live):
    url = live["endpoint"].url
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": NAME, "prompt": [PROMPT, "Subject: VPN"], "max_tokens": 3, "temperature": 0},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["id"] and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("length", "stop") for c in body["choices"])
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    wrong = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"}, timeout=30)
    assert wrong.status_code == 404 and "does not exist" in wrong.json()["error"]["message"]


def test_server_listens_only_on_loopback_and_starts_no_grpc(live):
    server = psutil.Process(live["endpoint"].handle["pid"])
    connections = getattr(server, "net_connections", server.connections)(kind="inet")
    listening = [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", httpx.URL(live["endpoint"].url).port)]


def test_server_survives_the_process_that_deployed_it(live):
    server = psutil.Process(live["endpoint"].handle["pid"])
    assert server.ppid() not in (os.getpid(), live["deployer_pid"])  # the deployer has exited
    assert os.getsid(server.pid) == server.pid != os.getsid(0)
    assert httpx.get(f"{live['endpoint'].url}/v2/models/{NAME}/ready", timeout=10).status_code == 200


def test_new_server_that_fails_to_load_leaves_the_old_one_serving(models, live, tmp_path):
    broken = tmp_path / "broken-weights"
    shutil.copytree(Path(models["a"].uri), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    current = _current_json(models)
    with pytest.raises(WorkloadError) as caught:
        execute(KServeLocal().workload(_adapter_record(broken, models["base"]), NAME, str(models["home"])))
    message = str(caught.value)
    assert "exited with code" in message and f"keeps serving {live['endpoint'].url}" in message
    assert "cannot load adapter" in message  # the tail of the new server's log
    assert _current_json(models) == current
    assert not [p for p in _servers_under(models["root"]) if str(broken) in " ".join(p.cmdline())]
    assert complete(live["endpoint"].url, PROMPT, max_tokens=2, model=NAME)


def test_readiness_timeout_stops_the_new_server_and_keeps_the_old(models, live):
    current = _current_json(models)
    before = {p.pid for p in _servers_under(models["root"])}
    with pytest.raises(WorkloadError, match=r"not ready within readiness_timeout_s=0.3 s"):
        execute(KServeLocal({"readiness_timeout_s": 0.3}).workload(models["b"], NAME, str(models["home"])))
    assert {p.pid for p in _servers_under(models["root"])} == before
    assert _current_json(models) == current
    assert complete(live["endpoint"].url, PROMPT, max_tokens=2, model=NAME)


def test_redeploy_is_blue_green_and_serves_the_new_adapter(models, live):
    old: EndpointRecord = live["endpoint"]
    old_text = complete(old.url, PROMPT, max_tokens=8, model=NAME)
    new = execute(KServeLocal().workload(models["b"], NAME, str(models["home"]))).outputs["endpoint"]
    live["endpoint"] = new
    assert new.url != old.url and new.handle["pid"] != old.handle["pid"]
    assert new.digest != old.digest
    assert not _running(old.handle["pid"])
    assert json.loads(_current_json(models))["pid"] == new.handle["pid"]
    assert complete(new.url, PROMPT, max_tokens=8, model=NAME) != old_text
    with pytest.raises(InputError, match="did not answer"):
        complete(old.url, PROMPT, model=NAME, timeout=5)


def test_stop_stops_the_server_and_is_idempotent(models, live):
    endpoint: EndpointRecord = live["endpoint"]
    target = KServeLocal()
    target.stop(endpoint)
    live["endpoint"] = None
    assert not _running(endpoint.handle["pid"])
    assert not (models["home"] / "serving" / NAME / "current.json").exists()
    target.stop(endpoint)
    with pytest.raises(InputError, match="did not answer"):
        complete(endpoint.url, PROMPT, model=NAME, timeout=5)
