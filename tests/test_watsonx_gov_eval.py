"""ibm-watsonx-gov metrics on the eval split's generations, computed by IBM's real library in its own runtime.

The library computes its metrics on this machine, but first authenticates to a
watsonx.governance instance and reads its monitor definitions; here that
instance is a loopback double in Cloud Pak for Data mode (the one mode that takes
a custom address), and the judge model is a loopback OpenAI-compatible endpoint.
The runtime environment is provisioned once per session, under the session's
cache (``$AIPLANE_RUNTIMES`` when set, so a machine that has it reuses it).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aiplane.core.config import GovernanceSettings
from aiplane.core.errors import ConfigError, WorkloadError
from aiplane.core.factsheet import build_factsheet
from aiplane.core.governance import judge
from aiplane.core.records import BaseModelRecord
from aiplane.core.runtimes import ensure_runtime
from aiplane.core.sample import generate_tickets, to_features
from aiplane.core.workload import Event, Workload, WorkloadContext
from aiplane.plugins.peft.base_model import build_tiny_granite, resolve
from aiplane.plugins.peft.train import train
from aiplane.plugins.peft.trainer import LoraTrainer
from aiplane.plugins.watsonx_gov.evaluate import (
    LOCAL_METRICS,
    WXGOV_RUNTIME,
    EvaluationSettings,
    evaluate_generations,
)
from aiplane.plugins.watsonx_gov.facts import custom_facts
from conftest import features_record

KEY_VAR = "AIPLANE_TEST_WXGOV_APIKEY"
JUDGE_KEY_VAR = "AIPLANE_TEST_JUDGE_KEY"
USER = "aiplane-ci"
# The same tiny run as tests/test_peft_trainer.py: about a second of training on a 2-core CPU.
SETTINGS = dict(
    r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], max_steps=30, batch_size=8, seq_len=64,
    learning_rate=0.01, seed=0, eval_limit=12, log_every=5, max_new_tokens=6,
)  # fmt: skip


class _Service:
    """What ibm-watsonx-gov asks of watsonx.governance on Cloud Pak for Data before it computes, recorded."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, dict]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else {}
                service.requests.append((self.command, self.path, body))
                if self.path == "/icp4d-api/v1/authorize" and self.command == "POST":
                    if service.users.get(body.get("username")) != body.get("api_key"):
                        return self._reply(401, {"_messageCode_": "401", "message": "Invalid username or API key"})
                    token = _jwt(body["username"])
                    service.tokens.add(token)
                    return self._reply(200, {"_messageCode_": "200", "message": "Success", "token": token})
                if self.headers.get("Authorization", "").removeprefix("Bearer ") not in service.tokens:
                    return self._reply(401, {"errors": [{"code": "AIQCS0001E", "message": "Unauthorized"}]})
                if self.path.endswith("/v2/monitor_definitions") and self.command == "GET":
                    return self._reply(200, {"monitor_definitions": []})
                return self._reply(404, {"errors": [{"code": "not_found", "message": self.path}]})

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def __enter__(self) -> "_Service":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()



class _Judge:
    """An OpenAI-compatible chat endpoint that rates every answer ``rating`` out of 10, recording what it is asked."""

    def __init__(self, rating: str = "8") -> None:
        self.requests: list[tuple[str, str | None, dict]] = []
        judge_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                judge_.requests.append((self.path, self.headers.get("Authorization"), body))
                data = json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": rating},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _jwt(user: str) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64({'username': user, 'sub': user, 'iat': now, 'exp': now + 3600})}.c2ln"


@pytest.fixture(scope="session")
def wxgov_runtime(no_home_state) -> Path:
    """The ibm-watsonx-gov runtime's Python, provisioned once per session (or found under $AIPLANE_RUNTIMES)."""
    started = time.perf_counter()
    python = ensure_runtime(WXGOV_RUNTIME, lambda line: None)
    env = python.parent.parent
    size = sum(p.stat().st_size for p in env.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"\nibm-watsonx-gov runtime at {env}: {size / 2**30:.2f} GiB, ready in {time.perf_counter() - started:.0f} s")
    return python


@pytest.fixture(scope="module")
def key() -> Iterator[str]:
    """The API key, set only in the environment variable the settings reference; a sentinel to look for in outputs."""
    value = "wxgov-sentinel-" + secrets.token_hex(8)
    saved = {name: os.environ.get(name) for name in (KEY_VAR, JUDGE_KEY_VAR)}
    os.environ[KEY_VAR] = value
    os.environ[JUDGE_KEY_VAR] = "judge-sentinel-" + secrets.token_hex(8)
    yield value
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.fixture(scope="module")
def service(key) -> Iterator[_Service]:
    with _Service(users={USER: key}) as s:
        yield s


@pytest.fixture
def judge_endpoint() -> Iterator[_Judge]:
    j = _Judge("8")
    yield j
    j.close()


def _evaluation(service: _Service, **more) -> dict:
    return {"watsonx_gov": {"metrics": ["answer_similarity", "answer_relevance"], "platform": "cpd", "url": service.url,
                            "username": USER, "api_key": {"env": KEY_VAR}, **more}}


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ctx = WorkloadContext(Workload(name="train-adapter", entrypoint="x:y"), self.events.append)

    def metric(self, name: str) -> list[float]:
        return [e.value for e in self.events if e.type == "metric" and e.name == name]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> BaseModelRecord:
    home = tmp_path_factory.mktemp("home")
    return resolve(str(build_tiny_granite(home / "tiny-granite")), str(home))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return to_features(generate_tickets(300))


@pytest.fixture(scope="module")
def trained(wxgov_runtime, service, base_model, rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    settings = {**SETTINGS, "evaluation": _evaluation(service)}
    recorder = _Recorder()
    record = train(base_model, features_record(rows), rows, settings, str(root), recorder.ctx)
    return record, recorder


def test_the_library_scores_the_generations_it_is_given(wxgov_runtime, service, key):
    rows = [
        {"id": "1", "prompt": "Ticket: the printer is jammed\nLabel:", "completion": " hardware"},
        {"id": "2", "prompt": "Ticket: I was charged twice\nLabel:", "completion": " billing"},
        {"id": "3", "prompt": "Ticket: cannot log in\nLabel:", "completion": " account"},
        {"id": "4", "prompt": "Ticket: refund please\nLabel:", "completion": " billing"},
    ]
    predictions = ["hardware", "billing", "billing", "billing refund"]
    recorder = _Recorder()
    before = len(service.requests)

    metrics = evaluate_generations(EvaluationSettings(**_evaluation(service)), rows, predictions, recorder.ctx)

    # token_recall: the share of the reference's tokens found in the generation, averaged over rows.
    assert metrics["eval_answer_similarity"] == pytest.approx(0.75)
    assert 0.0 <= metrics["eval_answer_relevance"] <= 1.0
    assert set(metrics) == {"eval_answer_similarity", "eval_answer_relevance"}
    assert recorder.metric("eval_answer_similarity") == [pytest.approx(0.75)]
    # The library authenticated to the instance the settings name, with the key their reference points to.
    authorizations = [body for _, path, body in service.requests[before:] if path == "/icp4d-api/v1/authorize"]
    assert authorizations and all(a["username"] == USER and a["api_key"] == key for a in authorizations)
    assert any(path.endswith("/v2/monitor_definitions") for _, path, _ in service.requests[before:])


def test_metrics_of_a_training_run_land_on_the_adapter_record(trained):
    record, recorder = trained
    m = record.metrics
    assert 0.0 <= m["eval_answer_relevance"] <= 1.0
    # An exact match recalls every reference token, so token recall is never below exact-match accuracy.
    assert m["eval_accuracy"] <= m["eval_answer_similarity"] <= 1.0
    assert recorder.metric("eval_answer_similarity") == [m["eval_answer_similarity"]]
    assert any("ibm-watsonx-gov 1.5.2 on 12 eval rows" in e.message for e in recorder.events if e.type == "log")
    assert record.config["evaluation"]["watsonx_gov"]["api_key"] == {"env": KEY_VAR, "secret": None, "key": None}


def test_they_land_on_the_factsheet_and_the_use_case_facts(trained):
    record, _ = trained
    document = build_factsheet(record)
    assert document["training"]["metrics"]["eval_answer_similarity"] == record.metrics["eval_answer_similarity"]
    evaluation = json.loads(custom_facts(document)["aiplane_evaluation"])
    assert evaluation["eval_answer_similarity"] == record.metrics["eval_answer_similarity"]
    assert evaluation["eval_answer_relevance"] == record.metrics["eval_answer_relevance"]


def test_a_governance_threshold_on_a_library_metric_gates_the_adapter(trained):
    record, _ = trained
    value = record.metrics["eval_answer_similarity"]
    draft = build_factsheet(record)
    assert judge(GovernanceSettings(thresholds={"eval_answer_similarity": value - 0.01}), draft).passed
    verdict = judge(GovernanceSettings(thresholds={"eval_answer_similarity": value + 0.01}), draft)
    assert not verdict.passed
    assert verdict.problems == [f"eval_answer_similarity {value:g} is below the minimum {value + 0.01:g}"]


def test_an_unknown_metric_is_refused_when_the_settings_load_naming_the_known_ones(service):
    evaluation = _evaluation(service)
    evaluation["watsonx_gov"]["metrics"] = ["answer_similarity", "rouge_score", "answer_similarty"]
    with pytest.raises(ConfigError) as err:
        LoraTrainer({**SETTINGS, "evaluation": evaluation})
    message = str(err.value)
    assert "evaluation.watsonx_gov.metrics" in message and "'rouge_score', 'answer_similarty'" in message
    assert ", ".join(LOCAL_METRICS) in message and "Did you mean 'answer_similarity'?" in message


def test_the_judge_is_off_unless_configured(trained, service):
    record, _ = trained
    assert EvaluationSettings(**_evaluation(service)).watsonx_gov.judge is None
    assert record.config["evaluation"]["watsonx_gov"]["judge"] is None
    assert not [k for k in record.metrics if k.endswith("_llm_judge")]


def test_a_configured_judge_scores_through_its_openai_compatible_endpoint(wxgov_runtime, service, judge_endpoint):
    judge_settings = {"model": "granite-judge", "url": judge_endpoint.url, "api_key": {"env": JUDGE_KEY_VAR},
                      "metrics": ["answer_similarity"]}
    settings = EvaluationSettings(**_evaluation(service, judge=judge_settings))
    rows = [{"id": str(i), "prompt": f"Ticket: {t}\nLabel:", "completion": " billing"} for i, t in enumerate("ab")]

    metrics = evaluate_generations(settings, rows, ["billing", "account"], _Recorder().ctx)

    assert metrics["eval_answer_similarity_llm_judge"] == pytest.approx(0.8)  # the judge's 8 out of 10
    assert metrics["eval_answer_similarity"] == pytest.approx(0.5)  # computed locally, as without a judge
    assert len(judge_endpoint.requests) == 2
    path, authorization, body = judge_endpoint.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "granite-judge"
    assert authorization == f"Bearer {os.environ[JUDGE_KEY_VAR]}"
    # unitxt caches the judge's answers in its working directory: the evaluation's scratch one, not ours.
    assert not Path("inference_engine_cache").exists()


def test_a_missing_api_key_stops_training_before_it_starts(service, base_model, rows, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    with pytest.raises(ConfigError, match=f"export {KEY_VAR}="):
        train(base_model, features_record(rows), rows, {**SETTINGS, "evaluation": _evaluation(service)}, str(tmp_path),
              _Recorder().ctx)
    assert not any(tmp_path.iterdir())


def test_refused_credentials_fail_the_run_and_publish_nothing(wxgov_runtime, service, base_model, rows, tmp_path,
                                                                monkeypatch):
    wrong = "wrong-sentinel-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_VAR, wrong)
    recorder = _Recorder()
    with pytest.raises(WorkloadError, match="watsonx.governance did not accept the credentials") as err:
        train(base_model, features_record(rows), rows, {**SETTINGS, "evaluation": _evaluation(service)}, str(tmp_path),
              recorder.ctx)
    assert wrong not in str(err.value) and KEY_VAR in str(err.value)
    assert not list(tmp_path.glob("adapters/*"))


def test_the_api_key_appears_nowhere_in_the_record_or_the_events(trained, key):
    record, recorder = trained
    assert key not in record.model_dump_json()
    assert not [e for e in recorder.events if key in e.message or key in e.name]

