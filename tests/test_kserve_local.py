"""kserve-local: a real KServe ModelServer process serving the tiny Granite with a LoRA adapter.

One endpoint (``tickets``) is deployed once for the module through the local
engine (a worker process that exits afterwards) and shared; the tests that
re-deploy or stop it run last and update the shared record. Its URL never
changes: every test may use ``live["endpoint"].url``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest

from aiplane.core.storage import local_path
from aiplane.core.artifacts import sha256_path
from aiplane.core.errors import ConfigError, InputError, WorkloadError
from aiplane.core.records import AdapterRecord, BaseModelRecord, EndpointRecord
from aiplane.core.config import Target, load_deployment
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
    shutil.copytree(local_path(models["a"].uri), broken)
    (broken / "adapter_config.json").unlink()
    before, current = len(_servers_under(models["root"])), _current_json(models)
    with pytest.raises(InputError, match="has no adapter_config.json"):
        execute(KServeLocal().workload(_adapter_record(broken, models["base"]), NAME, str(models["home"])))
    assert len(_servers_under(models["root"])) == before
    assert _current_json(models) == current


def _listener(reuseport: bool = False) -> socket.socket:
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


# A listener with SO_REUSEPORT would not stop the bind: the server would silently share its port.
@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "reuseport"])
def test_fixed_port_in_use_fails_before_any_process_starts(models, reuseport):
    with _listener(reuseport) as holder:
        port = holder.getsockname()[1]
        before = len(_servers_under(models["root"]))
        target = KServeLocal({"port": port})
        in_use = rf"port {port} on 127.0.0.1 is in use by pid {os.getpid()} .*use port: 0"
        with pytest.raises(ConfigError, match=in_use):
            execute(target.workload(models["a"], "blocked", str(models["home"])))
    assert len(_servers_under(models["root"])) == before
    assert not (models["home"] / "serving" / "blocked").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="steering a port between listeners is Linux-only")
def test_steering_sends_new_connections_to_the_chosen_listener():
    """What a swap relies on: listeners of one port, in the order they listened, and a program picking one."""
    from aiplane.plugins.kserve._port import NEWEST, OLDEST, Steering, claim

    first, _ = claim("127.0.0.1", 0, None, "steer")
    port = first.getsockname()[1]
    second, _ = claim("127.0.0.1", port, None, "steer")
    with first, second:
        steering = Steering(second)
        first.listen()
        assert not steering.listening()
        second.listen()
        assert steering.listening()

        def reached() -> list[int]:
            counts = [0, 0]
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass
                for i, listener in enumerate((first, second)):
                    listener.settimeout(0.01)
                    with contextlib.suppress(TimeoutError):
                        listener.accept()[0].close()
                        counts[i] += 1
            return counts

        assert steering.to(OLDEST) and reached() == [20, 0]
        assert steering.to(NEWEST) and reached() == [0, 20]


def test_check_reports_a_fixed_port_another_process_holds(models):
    deployment = load_deployment("local", home=models["home"])
    with _listener() as holder:
        port = holder.getsockname()[1]
        (problem,) = KServeLocal({"port": port}).check(deployment, endpoint_name="elsewhere")
    assert problem.startswith(f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}")
    assert "choose a free port" in problem
    assert KServeLocal({"port": port}).check(deployment, endpoint_name="elsewhere") == []


def test_check_reports_a_host_that_does_not_resolve(models):
    deployment = load_deployment("local", home=models["home"])
    (problem,) = KServeLocal({"host": "no-such-host.invalid"}).check(deployment)
    assert problem.startswith("Serving host 'no-such-host.invalid' cannot be resolved")


def test_check_accepts_the_port_of_the_endpoints_own_server_only(models, live):
    deployment = load_deployment("local", home=models["home"])
    target = KServeLocal({"port": httpx.URL(live["endpoint"].url).port})
    assert target.check(deployment, endpoint_name=NAME) == []
    (problem,) = target.check(deployment, endpoint_name="other-endpoint")
    assert f"in use by pid {live['endpoint'].handle['pid']}" in problem


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
    # The endpoint's port, and the private one the deployer checked this server on.
    assert {a.ip for a in listening} == {"127.0.0.1"} and len(listening) == 2
    assert httpx.URL(live["endpoint"].url).port in {a.port for a in listening}


def test_running_is_true_for_the_current_server(live):
    assert KServeLocal().running(live["endpoint"]) is True


def test_server_survives_the_process_that_deployed_it(live):
    server = psutil.Process(live["endpoint"].handle["pid"])
    assert server.ppid() not in (os.getpid(), live["deployer_pid"])  # the deployer has exited
    assert os.getsid(server.pid) == server.pid != os.getsid(0)
    assert httpx.get(f"{live['endpoint'].url}/v2/models/{NAME}/ready", timeout=10).status_code == 200


def test_new_server_that_fails_to_load_leaves_the_old_one_serving_on_the_same_url(models, live, tmp_path):
    broken = tmp_path / "broken-weights"
    shutil.copytree(local_path(models["a"].uri), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    url, current, events = live["endpoint"].url, _current_json(models), []
    with pytest.raises(WorkloadError) as caught:
        workload = KServeLocal().workload(_adapter_record(broken, models["base"]), NAME, str(models["home"]))
        execute(workload, emit=events.append)
    # The broken server was handed the endpoint's own port, beside the current server.
    assert any(f"on {url} (checked on http://127.0.0.1:" in e.message for e in events)
    message = str(caught.value)
    assert "exited with code" in message and f"keeps serving {url}" in message
    assert "cannot load adapter" in message  # the tail of the new server's log
    assert _current_json(models) == current
    assert not [p for p in _servers_under(models["root"]) if str(broken) in " ".join(p.cmdline())]
    assert complete(url, PROMPT, max_tokens=2, model=NAME)


def test_readiness_timeout_stops_the_new_server_and_keeps_the_old(models, live):
    current = _current_json(models)
    before = {p.pid for p in _servers_under(models["root"])}
    with pytest.raises(WorkloadError, match=r"not ready within readiness_timeout_s=0.3 s"):
        execute(KServeLocal({"readiness_timeout_s": 0.3}).workload(models["b"], NAME, str(models["home"])))
    assert {p.pid for p in _servers_under(models["root"])} == before
    assert _current_json(models) == current
    assert complete(live["endpoint"].url, PROMPT, max_tokens=2, model=NAME)


def test_redeploy_keeps_the_url_and_serves_the_new_adapter(models, live):
    old: EndpointRecord = live["endpoint"]
    old_text = complete(old.url, PROMPT, max_tokens=8, model=NAME)
    # A fixed port equal to the endpoint's own is re-deployable too: the servers share it.
    target = KServeLocal({"port": httpx.URL(old.url).port})
    new = execute(target.workload(models["b"], NAME, str(models["home"]))).outputs["endpoint"]
    live["endpoint"] = new
    assert new.url == old.url and new.handle["pid"] != old.handle["pid"]
    assert new.digest != old.digest
    assert not _running(old.handle["pid"])
    assert (target.running(old), target.running(new)) == (False, True)
    assert json.loads(_current_json(models))["pid"] == new.handle["pid"]
    assert complete(new.url, PROMPT, max_tokens=8, model=NAME) != old_text


def test_requests_sent_during_a_swap_all_succeed(models, live):
    url = live["endpoint"].url
    before = complete(url, PROMPT, max_tokens=8, model=NAME)
    answers: list[str | Exception] = []
    pings: list[int | Exception] = []
    done = threading.Event()

    def send() -> None:
        # A new connection per request (urllib), as most clients of an endpoint make.
        while not done.is_set() and len(answers) < 5000:
            try:
                answers.append(complete(url, PROMPT, max_tokens=8, model=NAME, timeout=30))
            except InputError as exc:
                answers.append(exc)

    def ping() -> None:
        # Cheap requests at a high rate, so some are queued on the old server's port when it stops listening:
        # without steering them away first, those are reset (this test then fails most runs).
        while not done.is_set() and len(pings) < 20000:
            try:
                with urllib.request.urlopen(f"{url}/v2/models/{NAME}/ready", timeout=30) as response:
                    pings.append(response.status)
            except OSError as exc:
                pings.append(exc)

    senders = [threading.Thread(target=fn) for fn in (send, ping, ping)]
    for sender in senders:
        sender.start()
    try:
        new = execute(KServeLocal().workload(models["a"], NAME, str(models["home"]))).outputs["endpoint"]
        live["endpoint"] = new
        time.sleep(0.5)
    finally:
        done.set()
        for sender in senders:
            sender.join(60)
    after = complete(url, PROMPT, max_tokens=8, model=NAME)
    assert new.url == url and after != before
    assert [a for a in answers if isinstance(a, Exception)] == []
    assert [p for p in pings if p != 200] == []
    # Both servers answered while the requests were being sent: they spanned the swap.
    assert set(answers) == {before, after}


def test_stop_says_whether_it_stopped_a_server(models, live):
    endpoint: EndpointRecord = live["endpoint"]
    target = KServeLocal()
    assert target.stop(endpoint) is True
    live["endpoint"] = None
    assert not _running(endpoint.handle["pid"])
    assert not (models["home"] / "serving" / NAME / "current.json").exists()
    assert target.running(endpoint) is False
    assert target.stop(endpoint) is False
    with pytest.raises(InputError, match="did not answer"):
        complete(endpoint.url, PROMPT, model=NAME, timeout=5)


def test_server_of_an_older_aiplane_is_replaced_on_a_new_port_once(models):
    """A server started without SO_REUSEPORT blocks its port; the endpoint moves, and says so once."""
    name = "legacy"
    state = models["home"] / "serving" / name
    state.mkdir(parents=True)
    # Stands in for such a server: our module and endpoint on its command line, a plain listener.
    code = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
        "print(s.getsockname()[1], flush=True); time.sleep(300)"
    )
    old = subprocess.Popen(
        [sys.executable, "-c", code, SERVER_MODULE, "--model-name", name], stdout=subprocess.PIPE, text=True
    )
    endpoint = None
    try:
        old_url = f"http://127.0.0.1:{int(old.stdout.readline())}"
        (state / "current.json").write_text(
            json.dumps({"pid": old.pid, "url": old_url, "host": "127.0.0.1", "port": httpx.URL(old_url).port})
        )
        events = []
        endpoint = execute(
            KServeLocal().workload(models["a"], name, str(models["home"])), emit=events.append
        ).outputs["endpoint"]
        assert endpoint.url != old_url
        moved = [e.message for e in events if "without SO_REUSEPORT" in e.message]
        assert len(moved) == 1 and f"moves to port {httpx.URL(endpoint.url).port} this once" in moved[0]
        assert not _running(old.pid)
        assert complete(endpoint.url, PROMPT, max_tokens=2, model=name)
    finally:
        old.kill()
        old.wait(10)
        if endpoint is not None:
            KServeLocal().stop(endpoint)
