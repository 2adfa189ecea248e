"""The ``vllm`` target in ``merged`` mode (its default) and serving while training: a real vLLM server (the CPU
build) serving the tiny Granite with an adapter merged into its weights.

The module's endpoint is prepared the way ``aiplane up`` prepares it while the
adapter trains (:meth:`VllmLocal.prepare`), then deployed through the local
engine; tests run in file order and change it (a new adapter, a refused one, a
rollback), and stop it last. Servers are eager (``--enforce-eager``): what is
under test is the swapping, not vLLM's compiler.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiplane.core.config import Target
from aiplane.core.errors import InputError
from aiplane.core.plugins import Registry
from aiplane.plugins.vllm import VllmLocal
from aiplane.plugins.vllm import _server as server
from aiplane.plugins.vllm import prepare as preparing
from test_vllm import (
    _adapter_record,
    _base_record,
    _make_adapter,
    _still_running,
    _tree,
    _trees_under,
)

NAME = "tickets"
# A long readiness timeout: a vLLM start takes minutes on 2 cores shared with other test sessions.
SETTINGS = {"adapters": "merged", "extra_args": ["--enforce-eager"], "readiness_timeout_s": 900}
# Several KV blocks long, so vLLM's prefix cache holds blocks of it from one set of weights when the next arrives.
PROMPT = "Subject: printer offline on the third floor since this morning, nobody can print. " * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from aiplane.plugins.peft.base_model import build_tiny_granite

    root = tmp_path_factory.mktemp("vllm-merged")
    base_dir = build_tiny_granite(root / "base")
    base = _base_record(base_dir)
    adapters = {key: _adapter_record(_make_adapter(base_dir, root / f"adapter-{key}", seed=seed), base)
                for key, seed in (("a", 1), ("b", 2))}  # fmt: skip
    yield {"root": root, "home": root / "home", "base": base, **adapters}
    for directory in server.servers_dir(root / "home").glob("*"):
        server.forget(directory, grace_s=5)


def _target(models, **settings) -> VllmLocal:
    return VllmLocal({**SETTINGS, **settings}, home=models["home"])


def _deploy(models, adapter, **settings):
    lines: list[str] = []
    result = Registry().engine("local").run(
        _target(models, **settings).workload(adapter, NAME), Target(name="local", engine="local", region="eu"),
        on_event=lambda e: lines.append(str(e)),
    )  # fmt: skip
    return result.outputs["endpoint"], lines


def _text(url: str, model: str = NAME) -> tuple[str, list[float]]:
    """What the endpoint answers, and the log-probabilities of its tokens: which weights answered (a random tiny
    model may well say the same words with other weights)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)  # a fresh server's first answer, loaded box
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _same(answer: tuple[str, list[float]], other: tuple[str, list[float]]) -> bool:
    return answer[0] == other[0] and answer[1] == pytest.approx(other[1], abs=1e-3)


def _state(models) -> dict:
    return json.loads((models["home"] / "serving" / NAME / server.ENDPOINT_STATE).read_text())


@pytest.fixture(scope="module")
def live(models):
    # As the orchestrator does when training starts: the server comes up on the base model's weights meanwhile.
    _target(models).prepare(models["base"], NAME)
    sdir = server.merged_server_dir(models["home"], models["base"].digest, NAME)
    preparing._started[sdir]["thread"].join(600)
    prepared = server.server_info(sdir)
    assert prepared is not None, "the prepared server did not start: see the captured log"
    base_text = _text(prepared["url"])  # answering to the endpoint's name, though no endpoint routes to it yet
    endpoint, lines = _deploy(models, models["a"])
    # Each test may run alone (-k): what a test needs from an earlier step is taken here, or by the test itself.
    state = {"endpoint": endpoint, "lines": lines, "prepared": prepared, "base_text": base_text, "a_text": _text(endpoint.url)}
    yield state
    _target(models).stop(state["endpoint"])


def test_the_deploy_uses_the_server_prepared_while_the_adapter_trained(live):
    endpoint, prepared = live["endpoint"], live["prepared"]
    assert (endpoint.url, endpoint.handle["pid"]) == (prepared["url"], prepared["pid"])
    assert not any("starting the vLLM server" in line for line in live["lines"])


def test_a_merged_endpoint_answers_with_the_adapter_merged_in_under_its_name_only(models, live):
    url = live["endpoint"].url
    assert {m["id"]: m["parent"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]} == {NAME: None}
    assert not _same(live["a_text"], live["base_text"])
    state = _state(models)
    assert state["mode"] == "merged" and state["current"] == models["a"].digest
    assert Path(state["weights"], "model.safetensors").is_file()
    assert _target(models).running(live["endpoint"]) is True


def test_a_new_adapter_answers_on_a_candidate_then_is_swapped_in_at_the_same_url_by_the_same_process(models, live):
    before = live["endpoint"]
    after, lines = _deploy(models, models["b"])
    assert (after.url, after.handle["pid"]) == (before.url, before.handle["pid"])
    assert any("answered on a candidate server" in line for line in lines)
    candidate = server.merged_server_dir(models["home"], models["base"].digest, NAME).with_name(
        f"{Path(after.handle['server_dir']).name}.candidate"
    )
    assert server.server_info(candidate) is None and not _trees_under(candidate)
    live["b_text"] = _text(after.url)
    assert not _same(live["b_text"], live["a_text"]) and not _same(live["b_text"], live["base_text"])
    assert _target(models).running(before) is False and _target(models).running(after) is True
    live["endpoint"] = after


def test_an_adapter_whose_merge_is_not_finite_is_refused_and_the_endpoint_keeps_serving(models, live, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    source = Path(models["a"].uri)
    (broken / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = {k: v.fill_(float("inf")) if "lora_B" in k else v for k, v in load_file(str(source / "adapter_model.safetensors")).items()}
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    serving, current = _text(live["endpoint"].url), _state(models)["current"]
    with pytest.raises(InputError, match="non-finite"):
        _deploy(models, _adapter_record(broken, models["base"]))
    assert _same(_text(live["endpoint"].url), serving) and _state(models)["current"] == current


def test_a_rollback_to_a_kept_version_is_swapped_back_at_once_with_no_kv_of_the_other_weights_reused(models, live):
    if _state(models)["current"] != models["b"].digest:  # run alone: b replaces a first, as the test above does
        live["endpoint"], _ = _deploy(models, models["b"])
    _text(live["endpoint"].url)  # the same prompt answered with b's weights: its cached blocks must not serve a's
    after, lines = _deploy(models, models["a"])
    assert after.handle["rolled_back"] is True and after.handle["pid"] == live["endpoint"].handle["pid"]
    assert not any("candidate" in line for line in lines)  # a's weights answered as this endpoint before
    assert _same(_text(after.url), live["a_text"])
    live["endpoint"] = after


def test_stop_leaves_no_process_and_no_merged_weights_behind(models, live):
    endpoint = live["endpoint"]
    tree = _tree(endpoint.handle["pid"])
    assert _target(models).stop(endpoint) is True
    assert not _still_running(tree) and not _trees_under(models["root"])
    assert not (models["home"] / "serving" / NAME / "merged").exists()
    assert _target(models).stop(endpoint) is False


_FAILED_RUN = """
import json, sys, time
from aiplane.core.records import BaseModelRecord
from aiplane.plugins.vllm import VllmLocal, _server as server
base = BaseModelRecord.model_validate_json(sys.argv[1])
VllmLocal(json.loads(sys.argv[2]), home=sys.argv[3]).prepare(base, "failed-run")
sdir = server.merged_server_dir(__import__("pathlib").Path(sys.argv[3]), base.digest, "failed-run")
while server.server_info(sdir) is None:  # the server is starting: the training fails now
    time.sleep(0.1)
print(json.dumps(server.server_info(sdir)), flush=True)
sys.exit(1)
"""


def test_a_server_prepared_for_a_run_whose_training_fails_is_stopped_when_the_run_ends(models):
    done = subprocess.run(
        [sys.executable, "-c", _FAILED_RUN, models["base"].model_dump_json(), json.dumps(SETTINGS), str(models["home"])],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    info = json.loads(done.stdout)
    deadline = time.monotonic() + 30
    while server.alive(info) and time.monotonic() < deadline:
        time.sleep(0.2)
    sdir = server.merged_server_dir(models["home"], models["base"].digest, "failed-run")
    assert not server.alive(info) and not _trees_under(sdir) and server.server_info(sdir) is None
