"""A loopback HTTP server speaking the subset of the KFP v2beta1 REST API the ``kfp`` engine uses.

Used by the contract tests in ``test_kfp_engine.py``: health, pipelines (list by
filter, create), versions (list by filter, multipart upload), experiments (list,
create), runs (create, get, terminate). Every request is recorded with its
``Authorization`` header; a server started with a token answers 401 to anything else.

Runs are executed for real, the way a cluster would: the uploaded version's spec
is run with the run's parameters (and the spec's defaults for the rest) through
``kfp.local`` in its own process group (``python _kfp_contract_server.py SPEC
PARAMS ROOT``), and terminating a run kills that group.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: Any = None


@dataclass
class FakeRun:
    record: dict[str, Any]
    proc: subprocess.Popen | None = None
    terminated: bool = False
    log: Path | None = None


@dataclass
class FakeKfp:
    """The server's state; ``url`` is where it listens (``127.0.0.1``, a free port)."""

    workdir: Path
    token: str | None = None
    calls: list[Call] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, FakeRun] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKfp":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        for run in self.runs.values():
            _kill(run)

    def new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids)}"

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.fullmatch(pattern, c.path)]

    # -- runs -----------------------------------------------------------------------------------

    def start_run(self, run: FakeRun, spec: str, parameters: dict[str, Any]) -> None:
        rundir = self.workdir / run.record["run_id"]
        rundir.mkdir(parents=True)
        (rundir / "spec.yaml").write_text(spec)
        (rundir / "params.json").write_text(json.dumps(parameters))
        run.log = rundir / "log.txt"
        (rundir / "tmp").mkdir()
        with open(run.log, "w") as log:
            run.proc = subprocess.Popen(
                [sys.executable, __file__, str(rundir / "spec.yaml"), str(rundir / "params.json"), str(rundir / "root")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # Like a pod's own /tmp: whatever the task leaves there goes with the test's tmp_path.
                env={**os.environ, "TMPDIR": str(rundir / "tmp")},
            )
        run.record["state"] = "RUNNING"
        threading.Thread(target=self._watch, args=(run,), daemon=True).start()

    def _watch(self, run: FakeRun) -> None:
        assert run.proc is not None
        code = run.proc.wait()
        if run.terminated:
            run.record["state"] = "CANCELED"
        elif code == 0:
            run.record["state"] = "SUCCEEDED"
        else:
            run.record["state"] = "FAILED"
            run.record["error"] = {"code": 2, "message": f"task aiplane-workload failed (exit code {code})"}
        run.record["finished_at"] = _now()


def _kill(run: FakeRun) -> None:
    """As Kubernetes deletes a pod: SIGTERM, a grace period, then SIGKILL."""
    if run.proc is None or run.proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            run.proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    run.proc.wait()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for p in json.loads(filter_json).get("predicates", []):
        value = p.get("stringValue", p.get("string_value"))
        if p.get("operation") not in ("EQUALS", 1) or item.get(p["key"]) != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeKfp

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": message, "code": {400: 3, 401: 16, 404: 5, 409: 6}.get(status, 2), "message": message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        fake = self.server_state
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self._body() if method == "POST" else b""
        call = Call(method, url.path, query, self.headers.get("Authorization"))
        fake.calls.append(call)
        if fake.token is not None and call.authorization != f"Bearer {fake.token}":
            return self._error(401, "Unauthenticated: invalid bearer token")
        path = url.path.removeprefix(API)
        if method == "GET" and path == "/healthz":
            return self._reply(200, {"commit_sha": "fake", "tag_name": "2.5.0-fake", "multi_user": False})
        if method == "GET" and path == "/pipelines":
            found = [p for p in fake.pipelines.values() if _matches(p, query.get("filter"))]
            return self._reply(200, {"pipelines": found, "total_size": len(found)})
        if method == "POST" and path == "/pipelines":
            body = call.body = json.loads(raw)
            if any(p["display_name"] == body["display_name"] for p in fake.pipelines.values()):
                return self._error(409, f"pipeline {body['display_name']} already exists")
            pid = fake.new_id("pipeline")
            fake.pipelines[pid] = {**body, "pipeline_id": pid, "name": body["display_name"], "created_at": _now()}
            return self._reply(200, fake.pipelines[pid])
        m = re.fullmatch(r"/pipelines/([^/]+)/versions", path)
        if method == "GET" and m:
            found = [
                v for v in fake.versions.values() if v["pipeline_id"] == m.group(1) and _matches(v, query.get("filter"))
            ]
            return self._reply(200, {"pipeline_versions": found, "total_size": len(found)})
        if method == "POST" and path == "/pipelines/upload_version":
            return self._upload_version(fake, query, raw)
        if method == "GET" and path == "/experiments":
            found = [e for e in fake.experiments.values() if _matches(e, query.get("filter"))]
            return self._reply(200, {"experiments": found, "total_size": len(found)})
        if method == "POST" and path == "/experiments":
            body = call.body = json.loads(raw)
            eid = fake.new_id("experiment")
            fake.experiments[eid] = {**body, "experiment_id": eid, "created_at": _now()}
            return self._reply(200, fake.experiments[eid])
        if method == "POST" and path == "/runs":
            call.body = json.loads(raw)
            return self._create_run(fake, call.body)
        m = re.fullmatch(r"/runs/([^/:]+)(:terminate)?", path)
        if m and m.group(1) in fake.runs:
            run = fake.runs[m.group(1)]
            if method == "GET" and not m.group(2):
                return self._reply(200, run.record)
            if method == "POST" and m.group(2):
                run.terminated = True
                run.record["state"] = "CANCELING"
                _kill(run)
                return self._reply(200, {})
        return self._error(404, f"no route for {method} {url.path}")

    def _upload_version(self, fake: FakeKfp, query: dict[str, str], raw: bytes) -> None:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
        )
        files = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
        if not files:
            return self._error(400, "no uploadfile in the form")
        spec = files[0].get_payload(decode=True).decode()
        docs = list(yaml.safe_load_all(spec))
        if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
            return self._error(400, "uploadfile is not a KFP pipeline spec")
        pid, name = query.get("pipelineid"), query.get("name")
        if pid not in fake.pipelines:
            return self._error(404, f"pipeline {pid} not found")
        if any(v["pipeline_id"] == pid and v["display_name"] == name for v in fake.versions.values()):
            return self._error(409, f"version {name} already exists")
        vid = fake.new_id("version")
        fake.versions[vid] = {
            "pipeline_id": pid,
            "pipeline_version_id": vid,
            "display_name": name,
            "name": name,
            "description": query.get("description", ""),
            "created_at": _now(),
        }
        fake.specs[vid] = spec
        return self._reply(200, fake.versions[vid])

    def _create_run(self, fake: FakeKfp, body: dict) -> None:
        ref = body.get("pipeline_version_reference") or {}
        vid = ref.get("pipeline_version_id")
        if vid not in fake.specs or fake.versions[vid]["pipeline_id"] != ref.get("pipeline_id"):
            return self._error(404, f"pipeline version {vid} not found")
        if body.get("experiment_id") not in fake.experiments:
            return self._error(404, f"experiment {body.get('experiment_id')} not found")
        parameters = (body.get("runtime_config") or {}).get("parameters") or {}
        inputs = next(yaml.safe_load_all(fake.specs[vid]))["root"]["inputDefinitions"]["parameters"]
        unknown = set(parameters) - set(inputs)
        missing = {k for k, v in inputs.items() if not v.get("isOptional") and k not in parameters}
        if unknown or missing:
            return self._error(400, f"bad run parameters: unknown {sorted(unknown)}, missing {sorted(missing)}")
        rid = fake.new_id("run")
        run = FakeRun({**body, "run_id": rid, "state": "PENDING", "created_at": _now()})
        fake.runs[rid] = run
        fake.start_run(run, fake.specs[vid], parameters)
        return self._reply(200, {**run.record, "state": "PENDING"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


def _execute(spec: str, params_file: str, root: str) -> int:
    """What the cluster does with a run: execute the spec with the run's parameters."""
    import warnings

    warnings.simplefilter("ignore")
    from kfp import components, local

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=root,
        workspace_root=str(Path(root).parent / "workspace"), raise_on_error=False,
    )
    task = components.load_component_from_file(spec)(**json.loads(Path(params_file).read_text()))
    return 0 if task.outputs else 1


if __name__ == "__main__":
    sys.exit(_execute(*sys.argv[1:4]))
